"""A training run's folder: one run per --outdir, never overwritten or mixed, and what makes two runs the same.

- A fresh `train.py` into a folder that holds a run (a state, a log, prefixes) is refused; `--start_over` moves the
  old run's files to `<outdir>/previous-runs/<time>/` first (nothing is deleted).
- A lock file keeps a second `train.py` out of a folder while one is writing there.
- Temporary files that a killed save left behind (atomic_save's `.<name>.<hex>.tmp.<ext>`) under this run's own
  file names are removed when the next run starts.
- The run record, saved in `train_state.pt`, holds the settings and content digests (face set, general set,
  texts, model weights) that decide the training trajectory; `--resume` refuses a state whose record differs, and
  names every difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from apl.runtime import UsageError
from ldm.util import remove_stale_temporaries

STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
EMBEDDINGS = "embeddings"
PREVIOUS = "previous-runs"
LOCK_FILE = ".train.lock"

# TrainConfig fields that decide what a resumed run computes; a state trained with other values is another run.
TRAJECTORY_SETTINGS = (
    "placeholder",
    "num_vectors",
    "seed",
    "batch_size",
    "id_ratio",
    "id_target",
    "image_size",
    "negative_guidance",
    "reference",
    "no_phrase_prob",
    "max_general",
    "general_source",
    "start_guidance",
    "ddim_steps",
)


def _prefix_file(prompt: str):
    """Matcher of the prefix files of run `prompt` (`<prompt>-<step>[...].pt|.safetensors`)."""
    pattern = re.compile(rf"^{re.escape(prompt)}-.+\.(pt|safetensors)$")
    return lambda name: bool(pattern.match(name))


def run_files(outdir: Path, prompt: str) -> list[Path]:
    """The files of a run in `outdir`: state, log, plot and the prefixes of `prompt` (what --start_over moves)."""
    found = [outdir / n for n in (STATE_FILE, LOG_FILE, PLOT_FILE) if (outdir / n).is_file()]
    emb = outdir / EMBEDDINGS
    if emb.is_dir():
        ours = _prefix_file(prompt)
        found += sorted(p for p in emb.iterdir() if p.is_file() and ours(p.name))
    return found


def describe_run(outdir: Path, prompt: str) -> str:
    """'train_state.pt (step 300), log.jsonl (300 steps), 6 prefix files' for messages."""
    parts = []
    state = outdir / STATE_FILE
    if state.is_file():
        try:
            step = torch.load(state, map_location="cpu", weights_only=True).get("step")
            parts.append(f"{STATE_FILE} (step {step})")
        except Exception:  # a damaged state is still a run's file; say that it is there
            parts.append(STATE_FILE)
    log = outdir / LOG_FILE
    if log.is_file():
        parts.append(f"{LOG_FILE} ({sum(1 for line in log.read_text(errors='replace').splitlines() if line)} steps)")
    n = sum(1 for p in run_files(outdir, prompt) if p.parent.name == EMBEDDINGS)
    if n:
        parts.append(f"{n} prefix files in {EMBEDDINGS}/")
    return ", ".join(parts)


def check_outdir(outdir: Path, prompt: str, resume: str | None, start_over: bool) -> str | None:
    """Refuse to overwrite or mix runs; returns the reason to refuse (None: go on). Reads only, so every rank of a
    data-parallel run can ask and gets the same answer."""
    if outdir.exists() and not outdir.is_dir():
        return f"--outdir {outdir} is a file, not a folder; choose a folder for the run"
    if start_over and resume:
        return "--start_over and --resume exclude each other: --resume continues the run, --start_over moves it aside"
    if resume or start_over or not run_files(outdir, prompt):
        return None
    return (
        f"{outdir} already holds a training run ({describe_run(outdir, prompt)}); a new run would overwrite it. "
        f"Continue it with --resume auto, start over with --start_over (the old files move to "
        f"{outdir / PREVIOUS}/<time>/, nothing is deleted), or choose another --outdir"
    )


def check_foreign_resume(outdir: Path, prompt: str, state_path: Path) -> str | None:
    """A state from another folder may start a run only in a folder without a run of its own (or the two runs'
    logs and prefixes would mix); returns the reason to refuse."""
    if state_path.resolve() == (outdir / STATE_FILE).resolve() or not run_files(outdir, prompt):
        return None
    return (
        f"{outdir} already holds a training run ({describe_run(outdir, prompt)}); continuing {state_path} there "
        "would mix the two runs' logs and prefixes. Choose an empty --outdir, or --resume auto to continue that run"
    )


def move_run_aside(outdir: Path, prompt: str) -> Path | None:
    """Move the run's files to `<outdir>/previous-runs/<time>/` (same layout); returns that folder (None: nothing)."""
    files = run_files(outdir, prompt)
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = outdir / PREVIOUS / stamp
    k = 1
    while dest.exists():
        k += 1
        dest = outdir / PREVIOUS / f"{stamp}-{k}"
    for f in files:
        target = dest / f.relative_to(outdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(target))
    return dest


def remove_run_temporaries(outdir: Path, prompt: str) -> list[Path]:
    """Temporary files left by a kill during a save of this run's own files (state, log, plot, prefixes)."""
    own = {STATE_FILE, LOG_FILE, PLOT_FILE}
    removed = remove_stale_temporaries(outdir, lambda name: name in own)
    return removed + remove_stale_temporaries(outdir / EMBEDDINGS, _prefix_file(prompt))


class RunLock:
    """An exclusive lock on `<outdir>/.train.lock` while a run writes there (released by the OS if the process
    dies, so a kill -9 never leaves a stale lock)."""

    def __init__(self, outdir: Path) -> None:
        self.path = outdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns the reason it cannot be taken (another run writes here), else None."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; runs are still protected by the checks above
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            who = f"another train.py (pid {holder})" if holder.isdigit() else "another train.py"
            return f"{who} is writing to {self.path.parent}; wait for it to finish or choose another --outdir"
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# ----- the run record: what makes a resumed run the same run


def tensor_digest(t: torch.Tensor | None, per_row: int = 256) -> str:
    """sha256 of a (N, ...) tensor's shape, dtype and an evenly strided sample of every row (each image's latent is
    sampled, so any changed, added or removed image changes the digest; hashing all of it would take seconds)."""
    h = hashlib.sha256()
    if t is None:
        return "none"
    t = t.detach().cpu()
    h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
    if t.numel():
        rows = t.reshape(t.shape[0], -1)
        h.update(rows[:, :: max(1, rows.shape[1] // per_row)].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def text_digest(obj: object) -> str:
    """sha256 of a JSON-able object (names, captions, people, templates)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def run_record(cfg, data, model_fingerprint: str, width: int | str, precision: str) -> dict:
    """What decides a run's trajectory: settings, content digests of the data and the model, the text width."""
    settings = {k: getattr(cfg, k) for k in TRAJECTORY_SETTINGS if hasattr(cfg, k)}
    settings["precision"] = precision  # resolved ('auto' -> bf16 on a GPU)
    n_faces = len(data.face_names)
    return {
        "settings": settings,
        "faces": {
            "digest": text_digest(data.face_names) + tensor_digest(data.face_latents),
            "images": n_faces,
            "people": len(set(data.face_names)),
            "folder": str(cfg.face_dir),
        },
        "general": {
            "digest": text_digest(data.general_captions) + tensor_digest(data.general_latents),
            "samples": len(data.general_captions),
        },
        "texts": {"digest": text_digest([data.people, data.templates]), "people_file": str(cfg.people_file)},
        "model": {"fingerprint": model_fingerprint, "ckpt_path": str(cfg.ckpt_path), "config_path": cfg.config_path},
        "width": width,  # SD v1: an int; SDXL: '768+1280'
    }


def record_differences(old: Mapping, new: Mapping) -> list[str]:
    """Each way `new` (this run) differs from `old` (the saved state's record), as a phrase naming the flag; only
    what both records hold is compared."""
    out = []
    for key, value in new.get("settings", {}).items():
        if key in old.get("settings", {}) and old["settings"][key] != value:
            out.append(f"--{key} ({old['settings'][key]!r} then, {value!r} now)")

    def changed(section: str, field: str) -> bool:
        a, b = old.get(section, {}).get(field), new.get(section, {}).get(field)
        return a is not None and b is not None and a != b

    if "width" in old and "width" in new and old["width"] != new["width"]:
        out.append(f"the model's text width ({old['width']} then, {new['width']} now: another model family)")
    if changed("model", "fingerprint"):
        then, now = old["model"].get("ckpt_path"), new["model"]["ckpt_path"]
        same = " (the same path: the file changed)" if then == now else ""
        out.append(f"--ckpt_path (other model weights: {then} then, {now} now{same})")
    if changed("faces", "digest"):
        o, n = old["faces"], new["faces"]
        out.append(
            f"--face_dir (another face set: {o['images']} images of {o['people']} people in {o['folder']} then, "
            f"{n['images']} of {n['people']} in {n['folder']} now)"
        )
    if changed("general", "digest"):
        out.append(
            f"the general samples (--general_dir/--prompts_file/--max_general: {old['general']['samples']} then, "
            f"{new['general']['samples']} now, or other content)"
        )
    if changed("texts", "digest"):
        out.append("--people_file/--templates_file (other descriptions or templates)")
    return out


def refuse_other_run(path: Path, differences: list[str]) -> UsageError:
    """The error for resuming a state that belongs to another run."""
    return UsageError(
        f"--resume: {path} belongs to another run; it differs in {'; '.join(differences)}. Resume with the same "
        "settings and data, or start a new run with --start_over (moves the old one aside) or another --outdir"
    )
