"""ldm.sampling on the tiny model (per-image eta noise), sample.py flags and prompt files, export_prefix.py --out."""

from __future__ import annotations

import pytest
import torch

import export_prefix
import sample
from apl.runtime import TINY_CONFIG
from ldm.modules.embedding_manager import EmbeddingManager, read_embedding_file
from ldm.sampling import noise_seed, start_codes, step_noises, txt2img_latents

TINY = ["--config_path", str(TINY_CONFIG), "--steps", "2"]


# ------------------------------------------------------------------------------------------------------ ldm.sampling
def test_eta_noise_is_per_image_so_batches_do_not_change_images(tiny_model):
    kw = {"steps": 3, "scale": 2.0, "eta": 1.0, "height": 64, "width": 64}
    pair = txt2img_latents(tiny_model, ["a red car", "a blue bird"], [11, 12], **kw)
    alone = [txt2img_latents(tiny_model, [p], [s], **kw)[0] for p, s in (("a red car", 11), ("a blue bird", 12))]
    for b in range(2):
        torch.testing.assert_close(pair[b], alone[b], atol=1e-4, rtol=1e-4)
    # eta > 0 really adds noise (the images differ from eta = 0) ...
    assert (txt2img_latents(tiny_model, ["a red car"], [11], **(kw | {"eta": 0.0}))[0] - alone[0]).abs().max() > 1e-3
    # ... from a stream of its own: not the start code of the image, nor of the next seed (sample.py uses seed + i).
    shape = (4, 8, 8)
    first = step_noises([11], shape, 2)[0][0]
    assert not torch.allclose(first, start_codes([11], shape)[0]) and not torch.allclose(
        first, start_codes([12], shape)[0]
    )
    assert noise_seed(11) != noise_seed(12) and 0 <= noise_seed(11) < 2**63


# --------------------------------------------------------------------------------------------------------- sample.py
@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--H", "-8"], "argument --H: expected a positive integer, got -8"),
        (["--W", "12"], "argument --W: expected a positive multiple of 8"),
        (["--batch_size", "0"], "argument --batch_size: expected a positive integer, got 0"),
        (["--n_samples", "0"], "argument --n_samples: expected a positive integer, got 0"),
        (["--steps", "0"], "argument --steps: 0 is not an integer in [1, 500]"),
    ],
)
def test_sample_rejects_bad_sizes_and_counts_up_front(flags, needle, capsys):
    with pytest.raises(SystemExit) as info:
        sample.main([*TINY, *flags])
    err = capsys.readouterr().err
    assert info.value.code == 2 and needle in err and "Traceback" not in err, err


def test_sample_from_file_reads_indexed_captions(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("0 A man riding a horse .\n1 Two dogs on a beach\n")
    out = tmp_path / "s"
    rc = sample.main([*TINY, "--from_file", str(prompts), "--n_samples", "1", "--outdir", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = [line.split("\t") for line in (out / "prompts.txt").read_text().splitlines()]
    assert [r[2] for r in rows] == ["A man riding a horse .", "Two dogs on a beach"]
    assert (out / "00001.png").is_file() and (out / "grid.png").is_file()


# -------------------------------------------------------------------------------------------------- export_prefix.py
@pytest.fixture(scope="module")
def prefix_file(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("prefix") / "APL-3.pt"
    em = EmbeddingManager(
        tiny_model.cond_stage_model, ["alz"], num_vectors_per_token=2, generator=torch.Generator().manual_seed(0)
    )
    em.save(path, step=3)
    return path


def test_export_writes_exactly_the_out_path_or_refuses(tmp_path, capsys, prefix_file):
    for fmt, name in (("safetensors", "x.safetensors"), ("pt", "y.PT")):
        out = tmp_path / name
        assert export_prefix.main([str(prefix_file), "--format", fmt, "--out", str(out)]) == 0
        assert capsys.readouterr().out.strip().startswith(f"wrote {out}: 2 vectors, 32-d")
        _, params, _ = read_embedding_file(out)
        torch.testing.assert_close(params["alz"], read_embedding_file(prefix_file)[1]["alz"])
    for fmt, name, hint in (
        ("safetensors", "z.pt", "use --out " + str(tmp_path / "z.safetensors") + " (or --format pt)"),
        ("pt", "w", "has no suffix; use --out " + str(tmp_path / "w.pt")),
    ):
        rc = export_prefix.main([str(prefix_file), "--format", fmt, "--out", str(tmp_path / name)])
        captured = capsys.readouterr()
        assert rc == 2 and captured.err.startswith(f"export_prefix.py: error: --format {fmt} writes a .{fmt} file")
        assert hint in captured.err and not captured.out, captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors", "y.PT"]  # nothing written when refused
