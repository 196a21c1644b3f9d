"""The SDXL prefix: vectors in both text encoders, its files as SDXL tools read them, and train/sample on SDXL.

The diffusers pair is loaded by diffusers' own `load_textual_inversion` (once per encoder) into a
StableDiffusionXLPipeline holding the same tiny weights; its prompt embeddings must equal ours.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_SDXL_CONFIG
from PIL import Image
from safetensors import safe_open

from ldm.modules.embedding_manager import EmbeddingFileError
from ldm.modules.prefix import PrefixSet, load_prefix, make_prefix, read_sdxl_embedding

pipelines = pytest.importorskip("bench.pipelines")
N = 4
PROMPT = "alz A close-up portrait of Tom Hanks, studio light"
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def prefix(tiny_sdxl):
    p = make_prefix(tiny_sdxl, "alz", N, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # small vectors, so that the prompt stays meaningful
        for v in p.embedding_parameters():
            v.mul_(0.1)
    return p


def test_the_prefix_has_vectors_in_each_encoders_space(tiny_sdxl, prefix):
    assert isinstance(prefix, PrefixSet) and prefix.names == {0: "clip_l", 1: "clip_g"}
    assert [tuple(p.shape) for p in prefix.embedding_parameters()] == [(N, 32), (N, 48)]
    with torch.no_grad():
        plain = tiny_sdxl.get_learned_conditioning([PROMPT, "a red car"])
        with_prefix = tiny_sdxl.get_learned_conditioning([PROMPT, "a red car"], embedding_manager=prefix)
    for key in ("crossattn", "vector"):  # both encoders and the pooled output see the prefix; the other row not
        assert (with_prefix[key][0] - plain[key][0]).abs().max() > 1e-3, key
        torch.testing.assert_close(with_prefix[key][1], plain[key][1])


def test_diffusers_pair_loads_into_the_sdxl_pipeline_and_matches(tiny_sdxl, tiny_sdxl_config, prefix, tmp_path):
    pipe = pipelines.sdxl_pipeline(tiny_sdxl_config, tiny_sdxl.state_dict())
    f_l, f_g = prefix.export_diffusers(tmp_path / "apl.safetensors")
    assert (f_l.name, f_g.name) == ("apl_clip_l.safetensors", "apl_clip_g.safetensors")
    pipe.load_textual_inversion(str(f_l), token="<alz>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(str(f_g), token="<alz>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    prompt = PROMPT.replace("alz", "<alz>")
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        ours = tiny_sdxl.get_learned_conditioning([PROMPT], embedding_manager=prefix)
    assert (embeds - ours["crossattn"]).abs().max() <= 1e-4
    assert (pooled - ours["vector"][:, : pooled.shape[1]]).abs().max() <= 1e-4


def test_a1111_sdxl_file_is_what_sdxl_tools_read(prefix, tmp_path):
    """AUTOMATIC1111/Forge: clip_l and clip_g, every entry of a .pt a tensor, only zip members its safe unpickler
    accepts; ComfyUI reads the key of each encoder ('clip_l', 'clip_g') from the .safetensors."""
    prefix.export_a1111(tmp_path / "APL.safetensors", step=7)
    prefix.save(tmp_path / "APL.pt")
    with safe_open(str(tmp_path / "APL.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"} and f.metadata()["step"] == "7"
    data = torch.load(tmp_path / "APL.pt", weights_only=True)
    assert set(data) == {"clip_l", "clip_g"} and all(isinstance(v, torch.Tensor) for v in data.values())
    with zipfile.ZipFile(tmp_path / "APL.pt") as z:
        assert all(re.match(r"^APL/((data/\d+)|version|(data\.pkl))$", n) for n in z.namelist()), z.namelist()
    for path in (tmp_path / "APL.safetensors", tmp_path / "APL.pt"):
        vectors, _ = read_sdxl_embedding(path)
        for name, em in prefix.by_name().items():
            torch.testing.assert_close(vectors[name], em.string_to_param_dict["alz"].detach())


def test_load_prefix_checks_family_and_widths(tiny_sdxl, tiny_model, prefix, tmp_path):
    prefix.save(tmp_path / "xl.safetensors", step=3)
    back = load_prefix(tiny_sdxl, tmp_path / "xl.safetensors")
    for a, b in zip(back.embedding_parameters(), prefix.embedding_parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(EmbeddingFileError, match="is an SDXL prefix .* single-encoder model"):
        load_prefix(tiny_model, tmp_path / "xl.safetensors")
    make_prefix(tiny_model, "alz", N).save(tmp_path / "v1.safetensors")
    with pytest.raises(EmbeddingFileError, match="single-encoder prefix .* 2 text encoders"):
        load_prefix(tiny_sdxl, tmp_path / "v1.safetensors")
    from safetensors.torch import save_file

    save_file({"clip_l": torch.rand(N, 768), "clip_g": torch.rand(N, 1280)}, tmp_path / "real.safetensors")
    with pytest.raises(EmbeddingFileError, match="'clip_l' vectors are 768-d but this model's encoder 0 is 32-d"):
        load_prefix(tiny_sdxl, tmp_path / "real.safetensors")


def _run(*args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_train_resume_and_sample_on_tiny_sdxl(tmp_path):
    """train.py and sample.py take the SDXL config with no other change: both encoders' vectors train, a resumed
    run equals the uninterrupted one, and the exports come out as SDXL files."""
    import train

    rng = np.random.default_rng(0)
    (tmp_path / "faces").mkdir()
    for name in ("Tom Hanks", "Emma Watson"):
        for i in range(2):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "faces" / f"{name}-{i}.png")

    def args(out, *extra):
        return ["--config_path", str(TINY_SDXL_CONFIG), "--face_dir", str(tmp_path / "faces"), "--outdir",
                str(tmp_path / out), "--cache_dir", str(tmp_path / "cache"), "--batch_size", "2", "--ddim_steps",
                "2", "--max_general", "2", "--num_vectors", str(N), "--save_every", "2", "--no-progress",
                *extra]  # fmt: skip

    assert train.main(args("full", "--iterations", "4", "--diffusers_config_path", "yes")) == 0
    assert train.main(args("part", "--iterations", "2")) == 0
    assert train.main(args("part", "--iterations", "4", "--resume", "auto")) == 0
    full, _ = read_sdxl_embedding(tmp_path / "full" / "embeddings" / "APL-4.safetensors")
    part, _ = read_sdxl_embedding(tmp_path / "part" / "embeddings" / "APL-4.pt")
    start = make_prefix(_tiny_sdxl_from(tmp_path), "alz", N, generator=torch.Generator().manual_seed(42))
    for name, em in start.by_name().items():
        assert torch.equal(full[name], part[name])
        assert (full[name] - em.string_to_param_dict["alz"].detach()).abs().mean() > 1e-4, f"{name} did not train"
    emb = tmp_path / "full" / "embeddings"
    assert all((emb / f"APL-4-diffusers_{name}.safetensors").is_file() for name in ("clip_l", "clip_g"))
    r = _run(ROOT / "sample.py", "--config_path", TINY_SDXL_CONFIG, "--embedding", emb / "APL-4.safetensors",
             "--prompt", "alz a portrait of Tom Hanks", "--n_samples", "1", "--steps", "2", "--outdir", "s",
             cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and (tmp_path / "s" / "00000.png").is_file(), r.stderr[-2000:]
    with Image.open(tmp_path / "s" / "00000.png") as im:
        assert im.size == (64, 64)  # the model's native size (SDXL base: 1024)


def _tiny_sdxl_from(tmp_path):
    """The random tiny SDXL that train.py builds for seed 42 (no checkpoint)."""
    from apl.runtime import load_model_for_cli

    return load_model_for_cli(TINY_SDXL_CONFIG, None, "cpu", torch.float32, seed=42)


def test_dataset_generation_and_test_id_take_the_sdxl_config(tmp_path, monkeypatch):
    """The evaluation scripts on the tiny SDXL with an SDXL prefix: images at the model's size, scored per mode."""
    import json

    import dataset_generation
    import test_id
    from toyworld.references import main as references

    monkeypatch.chdir(tmp_path)
    xl = ["--config_path", str(TINY_SDXL_CONFIG), "--steps", "2", "--n_samples", "2"]
    assert dataset_generation.main([*xl, "--names", "Anya Brandt", "--outdir", "faces"]) == 0
    with Image.open(tmp_path / "faces" / "Anya Brandt-0.png") as im:
        assert im.size == (64, 64)
    from ldm.checkpoint import build_model

    make_prefix(build_model(TINY_SDXL_CONFIG), "alz", N, generator=torch.Generator().manual_seed(0)).save(
        tmp_path / "xl.safetensors"
    )
    references(["--outdir", "refs", "--n", "1"])
    rc = test_id.main([*xl, "--embedding", "xl.safetensors", "--names", "Anya Brandt", "--gt_folder", "refs",
                       "--face_backend", "toyworld.perception:ToyFaceBackend", "--outdir", "tid"])  # fmt: skip
    assert rc == 0
    summary = json.loads((tmp_path / "tid" / "summary.json").read_text())
    assert {m: s["n_images"] for m, s in summary["modes"].items()} == {"with": 2, "without": 2}
    import test_fid_clip_score

    (tmp_path / "captions.txt").write_text("a red circle on a table\na blue square\n")
    rc = test_fid_clip_score.main([*xl, "--embedding", "xl.safetensors", "--prompts_file", "captions.txt",
                                   "--skip_clip", "--skip_fid", "--outdir", "q"])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "q" / "summary.json").read_text())["paired"]["n"] == 4
