"""CLIP byte-level BPE tokenizer (Radford et al. 2021), built offline from the merges file in open_clip_torch.

Matches the Hugging Face ``CLIPTokenizer`` (tokenizers backend) that Stable Diffusion v1 uses: NFC, lowercase,
the CLIP regex split, byte-level symbols, BPE merges with a ``</w>`` end-of-word suffix, BOS 49406, EOS 49407,
77 positions padded with EOS.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import os
import unicodedata
import zlib
from collections.abc import Sequence
from pathlib import Path

import regex
import torch

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges so that the vocabulary ends at 49408 entries
VOCAB_SIZE = 49408

# Special tokens are matched in the raw text, case-sensitively, before any normalisation (as HF's added tokens).
_SPECIAL_RE = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
# The CLIP pre-tokenizer: contractions, runs of letters, single digits, runs of anything else but whitespace.
# `regex` (not `re`) because Python's `re` has no \p{L}/\p{N}; `\s` in `regex` is Unicode White_Space, the same
# set the Rust tokenizers library uses (str.split() would also eat U+001C..U+001F, which HF keeps as tokens).
_WORD_RE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")
_SPACE_RE = regex.compile(r"\s+")
_CACHE_LIMIT = 200_000  # distinct words memoised per tokenizer
_ROW_CACHE_LIMIT = 20_000  # distinct whole prompts memoised per tokenizer (616 bytes each)


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of GPT-2/CLIP byte-level BPE (the order fixes the first 256 token ids)."""
    # Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP, soft hyphen) are
    # shifted to U+0100.. so that every byte is a visible, non-whitespace character the BPE can merge.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def default_bpe_path() -> Path:
    """Path of the CLIP BPE merges file that ships inside the open_clip_torch wheel (without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The CLIP BPE vocabulary ({BPE_FILE_NAME}) comes with the open_clip_torch package, which is not "
            "installed: pip install open_clip_torch, or pass bpe_path= to CLIPTokenizer."
        )
    return Path(next(iter(spec.submodule_search_locations))) / BPE_FILE_NAME


def load_bpe(bpe_path: str | os.PathLike | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Read the merges file and return (vocabulary in id order, merges in rank order)."""
    path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
    fix = "reinstall open_clip_torch or pass bpe_path= pointing to a valid bpe_simple_vocab_16e6.txt.gz"
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"CLIP BPE merges file not found: {path}; {fix}.") from e
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"CLIP BPE merges file {path} is unreadable or corrupt ({e}); {fix}.") from e
    # Line 0 is a version header; the next NUM_MERGES lines are "first second" pairs in merge order.
    body = lines[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in body]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        bad = next((i + 2 for i, m in enumerate(merges) if len(m) != 2), len(merges) + 2)
        raise ValueError(
            f"CLIP BPE merges file {path} is corrupt: expected {NUM_MERGES} merge lines of two symbols after the "
            f"header, found {len(merges)} lines with a problem at line {bad}; {fix}."
        )
    byte_chars = list(bytes_to_unicode().values())
    vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
    return vocab, merges  # type: ignore[return-value]


def _normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, lowercase (per character, as the Rust tokenizers normaliser does)."""
    text = _SPACE_RE.sub(" ", unicodedata.normalize("NFC", text))
    # str.lower() turns a word-final capital sigma into 'ς'; the reference lowercases char by char ('σ').
    return "".join(c.lower() for c in text) if "Σ" in text else text.lower()


class CLIPTokenizer:
    """CLIP BPE tokenizer for SD prompts: `tok(prompts)` gives (B, 77) ids, BOS + 75 content ids + EOS + padding.

    OpenAI's CLIP (SD v1, SDXL's first encoder) pads with EOS; OpenCLIP (SDXL's second encoder) pads with id 0
    (`pad_token_id=0`, the token '!'), and the padded positions differ in what the text encoder outputs there."""

    bos_token_id = 49406
    eos_token_id = 49407
    model_max_length = 77

    def __init__(self, bpe_path: str | os.PathLike | None = None, pad_token_id: int = 49407) -> None:
        self.pad_token_id = int(pad_token_id)
        vocab, merges = load_bpe(bpe_path)
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # Prompt sets repeat the same words thousands of times; BPE of a word is pure, so memoise it.
        self._cache: dict[str, tuple[str, ...]] = {}
        self._rows: dict[str, torch.Tensor] = {}  # whole prompts -> ids (never handed out: stack copies)
        if len(self.encoder) != VOCAB_SIZE:  # duplicate merges collapse vocabulary entries and shift every id
            raise ValueError(
                f"CLIP BPE merges file {bpe_path or default_bpe_path()} gives {len(self.encoder)} distinct tokens, "
                f"not {VOCAB_SIZE}; reinstall open_clip_torch or pass bpe_path= pointing to the CLIP file."
            )

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49408)."""
        return len(self.encoder)

    def bpe(self, word: str) -> tuple[str, ...]:
        """BPE symbols of one pre-token given as byte-level characters; the last symbol carries `</w>`."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            # Merge the lowest-ranked adjacent pair everywhere it occurs (left to right, no overlaps).
            pair = min(itertools.pairwise(symbols), key=lambda p: self.bpe_ranks.get(p, NUM_MERGES))
            if pair not in self.bpe_ranks:
                break
            first, second = pair
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        result = tuple(symbols)
        if len(self._cache) >= _CACHE_LIMIT:  # bound memory on endless streams of unique strings
            self._cache.clear()
        self._cache[word] = result
        return result

    def tokens(self, text: str) -> list[str]:
        """BPE token strings of `text`, without BOS/EOS, e.g. ['alz</w>']."""
        out: list[str] = []
        # re.split with a capture group keeps the special tokens at odd positions.
        for k, part in enumerate(_SPECIAL_RE.split(text)):
            if k % 2 == 1:
                out.append(part)
                continue
            for word in _WORD_RE.findall(_normalize(part)):
                out.extend(self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return out

    def encode(self, text: str) -> list[int]:
        """Content token ids of `text`: no BOS/EOS, no truncation."""
        return [self.encoder[t] for t in self.tokens(text)]

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest run of `text`'s leading words (split at whitespace, so the text stays as written) that is at
        most `max_tokens` content tokens; `text` itself when it fits."""
        if len(self.encode(text)) <= max_tokens:
            return text
        words = text.split()
        lo, hi = 0, len(words)  # invariant: words[:lo] fits, words[:hi + 1] does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.encode(" ".join(words[:mid]))) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, lowercase, words separated by spaces; BOS/EOS/padding are skipped."""
        specials = (self.bos_token_id, self.eos_token_id)
        try:
            pieces = [self.decoder[int(i)] for i in ids if int(i) not in specials]
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is outside the CLIP vocabulary (0..{VOCAB_SIZE - 1})") from None
        # '</w>' is made of printable ASCII, so it survives the byte decoding and marks the word ends.
        data = bytes(self.byte_decoder[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """(B, 77) ids: BOS, the first 75 content ids, EOS, then padding (EOS unless pad_token_id says otherwise)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return torch.full((0, self.model_max_length), self.pad_token_id, dtype=torch.long)  # type: ignore
        return torch.stack([self._row(text) for text in texts])  # type: ignore[return-value]

    def _row(self, text: str) -> torch.Tensor:
        """One prompt's (77,) ids, cached: training draws its prompts from a small set, over and over."""
        row = self._rows.get(text)
        if row is None:
            n = self.model_max_length
            ids = [self.bos_token_id, *self.encode(text)[: n - 2], self.eos_token_id]
            row = torch.full((n,), self.pad_token_id, dtype=torch.long)
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
            if len(self._rows) >= _ROW_CACHE_LIMIT:
                self._rows.clear()
            self._rows[text] = row
        return row

    def token_id(self, word: str) -> int:
        """Id of `word` if it is exactly one BPE token (as a placeholder must be); ValueError otherwise."""
        pieces = self.tokens(word)
        if len(pieces) != 1 or pieces[0] in (BOS_TOKEN, EOS_TOKEN):
            raise ValueError(
                f"{word!r} is not a single CLIP token: it tokenizes to {len(pieces)} pieces {pieces}. "
                "Pick another word that is one token (e.g. 'alz', id 41128); check with CLIPTokenizer().tokens(word)."
            )
        return self.encoder[pieces[0]]
