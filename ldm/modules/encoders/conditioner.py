"""SDXL's conditioning (SGM's `GeneralConditioner`): a list of embedders, each owning `conditioner.embedders.N.*`.

Every embedder reads one input of a batch (`input_key`: 'txt' for the prompts; 'original_size_as_tuple',
'crop_coords_top_left' and 'target_size_as_tuple' for (B, 2) pixel values) and returns tensors. 3-d outputs
(B, 77, D) are cross-attention context, concatenated along features (SDXL: 768 + 1280 = 2048); 2-d outputs (B, d)
are the vector conditioning, concatenated in embedder order (SDXL: 1280 pooled text + 3 x 2 x 256 Fourier features
= 2816). The text embedders take the learned-prefix hook, one per embedder.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import timestep_embedding
from ldm.modules.encoders.modules import EmbeddingHook

TEXT_KEY = "txt"  # the batch key of the prompts
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
# Keys of SGM's embedder entries; ucg_rate/legacy_ucg_value drop conditions at random while training the UNet.
_ENTRY_KEYS = {"target", "params", "input_key", "is_trainable", "ucg_rate", "legacy_ucg_value"}


class ConcatTimestepEmbedderND(nn.Module):
    """Each of the (B, k) values -> `outdim` sinusoidal features [cos | sin], concatenated: (B, k * outdim).

    SDXL's micro-conditioning on sizes and crops (Podell et al. 2023, sec. 2.2), the same features as the
    timestep embedding. No weights."""

    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = int(outdim)

    @property
    def output_dims(self) -> dict[str, int]:
        """What this embedder adds to the conditioning for a (B, 2) input."""
        return {"vector": 2 * self.outdim}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        B, k = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(B, k * self.outdim)  # float32


def hook_for(embedding_manager: Any, index: int) -> EmbeddingHook | None:
    """The prefix hook of text embedder `index`: from a mapping {index: hook} or a sequence aligned with the
    embedders (a list, tuple or nn.ModuleList, None entries allowed)."""
    if embedding_manager is None:
        return None
    hook = getattr(embedding_manager, "hook", None)  # ldm.modules.prefix.PrefixSet: one manager per encoder
    if callable(hook):
        return hook(index)
    if isinstance(embedding_manager, Mapping):
        return embedding_manager.get(index)
    if isinstance(embedding_manager, (list, tuple, nn.ModuleList)):
        return embedding_manager[index] if index < len(embedding_manager) else None
    raise TypeError(
        "SDXL has two text encoders, each with its own prefix vectors (768 and 1280 wide): pass one hook per "
        f"encoder, e.g. {{0: clip_l_prefix, 1: clip_g_prefix}}, not a single {type(embedding_manager).__name__}."
    )


class GeneralConditioner(nn.Module):
    """Embedders under `embedders.N`, their outputs concatenated by kind into {'crossattn', 'vector'}."""

    def __init__(self, emb_models: Sequence[Mapping]) -> None:
        super().__init__()
        from ldm.util import instantiate_from_config  # late import: util's registry imports this module

        self.embedders = nn.ModuleList()
        self.input_keys: list[str] = []
        for i, entry in enumerate(emb_models):
            unknown = set(entry) - _ENTRY_KEYS
            if unknown:
                raise ValueError(f"GeneralConditioner: emb_models[{i}] has unsupported keys {sorted(unknown)}.")
            if entry.get("is_trainable", False):
                raise ValueError(
                    f"GeneralConditioner: emb_models[{i}] is_trainable: APL keeps the whole model frozen."
                )
            if "input_key" not in entry:
                raise ValueError(f"GeneralConditioner: emb_models[{i}] needs an input_key (e.g. 'txt').")
            self.embedders.append(instantiate_from_config(entry))
            self.input_keys.append(str(entry["input_key"]))

    @property
    def text_embedders(self) -> dict[int, nn.Module]:
        """The embedders that read the prompts, by index: where learned prefixes go."""
        return {i: e for i, (e, k) in enumerate(zip(self.embedders, self.input_keys, strict=True)) if k == TEXT_KEY}

    @property
    def output_dims(self) -> dict[str, int]:
        """Widths of the concatenated outputs, e.g. {'crossattn': 2048, 'vector': 2816} for SDXL base."""
        dims: dict[str, int] = {}
        for e in self.embedders:
            for kind, d in e.output_dims.items():
                dims[kind] = dims.get(kind, 0) + d
        return dims

    def forward(
        self,
        batch: Mapping[str, Any],
        embedding_manager: Any = None,
        zero_keys: Collection[str] = (),
    ) -> dict[str, torch.Tensor]:
        """{'txt': prompts, size keys: (B, 2)} -> {'crossattn': (B, 77, C), 'vector': (B, V)}.

        Outputs of embedders whose input key is in `zero_keys` are zeros (SGM's `force_uc_zero_embeddings`, the
        unconditional text of SDXL's sampling)."""
        out: dict[str, list[torch.Tensor]] = {}
        for i, (embedder, key) in enumerate(zip(self.embedders, self.input_keys, strict=True)):
            if key not in batch:
                raise KeyError(f"GeneralConditioner: embedder {i} reads {key!r}, which the batch lacks.")
            if key == TEXT_KEY:
                text = batch[key]
                if isinstance(text, Mapping):  # token ids per embedder {index: (B, 77)}: the encoders pad differently
                    text = text[i]
                result = embedder(text, embedding_manager=hook_for(embedding_manager, i))
            else:
                result = embedder(batch[key])
            for t in result if isinstance(result, tuple) else (result,):
                kind = {2: "vector", 3: "crossattn"}.get(t.ndim)
                if kind is None:
                    raise ValueError(f"GeneralConditioner: embedder {i} returned a {t.ndim}-d tensor.")
                out.setdefault(kind, []).append(torch.zeros_like(t) if key in zero_keys else t)
        return {kind: torch.cat(ts, dim=-1) for kind, ts in out.items()}
