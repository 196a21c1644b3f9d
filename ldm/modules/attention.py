"""Cross-attention transformer used inside the SD v1 / SDXL UNet (`SpatialTransformer`), original LDM key names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(fn, *args, enabled: bool) -> torch.Tensor:
    """Run `fn(*args)`, recomputing activations in backward when `enabled` and gradients are being recorded.

    The recomputed blocks draw no random numbers (SD's dropout is 0, and the frozen model is in eval mode), so no
    RNG state is saved and restored: that is cheaper, and reading the CUDA RNG state is not allowed while a CUDA
    graph is being captured (train.py --cuda_graph --gradient_checkpointing)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


class CrossAttention(nn.Module):
    """Multi-head attention; keys/values come from `context` (cross) or from `x` itself (self)."""

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape  # (B, HW, C)
        ctx = x if context is None else context  # (B, 77, 768) for cross-attention
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): half of the projection gates the other half."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward block with 4x expansion (`net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention over the text context, then feed-forward."""

    def __init__(
        self, dim: int, n_heads: int, d_head: int, context_dim: int, dropout: float = 0.0, checkpoint: bool = False
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, context, enabled=self.checkpoint)


class SpatialTransformer(nn.Module):
    """Image-shaped wrapper: GroupNorm, projection in, transformer blocks over HW tokens, projection out, residual.

    SD v1 projects with 1x1 convs; SD 2.x and SDXL (`use_linear`) with Linear layers applied to the tokens, which
    is the same map with weights stored as (C_out, C_in) instead of (C_out, C_in, 1, 1)."""

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        context_dim: int = 768,
        dropout: float = 0.0,
        use_linear: bool = False,
    ) -> None:
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, n_heads, d_head, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.use_linear:
            h = self.proj_in(h.flatten(2).transpose(1, 2))  # (B, HW, inner)
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, -1, H, W))
