"""The learned prefix for any model family: one EmbeddingManager per text encoder.

SD v1.x has one text encoder, and its prefix is an `EmbeddingManager` (the original's object and file layout).
SDXL has two, CLIP ViT-L (768-d) and OpenCLIP ViT-bigG (1280-d); `alz` is the same single BPE token in both, and
its prefix is a `PrefixSet` of two managers with the same placeholder and N, trained together with the same loss.

SDXL prefix files are the embedding format SDXL tools already read: `clip_l` (N, 768) and `clip_g` (N, 1280)
tensors (AUTOMATIC1111, Forge and ComfyUI load such a `.safetensors`/`.pt` as it is); APL's `.safetensors` adds
its metadata (placeholder, token id, N, step, base model) to the header, where those tools ignore it.

    prefix = make_prefix(model, "alz", 10, generator=g)   # EmbeddingManager (SD v1) or PrefixSet (SDXL)
    prefix = load_prefix(model, "APL-1000.safetensors")
    cond = model.get_learned_conditioning(["alz A portrait of ..."], embedding_manager=prefix)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as save_safetensors
from torch import nn

from ldm.modules.embedding_manager import (
    FORMAT_NAME,
    FORMAT_VERSION,
    READ_FIX,
    EmbeddingFileError,
    EmbeddingManager,
    _check_file,
    _read_pickle,
    _torch_save_portable,
    check_diffusers_token,
    check_vectors,
)
from ldm.util import atomic_save, is_safetensors_file

# The names SDXL embedding files give the two encoders' vectors, by encoder class.
ENCODER_NAMES = {"FrozenCLIPEmbedder": "clip_l", "FrozenOpenCLIPEmbedder2": "clip_g"}
SDXL_KEYS = ("clip_l", "clip_g")


def text_embedders(model: nn.Module) -> dict[int, nn.Module]:
    """The model's text encoders by index: SD v1 {0: cond_stage_model}; SDXL the conditioner's text embedders."""
    conditioner = getattr(model, "conditioner", None)
    if conditioner is not None:
        return dict(conditioner.text_embedders)
    return {0: model.cond_stage_model}


def is_multi_encoder(model: nn.Module) -> bool:
    return len(text_embedders(model)) > 1


def tokenizer_of(model: nn.Module):
    """The BPE tokenizer of the model's first text encoder (all share CLIP's vocabulary; padding differs)."""
    return next(iter(text_embedders(model).values())).tokenizer


def tokenize_prompts(model: nn.Module, prompts: Sequence[str]) -> torch.Tensor | dict[int, torch.Tensor]:
    """Token ids on the CPU as get_learned_conditioning takes them: (B, 77) for SD v1; one (B, 77) per encoder for
    SDXL (CLIP ViT-L pads with the end token, OpenCLIP with 0)."""
    embedders = text_embedders(model)
    if len(embedders) == 1:
        return next(iter(embedders.values())).tokenizer(list(prompts))
    return {i: e.tokenizer(list(prompts)) for i, e in embedders.items()}


def _encoder_name(embedder: nn.Module, index: int) -> str:
    return ENCODER_NAMES.get(type(embedder).__name__, f"encoder_{index}")


class PrefixSet(nn.Module):
    """One EmbeddingManager per text encoder (same placeholders and N); pass it as get_learned_conditioning's
    `embedding_manager`. It offers what training and saving use of a single manager."""

    def __init__(self, managers: Mapping[int, EmbeddingManager], names: Mapping[int, str]) -> None:
        super().__init__()
        if len({tuple(m.string_to_token_dict.items()) for m in managers.values()}) != 1:
            raise ValueError("PrefixSet: every encoder's manager must have the same placeholders and token ids.")
        if len({m.num_vectors_per_token for m in managers.values()}) != 1:
            raise ValueError("PrefixSet: every encoder's manager must have the same number of vectors.")
        self.indices = sorted(managers)
        self.names = {i: names[i] for i in self.indices}
        self.managers = nn.ModuleDict({str(i): managers[i] for i in self.indices})
        first = self.managers[str(self.indices[0])]
        self.string_to_token_dict = dict(first.string_to_token_dict)
        self.num_vectors_per_token = first.num_vectors_per_token
        self.tokenizer = first.tokenizer
        self.metadata: dict = {}

    def hook(self, index: int) -> EmbeddingManager | None:
        """The manager of text encoder `index` (the conditioner asks for each encoder's hook)."""
        key = str(index)
        return self.managers[key] if key in self.managers else None

    def by_name(self) -> dict[str, EmbeddingManager]:
        return {self.names[i]: self.managers[str(i)] for i in self.indices}

    @property
    def token_dim(self) -> str:
        """The encoders' widths, e.g. '768+1280' (records and messages)."""
        return "+".join(str(self.managers[str(i)].token_dim) for i in self.indices)

    @property
    def string_to_param_dict(self) -> dict[str, nn.Parameter]:
        """Every encoder's vectors under '<encoder name>.<placeholder>' (e.g. 'clip_g.alz'): what a training
        state saves and restores."""
        return {
            f"{self.names[i]}.{s}": p
            for i in self.indices
            for s, p in self.managers[str(i)].string_to_param_dict.items()
        }

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [p for i in self.indices for p in self.managers[str(i)].embedding_parameters()]

    def check_prompts_fit(self, prompts: Sequence[str]) -> None:
        next(iter(self.managers.values())).check_prompts_fit(prompts)

    def prompt_room(self, prompt: str) -> tuple[int, int]:
        return next(iter(self.managers.values())).prompt_room(prompt)

    def _vectors(self, path: Path) -> dict[str, torch.Tensor]:
        """{'clip_l': (N, 768), 'clip_g': (N, 1280)} of the single placeholder, checked for a file at `path`."""
        if len(self.string_to_token_dict) != 1:
            raise ValueError(f"SDXL prefix files hold one placeholder; this set has {list(self.string_to_token_dict)}")
        return {name: next(iter(m._cpu_vectors(path).values())) for name, m in self.by_name().items()}

    def save(self, path: str | os.PathLike, *, step: int | None = None, base_model: str | None = None) -> None:
        """`.safetensors`: clip_l/clip_g tensors with APL's metadata; `.pt`: the clip_l/clip_g dict alone."""
        path = Path(path)
        placeholder, token = next(iter(self.string_to_token_dict.items()))
        save_sdxl(self._vectors(path), path, placeholder, token, step=step, base_model=base_model)

    def export_a1111(
        self, path: str | os.PathLike, name: str | None = None, step: int = 0, base_model: str | None = None
    ) -> None:
        """The SDXL embedding file of AUTOMATIC1111 / Forge / ComfyUI (prompt word: the file name)."""
        self.save(path, step=step, base_model=base_model)

    def export_diffusers(
        self, path: str | os.PathLike, token: str | None = None, base_model: str | None = None
    ) -> list[Path]:
        """One diffusers textual-inversion file per encoder (see `export_sdxl_diffusers`)."""
        path = Path(path)
        placeholder = next(iter(self.string_to_token_dict))
        token = check_diffusers_token(token or f"<{placeholder}>", self.tokenizer, "--token")
        return export_sdxl_diffusers(self._vectors(path), path, token, base_model)


def save_sdxl(
    vectors: Mapping[str, torch.Tensor],
    path: Path,
    placeholder: str = "alz",
    token_id: int | None = None,
    step: int | None = None,
    base_model: str | None = None,
) -> None:
    """An SDXL prefix file: `.safetensors` with clip_l/clip_g and APL's metadata in the header, or a `.pt` holding
    the clip_l/clip_g dict alone (AUTOMATIC1111 reads every entry of an SDXL .pt as a tensor)."""
    vectors = {k: vectors[k].detach().float().cpu().contiguous() for k in SDXL_KEYS}
    for k, v in vectors.items():
        check_vectors(v, f"refusing to write {path}: {k!r}", "nothing was written")
    if path.suffix.lower() == ".safetensors":
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "family": "sdxl",
            "placeholders": json.dumps([placeholder]),
            "num_vectors": str(vectors["clip_l"].shape[0]),
            "token_ids": json.dumps({placeholder: token_id} if token_id is not None else {}),
            "width": f"{vectors['clip_l'].shape[1]}+{vectors['clip_g'].shape[1]}",
            "base_model": base_model or "",
            "step": "" if step is None else str(int(step)),
        }
        atomic_save(lambda tmp: save_safetensors(vectors, str(tmp), metadata=meta), path)
    elif path.suffix.lower() == ".pt":
        atomic_save(lambda tmp: _torch_save_portable(vectors, str(tmp), path), path)
    else:
        raise ValueError(f"an SDXL prefix is written as .safetensors or .pt, not {path.name!r}")


def export_sdxl_diffusers(
    vectors: Mapping[str, torch.Tensor], path: Path, token: str, base_model: str | None = None
) -> list[Path]:
    """`<stem>_clip_l.safetensors` and `<stem>_clip_g.safetensors`, each {token: (N, width)}, for diffusers:
    `pipe.load_textual_inversion(f_l, token=t, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`, then
    the same with f_g, `pipe.text_encoder_2` and `pipe.tokenizer_2`. Returns the paths written."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"the SDXL diffusers export writes .safetensors files, not {path.name!r}")
    out = []
    for name in SDXL_KEYS:
        v = vectors[name].detach().float().cpu().contiguous()
        target = path.with_name(f"{path.stem}_{name}{path.suffix}")
        check_vectors(v, f"refusing to write {target}: {name!r}", "nothing was written")
        meta = {"apl_width": str(v.shape[1]), "apl_base_model": base_model or "", "apl_encoder": name}
        atomic_save(lambda tmp, v=v, meta=meta: save_safetensors({token: v}, str(tmp), metadata=meta), target)
        out.append(target)
    return out


def read_sdxl_embedding(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """({'clip_l': (N, 768), 'clip_g': (N, 1280)}, metadata) of an SDXL embedding file (APL's, A1111's, kohya's),
    read without unsafe unpickling; every vector is checked."""
    path = Path(path)
    _check_file(path)
    meta: dict = {}
    if path.suffix.lower() == ".safetensors" or is_safetensors_file(path, EmbeddingFileError):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                raw = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise EmbeddingFileError(f"cannot read {path}: not a valid .safetensors file, or truncated ({e}).") from e
        try:
            meta = {
                "step": int(raw["step"]) if raw.get("step") else None,
                "base_model": raw.get("base_model") or raw.get("apl_base_model") or None,
                "token_ids": json.loads(raw.get("token_ids", "{}")),
                "placeholders": json.loads(raw.get("placeholders", "[]")),
            }
        except (ValueError, TypeError) as e:
            raise EmbeddingFileError(f"{path}: malformed metadata ({e}); metadata was {raw}.") from e
    else:
        obj = _read_pickle(path)
        tensors = dict(obj) if isinstance(obj, Mapping) else {}
        meta = {"step": obj.get("step") if isinstance(obj, Mapping) else None}
    if not set(SDXL_KEYS) <= set(tensors):
        raise EmbeddingFileError(
            f"{path} is no SDXL prefix: it holds {sorted(map(str, tensors))[:6]}, not clip_l and clip_g vectors "
            "(an SD v1.x prefix is used with an SD v1.x model)."
        )
    out = {}
    for key in SDXL_KEYS:
        v = tensors[key]
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or 0 in v.shape:
            raise EmbeddingFileError(f"{path}: {key!r} is not an (N, width) tensor of vectors.")
        check_vectors(v, f"{path}: {key!r}", READ_FIX)
        out[key] = v.detach().float().cpu()
    if out["clip_l"].shape[0] != out["clip_g"].shape[0]:
        raise EmbeddingFileError(
            f"{path}: clip_l has {out['clip_l'].shape[0]} vectors and clip_g {out['clip_g'].shape[0]}; APL trains "
            "the same number in both encoders."
        )
    return out, meta


def is_sdxl_embedding(path: str | os.PathLike) -> bool:
    """True when the file holds clip_l and clip_g vectors (without reading the tensors of a .safetensors)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors" or is_safetensors_file(path, EmbeddingFileError):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return set(SDXL_KEYS) <= set(f.keys())
        obj = _read_pickle(path)
    except (EmbeddingFileError, SafetensorError, OSError, ValueError):
        return False
    return isinstance(obj, Mapping) and set(SDXL_KEYS) <= set(obj)


def make_prefix(
    model: nn.Module,
    placeholder: str = "alz",
    num_vectors: int = 10,
    init_word: str | None = None,
    generator: torch.Generator | None = None,
    init: str = "uniform",
) -> EmbeddingManager | PrefixSet:
    """A new prefix for `model`: an EmbeddingManager (one text encoder) or a PrefixSet (SDXL), seeded by
    `generator` (the encoders draw one after the other from it)."""
    embedders = text_embedders(model)
    managers = {
        i: EmbeddingManager(
            e, [placeholder], num_vectors, [init_word] if init_word else None, generator=generator, init=init
        )
        for i, e in embedders.items()
    }
    if len(managers) == 1:
        return next(iter(managers.values()))
    return PrefixSet(managers, {i: _encoder_name(e, i) for i, e in embedders.items()})


def load_prefix(model: nn.Module, path: str | os.PathLike) -> EmbeddingManager | PrefixSet:
    """The prefix in `path` for `model`, checked: the file's family and every encoder's width must fit."""
    embedders = text_embedders(model)
    if len(embedders) == 1:
        return EmbeddingManager.from_file(next(iter(embedders.values())), path)
    if not is_sdxl_embedding(path):
        _check_file(Path(path))
        raise EmbeddingFileError(
            f"{path} is a single-encoder prefix (SD v1.x), but this model has {len(embedders)} text encoders "
            "(SDXL): an SDXL prefix holds clip_l and clip_g vectors (train one with this model's --config_path)."
        )
    vectors, meta = read_sdxl_embedding(path)
    names = {i: _encoder_name(e, i) for i, e in embedders.items()}
    placeholder = (meta.get("placeholders") or ["alz"])[0]
    n = next(iter(vectors.values())).shape[0]
    managers = {}
    for i, e in embedders.items():
        v = vectors.get(names[i])
        if v is None:
            raise EmbeddingFileError(f"{path} has no {names[i]!r} vectors for text encoder {i}.")
        width = e.token_embedding.weight.shape[1]
        if v.shape[1] != width:
            raise EmbeddingFileError(
                f"{path}: {names[i]!r} vectors are {v.shape[1]}-d but this model's encoder {i} is {width}-d: the "
                "prefix belongs to another model (SDXL: clip_l 768, clip_g 1280)."
            )
        em = EmbeddingManager(e, [placeholder], n, generator=torch.Generator())
        token = meta.get("token_ids", {}).get(placeholder)
        if token is not None and token != em.string_to_token_dict[placeholder]:
            raise EmbeddingFileError(
                f"{path}: placeholder {placeholder!r} has token id {token} in the file but "
                f"{em.string_to_token_dict[placeholder]} with this tokenizer."
            )
        with torch.no_grad():
            em.string_to_param_dict[placeholder].copy_(v)
        managers[i] = em
    prefix = PrefixSet(managers, names)
    prefix.metadata = dict(meta)
    return prefix


__all__ = [
    "PrefixSet",
    "is_multi_encoder",
    "is_sdxl_embedding",
    "load_prefix",
    "make_prefix",
    "read_sdxl_embedding",
    "text_embedders",
    "tokenize_prompts",
    "tokenizer_of",
]
