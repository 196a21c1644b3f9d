"""Reading diffusers model folders (SD v1.x and SDXL) strictly, under this repository's checkpoint names.

A folder holds `model_index.json` and one subfolder per component: `unet/`, `vae/`, `text_encoder/` and, for SDXL,
`text_encoder_2/`, each with its weights (`diffusion_pytorch_model.safetensors` or `model.safetensors`, `.bin`
pickles read weights-only, sharded `*.index.json`, or one `fp16`-style variant). Every tensor of each component
must land on one of our keys and every key must be filled, or the error names the file and the keys.

The name map is derived from our own module tree by a few rules per block type (diffusers numbers blocks per
resolution level, LDM consecutively), not written out as a table: `unet_names`, `vae_names`, `openclip_sources`.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from ldm.checkpoint import SD_CONFIG_HINT, SDXL_CONFIG_HINT, CheckpointError, _fmt_keys
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.sdxl import DiffusionEngine
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel, Upsample
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.encoders.openclip import FrozenOpenCLIPEmbedder2
from ldm.util import read_pickled_weights

STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")  # diffusers models, transformers models
_TOLERATED = re.compile(r"(^|\.)position_ids$")  # older transformers saved this buffer


@dataclass(frozen=True)
class Source:
    """Where one of our tensors comes from: diffusers keys and how they combine ('copy', 'qkv' rows, 'transpose')."""

    keys: tuple[str, ...]
    how: str = "copy"


# ----- name rules: our module prefix -> diffusers module prefix, applied to the longest matching prefix of a key

_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _block(prefixes: dict[str, str], ours: str, theirs: str, inner: Mapping[str, str] | None = None) -> None:
    prefixes[ours] = theirs
    for a, b in (inner or {}).items():
        prefixes[f"{ours}.{a}"] = f"{theirs}.{b}"


def _rename(keys, prefixes: Mapping[str, str]) -> dict[str, Source]:
    """Our key -> Source, renaming the longest module prefix found in `prefixes` (unlisted keys keep their name)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:n])
            if head in prefixes:
                out[key] = Source((prefixes[head] + "." + ".".join(parts[n:]),))
                break
        else:
            out[key] = Source((key,))
    return out


def unet_names(unet: UNetModel) -> dict[str, Source]:
    """Keys of our UNet -> diffusers UNet2DConditionModel keys (SD v1 and SDXL)."""
    p = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}

    def layers(path: str, block: nn.Module, level: str, j: int) -> None:
        for k, layer in enumerate(block):
            if isinstance(layer, ResBlock):
                _block(p, f"{path}.{k}", f"{level}.resnets.{j}", _RESBLOCK)
            elif isinstance(layer, SpatialTransformer):
                _block(p, f"{path}.{k}", f"{level}.attentions.{j}")  # same names inside
            elif isinstance(layer, (Downsample, Upsample)):
                op = "op" if isinstance(layer, Downsample) else "conv"
                kind = "downsamplers" if isinstance(layer, Downsample) else "upsamplers"
                p[f"{path}.{k}.{op}"] = f"{level}.{kind}.0.conv"

    level = j = 0  # diffusers: down_blocks.<level>.resnets.<j>; a Downsample closes a level
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            continue
        layers(f"input_blocks.{i}", block, f"down_blocks.{level}", j)
        level, j = (level + 1, 0) if isinstance(block[0], Downsample) else (level, j + 1)
    for k, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        _block(p, f"middle_block.{k}", f"mid_block.{name}", _RESBLOCK if k != 1 else None)
    level = j = 0  # up_blocks.<level>: an Upsample closes a level
    for i, block in enumerate(unet.output_blocks):
        layers(f"output_blocks.{i}", block, f"up_blocks.{level}", j)
        level, j = (level + 1, 0) if isinstance(block[-1], Upsample) else (level, j + 1)
    return _rename(unet.state_dict(), p)


def vae_names(vae: AutoencoderKL) -> dict[str, Source]:
    """Keys of our AutoencoderKL -> diffusers AutoencoderKL keys (its decoder counts levels from the bottom)."""
    p = {}
    for part, levels in (("encoder", vae.encoder.down), ("decoder", vae.decoder.up)):
        n = len(levels)
        for i, lvl in enumerate(levels):
            ours = f"{part}.{'down' if part == 'encoder' else 'up'}.{i}"
            theirs = f"{part}.down_blocks.{i}" if part == "encoder" else f"{part}.up_blocks.{n - 1 - i}"
            for j in range(len(lvl.block)):
                _block(p, f"{ours}.block.{j}", f"{theirs}.resnets.{j}", {"nin_shortcut": "conv_shortcut"})
            for j in range(len(lvl.attn)):
                _block(p, f"{ours}.attn.{j}", f"{theirs}.attentions.{j}", _VAE_ATTN)
            if hasattr(lvl, "downsample"):
                p[f"{ours}.downsample.conv"] = f"{theirs}.downsamplers.0.conv"
            if hasattr(lvl, "upsample"):
                p[f"{ours}.upsample.conv"] = f"{theirs}.upsamplers.0.conv"
        _block(p, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", {"nin_shortcut": "conv_shortcut"})
        _block(p, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN)
        _block(p, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", {"nin_shortcut": "conv_shortcut"})
        p[f"{part}.norm_out"] = f"{part}.conv_norm_out"
    return _rename(vae.state_dict(), p)


def clip_names(embedder: FrozenCLIPEmbedder) -> dict[str, Source]:
    """Our CLIP ViT-L keys (`transformer.text_model.*`) -> transformers CLIPTextModel keys (`text_model.*`)."""
    return {k: Source((k.removeprefix("transformer."),)) for k in embedder.state_dict()}


def openclip_sources(embedder: FrozenOpenCLIPEmbedder2) -> dict[str, Source]:
    """Our OpenCLIP keys (`model.*`) -> transformers CLIPTextModelWithProjection keys: q/k/v fused into in_proj,
    text_projection stored transposed (a Linear's weight)."""
    p = {"model.token_embedding": "text_model.embeddings.token_embedding",
         "model.ln_final": "text_model.final_layer_norm"}
    for i in range(len(embedder.model.transformer.resblocks)):
        _block(p, f"model.transformer.resblocks.{i}", f"text_model.encoder.layers.{i}",
               {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"})
    out = _rename(embedder.state_dict(), p)
    for key in out:
        m = re.fullmatch(r"model\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        if m:
            attn = f"text_model.encoder.layers.{m[1]}.self_attn"
            out[key] = Source(tuple(f"{attn}.{x}_proj.{m[2]}" for x in "qkv"), "qkv")
    out["model.positional_embedding"] = Source(("text_model.embeddings.position_embedding.weight",))
    out["model.text_projection"] = Source(("text_projection.weight",), "transpose")
    return out


# ----- files


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """A folder with model_index.json or a unet/ subfolder (the loader then says what is missing)."""
    path = Path(path)
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of one component: plain before a variant (`*.fp16.*`), .safetensors before .bin, a sharded
    `*.index.json` as its shards. Two variants and no plain weights is an error (which one was meant?)."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    stems = "|".join(STEMS)
    variants = {m[2] for n in names if (m := re.fullmatch(rf"({stems})\.(\w+)\.(safetensors|bin)", n))}
    variants |= {m[3] for n in names if (m := re.fullmatch(rf"({stems})\.(safetensors|bin)\.index\.(\w+)\.json", n))}
    for variant in ["", *sorted(variants)]:
        for ext in ("safetensors", "bin"):
            for stem in STEMS:
                single = f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"
                index = f"{stem}.{ext}.index.{variant}.json" if variant else f"{stem}.{ext}.index.json"
                if single in names or index in names:
                    if variant and len(variants) > 1:
                        raise CheckpointError(
                            f"{folder} holds several weight variants ({', '.join(sorted(variants))}) and no plain "
                            "weights: keep the one you mean and remove the others."
                        )
                    return [folder / single] if single in names else _shards(folder / index)
    raise CheckpointError(
        f"{folder}: no weights found (expected diffusion_pytorch_model.safetensors, model.safetensors or a .bin / "
        f"sharded .index.json of them; found {sorted(names) or 'nothing'}). Download the folder again, with weights."
    )


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {index}: not a weights index with a 'weight_map' ({e}).") from e
    shards = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise CheckpointError(f"{index} lists shards that are not in {index.parent}: {absent}. Download them too.")
    return shards


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path}: not a valid .safetensors file, or truncated ({e}).") from e
    obj = read_pickled_weights(  # weights only: a .bin that would run code when unpickled is refused
        path,
        [],
        CheckpointError,
        kind="PyTorch weights file",
        refusal="would run code when unpickled, and APL never executes code from weight files. Use the folder's "
        ".safetensors weights instead.",
        retry="Download it again.",
        mmap=zipfile.is_zipfile(path),
    )
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
    return dict(obj)


def _require(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} is missing: a diffusers model folder needs unet/, vae/ and text_encoder/ (SDXL also "
            "text_encoder_2/). Download the whole folder."
        )


def read_component(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of one component folder, and the file name(s) to quote in errors."""
    _require(folder)
    files = _weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors |= _read_file(f)
    return tensors, str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"


# Layouts that older diffusers / transformers versions wrote, renamed to today's on reading.
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _normalise(tensors: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    if component == "vae":
        pattern = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
        return {pattern.sub(lambda m: m[1] + _OLD_VAE_ATTENTION[m[2]] + ".", k): v for k, v in tensors.items()}
    if component.startswith("text_encoder") and not any(k.startswith("text_model.") for k in tensors):
        # transformers >= 5 saves CLIPTextModel without its `text_model.` level; older versions with it.
        return {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in tensors.items()}
    return tensors


def _combine(src: Source, tensors: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    parts = [tensors[k] for k in src.keys]
    t = torch.cat(parts) if src.how == "qkv" else parts[0].T if src.how == "transpose" else parts[0]
    if t.shape != shape and t.numel() == shape.numel() and tuple(shape[t.ndim :]) == (1,) * (len(shape) - t.ndim):
        t = t.reshape(shape)  # a Linear weight (C, C) for our 1x1 conv (C, C, 1, 1): the VAE's attention
    return t.contiguous()


def map_component(
    tensors: Mapping[str, torch.Tensor], sources: Mapping[str, Source], ours: nn.Module, what: str
) -> dict[str, torch.Tensor]:
    """Our tensors of one component from its diffusers tensors; strict: every key both ways, every shape."""
    expected = {k: v.shape for k, v in ours.state_dict().items()}
    needed = {k for src in sources.values() for k in src.keys}
    missing = needed - tensors.keys()
    unexpected = {k for k in tensors.keys() - needed if not _TOLERATED.search(k)}
    out, wrong = {}, []
    if not missing:
        for key, src in sources.items():
            out[key] = _combine(src, tensors, expected[key])
            if out[key].shape != expected[key]:
                wrong.append(f"{'+'.join(src.keys)}: file {list(out[key].shape)} vs model {list(expected[key])}")
    problems = [f"missing {_fmt_keys(missing)}"] if missing else []
    problems += [f"unexpected {_fmt_keys(unexpected)}"] if unexpected else []
    if wrong:
        more = " ..." if len(wrong) > 3 else ""
        problems.append(f"wrong shapes for {len(wrong)} tensors ({'; '.join(wrong[:3])}{more})")
    if problems:
        raise CheckpointError(
            f"{what} does not match the model config: {'; '.join(problems)}. Likely cause: this component is from "
            "another model (SD 2.x, another SDXL variant, a differently sized fine-tune?)."
        )
    return out


def _config_json(folder: Path) -> dict:
    path = folder / ("scheduler_config.json" if folder.name == "scheduler" else "config.json")
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"cannot read {path}: not valid JSON ({e}).") from e


def _check_configs(path: Path, model: LatentDiffusion) -> None:
    """What the component configs say that the weights cannot: the noise schedule, eps prediction, latent scale."""
    sched = _config_json(path / "scheduler")
    want = {"num_train_timesteps": model.num_timesteps, "beta_start": model.linear_start,
            "beta_end": model.linear_end, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    for key, value in want.items():
        got = sched.get(key, value)
        same = abs(float(got) - float(value)) <= 1e-6 * abs(float(value)) if isinstance(value, float) else got == value
        if not same:
            raise CheckpointError(
                f"{path / 'scheduler' / 'scheduler_config.json'}: {key} is {got!r}, the config says {value!r}; this "
                "model was trained with another noise schedule or prediction type (APL supports SD's eps models)."
            )
    scale = _config_json(path / "vae").get("scaling_factor", model.scale_factor)
    if abs(float(scale) - model.scale_factor) > 1e-6:
        raise CheckpointError(
            f"{path / 'vae' / 'config.json'}: scaling_factor {scale} differs from the config's scale_factor "
            f"{model.scale_factor} (SD v1 0.18215, SDXL 0.13025): wrong --config_path for this model?"
        )


def _components(model: LatentDiffusion) -> list[tuple[str, str, nn.Module, Callable[[nn.Module], dict]]]:
    """(diffusers subfolder, our key prefix, our module, its name map) for each component of `model`."""
    parts: list[tuple[str, str, nn.Module, Callable[[nn.Module], dict]]] = [
        ("unet", "model.diffusion_model.", model.model.diffusion_model, unet_names),
        ("vae", "first_stage_model.", model.first_stage_model, vae_names),
    ]
    if isinstance(model, DiffusionEngine):
        text = model.conditioner.text_embedders
        for folder, (i, embedder) in zip(("text_encoder", "text_encoder_2"), sorted(text.items()), strict=False):
            names = clip_names if isinstance(embedder, FrozenCLIPEmbedder) else openclip_sources
            parts.append((folder, f"conditioner.embedders.{i}.", embedder, names))
    else:
        parts.append(("text_encoder", "cond_stage_model.", model.cond_stage_model, clip_names))
    return parts


def read_diffusers_folder(path: str | os.PathLike, model: LatentDiffusion) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers model folder under `model`'s checkpoint names (strict; `model` may be on meta)."""
    path = Path(path)
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{path} has no model_index.json: not a complete diffusers model folder.")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"cannot read {index_path}: not valid JSON ({e}).") from e
    listed = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    is_xl, want_xl = "text_encoder_2" in listed, isinstance(model, DiffusionEngine)
    if "text_encoder" not in listed and "text_encoder_2" in listed:
        raise CheckpointError(f"{path} is the SDXL refiner (no text_encoder); APL needs SDXL base or a fine-tune.")
    if is_xl != want_xl:
        kind, hint = ("an SDXL", SDXL_CONFIG_HINT) if is_xl else ("an SD v1.x", SD_CONFIG_HINT)
        raise CheckpointError(
            f"{path} is {kind} diffusers folder ({index.get('_class_name', '?')}, text encoders: "
            f"{sorted(k for k in listed if k.startswith('text_encoder'))}): load it with --config_path {hint}."
        )
    _check_configs(path, model)
    parts = _components(model)
    for folder, *_ in parts:  # before reading gigabytes of the others
        _require(path / folder)
    out: dict[str, torch.Tensor] = {}
    for folder, prefix, module, names in parts:
        tensors, where = read_component(path / folder)
        mapped = map_component(_normalise(tensors, folder), names(module), module, where)
        out |= {prefix + k: v for k, v in mapped.items()}
    return out
