"""APL training on the tiny model: the loss learns, train.py end to end, resume equality, DDP, bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from PIL import Image

import train as train_script
from apl.step import apl_loss
from apl.trainer import TrainConfig, load_state, save_state
from ldm.checkpoint import build_model
from ldm.modules.embedding_manager import EmbeddingManager, read_embedding_file

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "tiny-sd.yaml")


@pytest.fixture(scope="module")
def strong_tiny_model(tiny_config):
    """Tiny model with larger random weights, so that its eps depends clearly on the text (PyTorch's default
    init makes the cross-attention contribution of a random tiny model almost zero)."""
    return randomize_(build_model(copy.deepcopy(tiny_config)), std=0.15).eval().requires_grad_(False)


def test_overfit_fixed_batch(strong_tiny_model):
    """On a fixed batch the loss falls >= 10x and eps(private) approaches eps(neutral); fails without gradients."""
    tiny_model = strong_tiny_model
    em = EmbeddingManager(tiny_model.cond_stage_model, ["alz"], 10, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(em.embedding_parameters(), lr=2e-2)
    z_t = torch.randn(4, 4, 8, 8)
    t = torch.tensor([50, 300, 600, 900])
    private = ["alz A photo of Tom Hanks", "alz a red car", "alz A close-up portrait of Emma Watson", "alz a cat"]
    neutral = [
        "A photo of a male person, short brown hair.",
        "a red car",
        "A close-up portrait of a female person.",
        "a cat",
    ]
    with torch.no_grad():
        eps_n = tiny_model.apply_model(z_t, t, tiny_model.get_learned_conditioning(neutral))
        gap0 = (tiny_model.apply_model(z_t, t, tiny_model.get_learned_conditioning(private, em)) - eps_n).abs().mean()
    losses = []
    for _ in range(200):
        loss = apl_loss(tiny_model, em, z_t, t, private, neutral).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not any(p.grad is not None for p in tiny_model.parameters())  # only the prefix learns
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    with torch.no_grad():
        gap = (tiny_model.apply_model(z_t, t, tiny_model.get_learned_conditioning(private, em)) - eps_n).abs().mean()
    assert gap < gap0 / 3, (gap0, gap)


def _faces(folder: Path, names=("Tom Hanks", "Emma Watson"), k=3, size=64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        for i in range(k):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{n}-{i}.png")
    return folder


def _args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return [
        "--config_path",
        TINY,
        "--face_dir",
        str(tmp_path / "faces"),
        "--outdir",
        str(tmp_path / out),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--image_size",
        "64",
        "--batch_size",
        "2",
        "--ddim_steps",
        "2",
        "--max_general",
        "4",
        "--no-progress",
        *extra,
    ]


def _prefix(path: Path) -> torch.Tensor:
    return read_embedding_file(path)[1]["alz"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    _faces(tmp / "faces")
    assert train_script.main(_args(tmp, "full", "--iterations", "6", "--save_every", "3", "--plot_every", "3")) == 0
    return tmp


def test_train_writes_embeddings_plot_and_log(trained):
    out = trained / "full"
    for step in (3, 6):
        assert (out / "embeddings" / f"APL-{step}.pt").is_file()
        assert (out / "embeddings" / f"APL-{step}.safetensors").is_file()
    assert _prefix(out / "embeddings" / "APL-6.pt").shape == (10, 32)
    assert not torch.equal(_prefix(out / "embeddings" / "APL-3.pt"), _prefix(out / "embeddings" / "APL-6.pt"))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and len(r["t"]) == 2 for r in records)
    assert (out / "loss.png").stat().st_size > 1000 and (out / "train_state.pt").is_file()


def test_resume_gives_the_uninterrupted_prefix(trained):
    assert train_script.main(_args(trained, "part", "--iterations", "3", "--save_every", "3")) == 0
    assert train_script.main(_args(trained, "part", "--iterations", "6", "--save_every", "3", "--resume", "auto")) == 0
    full = _prefix(trained / "full" / "embeddings" / "APL-6.pt")
    assert torch.equal(_prefix(trained / "part" / "embeddings" / "APL-6.pt"), full)
    steps = [json.loads(line)["step"] for line in (trained / "part" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fp16_trains_with_loss_scaling_and_resumes(trained, tiny_config, capsys, monkeypatch):
    """fp16 weights train with a loss scaler (test_step shows why): its state is saved and restored, so a resumed
    run equals the uninterrupted one, and the prefix moves."""
    import apl.trainer as trainer

    # train.py refuses fp16 on the CPU (it is for GPUs without bf16); the tiny model computes it fine here.
    monkeypatch.setattr(trainer, "pick_dtype", lambda precision, device: {"fp16": torch.float16}[precision])
    fp16 = ("--precision", "fp16", "--save_every", "3")
    assert train_script.main(_args(trained, "fp16", "--iterations", "6", *fp16)) == 0
    assert "fp16 loss scaling: 0 step(s) skipped" in capsys.readouterr().out
    assert train_script.main(_args(trained, "fp16_part", "--iterations", "3", *fp16)) == 0
    state = torch.load(trained / "fp16_part" / "train_state.pt", weights_only=True)
    assert state["loss_scaler"]["scale"] == 2.0**16
    assert train_script.main(_args(trained, "fp16_part", "--iterations", "6", *fp16, "--resume", "auto")) == 0
    final = _prefix(trained / "fp16" / "embeddings" / "APL-6.pt")
    assert torch.equal(_prefix(trained / "fp16_part" / "embeddings" / "APL-6.pt"), final)
    model = build_model(copy.deepcopy(tiny_config))
    init = EmbeddingManager(model.cond_stage_model, ["alz"], 10, generator=torch.Generator().manual_seed(42))
    moved = (final - init.string_to_param_dict["alz"].detach()).abs()
    assert moved.mean() > 1e-3, "the prefix did not move"


def test_resume_refusals_and_new_lr(trained, capsys):
    """Resuming a finished run, from a prefix file or from a file that is no state gives one clear message; a new
    --lr applies after a resume (the saved optimizer state holds the old one)."""
    import shutil

    shutil.copytree(trained / "full", trained / "again")
    cases = [
        (["--iterations", "6", "--resume", "auto"], "is at step 6 already; --iterations is the total"),
        (["--resume", str(trained / "full" / "embeddings" / "APL-3.pt")], "is not a training state"),
    ]
    torch.save({"step": 3}, trained / "not_state.pt")
    cases.append((["--resume", str(trained / "not_state.pt")], "is not a training state"))
    for extra, message in cases:
        assert train_script.main(_args(trained, "again", *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "weights_only=False" not in err, err
    args = _args(trained, "again", "--iterations", "7", "--resume", "auto", "--lr", "0.05")
    assert train_script.main(args) == 0
    last = json.loads((trained / "again" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 7 and last["lr"] == 0.05


@pytest.mark.parametrize("log_every", ["1", "3"])
def test_interrupt_saves_completed_steps_and_resumes_exactly(trained, monkeypatch, log_every):
    """Ctrl-C after an optimizer step (here: while the loss plot is drawn) saves the state of the completed steps
    and the pending log window; the resumed run equals the uninterrupted one and its log has every step once."""
    from apl.train_log import TrainLog

    real_plot, calls = TrainLog.plot, {"n": 0}

    def plot_then_interrupt(self, path):
        calls["n"] += 1
        real_plot(self, path)
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLog, "plot", plot_then_interrupt)
    out = f"int{log_every}"
    common = ("--save_every", "3", "--plot_every", "2", "--log_every", log_every)
    assert train_script.main(_args(trained, out, "--iterations", "6", *common)) == 130
    state = torch.load(trained / out / "train_state.pt", weights_only=True)
    assert state["step"] == state["optimizer"]["state"][0]["step"]  # labelled with the steps Adam has taken
    assert train_script.main(_args(trained, out, "--iterations", "6", *common, "--resume", "auto")) == 0
    full = _prefix(trained / "full" / "embeddings" / "APL-6.pt")
    assert torch.equal(_prefix(trained / out / "embeddings" / "APL-6.pt"), full)
    steps = [json.loads(line)["step"] for line in (trained / out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fewer_host_syncs_change_nothing(trained):
    """--log_every 4 (NaN check/log/progress once per 4 steps) trains and logs exactly like a check every step."""
    assert (
        train_script.main(_args(trained, "sync4", "--iterations", "6", "--save_every", "6", "--log_every", "4")) == 0
    )
    assert torch.equal(
        _prefix(trained / "sync4" / "embeddings" / "APL-6.pt"), _prefix(trained / "full" / "embeddings" / "APL-6.pt")
    )
    logs = [
        [json.loads(line) for line in (trained / d / "log.jsonl").read_text().splitlines()] for d in ("full", "sync4")
    ]
    for a, b in zip(*logs, strict=True):
        assert {k: v for k, v in a.items() if k != "samples_per_s"} == {
            k: v for k, v in b.items() if k != "samples_per_s"
        }


def test_general_images_in_metadata_layout(tmp_path):
    _faces(tmp_path / "faces")
    gen = tmp_path / "general"
    gen.mkdir()
    lines = []
    for i, mode in enumerate(["L", "CMYK", "RGBA", "I;16"]):  # odd image modes are converted, not skipped
        arr = np.full((64, 64), 30 * i + 10, dtype=np.uint16 if mode == "I;16" else np.uint8)
        img = Image.fromarray(arr * (256 if mode == "I;16" else 1)) if mode == "I;16" else Image.fromarray(arr)
        img = img if mode in ("L", "I;16") else img.convert(mode)
        name = f"g{i}.{'tif' if mode == 'I;16' else 'png' if mode != 'CMYK' else 'jpg'}"
        img.save(gen / name)
        lines.append(json.dumps({"file_name": name, "text": f"a plain picture number {i}"}))
    (gen / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    lines.append(json.dumps({"file_name": "broken.png", "text": "broken"}))
    (gen / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert train_script.main(_args(tmp_path, "img", "--general_dir", str(gen), "--iterations", "2")) == 0
    assert (tmp_path / "img" / "embeddings" / "APL-2.pt").is_file()


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    """2 gloo processes x batch 1 equal 1 process x batch 2 (same global batch plan); prefix identical on ranks."""
    _faces(tmp_path / "faces")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = [
        "--config_path",
        TINY,
        "--face_dir",
        str(tmp_path / "faces"),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--image_size",
        "64",
        "--ddim_steps",
        "2",
        "--max_general",
        "4",
        "--iterations",
        "3",
        "--accelerator",
        "cpu",
        "--no-progress",
    ]
    for name, devices, batch in (("one", "1", "2"), ("two", "2", "1")):
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                *common,
                "--cpu_processes",
                devices,
                "--batch_size",
                batch,
                "--outdir",
                str(tmp_path / name),
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
    one = _prefix(tmp_path / "one" / "embeddings" / "APL-3.pt")
    two = _prefix(tmp_path / "two" / "embeddings" / "APL-3.pt")
    # Same global batch; only the reduction order of the gradient mean differs (float32 rounding).
    assert torch.allclose(one, two, atol=1e-5, rtol=0), (one - two).abs().max()


@pytest.mark.parametrize(
    ("extra", "setup", "message"),
    [
        (["--face_dir", "/nonexistent/faces"], None, "/nonexistent/faces"),
        ([], "empty", "contains no images"),
        (["--placeholder", "anonymization"], None, "not a single"),
        (["--accelerator", "cuda", "--devices", "0,7"], None, "--devices 0,7"),
        (["--general_source", "images", "--general_dir", "GEN"], "uncaptioned", "no caption layout"),
        (["--people_file", "PEOPLE"], "people", "no usable face images"),
        (["--max_general", "0"], None, "--max_general 0: must be >= 1"),
        (["--image_size", "0"], None, "--image_size 0: must be a positive multiple of 8"),
        (["--cuda_graph"], None, "--cuda_graph needs a CUDA GPU"),
    ],
)
def test_bad_input_messages(tmp_path, capsys, extra, setup, message):
    faces = _faces(tmp_path / "faces")
    if setup == "empty":
        for f in faces.iterdir():
            f.unlink()
    if setup == "uncaptioned":
        (tmp_path / "gen").mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / "gen" / "x.png")
    if setup == "people":
        (tmp_path / "people.tsv").write_text("Somebody Else\tA male person, short hair.\n")
    extra = [e.replace("GEN", str(tmp_path / "gen")).replace("PEOPLE", str(tmp_path / "people.tsv")) for e in extra]
    assert train_script.main(_args(tmp_path, "bad", "--iterations", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error:") and message in err, err
    assert "Traceback" not in err


def test_skips_are_counted_and_reported(tmp_path, capsys):
    faces = _faces(tmp_path / "faces")
    (faces / "Tom Hanks-9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (faces / "Nobody Known-0.png").write_bytes((faces / "Tom Hanks-0.png").read_bytes())
    assert train_script.main(_args(tmp_path, "skips", "--iterations", "1")) == 0
    out = capsys.readouterr().out
    assert "unreadable image" in out and "Tom Hanks-9.png" in out
    assert "no attribute description for 'Nobody Known'" in out


@pytest.mark.parametrize("log_every", ["1", "2"])
def test_non_finite_loss_stops_and_keeps_the_last_good_prefix(tmp_path, capsys, monkeypatch, log_every):
    import apl.step as step

    _faces(tmp_path / "faces")
    real, calls = step.apl_terms, {"n": 0}

    def loss_that_breaks(*a, **kw):
        calls["n"] += 1
        loss, gap = real(*a, **kw)
        return (loss * float("nan"), gap) if calls["n"] == 3 else (loss, gap)

    monkeypatch.setattr(step, "apl_terms", loss_that_breaks)
    args = _args(tmp_path, "nan", "--iterations", "5", "--save_every", "1", "--log_every", log_every)
    assert train_script.main(args) == 2
    err = capsys.readouterr().err
    # Step 3 ran with the prefix after 2 updates and gave NaN: the prefix after 1 update is the last known good one.
    assert "non-finite at step 3" in err and "APL-1-last-good.pt" in err and "Traceback" not in err
    emb = tmp_path / "nan" / "embeddings"
    assert torch.equal(_prefix(emb / "APL-1-last-good.pt"), _prefix(emb / "APL-1.pt"))
    assert not (emb / "APL-3.pt").exists()


def test_export_cli(trained, tmp_path):
    import export_prefix

    src = trained / "full" / "embeddings" / "APL-6.pt"
    # The tiny model's 32-d prefix fits no SD family: refused for other tools' formats unless forced.
    assert export_prefix.main([str(src), "--format", "a1111", "--out", str(tmp_path / "APL.pt")]) == 2
    assert not (tmp_path / "APL.pt").exists()
    assert export_prefix.main([str(src), "--format", "a1111", "--out", str(tmp_path / "APL.pt"), "--force"]) == 0
    a1111 = torch.load(tmp_path / "APL.pt", weights_only=True)
    assert torch.equal(a1111["string_to_param"]["*"], _prefix(src)) and a1111["name"] == "<apl>"
    assert a1111["step"] == 6 and a1111["apl_width"] == "32"  # the .pt prefix carries its step
    out = str(tmp_path / "d.safetensors")
    assert export_prefix.main([str(src), "--format", "diffusers", "--out", out, "--force"]) == 0
    assert (
        export_prefix.main([str(tmp_path / "missing.pt"), "--format", "a1111", "--out", str(tmp_path / "x.pt")]) == 2
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graph_training_equals_eager_training(tmp_path, precision):
    """train.py on the GPU: --cuda_graph (captured step, replayed) gives the eager run's prefix and losses."""
    _faces(tmp_path / "faces")
    common = ("--accelerator", "cuda", "--precision", precision, "--iterations", "8", "--save_every", "4",
              "--log_every", "4")
    assert train_script.main(_args(tmp_path, "eager", *common)) == 0
    assert train_script.main(_args(tmp_path, "graph", *common, "--cuda_graph")) == 0
    eager, graph = (_prefix(tmp_path / d / "embeddings" / "APL-8.pt") for d in ("eager", "graph"))
    start = _prefix(tmp_path / "eager" / "embeddings" / "APL-4.pt")
    # GPU kernels add atomically in places: the runs agree to rounding noise, which Adam can turn into a sign
    # difference only where a gradient is ~0. A graph that replayed stale inputs would differ everywhere.
    diff = (graph - eager).abs()
    assert diff.mean() < 0.05 * (eager - start).abs().mean(), (float(diff.mean()), float((eager - start).abs().mean()))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
              for d in ("eager", "graph")]
    assert losses[0] == pytest.approx(losses[1], rel={"fp32": 1e-4, "bf16": 2e-2, "fp16": 1e-2}[precision])


def test_load_state_restores_loss_scale(tmp_path, tiny_model):
    cfg = TrainConfig()
    em = EmbeddingManager(tiny_model.cond_stage_model, ["alz"], 4, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(em.embedding_parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    save_state(tmp_path / "s.pt", 3, em, opt, cfg, scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    fresh_opt = torch.optim.Adam(em.embedding_parameters(), lr=1e-3)
    assert load_state(tmp_path / "s.pt", em, fresh_opt, cfg, fresh) == 3
    assert fresh.get_scale() == 8.0
