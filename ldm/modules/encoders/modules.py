"""CLIP ViT-L/14 text encoder (`cond_stage_model.transformer.text_model.*`, Hugging Face key names).

SD v1 uses its last hidden state after the final LayerNorm; SDXL's first embedder
(`conditioner.embedders.0.transformer.text_model.*`) the same network's penultimate hidden state (`layer: hidden`,
`layer_idx: 11`), without the final LayerNorm.

The learned APL prefix enters through the named `embedding_manager` argument: it receives the token ids and
their token embeddings and returns the (possibly rewritten) token embeddings before position embeddings are
added. Nothing is monkeypatched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.util import to_device

# (input_ids (B, 77), token_embeds (B, 77, D)) -> token_embeds (B, 77, D)
EmbeddingHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # BPE vocabulary incl. <|startoftext|>/<|endoftext|>
    width: int = 768  # hidden size = context_dim of the UNet
    layers: int = 12
    heads: int = 12
    max_length: int = 77  # positions
    mlp_ratio: int = 4  # fc1 width = 4 * width
    eps: float = 1e-5  # LayerNorm eps


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # CLIP text attention is causal
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.fc2 = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU, as OpenAI's CLIP was trained


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)


class CLIPTextTransformer(nn.Module):
    """Token ids (B, 77) -> last hidden state after the final LayerNorm (B, 77, D), or an earlier hidden state."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        embedding_manager: EmbeddingHook | None = None,
        hidden_layer: int | None = None,
    ) -> torch.Tensor:
        """`hidden_layer=k`: the hidden state after k encoder layers (Hugging Face `hidden_states[k]`), no final
        LayerNorm, and the remaining layers are not run."""
        x = self.embeddings.token_embedding(input_ids)  # (B, 77, D)
        if embedding_manager is not None:
            x = embedding_manager(input_ids, x)
        x = x + self.embeddings.position_embedding.weight[: x.shape[1]].to(x.dtype)
        for layer in self.encoder.layers[:hidden_layer]:
            x = layer(x)
        return self.final_layer_norm(x) if hidden_layer is None else x


class CLIPTextModel(nn.Module):
    """Holder giving the `transformer.text_model.*` key level of SD v1 checkpoints."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)

    def forward(
        self,
        input_ids: torch.Tensor,
        embedding_manager: EmbeddingHook | None = None,
        hidden_layer: int | None = None,
    ) -> torch.Tensor:
        return self.text_model(input_ids, embedding_manager, hidden_layer)


_KNOWN_VERSIONS = {"openai/clip-vit-large-patch14"}


class FrozenCLIPEmbedder(nn.Module):
    """SD v1's conditioning model, and SDXL's first embedder: tokenizer + frozen CLIP text transformer.

    `version` names the Hugging Face model the original downloaded; here it only selects the architecture
    (ViT-L/14 text tower). The weights always come from the SD checkpoint. A tiny encoder for tests and the
    demo is built with `width`/`layers`/`heads`. `layer`: 'last' (SD v1, after the final LayerNorm) or 'hidden'
    with `layer_idx` (SDXL: 11, the penultimate layer's output, as Hugging Face's `hidden_states[11]`).
    """

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | None = None,
        max_length: int = 77,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        layer: str = "last",
        layer_idx: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs.keys() - {"freeze", "always_return_pooled"} or kwargs.get("always_return_pooled"):
            raise ValueError(f"FrozenCLIPEmbedder: unsupported config keys {sorted(kwargs)}.")
        if layer not in ("last", "hidden") or (layer == "hidden") != (layer_idx is not None):
            raise ValueError(
                f"FrozenCLIPEmbedder: layer={layer!r}, layer_idx={layer_idx!r}; supported are layer 'last' (SD v1) "
                "and layer 'hidden' with a layer_idx (SDXL: 11)."
            )
        if layer_idx is not None and not 0 < int(layer_idx) <= layers:
            raise ValueError(f"FrozenCLIPEmbedder: layer_idx {layer_idx} is outside 1..{layers}.")
        # Offline setups often point `version` at a local copy (.../clip-vit-large-patch14): same architecture.
        local_copy = str(version).rstrip("/\\").lower().endswith("clip-vit-large-patch14")
        if version not in _KNOWN_VERSIONS and not local_copy:
            raise ValueError(
                f"FrozenCLIPEmbedder: unknown version {version!r}; SD v1 uses "
                "'openai/clip-vit-large-patch14' (SD 2.x uses OpenCLIP ViT-H and is not supported)."
            )
        if max_length != 77:
            raise ValueError("FrozenCLIPEmbedder: max_length must be 77 for SD v1.")
        self.config = CLIPTextConfig(width=width, layers=layers, heads=heads, max_length=max_length)
        self.transformer = CLIPTextModel(self.config)
        self.layer_idx = None if layer_idx is None else int(layer_idx)
        self._tokenizer = None

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token-embedding table the learned prefix lives beside (vectors of this width)."""
        return self.transformer.text_model.embeddings.token_embedding

    @property
    def output_dims(self) -> dict[str, int]:
        """What this embedder adds to SDXL's conditioning: its width of cross-attention context."""
        return {"crossattn": self.config.width}

    @property
    def tokenizer(self):
        """The offline BPE tokenizer (built on first use: reading the BPE file takes ~0.3 s)."""
        if self._tokenizer is None:
            from ldm.modules.encoders.tokenizer import CLIPTokenizer

            self._tokenizer = CLIPTokenizer()
        return self._tokenizer

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> token ids (B, 77) on this module's device."""
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        return to_device(self.tokenizer(text), device)  # pinned first on a GPU: no wait for the GPU queue

    def forward(
        self, text: str | Sequence[str] | torch.Tensor, embedding_manager: EmbeddingHook | None = None
    ) -> torch.Tensor:
        """Prompts, or token ids (B, 77) already on this module's device -> hidden states (B, 77, width)."""
        ids = text if isinstance(text, torch.Tensor) else self.tokenize(text)
        return self.transformer(ids, embedding_manager=embedding_manager, hidden_layer=self.layer_idx)

    def encode(self, text: str | Sequence[str], embedding_manager: EmbeddingHook | None = None) -> torch.Tensor:
        return self(text, embedding_manager=embedding_manager)
