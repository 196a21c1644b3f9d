"""Reading, checking and writing SD v1 / SDXL checkpoints (`.ckpt`/`.pt`, `.safetensors`, diffusers folders), with no
unsafe unpickling.

The module tree of `LatentDiffusion` *is* the checkpoint layout, so loading is a strict key/shape comparison
followed by `load_state_dict(assign=True)` into a model built on the `meta` device (no double allocation).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from ldm.models.diffusion.ddpm import SCHEDULE_KEYS, LatentDiffusion, schedule_tensors
from ldm.util import (
    atomic_save,
    instantiate_from_config,
    is_safetensors_file,
    load_config,
    read_pickled_weights,
)

# Keys that real SD v1 / SDXL files carry beyond the model's tensors; tolerated by name, never loaded.
TOLERATED = (
    re.compile(r"^model_ema\."),
    re.compile(r"(^|\.)position_ids$"),
    re.compile(r"^logvar$"),
    re.compile(r"^lvlb_weights$"),
    re.compile(r"^conditioner\.embedders\.\d+\.model\.logit_scale$"),  # OpenCLIP's image-text scale, no text role
    re.compile(r"^denoiser\.sigmas$"),  # SGM's schedule as sigmas, in some SGM-trained files
)
SD_CONFIG_HINT = "configs/stable-diffusion/v1-inference.yaml"
SDXL_CONFIG_HINT = "configs/sdxl/sd_xl_base.yaml"
SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A weight file APL cannot use; the message says which file, what is wrong and what to do."""


class _IgnoredPickledObject:
    """Stand-in for harmless training-state objects (Lightning callbacks) found in some `.ckpt` files."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


# Training-state classes seen inside SD `.ckpt` files; they are rebuilt as inert stand-ins, never imported.
_STUB_GLOBALS = [
    (_IgnoredPickledObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    # An embedding file (textual inversion / APL .pt) passed as the model: read it, then say what it is.
    (_IgnoredPickledObject, "torch.nn.modules.container.ParameterDict"),
]


def _numpy_globals() -> list:
    """numpy scalars/dtypes that store `global_step` in some checkpoints (data, not code)."""
    import numpy as np

    out: list = [(np.dtype, "numpy.dtype"), np.dtype]
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    out += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    out += [getattr(np.dtypes, n) for n in ("Int64DType", "Float64DType", "Float32DType", "Int32DType")]
    return out


def _fmt_keys(keys, n: int = 5) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more + f" [{len(keys)} in all]"


def _check_path(path: Path) -> None:
    if path.is_dir():
        if (path / "model_index.json").exists() or (path / "unet").is_dir():
            raise CheckpointError(
                f"{path} is a diffusers model folder: load it with load_model(config, folder) (scripts: --ckpt_path), "
                "which maps its diffusers names onto the config's model; read_state_dict reads single files."
            )
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the .ckpt/.safetensors file itself.")
    if not path.exists():
        raise CheckpointError(
            f"checkpoint not found: {path} (download e.g. v1-5-pruned-emaonly.ckpt and pass its path with --ckpt_path)"
        )
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish.")


def _read_pickle(path: Path) -> object:
    return read_pickled_weights(
        path,
        _STUB_GLOBALS + _numpy_globals(),
        CheckpointError,
        kind="PyTorch checkpoint",
        refusal="would run code when unpickled, and APL never executes code from weight files. Use a .safetensors "
        "copy of the model, or convert this file to .safetensors yourself only if you trust its source.",
        retry="Download it again and compare its size/hash with the source.",
        mmap=zipfile.is_zipfile(path),
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: top-level or under `state_dict`; `.safetensors` or weights-only pickles."""
    path = Path(path)
    _check_path(path)
    safetensors_bytes = is_safetensors_file(path, CheckpointError)  # a .ckpt name on safetensors bytes loads too
    if path.suffix.lower() in SAFETENSORS_EXT or safetensors_bytes:
        try:
            obj: object = load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: not a valid .safetensors file, or truncated ({e}).") from e
    else:
        obj = _read_pickle(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = {str(k) for k in obj}
        raise CheckpointError(f"{path} holds no tensors (keys: {_fmt_keys(keys)}); {guess_cause(keys)}")
    return _normalise_keys(tensors)


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Some SD v1 fine-tunes were saved with an older transformers CLIP that lacked the `text_model.` level."""
    old = "cond_stage_model.transformer."
    if any(k.startswith(old + "encoder.") for k in sd) and not any(k.startswith(old + "text_model.") for k in sd):
        sd = {(old + "text_model." + k[len(old) :] if k.startswith(old) else k): v for k, v in sd.items()}
    return sd


def _family(keys: set[str]) -> str | None:
    """'sdxl', 'sdxl-refiner' or 'v1' from a checkpoint's (or a model's) key names; None if neither."""
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"  # its only text encoder is OpenCLIP ViT-bigG
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "v1"
    return None


def guess_cause(keys: set[str], shape_of: Mapping[str, tuple] | None = None, expected: set[str] | None = None) -> str:
    """A human guess of what kind of file this is, from its key names (and the model's, `expected`, if known)."""
    shape_of = shape_of or {}
    family, model_family = _family(keys), _family(expected or set())
    if family == "sdxl-refiner":
        return "this looks like the SDXL refiner (OpenCLIP only); APL needs SDXL base or a fine-tune of it."
    if family == "sdxl" and model_family != "sdxl":
        return f"this looks like an SDXL checkpoint: load it with --config_path {SDXL_CONFIG_HINT}."
    if family == "v1" and model_family == "sdxl":
        return f"this looks like an SD v1.x checkpoint: load it with --config_path {SD_CONFIG_HINT}."
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "this looks like an SD 2.x checkpoint (OpenCLIP ViT-H text encoder); APL supports SD v1.x and SDXL."
    conv_in = shape_of.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) > 1 and conv_in[1] == 9:
        return "this looks like an inpainting checkpoint (9 input channels); APL needs a text-to-image model."
    to_k = shape_of.get("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and to_k[-1] == 1024:
        return "this looks like an SD 2.x checkpoint (1024-d text context); APL supports SD v1.x (768-d) and SDXL."
    if any("lora" in k.lower() for k in keys):
        return "this looks like a LoRA file; load the base checkpoint instead (merge LoRAs elsewhere)."
    if keys & {"string_to_param", "string_to_token", "emb_params"} or any(
        k.startswith("string_to_param") for k in keys
    ):
        return "this looks like a textual-inversion/APL embedding file; pass it as the embedding, not the model."
    if any(k.startswith(("down_blocks.", "unet.", "text_encoder.", "time_embedding.", "mid_block.")) for k in keys):
        return (
            "this looks like diffusers-format weights of one component; pass the whole diffusers model folder (the "
            "one with model_index.json) as --ckpt_path, or a single-file checkpoint (.ckpt/.safetensors)."
        )
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and not any(k.startswith("model.") for k in keys):
        return "this looks like a VAE-only file; use a full SD v1.x or SDXL checkpoint."
    if len(keys) <= 4:
        return "the file holds only a few tensors; it is not a full SD v1.x or SDXL checkpoint."
    if family == "sdxl":
        return "it is an SDXL checkpoint that does not fit this SDXL config (another variant, or a damaged file?)."
    kind = "an SDXL" if model_family == "sdxl" else "an SD v1.x"
    return f"it is not {kind} checkpoint for this config (wrong model or wrong config?)."


def check_state_dict(
    model: LatentDiffusion, sd: Mapping[str, torch.Tensor], path: str | os.PathLike, schedule_rtol: float = 1e-3
) -> dict[str, torch.Tensor]:
    """Strictly compare a file's tensors with the model; return the tensors to load (schedule excluded)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keys = set(sd)
    tolerated = {k for k in keys - expected.keys() if any(p.search(k) for p in TOLERATED)}
    missing = expected.keys() - keys - set(SCHEDULE_KEYS)
    unexpected = keys - expected.keys() - tolerated
    shapes = {k: tuple(sd[k].shape) for k in keys}
    wrong = {k for k in keys & expected.keys() if shapes[k] != expected[k]}
    problems = []
    if missing:
        problems.append(f"missing {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {_fmt_keys(unexpected)}")
    if wrong:
        detail = "; ".join(f"{k}: file {list(shapes[k])} vs model {list(expected[k])}" for k in sorted(wrong)[:3])
        problems.append(f"wrong shapes for {len(wrong)} tensors ({detail}{' ...' if len(wrong) > 3 else ''})")
    if problems:
        raise CheckpointError(
            f"{path} does not match the model config: "
            + "; ".join(problems)
            + f". Likely cause: {guess_cause(keys, shapes, set(expected))}"
        )
    ref = schedule_tensors(model.num_timesteps, model.linear_start, model.linear_end)
    for k in SCHEDULE_KEYS:
        if k not in sd:
            continue
        # Compare at the file's precision: bf16 files round the schedule by ~4e-3 relative.
        rtol = max(schedule_rtol, 2 * torch.finfo(sd[k].dtype).eps) if sd[k].is_floating_point() else schedule_rtol
        if not torch.allclose(sd[k].double(), ref[k].double(), rtol=rtol, atol=1e-6):
            raise CheckpointError(
                f"{path}: schedule buffer {k!r} disagrees with the config (timesteps/linear_start/"
                "linear_end); this checkpoint was trained with another noise schedule."
            )
    return {k: v for k, v in sd.items() if k in expected and k not in SCHEDULE_KEYS}


def checked_values(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors in `dtype`, after checking that every one is floating point and finite there.

    A key set and shapes can be right while the values are not: an int8/bool tensor (a quantised or damaged file)
    or NaN/inf values (a diverged fine-tune, a bad conversion) load "strictly" and draw black or garbage images."""
    not_float = {k: v.dtype for k, v in tensors.items() if not v.is_floating_point()}
    if not_float:
        k = sorted(not_float)[0]
        raise CheckpointError(
            f"{path}: {len(not_float)} weight tensors are not floating point (e.g. {k}: {not_float[k]}); SD weights "
            "are fp32/fp16/bf16. The file is quantised or damaged: use an unquantised .ckpt/.safetensors copy."
        )
    out, broken, overflow = {}, [], []
    for k, v in tensors.items():
        c = v.to(dtype)
        if not bool(torch.isfinite(c).all()):
            (broken if not bool(torch.isfinite(v).all()) else overflow).append(k)
        out[k] = c
    if broken:
        raise CheckpointError(
            f"{path}: {len(broken)} weight tensors hold NaN or infinite values ({_fmt_keys(broken, 3)}); the file "
            "is damaged or the fine-tune diverged. Download it again or use another checkpoint."
        )
    if overflow:
        raise CheckpointError(
            f"{path}: {len(overflow)} weight tensors exceed the range of {str(dtype).replace('torch.', '')} "
            f"({_fmt_keys(overflow, 3)}); load it with --precision fp32 or bf16."
        )
    return out


def build_model(config: Mapping | str | os.PathLike, device: str | torch.device = "cpu") -> LatentDiffusion:
    """Instantiate the model of a CompVis config (random init on `device`, or shapes only on 'meta')."""
    config = load_config(config) if not isinstance(config, Mapping) else config
    with torch.device(device):
        model = instantiate_from_config(config["model"])
    if not isinstance(model, LatentDiffusion):
        raise CheckpointError("config's model target must be ldm.models.diffusion.ddpm.LatentDiffusion")
    return model


def _read_for(config: Mapping | str | os.PathLike, ckpt_path: str | os.PathLike) -> tuple[dict, LatentDiffusion]:
    """The tensors of `ckpt_path` under our names, and the config's model on `meta`. A file is read first (a bad
    file fails fast); a diffusers folder after the model is built, since its names are mapped onto the model."""
    from ldm.diffusers_folder import is_diffusers_folder, read_diffusers_folder  # it imports this module

    if is_diffusers_folder(ckpt_path):
        model = build_model(config, "meta")
        return read_diffusers_folder(ckpt_path, model), model
    sd = read_state_dict(ckpt_path)
    return sd, build_model(config, "meta")


def load_model(
    config: Mapping | str | os.PathLike,
    ckpt_path: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentDiffusion:
    """Build the model of `config` and load `ckpt_path` (a checkpoint file or a diffusers model folder) strictly;
    frozen, eval mode, weights in `dtype`.

    `ckpt_path=None` gives random weights (tests, the tiny demo)."""
    if ckpt_path is None:
        model = build_model(config, "cpu")
    else:
        sd, model = _read_for(config, ckpt_path)
        to_load = check_state_dict(model, sd, ckpt_path)
        model.load_state_dict(checked_values(to_load, ckpt_path, dtype), strict=False, assign=True)
        model.register_schedule()
        left = [n for n, t in model.state_dict().items() if t.is_meta]
        assert not left, f"internal error: tensors left unloaded: {left[:5]}"
    model.set_precision(dtype)
    return model.to(device).eval().requires_grad_(False)


def save_checkpoint(
    model_or_sd: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> None:
    """Write an SD v1 checkpoint atomically: `.safetensors`, or a `.ckpt` holding {'state_dict': ...}."""
    path = Path(path)
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    sd = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() and k not in SCHEDULE_KEYS else v)
        .detach()
        .cpu()
        .contiguous()
        for k, v in sd.items()
    }
    if path.suffix.lower() in SAFETENSORS_EXT:
        atomic_save(lambda tmp: save_safetensors(sd, str(tmp), metadata={"format": "pt"}), path)
    else:
        atomic_save(lambda tmp: torch.save({"state_dict": sd}, tmp), path)
