"""OpenCLIP text tower in open_clip's own key names: SDXL's second embedder (`conditioner.embedders.1.model.*`).

ViT-bigG/14's text transformer: 32 pre-norm blocks of width 1280 with causal self-attention, exact GELU and a
fused q/k/v projection (`attn.in_proj_weight`, (3W, W)), then `ln_final` and `text_projection` (W, E). SDXL takes
two things from it: the penultimate hidden state (the input of the last block, no `ln_final`) as cross-attention
context, and the pooled output, `ln_final(last)` at the end-of-text token times `text_projection`.

The learned prefix enters through the same named `embedding_manager` argument as in the SD v1 encoder
(ldm/modules/encoders/modules.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.modules import EmbeddingHook
from ldm.util import to_device

EOS_TOKEN_ID = 49407  # <|endoftext|>, where the pooled output is read
OPENCLIP_PAD_TOKEN_ID = 0  # open_clip.tokenize pads with 0 (the token '!'), not with EOS as OpenAI's CLIP in SD v1


@dataclass
class OpenCLIPTextConfig:
    vocab_size: int = 49408  # the same BPE vocabulary as OpenAI's CLIP
    width: int = 1280  # hidden size; SDXL's context gets these 1280 features per token
    layers: int = 32
    heads: int = 20
    max_length: int = 77  # positions
    mlp_ratio: int = 4  # c_fc width = 4 * width
    embed_dim: int = 1280  # width of the pooled output after text_projection
    eps: float = 1e-5  # LayerNorm eps


# open_clip architectures whose text tower this module reproduces: name -> (width, layers, heads, embed_dim).
KNOWN_ARCHS = {"ViT-bigG-14": (1280, 32, 20, 1280)}


class MultiheadSelfAttention(nn.Module):
    """Causal self-attention with open_clip's (torch.nn.MultiheadAttention's) names: fused in_proj, out_proj."""

    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D)
        q, k, v = (t.view(B, L, self.heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # the text tower's causal mask
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    """c_fc, exact GELU, c_proj (OpenCLIP trains with nn.GELU, not OpenAI's quick-GELU)."""

    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.c_proj = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = MultiheadSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Holder of the `transformer.resblocks.N` key level."""

    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


def end_of_text_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) index of each row's first end-of-text token; the last position for a row that has none.

    open_clip pools at `ids.argmax(-1)`, which is the same place while EOS (49407) is the largest id of a row. A row
    can lose its EOS when a learned prefix pushes it past position 76: open_clip's own truncation then puts the end
    of text at the last position, so that is where it is taken."""
    is_eos = ids == eos_token_id
    last = torch.full_like(ids[:, 0], ids.shape[1] - 1)
    return torch.where(is_eos.any(1), is_eos.int().argmax(1), last)


class OpenCLIPTextTransformer(nn.Module):
    """Token ids (B, 77) -> (penultimate hidden state (B, 77, W), pooled projected output (B, E))."""

    def __init__(self, cfg: OpenCLIPTextConfig) -> None:
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))  # used as x @ W, not W x
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def forward(
        self, input_ids: torch.Tensor, embedding_manager: EmbeddingHook | None = None, eos_token_id: int = EOS_TOKEN_ID
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.token_embedding(input_ids)  # (B, 77, W)
        pool_ids = input_ids
        if embedding_manager is not None:
            x = embedding_manager(input_ids, x)
            # A hook that moves tokens (the APL prefix) says where they went, so the EOS is found after the move.
            expand_ids = getattr(embedding_manager, "expand_ids", None)
            if expand_ids is not None:
                pool_ids = expand_ids(input_ids)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        *body, last = self.transformer.resblocks
        for block in body:
            x = block(x)
        penultimate = x  # (B, 77, W): SDXL's cross-attention features, taken before the last block
        x = self.ln_final(last(x))
        rows = torch.arange(x.shape[0], device=x.device)
        eos = end_of_text_positions(pool_ids.to(x.device), eos_token_id)
        pooled = x[rows, eos] @ self.text_projection.to(x.dtype)  # (B, E)
        return penultimate, pooled


class FrozenOpenCLIPEmbedder2(nn.Module):
    """SDXL's second embedder (SGM's class name): tokenizer + frozen OpenCLIP text tower under `model.*`.

    Outputs the penultimate hidden state (B, 77, W) for the cross-attention context and the pooled output (B, E)
    for the vector conditioning. `arch`/`version` name the open_clip model the original downloaded; here they
    only select the architecture, the weights come from the SDXL checkpoint. `width`/`layers`/`heads`/`embed_dim`
    build a tiny tower for tests.
    """

    def __init__(
        self,
        arch: str = "ViT-bigG-14",
        version: str = "laion2b_s39b_b160k",
        device: str | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "penultimate",
        always_return_pooled: bool = True,
        legacy: bool = False,
        width: int | None = None,
        layers: int | None = None,
        heads: int | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if arch not in KNOWN_ARCHS:
            raise ValueError(
                f"FrozenOpenCLIPEmbedder2: unknown arch {arch!r}; SDXL base uses 'ViT-bigG-14' (known: "
                f"{', '.join(KNOWN_ARCHS)})."
            )
        if layer != "penultimate" or not always_return_pooled or legacy or max_length != 77:
            raise ValueError(
                "FrozenOpenCLIPEmbedder2: only SDXL base's settings are supported (layer 'penultimate', "
                f"always_return_pooled true, legacy false, max_length 77); got layer={layer!r}, "
                f"always_return_pooled={always_return_pooled}, legacy={legacy}, max_length={max_length}."
            )
        w, n, h, e = KNOWN_ARCHS[arch]
        self.config = OpenCLIPTextConfig(
            width=width or w, layers=layers or n, heads=heads or h, embed_dim=embed_dim or e, max_length=max_length
        )
        if self.config.layers < 2:
            raise ValueError("FrozenOpenCLIPEmbedder2: needs at least 2 layers (SDXL reads the penultimate one).")
        self.model = OpenCLIPTextTransformer(self.config)
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The offline BPE tokenizer, padding with 0 as open_clip does (built on first use)."""
        if self._tokenizer is None:
            from ldm.modules.encoders.tokenizer import CLIPTokenizer

            self._tokenizer = CLIPTokenizer(pad_token_id=OPENCLIP_PAD_TOKEN_ID)
        return self._tokenizer

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token-embedding table the learned prefix lives beside (vectors of this width)."""
        return self.model.token_embedding

    @property
    def output_dims(self) -> dict[str, int]:
        """What this embedder adds to SDXL's conditioning: context width and pooled width."""
        return {"crossattn": self.config.width, "vector": self.config.embed_dim}

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Prompts -> token ids (B, 77) on this module's device."""
        return to_device(self.tokenizer(text), self.model.token_embedding.weight.device)

    def forward(
        self, text: str | Sequence[str] | torch.Tensor, embedding_manager: EmbeddingHook | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts or token ids (B, 77) -> (penultimate hidden state (B, 77, W), pooled output (B, E))."""
        ids = text if isinstance(text, torch.Tensor) else self.tokenize(text)
        return self.model(ids, embedding_manager=embedding_manager)

    def encode(self, text: str | Sequence[str], embedding_manager: EmbeddingHook | None = None):
        return self(text, embedding_manager=embedding_manager)

