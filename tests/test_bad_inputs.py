"""Bad inputs fed to train.py, sample.py and export_prefix.py as a user runs them (tiny model).

Each case must end with the documented exit code (2 for bad input), one clear `<script>: error: ...` line that
says what and where, and no traceback; or, where the input is usable after a stated change, succeed and say so.
Faults mid-save (a full disk, a kill) must leave the earlier files intact, and `--resume auto` must then give
the prefix of an uninterrupted run exactly. The evaluation scripts have their own table (test_bad_inputs_eval).

One case per class runs as a real subprocess (`python train.py ...`: exit code and stderr only); the others call
the same scripts' `main(argv)` in this process: the same code without 3 s of importing torch per case, so that
the suite stays within its time on 2 cores.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.modules.embedding_manager import read_embedding_file

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny" / "tiny-sd.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


def run(script: str, *args: str, cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """`python <script> args` in `cwd` (with `fault`, through tests/run_with_fault.py), as a user runs it."""
    cmd = [sys.executable, str(ROOT / script), *args]
    if fault:
        cmd = [sys.executable, str(ROOT / "tests" / "run_with_fault.py"), fault, str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def call(script: str, *args: str, capsys) -> subprocess.CompletedProcess:
    """The script's main(argv) in this process, returning what `run` returns (argparse errors exit 2 as well)."""
    import importlib

    capsys.readouterr()
    module = importlib.import_module(script.removesuffix(".py"))
    try:
        rc = module.main(list(args))
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], rc, out.out, out.err)


def assert_clear_error(r: subprocess.CompletedProcess, script: str, *needles: str, rc: int = 2) -> str:
    """Exit code `rc`, no traceback, and one `<script>: error:` line holding every needle."""
    err = r.stderr
    assert r.returncode == rc, f"rc {r.returncode}\n{err[-3000:]}\n{r.stdout[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"{script}: error:")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Face sets, prefixes and checkpoints (good and broken) that the cases below use."""
    w = tmp_path_factory.mktemp("bad_inputs")
    rng = np.random.default_rng(0)
    for folder, k in (("faces", 3), ("faces_other", 2)):
        (w / folder).mkdir()
        for name in ("Tom Hanks", "Emma Watson"):
            for i in range(k):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(w / folder / f"{name}-{i}.png")
    good = torch.rand(10, 32)
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("huge", 1e30)):
        bad = good.clone()
        bad[4, 7] = value
        save_file({"string_to_param.alz": bad}, w / f"{name}.safetensors", metadata={"token_ids": '{"alz": 41128}'})
    save_file({"string_to_param.alz": torch.rand(10, 1024)}, w / "sd2.safetensors")
    save_file({"string_to_param.alz": torch.rand(10, 768)}, w / "sd1.safetensors")
    save_file({"string_to_param.alz": good}, w / "tiny.safetensors")
    from ldm.checkpoint import build_model, save_checkpoint

    torch.manual_seed(0)
    sd = build_model(TINY).state_dict()
    for name, change in (("nan", "nan"), ("int8", "int8")):
        broken = dict(sd)
        t = broken["model.diffusion_model.out.2.weight"].clone()
        if change == "nan":
            t.view(-1)[0] = float("nan")
        else:
            t = t.to(torch.int8)
        broken["model.diffusion_model.out.2.weight"] = t
        save_checkpoint(broken, w / f"ckpt_{name}.safetensors")
    torch.manual_seed(1)
    save_checkpoint(build_model(TINY).state_dict(), w / "tiny_other.safetensors")
    (w / "long_prompts.txt").write_text(
        "a red circle on a grey table\n" + " ".join(["a blue square next to a green triangle"] * 12) + "\n"
    )
    (w / "long_templates.txt").write_text(" ".join(["standing in a very long and winding corridor"] * 10) + "\n")
    return w


def train_args(w: Path, out: str, *extra: str, faces: str = "faces") -> list[str]:
    return [
        "--config_path", TINY, "--face_dir", str(w / faces), "--outdir", str(w / out), "--cache_dir", str(w / "cache"),
        "--image_size", "64", "--batch_size", "2", "--ddim_steps", "2", "--max_general", "4", "--no-progress",
        "--save_every", "3", *extra,
    ]  # fmt: skip


@dataclass
class Case:
    """One bad input: a script, its arguments, and what the single error line must say."""

    name: str
    script: str
    args: list[str]
    needles: tuple[str, ...]
    rc: int = 2
    stdout: tuple[str, ...] = field(default_factory=tuple)  # for rc 0: what the run must say it changed
    spawn: bool = False  # run as `python <script>` (one case per class); else main(argv) in this process


def _cases(w: Path) -> list[Case]:
    s = str(w)
    tr = lambda *a: train_args(w, "bad", "--iterations", "1", *a)  # noqa: E731
    smp = ["--config_path", TINY, "--n_samples", "1", "--steps", "2", "--outdir", f"{s}/samples"]
    exp = lambda name, fmt, out, *a: [f"{s}/{name}", "--format", fmt, "--out", f"{s}/{out}", *a]  # noqa: E731
    long_prompt = "alz " + "a small red house " * 17
    return [
        # 1. non-finite / out-of-range numbers
        Case("NaN prefix, sample.py", "sample.py", [*smp, "--embedding", f"{s}/nan.safetensors"],
             ("nan.safetensors", "NaN or infinite", "vector(s) 4 of 10"), spawn=True),
        Case("inf prefix, export", "export_prefix.py", exp("inf.safetensors", "a1111", "x.safetensors", "--force"),
             ("inf.safetensors", "NaN or infinite")),
        Case("1e30 prefix, sample.py", "sample.py", [*smp, "--embedding", f"{s}/huge.safetensors"],
             ("huge.safetensors", "values up to 1e+30")),
        Case("NaN weight in checkpoint", "sample.py", [*smp, "--ckpt_path", f"{s}/ckpt_nan.safetensors"],
             ("ckpt_nan.safetensors", "NaN or infinite", "model.diffusion_model.out.2.weight"), spawn=True),
        Case("int8 weight in checkpoint", "sample.py", [*smp, "--ckpt_path", f"{s}/ckpt_int8.safetensors"],
             ("not floating point", "torch.int8")),
        Case("--lr 1e38", "train.py", tr("--lr", "1e38"), ("--lr 1e+38", "(0, 10]"), spawn=True),
        Case("--lr nan", "train.py", tr("--lr", "nan"), ("--lr nan",)),
        Case("--negative_guidance -1", "train.py", tr("--negative_guidance", "-1"), ("nothing trains",)),
        Case("--seed -1", "train.py", tr("--seed", "-1"), ("--seed -1",)),
        Case("--num_vectors 100", "train.py", tr("--num_vectors", "100"), ("--num_vectors 100",)),
        Case("--image_size 72 (UNet needs 16)", "train.py", tr("--image_size", "72"), ("multiple of 16",)),
        Case("sample.py --scale nan", "sample.py", [*smp, "--scale", "nan"], ("--scale", "nan")),
        Case("sample.py --steps 2000", "sample.py", [*smp, "--steps", "2000"], ("--steps", "[1, 500]")),
        Case("sample.py --device foo", "sample.py", [*smp, "--device", "foo"], ("--device 'foo'", "cuda:N")),
        Case("sample.py --H 72", "sample.py", [*smp, "--H", "72", "--W", "64"], ("72x64", "multiple of 16")),
        # 2. width and model family where a file is made
        Case("SD 2.x prefix as SD v1 export", "export_prefix.py",
             exp("sd2.safetensors", "a1111", "x.pt", "--base", "sd1"),
             ("1024-d", "SD 2.x", "--base sd2"), spawn=True),
        Case("tiny prefix as SD v1 export", "export_prefix.py", exp("tiny.safetensors", "diffusers", "x.safetensors"),
             ("32-d", "test or toy model", "--force")),
        Case("SD v1 prefix into the tiny model", "sample.py", [*smp, "--embedding", f"{s}/sd1.safetensors"],
             ("768-d (SD v1.x", "32-d")),
        # 3. exports the target tool would misread
        Case("diffusers token with capitals", "export_prefix.py",
             exp("sd1.safetensors", "diffusers", "x.safetensors", "--token", "<ALZ>"), ("has capitals", "'<alz>'"),
             spawn=True),
        Case("A1111 name that is a CLIP word", "export_prefix.py", exp("sd1.safetensors", "a1111", "x.pt", "--name",
             "anon"), ("already in the CLIP vocabulary",)),
        # 5. flags that meant something else
        Case("--devices 3 without CUDA", "train.py", tr("--devices", "3"), ("names GPU ids", "--cpu_processes"),
             spawn=True),
        Case("--devices 0,1 without CUDA", "train.py", tr("--devices", "0,1"), ("no CUDA GPU",)),
        Case("--accelerator cpu --devices 2", "train.py", tr("--accelerator", "cpu", "--devices", "2"),
             ("--accelerator cpu is set", "--cpu_processes N")),
        Case("--num_nodes 2 without a launcher (would wait forever)", "train.py", tr("--num_nodes", "2"),
             ("needs a multi-node launcher", "torchrun")),
        Case("--embedding but no prompt has alz (the prefix would change nothing)", "sample.py",
             [*smp, "--embedding", f"{s}/tiny.safetensors", "--prompt", "A portrait of Tom Hanks"],
             ("no prompt contains its placeholder 'alz'", "--prompt 'alz A portrait of Tom Hanks'")),
        # 8. prompts cut by the prefix
        Case("prompt too long for the prefix", "sample.py",
             [*smp, "--embedding", f"{s}/tiny.safetensors", "--prompt", long_prompt],
             ("too long for the prefix", "end token"), spawn=True),
        Case("template too long beside the prefix", "train.py", tr("--templates_file", f"{s}/long_templates.txt"),
             ("identity prompt", "--templates_file")),
        Case("long general caption is cut on both sides", "train.py",
             [*tr("--prompts_file", f"{s}/long_prompts.txt"), "--outdir", f"{s}/cut"], (), rc=0,
             stdout=("1 general caption(s) are longer than the 65 CLIP tokens", "cut at a word boundary")),
    ]  # fmt: skip


def _check(case: Case, r: subprocess.CompletedProcess) -> str | None:
    try:
        if case.rc == 0:
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
            for needle in case.stdout:
                assert needle in r.stdout, f"{needle!r} not in stdout:\n{r.stdout[-2000:]}"
        else:
            assert_clear_error(r, case.script, *case.needles, rc=case.rc)
    except AssertionError as e:
        return f"{case.name}: {e}"
    return None


def test_bad_input_table(world, capsys, monkeypatch):
    """Every case of the table: its exit code and its one clear line, never a traceback (the subprocess cases two
    at a time, while the others run in this process)."""
    cases = _cases(world)
    with ThreadPoolExecutor(max_workers=2) as pool:
        spawned = pool.map(lambda c: (c, run(c.script, *c.args, cwd=world)), [c for c in cases if c.spawn])
        monkeypatch.chdir(world)
        failures = [_check(c, call(c.script, *c.args, capsys=capsys)) for c in cases if not c.spawn]
        failures += [_check(c, r) for c, r in spawned]
    failures = [f for f in failures if f]
    assert not failures, "\n\n".join(failures)


def _prefix(path: Path) -> torch.Tensor:
    return read_embedding_file(path)[1]["alz"]


@pytest.fixture(scope="module")
def uninterrupted(world):
    """The reference run: 6 steps, saved at 3 and 6."""
    import train

    assert train.main(train_args(world, "ref", "--iterations", "6")) == 0
    return _prefix(world / "ref" / "embeddings" / "APL-6.pt")


def test_a_run_is_never_overwritten_or_mixed(world, uninterrupted, capsys):
    """A fresh run into a folder with a run is refused; --start_over moves it aside; --resume refuses a state of
    another run, naming each difference; a second train.py is kept out while one writes."""
    import shutil

    ref = world / "ref"
    r = run("train.py", *train_args(world, "ref", "--iterations", "6"), cwd=world)  # a real subprocess
    assert_clear_error(r, "train.py", "already holds a training run", "train_state.pt (step 6)", "--start_over")
    toy = ["--config_path", str(ROOT / "configs" / "toy" / "toy-sd.yaml"),
           "--ckpt_path", str(ROOT / "toyworld" / "assets" / "toy-sd.safetensors")]  # fmt: skip
    changes = [
        (["--negative_guidance", "2"], ("--negative_guidance (1.0 then, 2.0 now)",)),
        (["--max_general", "3"], ("--max_general (4 then, 3 now)",)),
        (["--precision", "bf16"], ("--precision ('fp32' then, 'bf16' now)",)),
        (["--ckpt_path", str(world / "tiny_other.safetensors")], ("--ckpt_path (other model weights",)),
        (toy, ("text width (32 then, 16 now",)),
    ]
    for extra, needles in changes:
        r = call("train.py", *train_args(world, "ref", "--iterations", "9", "--resume", "auto", *extra), capsys=capsys)
        assert_clear_error(r, "train.py", "belongs to another run", *needles)
    args = train_args(world, "ref", "--iterations", "9", "--resume", "auto", faces="faces_other")
    assert_clear_error(call("train.py", *args, capsys=capsys), "train.py",
                       "--face_dir (another face set: 6 images of 2 people", "4 of 2")  # fmt: skip
    # A state from another folder, continued into a folder that holds a run, would mix the two runs.
    shutil.copytree(ref, world / "foreign")
    args = train_args(world, "foreign", "--iterations", "9", "--resume", str(ref / "train_state.pt"))
    assert_clear_error(call("train.py", *args, capsys=capsys), "train.py", "would mix the two runs")
    # The lock: while another process holds it, a second run is refused (the OS frees it if that process dies).
    fd = os.open(ref / ".train.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run("train.py", *train_args(world, "ref", "--iterations", "9", "--resume", "auto"), cwd=world)
        assert_clear_error(r, "train.py", "is writing to", str(ref))
    finally:
        os.close(fd)
    # --start_over keeps the old run under previous-runs/ and trains a new one.
    copy = world / "mixed"
    shutil.copytree(ref, copy)
    r = call("train.py", *train_args(world, "mixed", "--iterations", "3", "--start_over"), capsys=capsys)
    assert r.returncode == 0 and "--start_over: the earlier run's files are now in" in r.stdout, r.stderr[-2000:]
    (old,) = (copy / "previous-runs").iterdir()
    assert torch.equal(_prefix(old / "embeddings" / "APL-6.pt"), uninterrupted)
    assert (old / "train_state.pt").is_file() and (old / "log.jsonl").is_file()
    assert sorted(p.name for p in (copy / "embeddings").iterdir()) == ["APL-3.pt", "APL-3.safetensors"]


@pytest.mark.parametrize("fault", ["enospc", "pos", "kill", "term"])
def test_fault_mid_save_then_resume_gives_the_uninterrupted_prefix(world, uninterrupted, fault, capsys, monkeypatch):
    """The second save of train_state.pt (step 6) fails: a full disk, torch's stream error, or a kill (a real
    subprocess). Earlier files stay intact, the error is one line naming the file, a killed save's temporary file
    is removed at the next start, and the resumed run ends with the uninterrupted run's prefix, bit for bit."""
    out = f"fault_{fault}"
    args = train_args(world, out, "--iterations", "6")
    state = world / out / "train_state.pt"
    if fault == "kill":
        r = run("train.py", *args, cwd=world, fault=f"{fault}:train_state:2")
        assert r.returncode == -9, r.stderr[-2000:]
        assert list((world / out).glob(".train_state.*.tmp.pt")), "the kill should leave a temporary file"
    elif fault == "term":  # SIGTERM during the first save: the state of the completed steps is saved, exit 130
        r = run("train.py", *args, cwd=world, fault=f"{fault}:train_state:1")
        assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "interrupted: state after 3 steps saved" in r.stdout, r.stdout[-2000:]
    else:
        from run_with_fault import install

        monkeypatch.setattr(torch, "save", torch.save)  # undone after the test
        install(f"{fault}:train_state:2")
        r = call("train.py", *args, capsys=capsys)
        monkeypatch.undo()
        line = assert_clear_error(r, "train.py", f"could not write {state}", "the previous train_state.pt")
        want = ("No space left on device", "is full") if fault == "enospc" else ("unexpected pos",)
        assert all(w in line for w in want), line
    assert torch.load(state, weights_only=True)["step"] == 3  # the earlier state is intact
    r = call("train.py", *train_args(world, out, "--iterations", "6", "--resume", "auto"), capsys=capsys)
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("removed 1 temporary file(s)" in r.stdout) == (fault == "kill"), r.stdout
    assert not list((world / out).glob(".*.tmp*"))
    assert torch.equal(_prefix(world / out / "embeddings" / "APL-6.pt"), uninterrupted)


def test_the_package_imports_outside_the_repository(tmp_path):
    """`make setup` installs the repository (pip install -e .): `import apl, ldm` works from any folder."""
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", "import apl, ldm, args; print(apl.__file__)"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()).resolve().is_relative_to(ROOT)
