"""What every script needs: device and precision choice, and loading the model named by --config_path/--ckpt_path."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm.checkpoint import load_model

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny" / "tiny-sd.yaml"
SD_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
DEFAULT_CKPT = "models/Stable-diffusion/v1-5-pruned-emaonly.ckpt"


class UsageError(ValueError):
    """Bad command-line input; scripts print it as one line and exit 2."""


def number_in(lo: float, hi: float, kind: type = float, lo_open: bool = False, why: str = ""):
    """An argparse `type=` for a finite number in [lo, hi] ((lo, hi] with lo_open): 'nan', 'inf' and values outside
    give one argparse error naming the range, instead of a traceback deep inside torch later."""
    import argparse
    import math

    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            what = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"{text} is not {what} in {span}{f' ({why})' if why else ''}")
        return value

    parse.__name__ = f"number in {span}"  # argparse names the type in some messages
    return parse


def shipped_file(path: str | os.PathLike) -> Path:
    """A relative path that is not in the working directory but ships with APL (people.tsv, ...) -> APL's copy."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (ROOT / p).exists():
        return ROOT / p
    return p


def native_image_size(config_path: str | os.PathLike) -> int:
    """The side in pixels a model was trained at: its config's latent `image_size` x 8 (SD v1 512, SDXL 1024)."""
    from ldm.util import load_config

    params = load_config(shipped_file(config_path))["model"].get("params") or {}
    return int(params.get("image_size", 64)) * 8


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda:0 when available, else cpu; 'cuda:N' is checked to exist."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is visible on this machine (use --device cpu)")
        if (dev.index or 0) >= n:
            raise UsageError(f"--device {name}: only {n} GPU(s) visible (cuda:0..cuda:{n - 1})")
    return dev


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cpu" and precision == "fp16":
        raise UsageError("--precision fp16 is not supported on the CPU; use fp32 or bf16")
    return PRECISIONS[precision]


def is_tiny(config_path: str | os.PathLike) -> bool:
    """A random-weight test model of configs/tiny/ (tiny-sd.yaml, tiny-sdxl.yaml): no checkpoint needed."""
    return Path(config_path).resolve().parent == TINY_CONFIG.resolve().parent


def load_model_for_cli(
    config_path: str | os.PathLike,
    ckpt_path: str | os.PathLike | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
):
    """The model for a script run. The tiny config without a checkpoint gives seeded random weights (demo/tests).

    On a GPU this also lets cuDNN time its convolution algorithms once per shape (`cudnn.benchmark`): training and
    sampling run the same shapes thousands of times."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    if ckpt_path in (None, "", "none") or (is_tiny(config_path) and str(ckpt_path) == DEFAULT_CKPT):
        if not is_tiny(config_path):
            raise UsageError(
                f"--ckpt_path is required with {config_path}: download an SD v1.x checkpoint such as "
                f"v1-5-pruned-emaonly.ckpt to {DEFAULT_CKPT} (or use --config_path {TINY_CONFIG.relative_to(ROOT)}"
                " for the random-weight tiny model)"
            )
        torch.manual_seed(seed)
        return load_model(config_path, None, device, dtype)
    return load_model(config_path, ckpt_path, device, dtype)
