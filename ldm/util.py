"""Config handling: CompVis-style `target`/`params` configs resolved through a fixed registry of APL classes.

A config's `target` is looked up in `REGISTRY`; nothing is ever imported by name from a config file, so a YAML
file cannot make APL run arbitrary code.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn


def _registry() -> dict[str, Callable[..., Any]]:
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.diffusion.ddpm import LatentDiffusion
    from ldm.models.diffusion.sdxl import DiffusionEngine
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.encoders.conditioner import ConcatTimestepEmbedderND, GeneralConditioner
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    from ldm.modules.encoders.openclip import FrozenOpenCLIPEmbedder2

    ours = {
        "ldm.models.diffusion.ddpm.LatentDiffusion": LatentDiffusion,
        "ldm.modules.diffusionmodules.openaimodel.UNetModel": UNetModel,
        "ldm.models.autoencoder.AutoencoderKL": AutoencoderKL,
        "ldm.modules.encoders.modules.FrozenCLIPEmbedder": FrozenCLIPEmbedder,
        "ldm.models.diffusion.sdxl.DiffusionEngine": DiffusionEngine,
        "ldm.modules.encoders.conditioner.GeneralConditioner": GeneralConditioner,
        "ldm.modules.encoders.conditioner.ConcatTimestepEmbedderND": ConcatTimestepEmbedderND,
        "ldm.modules.encoders.openclip.FrozenOpenCLIPEmbedder2": FrozenOpenCLIPEmbedder2,
        "torch.nn.Identity": nn.Identity,  # the VAE's `lossconfig` in inference configs
    }
    # The names Stability's generative-models (SGM) configs use for the same classes, so its sd_xl_base.yaml
    # builds the same model as configs/sdxl/sd_xl_base.yaml. (The denoiser block is read as data by DiffusionEngine.)
    sgm = {
        "sgm.models.diffusion.DiffusionEngine": DiffusionEngine,
        "sgm.modules.diffusionmodules.openaimodel.UNetModel": UNetModel,
        "sgm.models.autoencoder.AutoencoderKLInferenceWrapper": AutoencoderKL,
        "sgm.modules.GeneralConditioner": GeneralConditioner,
        "sgm.modules.encoders.modules.GeneralConditioner": GeneralConditioner,
        "sgm.modules.encoders.modules.FrozenCLIPEmbedder": FrozenCLIPEmbedder,
        "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": FrozenOpenCLIPEmbedder2,
        "sgm.modules.encoders.modules.ConcatTimestepEmbedderND": ConcatTimestepEmbedderND,
    }
    return ours | sgm


class ConfigError(ValueError):
    """A model config that APL cannot build."""


def instantiate_from_config(config: Mapping) -> Any:
    """Build `config['target'](**config['params'])` for a target in APL's registry; refuse anything else."""
    if not isinstance(config, Mapping) or "target" not in config:
        raise ConfigError(f"expected a mapping with a 'target' key, got {config!r:.200}")
    target = config["target"]
    registry = _registry()
    if target not in registry:
        raise ConfigError(
            f"config target {target!r} is not one of APL's model classes ({', '.join(sorted(registry))});"
            " APL never imports classes named in a config file. SD v1 and SDXL configs use exactly these."
        )
    params = config.get("params") or {}
    try:
        return registry[target](**params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {target}: {e}") from e


def load_config(path: str | os.PathLike) -> dict:
    """Read a CompVis YAML config (safe loader) and return the mapping under `model:`'s parent."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (SD v1: configs/stable-diffusion/v1-inference.yaml)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path} is a binary file, not a YAML config: is it a checkpoint? Pass weights with --ckpt_path and the "
            "config (e.g. configs/stable-diffusion/v1-inference.yaml) with --config_path"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(config, Mapping) or "model" not in config:
        raise ConfigError(f"{path}: expected a CompVis config with a top-level 'model:' section")
    return dict(config)


# ----- atomic file writes: a crash or Ctrl-C mid-save never leaves a half-written file under the final name


def _fsync_dir(folder: Path) -> None:
    """Flush a directory entry so a completed rename survives power loss (POSIX only)."""
    if os.name != "posix":
        return  # Windows cannot open directories; os.replace is already durable enough there
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TMP_NAME = re.compile(r"^\.(?P<stem>.+)\.[0-9a-f]{12}\.tmp(?P<suffix>\.[^.]*)?$")


def _new_tmp_path(path: Path) -> Path:
    """Create an empty, unique temporary file next to `path` that keeps `path`'s suffix."""
    for _ in range(100):
        # Keep the real suffix last: writers such as matplotlib's savefig pick the format from it.
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}.tmp{path.suffix}")
        try:
            # 0o666 lets the process umask decide the final permissions, as for any ordinary file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise OSError(f"could not create a temporary file next to {path}: 100 random names were all taken")


class SaveError(OSError):
    """A file could not be written. The message names the file and the cause; the file under that name is as it
    was before the attempt (atomic_save writes a temporary file and renames it only when it is complete)."""


def describe_save_failure(path: Path, error: BaseException, existed: bool) -> str:
    """One line for a failed save: which file, why, that the earlier file is intact, and what to do."""
    if isinstance(error, OSError) and error.strerror:
        cause = error.strerror
    else:  # torch.save and others report a full disk as RuntimeError ('unexpected pos ...', 'write failed')
        text = str(error).splitlines()[0] if str(error) else ""
        cause = f"{type(error).__name__}: {text}" if text else type(error).__name__
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        free is not None and free < 1 << 20
    )
    if full:
        space = f" ({free / 2**20:.1f} MiB free)" if free is not None else ""
        advice = f"the disk holding {path.parent} is full{space}: free some space or choose another folder"
    elif isinstance(error, PermissionError):
        advice = f"check the permissions of {path.parent}, or choose another folder"
    else:
        advice = "check the folder and the disk"
    kept = f"the previous {path.name} is unchanged" if existed else f"no {path.name} was written"
    return f"could not write {path}: {cause}. {kept}; {advice}, then run again"


def atomic_save(obj_writer: Callable[[Path], None], path: str | os.PathLike[str]) -> None:
    """Call `obj_writer(tmp)` on a temporary file in `path`'s folder, fsync it, then rename it onto `path`.

    The parent folder is created if needed. If anything fails (a full disk, a writer error), the temporary file is
    removed, `path` is left as it was, and a `SaveError` naming `path` and the cause is raised (KeyboardInterrupt
    passes through unchanged). Example: `atomic_save(lambda p: torch.save(obj, p), "out/emb.pt")`.
    """
    path = Path(path)
    existed = path.exists()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_tmp_path(path)
        mode = stat.S_IMODE(tmp.stat().st_mode)  # what the umask gives an ordinary new file
        obj_writer(tmp)
        # Some writers replace the file with their own (safetensors' save_file creates it with mode 0600): give it
        # back the ordinary mode, so a saved prefix or checkpoint is readable like the rest.
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(e, SaveError):
            raise
        raise SaveError(describe_save_failure(path, e, existed)) from e
    except BaseException:  # Ctrl-C: no half file, and the interrupt goes on as it is
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(
    folder: str | os.PathLike[str], is_ours: Callable[[str], bool], older_than_s: float = 0.0
) -> list[Path]:
    """Delete the temporary files that atomic_save left in `folder` when a process was killed mid-save.

    Only temporaries whose final file name (e.g. `train_state.pt` for `.train_state.<hex>.tmp.pt`) satisfies
    `is_ours`, and that are older than `older_than_s` seconds, are removed; returns them."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for entry in folder.iterdir():
        m = _TMP_NAME.match(entry.name)
        if m is None or not entry.is_file() or not is_ours(m.group("stem") + (m.group("suffix") or "")):
            continue
        try:
            if now - entry.stat().st_mtime >= older_than_s:
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # another process finished or removed it meanwhile
            continue
    return removed


# ----- host-to-device copies


def staged(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` ready for a non-blocking copy to `device`: a CPU tensor bound for a GPU is first copied into pinned memory.

    A copy from ordinary (pageable) host memory makes the host wait until the GPU has finished everything queued
    before it, so the CPU could no longer prepare step n+1 while the GPU runs step n. PyTorch's pinned-memory
    cache keeps the buffer alive until the copy is done."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda" and not t.is_pinned():
        return t.pin_memory()
    return t


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device` through a non-blocking copy (from pinned memory, see `staged`)."""
    return staged(t, device).to(device, non_blocking=True)


# ----- weights-only unpickling: tensors and plain data only; named stand-ins for known harmless classes


def load_weights_only(path: str | os.PathLike, stand_ins: list | tuple = (), mmap: bool = False) -> object:
    """`torch.load(weights_only=True)` with `stand_ins` ((class, "module.Name") pairs) allowed for this call only.

    Anything else that is not a tensor or plain data raises `pickle.UnpicklingError` and is never executed."""
    with torch.serialization.safe_globals(list(stand_ins)):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def sniff_weights_file(path: str | os.PathLike) -> str | None:
    """What a weights file really is when it is no PyTorch pickle, from its first bytes: 'safetensors', or a
    description for an error message (a Git LFS pointer, a web page, an image); None when nothing is recognised."""
    with open(path, "rb") as f:
        head = f.read(64)
        size = os.fstat(f.fileno()).st_size
    if len(head) > 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    if head.startswith(b"version https://git-lfs"):
        return (
            "a Git LFS pointer, not the weights (the large file was never downloaded: run `git lfs pull`, or "
            "download the file directly)"
        )
    if head.lstrip()[:1] == b"<":
        return "a web page (HTML/XML), not weights: the download saved an error or login page"
    if head.startswith(b"\x89PNG"):
        return "a PNG image; embeddings hidden in images are not supported, use the .pt/.safetensors file"
    return None


def read_pickled_weights(
    path: Path,
    stand_ins: list | tuple,
    error: type[Exception],
    kind: str,
    refusal: str,
    retry: str,
    mmap: bool = False,
) -> object:
    """`load_weights_only` with one clear `error` per failure, for a file of `kind` ('PyTorch checkpoint'):
    a refused class ('refused to load <path>: it holds a pickled callable or object (name) that <refusal>'),
    bytes that are no pickle at all, or a damaged file (both end with the advice `retry`)."""
    try:
        return load_weights_only(path, stand_ins, mmap=mmap)
    except pickle.UnpicklingError as e:
        what = refused_global(e)
        if not what:  # no refused class: the bytes are no pickle at all (torch: "Unsupported operand")
            raise error(f"cannot read {path}: it is not a {kind} (no pickle inside). {retry}") from None
        raise error(f"refused to load {path}: it holds a pickled callable or object{what} that {refusal}") from e
    except Exception as e:  # torch raises many types for damaged files (RuntimeError, EOFError, KeyError, ...)
        raise error(
            f"cannot read {path}: the file is truncated or not a {kind} ({type(e).__name__}: {e}). {retry}"
        ) from e


def is_safetensors_file(path: Path, error: type[Exception]) -> bool:
    """True when the bytes are safetensors, whatever the file name; `error` for a file that is recognisably no
    weights at all (a Git LFS pointer, a web page, an image)."""
    kind = sniff_weights_file(path)
    if kind not in (None, "safetensors"):
        raise error(f"cannot read {path}: it is {kind}.")
    return kind == "safetensors"


def refused_global(error: Exception) -> str:
    """' (module.name)' of the global that weights-only unpickling refused, for error messages ('' if unknown)."""
    m = re.search(r"(?:GLOBAL|global|function|class) <?([\w.]+)", str(error))
    return f" ({m.group(1)})" if m else ""
