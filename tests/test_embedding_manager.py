"""EmbeddingManager: the insertion rule against plain-Python references, gradients, file formats and exports."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.modules.embedding_manager import EmbeddingFileError, EmbeddingManager, read_embedding_file

ALZ = 41128
N = 10
WIDTH = 32  # CLIP width of the tiny test model
PORTRAIT = "a close-up portrait of a man"


@pytest.fixture(scope="module")
def embedder(tiny_model):
    return tiny_model.cond_stage_model


@pytest.fixture()
def em(embedder):
    return EmbeddingManager(embedder, ["alz"], num_vectors_per_token=N, generator=torch.Generator().manual_seed(7))


def expand_reference(ids: list[int], rows: list[torch.Tensor], vectors: dict[int, torch.Tensor]) -> torch.Tensor:
    """Straightforward rule: every placeholder token becomes its N vectors, then the row is cut to its length."""
    out: list[torch.Tensor] = []
    for token, row in zip(ids, rows, strict=True):
        out.extend(vectors[token].unbind(0) if token in vectors else [row])
    return torch.stack(out[: len(ids)])


def expand_like_original(ids: torch.Tensor, emb: torch.Tensor, vectors: dict[int, torch.Tensor]) -> torch.Tensor:
    """The original's loop: occurrences right to left over the batch, cutting back to L after each insertion."""
    ids, emb, L = ids.clone(), emb.clone(), ids.shape[1]
    for token, vec in vectors.items():
        rows, cols = torch.where(ids == token)
        order = torch.argsort(cols, descending=True)
        for r, c in zip(rows[order].tolist(), cols[order].tolist(), strict=True):
            ids[r] = torch.cat([ids[r, :c], torch.full((vec.shape[0],), token), ids[r, c + 1:]])[:L]
            emb[r] = torch.cat([emb[r, :c], vec, emb[r, c + 1:]])[:L]
    return emb


LONG_END = " ".join(["photo"] * 68) + " alz x y z"  # the placeholder near the 77 limit: its vectors get cut
LONG_START = "alz " + " ".join(["photo"] * 74)  # 75 content tokens: the insertion pushes EOS and 9 words out
PROMPTS = ["alz a photo of a dog", "a photo of alz on the beach", "alz x alz", "a photo of a dog", LONG_END,
           LONG_START, ""]


def test_insertion_matches_references(embedder, em):
    ids = embedder.tokenize(PROMPTS)
    emb = embedder.transformer.text_model.embeddings.token_embedding(ids)
    out = em(ids, emb)
    assert out.shape == (len(PROMPTS), 77, WIDTH)
    vectors = {ALZ: em.string_to_param_dict["alz"].detach()}
    for b in range(len(PROMPTS)):
        ref = expand_reference(ids[b].tolist(), list(emb[b].unbind(0)), vectors)
        assert torch.equal(out[b], ref), PROMPTS[b]
    assert torch.equal(out, expand_like_original(ids, emb, vectors))
    # Rows are independent of the batch they are in; rows without the placeholder are untouched.
    for b, p in enumerate(PROMPTS):
        assert torch.equal(em(ids[b:b + 1], emb[b:b + 1])[0], out[b]), p
    assert torch.equal(out[3], emb[3]) and torch.equal(out[6], emb[6])
    assert not torch.equal(out[0], emb[0])


def test_insertion_layout(embedder, em):
    """Code each token embedding as id*100+position and each vector as -(k+1): the output spells its layout."""
    prompts = ["alz x alz", LONG_START, LONG_END]
    ids = embedder.tokenize(prompts)
    code = (ids * 100 + torch.arange(77)).float()
    emb = torch.zeros(len(prompts), 77, WIDTH)
    emb[..., 0] = code
    with torch.no_grad():
        em.string_to_param_dict["alz"].zero_()
        em.string_to_param_dict["alz"][:, 0] = -torch.arange(1.0, N + 1)
    out = em(ids, emb)[..., 0]
    vec = [-float(k) for k in range(1, N + 1)]
    bos, eos = 49406 * 100.0, 49407 * 100.0
    x = ids[0, 2].item() * 100.0 + 2
    # "alz x alz": BOS, 10 vectors, x, 10 vectors, EOS, then the EOS padding shifted right by 18.
    assert out[0, :23].tolist() == [bos, *vec, x, *vec, eos + 4]
    assert out[0, 23:].tolist() == (eos + torch.arange(5, 59)).tolist()
    # Placeholder first in a full prompt: 10 vectors then the first 66 words; the final EOS is cut (as the original).
    assert out[1, :11].tolist() == [bos, *vec]
    assert out[1, 11:].tolist() == code[1, 2:68].tolist()
    assert eos + 76 not in out[1].tolist()
    # Placeholder at position 69: only 8 of its vectors fit, everything after it is cut.
    assert ids[2, 69].item() == ALZ
    assert out[2, :69].tolist() == code[2, :69].tolist() and out[2, 69:].tolist() == vec[:8]


def test_get_learned_conditioning_and_gradients(tiny_model, em):
    prompts = ["alz a photo", "a photo"]
    c = tiny_model.get_learned_conditioning(prompts, embedding_manager=em)
    with torch.no_grad():
        plain = tiny_model.get_learned_conditioning(prompts)
    assert c.shape == (2, 77, WIDTH)
    assert torch.equal(c[1], plain[1])
    assert (c[0] - plain[0]).abs().max() > 1e-3
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    loss = tiny_model.apply_model(x, t, c).square().mean()
    loss.backward()
    (param,) = em.embedding_parameters()
    assert param.dtype == torch.float32 and param.grad is not None and param.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in tiny_model.parameters())
    assert [n for n, _ in em.named_parameters()] == ["string_to_param_dict.alz"]  # no CLIP weights inside


def test_dtype_and_init(embedder, em):
    ids = embedder.tokenize(["alz a photo"])
    emb = embedder.transformer.text_model.embeddings.token_embedding(ids).to(torch.bfloat16)
    out = em(ids, emb)
    assert out.dtype == torch.bfloat16 and em.string_to_param_dict["alz"].dtype == torch.float32
    assert torch.equal(out[0, 1:11], em.string_to_param_dict["alz"].detach().to(torch.bfloat16))
    # Default init: uniform [0, 1) from the generator, reproducible.
    p = em.string_to_param_dict["alz"]
    assert p.shape == (N, WIDTH) and 0 <= p.min() and p.max() < 1 and p.std() > 0.1
    again = EmbeddingManager(embedder, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.string_to_param_dict["alz"], p) and em.string_to_token_dict == {"alz": ALZ}
    # Init from a word: the mean of its token embeddings, N times.
    word = EmbeddingManager(embedder, ["alz"], num_vectors_per_token=3, initializer_words=["face photo"])
    table = embedder.transformer.text_model.embeddings.token_embedding.weight
    expected = table[embedder.tokenizer.encode("face photo")].mean(0)
    assert torch.allclose(word.string_to_param_dict["alz"], expected.expand(3, WIDTH))


@pytest.mark.parametrize(("word", "pieces"), [("Tom Hanks", ["tom</w>", "hanks</w>"]),
                                              ("anonymization", ["an", "ony", "mi", "zation</w>"])])
def test_placeholder_must_be_one_token(embedder, word, pieces):
    with pytest.raises(ValueError, match="not a single CLIP token") as e:
        EmbeddingManager(embedder, [word])
    assert str(pieces) in str(e.value) and "Pick another word" in str(e.value)


def test_unknown_options_refused(embedder):
    with pytest.raises(TypeError, match="unknown argument 'num_vector'"):
        EmbeddingManager(embedder, num_vector=3)
    with pytest.raises(ValueError, match="progressive_words"):
        EmbeddingManager(embedder, progressive_words=True)
    EmbeddingManager(embedder, progressive_words=False)  # the original's config value is accepted


def original_file(path, vectors: torch.Tensor, name: str = "alz", token: int = ALZ) -> None:
    """A file as the original code wrote it: 0-d token tensor (a view) and a real ParameterDict module."""
    torch.save({"string_to_token": {name: torch.tensor([[49406, token]])[0, 1]},
                "string_to_param": nn.ParameterDict({name: nn.Parameter(vectors)})}, path)


def test_original_pt_layout(embedder, em, tmp_path):
    vectors = torch.randn(N, WIDTH, generator=torch.Generator().manual_seed(3))
    original_file(tmp_path / "orig.pt", vectors)
    tokens, params, meta = read_embedding_file(tmp_path / "orig.pt")
    assert tokens == {"alz": ALZ} and meta["format"] == "original" and type(params["alz"]) is torch.Tensor
    assert torch.equal(params["alz"], vectors)
    param = em.string_to_param_dict["alz"]
    em.load(tmp_path / "orig.pt")
    assert em.string_to_param_dict["alz"] is param and torch.equal(param, vectors)  # in place: optimisers stay valid
    state = torch.random.get_rng_state()
    assert torch.equal(EmbeddingManager.from_file(embedder, tmp_path / "orig.pt").string_to_param_dict["alz"], vectors)
    assert torch.equal(torch.random.get_rng_state(), state)  # loading does not shift the user's random stream
    # Our .pt writer produces the same layout, readable by the original's plain torch.load.
    em.save(tmp_path / "ours.pt")
    raw = torch.load(tmp_path / "ours.pt", weights_only=False)
    assert set(raw) == {"string_to_token", "string_to_param"} and isinstance(raw["string_to_param"], nn.ParameterDict)
    assert raw["string_to_token"]["alz"].ndim == 0 and raw["string_to_token"]["alz"].item() == ALZ
    assert torch.equal(raw["string_to_param"]["alz"], vectors)
    assert sorted(os.listdir(tmp_path)) == ["orig.pt", "ours.pt"]  # no temporary files left behind


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_refused(em, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_token": {"alz": torch.tensor(ALZ)}, "string_to_param": _Evil(str(marker))}, path)
    with pytest.raises(EmbeddingFileError, match=r"refused to load .*evil\.pt.*(system|posix)"):
        em.load(path)
    with pytest.raises(EmbeddingFileError, match="refused to load"):
        read_embedding_file(path)
    assert not marker.exists()


def test_bad_files(embedder, em, tmp_path):
    em.save(tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EmbeddingFileError, match=r"cut\.pt.*truncated"):
        em.load(tmp_path / "cut.pt")
    em.save(tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(EmbeddingFileError, match=r"cut\.safetensors.*truncated"):
        em.load(tmp_path / "cut.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(EmbeddingFileError, match="empty"):
        em.load(tmp_path / "empty.pt")
    with pytest.raises(EmbeddingFileError, match="not found"):
        em.load(tmp_path / "missing.pt")
    original_file(tmp_path / "sd15.pt", torch.rand(N, 768))  # a real SD v1 file into the 32-wide tiny model
    with pytest.raises(EmbeddingFileError, match=r"sd15\.pt.*768-d \(SD v1.x.*text encoder is 32-d"):
        em.load(tmp_path / "sd15.pt")
    original_file(tmp_path / "n4.pt", torch.rand(4, WIDTH))
    with pytest.raises(EmbeddingFileError, match="4 vectors .* num_vectors_per_token=10"):
        em.load(tmp_path / "n4.pt")
    assert EmbeddingManager.from_file(embedder, tmp_path / "n4.pt").num_vectors_per_token == 4
    original_file(tmp_path / "cat.pt", torch.rand(N, WIDTH), name="cat", token=2368)
    with pytest.raises(EmbeddingFileError, match=r"placeholders \['cat'\] but this manager has \['alz'\]"):
        em.load(tmp_path / "cat.pt")
    original_file(tmp_path / "wrong_id.pt", torch.rand(N, WIDTH), token=123)
    with pytest.raises(EmbeddingFileError, match="token id 123 in the file but 41128"):
        em.load(tmp_path / "wrong_id.pt")
    torch.save({"clip_g": torch.zeros(1, 1280), "clip_l": torch.zeros(1, 768)}, tmp_path / "sdxl.pt")
    with pytest.raises(EmbeddingFileError, match="SDXL"):
        em.load(tmp_path / "sdxl.pt")
    torch.save({"state_dict": {"model.x": torch.zeros(1)}}, tmp_path / "model.ckpt")
    with pytest.raises(EmbeddingFileError, match="is a model checkpoint"):
        em.load(tmp_path / "model.ckpt")
    save_file({"model.diffusion_model.x": torch.zeros(4, 3), "first_stage_model.y": torch.zeros(2)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(EmbeddingFileError, match="is a model checkpoint .* pass the model with --ckpt_path"):
        em.load(tmp_path / "model.safetensors")
    (tmp_path / "lfs.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    with pytest.raises(EmbeddingFileError, match="Git LFS pointer"):
        em.load(tmp_path / "lfs.pt")
    (tmp_path / "text.pt").write_bytes(b"just some text")
    with pytest.raises(EmbeddingFileError, match="not a PyTorch embedding file") as e:
        em.load(tmp_path / "text.pt")
    assert "run code" not in str(e.value)
    (tmp_path / "st.pt").write_bytes((tmp_path / "good.safetensors").read_bytes())  # safetensors under .pt: read
    em.load(tmp_path / "st.pt")
    with pytest.raises(ValueError, match="unknown file type"):
        em.save(tmp_path / "x.txt")


def test_safetensors_round_trip(embedder, em, tmp_path):
    path = tmp_path / "APL-9999.safetensors"
    em.save(path, step=9999, base_model="v1-5-pruned-emaonly.ckpt")
    assert set(load_file(path)) == {"string_to_param.alz"}
    tokens, params, meta = read_embedding_file(path)
    assert tokens == {"alz": ALZ} and torch.equal(params["alz"], em.string_to_param_dict["alz"].detach())
    assert meta == {"format": "apl-embedding", "format_version": 1, "num_vectors": N, "step": 9999, "width": WIDTH,
                    "base_model": "v1-5-pruned-emaonly.ckpt", "placeholders": ["alz"], "token_ids": {"alz": ALZ}}
    other = EmbeddingManager.from_file(embedder, path)
    assert torch.equal(other.string_to_param_dict["alz"], em.string_to_param_dict["alz"])
    assert other.metadata["step"] == 9999
    assert os.listdir(tmp_path) == [path.name]


def test_a1111_export(embedder, em, tmp_path):
    em.export_a1111(tmp_path / "apl.pt", step=9999)
    data = torch.load(tmp_path / "apl.pt", weights_only=True)
    assert type(data) is dict and set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                                               "sd_checkpoint_name", "apl_width", "apl_base_model"}
    assert data["apl_width"] == str(WIDTH)
    assert data["string_to_token"] == {"*": 265} and data["name"] == "<apl>" and data["step"] == 9999
    assert data["sd_checkpoint"] is None and data["sd_checkpoint_name"] is None
    assert type(data["string_to_param"]) is dict and set(data["string_to_param"]) == {"*"}
    vec = data["string_to_param"]["*"]
    assert type(vec) is torch.Tensor and vec.shape == (N, WIDTH) and vec.dtype == torch.float32
    assert torch.equal(vec, em.string_to_param_dict["alz"].detach())
    em.export_a1111(tmp_path / "apl.safetensors", name="<anon>")
    assert set(load_file(tmp_path / "apl.safetensors")) == {"emb_params"}
    for f in ("apl.pt", "apl.safetensors"):  # both load back into an `alz` manager
        back = EmbeddingManager.from_file(embedder, tmp_path / f)
        assert back.string_to_token_dict == {"alz": ALZ} and torch.equal(back.string_to_param_dict["alz"], vec)


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model, tiny_config):
    """A diffusers StableDiffusionPipeline with the tiny model's weights converted by diffusers/transformers."""
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    from test_model_parity import diffusers_unet, diffusers_vae, hf_text_model

    from ldm.modules.encoders.tokenizer import load_bpe

    sd = tiny_model.state_dict()
    vocab, merges = load_bpe()
    # transformers 5.x ignores vocab_file=; vocab=/merges= build the same tokenizer from the open_clip BPE file.
    tokenizer = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                                           pad_token="<|endoftext|>", model_max_length=77)
    assert len(tokenizer) == 49408
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return diffusers.StableDiffusionPipeline(
        vae=diffusers_vae(tiny_config, sd), text_encoder=hf_text_model(tiny_model, sd), tokenizer=tokenizer,
        unet=diffusers_unet(tiny_config, sd), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def test_diffusers_export_matches_our_encoder(tiny_model, em, tiny_pipeline, tmp_path):
    pipe = tiny_pipeline
    with torch.no_grad():
        ours = tiny_model.get_learned_conditioning([f"alz {PORTRAIT}"], embedding_manager=em)
    with pytest.raises(ValueError, match="already in the CLIP vocabulary"):
        em.export_diffusers(tmp_path / "x.safetensors", token="alz")  # diffusers' loader would refuse it
    # diffusers lower-cases the prompt: '<ALZ>' would match its first vector only; tokens with spaces split.
    for bad, message in (("<ALZ>", "has capitals.*Use '<alz>'"), ("<a lz>", "without spaces")):
        with pytest.raises(ValueError, match=message):
            em.export_diffusers(tmp_path / "x.safetensors", token=bad)
        with pytest.raises(ValueError, match=message):
            em.export_a1111(tmp_path / "x.pt", name=bad)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.pt").exists()
    em.export_diffusers(tmp_path / "alz.safetensors")
    em.export_diffusers(tmp_path / "alz.bin", token="<alz-bin>")
    em.export_a1111(tmp_path / "alz-a1111.pt")
    assert set(load_file(tmp_path / "alz.safetensors")) == {"<alz>"}
    n_words = len(tiny_model.cond_stage_model.tokenizer.encode(PORTRAIT))
    # Each file goes through diffusers' own loader; diffusers expands a token into <t>, <t>_1, ..., <t>_9.
    # The A1111 file without token=: diffusers takes the file's name, '<alz-a1111>' (lower case: all N vectors).
    for path, token in [("alz.safetensors", "<alz>"), ("alz.bin", "<alz-bin>"), ("alz-a1111.pt", None)]:
        pipe.load_textual_inversion(str(tmp_path / path), token=token)
        token = token or "<alz-a1111>"
        prompt = f"{token} {PORTRAIT}"
        ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer)).input_ids
        assert len(ids) == 1 + N + n_words + 1 and min(ids[1:1 + N]) >= 49408
        with torch.no_grad():
            theirs, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
        assert theirs.shape == ours.shape
        assert (theirs - ours).abs().max() <= 1e-4, path
    # Loaded back into our manager, the diffusers file gives the same vectors.
    back = EmbeddingManager.from_file(tiny_model.cond_stage_model, tmp_path / "alz.safetensors")
    assert torch.equal(back.string_to_param_dict["alz"], em.string_to_param_dict["alz"])


# What AUTOMATIC1111's modules/safe.py accepts in a .pt: zip members, and the globals its unpickler allows.
A1111_ZIP_MEMBER = r"^([^/]+)/((data/\d+)|version|(data\.pkl))$"
A1111_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("__builtin__", "set"),
    *(("torch", s) for s in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                             "ByteStorage", "BFloat16Storage", "float32")),
}


def _pickle_globals(data: bytes) -> set[tuple[str, str]]:
    import pickletools

    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.add(tuple(strings[-2:]))
    return found


def test_pt_files_pass_automatic1111s_loader_checks(em, tmp_path):
    """torch.save adds zip members (.format_version, byteorder, ...) that A1111 refuses as 'malicious'; our .pt
    files hold only data.pkl (first), data/<n> and version, and only globals A1111's unpickler allows."""
    import re
    import zipfile

    em.save(tmp_path / "APL.pt")
    em.export_a1111(tmp_path / "APL-a1111.pt")
    em.export_diffusers(tmp_path / "apl-diffusers.bin")
    for path in (tmp_path / "APL.pt", tmp_path / "APL-a1111.pt", tmp_path / "apl-diffusers.bin"):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            assert all(re.match(A1111_ZIP_MEMBER, n) for n in names), names
            # the zip folder is the final file's stem, as torch.save(obj, path) names it; never a temporary name
            assert {n.split("/")[0] for n in names} == {path.stem}, names
            assert names[0].endswith("/data.pkl")
            assert _pickle_globals(z.read(names[0])) <= A1111_GLOBALS
        _, params, _ = read_embedding_file(path)
        assert torch.equal(next(iter(params.values())), em.string_to_param_dict["alz"].detach())
        loaded = torch.load(path, weights_only=False, mmap=True)
        assert loaded.get("string_to_param", loaded.get("<alz>")) is not None


@pytest.mark.parametrize(
    ("value", "message"),
    [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"), (1e30, r"values up to 1e\+30")],
)
def test_broken_vectors_are_refused_when_read_and_when_written(embedder, em, tmp_path, value, message):
    """A prefix with NaN/inf or absurd values would draw black images that score as 'anonymous': every file read
    or written names the entry and the vectors instead."""
    bad = em.string_to_param_dict["alz"].detach().clone()
    bad[3, :2] = value
    save_file({"string_to_param.alz": bad}, tmp_path / "bad.safetensors")
    torch.save({"<alz>": bad}, tmp_path / "bad.bin")
    for path in (tmp_path / "bad.safetensors", tmp_path / "bad.bin"):
        with pytest.raises(EmbeddingFileError, match=rf"{path.name}: entry .*{message}.*vector\(s\) 3 of {N}"):
            read_embedding_file(path)
    with torch.no_grad():
        em.string_to_param_dict["alz"].copy_(bad)
    writers = [lambda p: em.save(p), lambda p: em.export_a1111(p), lambda p: em.export_diffusers(p)]
    for write, name in zip(writers, ("out.pt", "out-a1111.safetensors", "out.bin"), strict=True):
        with pytest.raises(EmbeddingFileError, match=rf"refusing to write .*{name}.*{message}"):
            write(tmp_path / name)
        assert not (tmp_path / name).exists()
    torch.save({"<alz>": bad.to(torch.int8)}, tmp_path / "int.bin")
    with pytest.raises(EmbeddingFileError, match="not a float tensor"):
        read_embedding_file(tmp_path / "int.bin")


def test_normal_init_has_the_scale_of_token_embeddings(embedder):
    """--init normal starts at the per-dimension mean and spread of the CLIP token embeddings (seeded)."""
    table = embedder.transformer.text_model.embeddings.token_embedding.weight.detach()
    make = lambda seed: EmbeddingManager(  # noqa: E731
        embedder, ["alz"], 64, generator=torch.Generator().manual_seed(seed), init="normal"
    ).string_to_param_dict["alz"].detach()
    v = make(0)
    assert torch.equal(v, make(0)) and not torch.equal(v, make(1))
    torch.testing.assert_close(v.mean(0), table.mean(0), atol=4 * float(table.std(0).max()) / 8, rtol=0)
    assert 0.7 < float(v.std(0).mean() / table.std(0).mean()) < 1.3
    with pytest.raises(ValueError, match="init must be one of"):
        EmbeddingManager(embedder, ["alz"], 4, init="zeros")
