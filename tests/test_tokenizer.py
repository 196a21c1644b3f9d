"""Our CLIP BPE tokenizer against the Hugging Face CLIPTokenizer built from the same merges file."""

import gzip
import random

import pytest
import torch

from ldm.modules.encoders.tokenizer import CLIPTokenizer, default_bpe_path

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "A photo of Tom Hanks",
    "alz A close-up portrait of Scarlett Johansson, smiling.",
    "Hello,   world!!  How's it going?? (fine) [ok] {x} #tag @user 50% $3.99 a+b=c ... --- ;:",
    "CAPITALS and MiXeD CaSe WORDS",
    "café naïve résumé über Ñandú Ørsted Straße",
    "cafe\u0301 nai\u0308ve u\u0308ber N\u0303andu\u0301",  # combining forms: NFC must equal the precomposed ones
    "emoji 😀🔥👩‍👩‍👧 ❤️ ✨ 🇫🇷",
    "digits 1234567890 and 3.14159 and 2024-01-01 and 10,000",
    "it's don't they're we've I'm you'll he'd IT'S DON'T 'quoted' ''s",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines\r\n end  ",
    "",
    "   ",
    "日本語のテキスト 中文文本 한국어 텍스트",
    "Русский текст, Ελληνικά ΟΔΟΣ ΣΑΣ, עברית, العربية, हिन्दी नमस्ते, ไทย",
    "İstanbul ß ǅ ﬁ ﬀ Ⅻ ½ ² ①",
    "weird\x1cspaces\x85here\xa0and\u2000there\u3000and\u200bzero\ufeffwidth",
    "special <|endoftext|> inside<|startoftext|>text <|ENDOFTEXT|>",
    "</w> <w> <|> &amp; &lt;b&gt; \\n \\t",
    "a " * 100,  # > 75 tokens: truncation
    "The quick brown fox jumps over the lazy dog. " * 12,
]


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def reference():
    """transformers' CLIPTokenizer with the vocab and merges built independently from the same .gz file."""
    with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    # GPT-2 byte-to-unicode table, written out differently from the module's version on purpose.
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    rest = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + n) for n in range(len(rest))]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = transformers.CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=merges,
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    assert len(tok) == 49408, "the reference tokenizer did not take the vocabulary (transformers API change?)"
    assert tok.pad_token_id == 49407 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    return tok


def test_alz_is_one_token(ours):
    assert ours.encode("alz") == [41128]
    assert ours.tokens("alz") == ["alz</w>"]
    assert ours.token_id("alz") == 41128
    assert ours.token_id(" ALZ ") == 41128
    assert ours.vocab_size == 49408


def test_token_id_rejects_multi_token_words(ours):
    with pytest.raises(ValueError, match=r"tom</w>.*hanks</w>") as info:
        ours.token_id("Tom Hanks")
    assert "another word" in str(info.value)
    with pytest.raises(ValueError, match="0 pieces"):
        ours.token_id("   ")
    with pytest.raises(ValueError, match="not a single CLIP token"):
        ours.token_id("<|endoftext|>")


@pytest.mark.parametrize("text", PROMPTS, ids=range(len(PROMPTS)))
def test_ids_match_transformers(ours, reference, text):
    want = reference(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = ours(text)
    assert got.dtype == torch.long and got.shape == (1, 77)
    assert got.tolist() == want.tolist()
    # Content ids without truncation and the token strings agree too.
    ref_ids = reference(text, add_special_tokens=False).input_ids
    assert ours.encode(text) == ref_ids
    assert ours.tokens(text) == reference.convert_ids_to_tokens(ref_ids)
    assert ours.decode(got[0].tolist()) == reference.decode(want[0].tolist(), skip_special_tokens=True)


def test_batch_padding_and_truncation(ours, reference):
    batch = ours(PROMPTS)
    want = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(batch, want)
    assert batch.shape == (len(PROMPTS), 77)
    assert (batch[:, 0] == 49406).all()
    empty = ours("")[0]
    assert empty[0] == 49406 and (empty[1:] == 49407).all()  # SD v1 pads with EOS
    long = ours("a " * 100)[0]
    assert long.tolist() == [49406] + [320] * 75 + [49407]


def test_combining_forms_equal_precomposed(ours):
    assert ours.encode("cafe\u0301 N\u0303") == ours.encode("café Ñ")
    assert ours.encode("Café") == ours.encode("café")


def test_random_text_matches_transformers(ours, reference):
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,!?'-\t\néüÑß日本😀ΣΑ") + ["'s", "'re", " "]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert ours.encode(text) == reference(text, add_special_tokens=False).input_ids, repr(text)


def test_decode_roundtrip(ours):
    assert ours.decode(ours.encode("A photo of  Tom Hanks, smiling!")) == "a photo of tom hanks , smiling !"
    with pytest.raises(ValueError, match="outside the CLIP vocabulary"):
        ours.decode([49408])


def test_missing_or_corrupt_bpe_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="reinstall open_clip_torch or pass bpe_path"):
        CLIPTokenizer(tmp_path / "nope.txt.gz")
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="reinstall open_clip_torch or pass bpe_path"):
        CLIPTokenizer(bad)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match=r"short\.txt\.gz.*corrupt"):
        CLIPTokenizer(short)


def test_tokenizer_rows_cannot_be_mutated_through_results():
    tok = CLIPTokenizer()
    for arg in ("a red car", ["a red car"], ["a red car", "a cat"]):
        ids = tok(arg)
        want = ids.clone()
        ids[0, 1] = 0
        assert torch.equal(tok(arg), want)
