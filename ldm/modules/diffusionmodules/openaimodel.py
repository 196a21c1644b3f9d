"""The SD v1 / SDXL UNet (`model.diffusion_model.*`), built so that checkpoint key names are the module tree.

SDXL is the same network with other config values (CompVis/SGM `UNetModel` keys): a transformer depth per level,
linear projections in the transformers, and `label_emb`, an MLP that adds a vector conditioning `y` (pooled text
and size/crop features) to the timestep embedding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import SpatialTransformer, maybe_checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features [cos | sin] (Vaswani et al. 2017, as in the ADM/LDM code), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between; 1x1 skip when widths differ."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.checkpoint = checkpoint

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, emb, enabled=self.checkpoint)


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W (`op`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (`conv`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the text context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# Config keys of the CompVis UNet that do not change the SD v1 architecture (accepted and ignored).
_IGNORED = {
    "image_size",
    "use_fp16",
    "legacy",
    "conv_resample",
    "dims",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
    "num_heads_upsample",
    "n_embed",
    "spatial_transformer_attn_type",  # SGM: which attention kernel (softmax / xformers), same math
}


class UNetModel(nn.Module):
    """Eps-predicting UNet of SD v1 and SDXL: ResBlocks + SpatialTransformers at the attention resolutions.

    `transformer_depth` is one depth for all levels (SD v1) or one per level (SDXL: [1, 2, 10], the first level
    having no attention); `num_classes="sequential"` with `adm_in_channels` adds `label_emb` for the vector
    conditioning `y` (SDXL: 2816 = 1280 pooled text + 6 size/crop values x 256 Fourier features).
    `use_checkpoint` from the CompVis config is accepted, but gradient checkpointing is switched on explicitly
    with `set_gradient_checkpointing(True)` (it costs ~30% speed and is only worth it when memory is short).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_heads: int = 8,
        num_head_channels: int = -1,
        use_spatial_transformer: bool = True,
        transformer_depth: int | Sequence[int] = 1,
        transformer_depth_middle: int | None = None,
        context_dim: int = 768,
        use_linear_in_transformer: bool = False,
        num_classes: str | int | None = None,
        adm_in_channels: int | None = None,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        self.channels_last = False  # set_channels_last
        unknown = set(kwargs) - _IGNORED
        if unknown:
            raise ValueError(
                f"UNetModel: unsupported config keys {sorted(unknown)}. "
                "APL supports the Stable Diffusion v1.x and SDXL base UNets."
            )
        if kwargs.get("use_scale_shift_norm") or kwargs.get("resblock_updown") or not use_spatial_transformer:
            raise ValueError("UNetModel: use_scale_shift_norm/resblock_updown/non-spatial attention are not SD v1.")
        if kwargs.get("dims", 2) != 2:
            raise ValueError("UNetModel: only 2-D UNets (dims: 2) are supported.")
        depths = [transformer_depth] * len(channel_mult) if isinstance(transformer_depth, int) else transformer_depth
        depths = [int(d) for d in depths]
        if len(depths) != len(channel_mult):
            raise ValueError(
                f"UNetModel: transformer_depth {list(depths)} needs one depth per level of channel_mult "
                f"{list(channel_mult)}."
            )
        depth_middle = depths[-1] if transformer_depth_middle is None else int(transformer_depth_middle)
        if num_classes not in (None, "sequential"):
            raise ValueError(
                f"UNetModel: num_classes={num_classes!r} (a class-conditional UNet) is not supported; SDXL uses "
                "'sequential' with adm_in_channels."
            )
        if (num_classes == "sequential") != (adm_in_channels is not None):
            raise ValueError("UNetModel: num_classes 'sequential' and adm_in_channels go together (SDXL: 2816).")
        self.model_channels = model_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.adm_in_channels = adm_in_channels
        self.context_dim = context_dim
        emb_dim = model_channels * 4

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, d_head = (
                (num_heads, ch // num_heads)
                if num_head_channels == -1
                else (ch // num_head_channels, num_head_channels)
            )
            return SpatialTransformer(ch, heads, d_head, depth, context_dim, dropout, use_linear_in_transformer)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if adm_in_channels is not None:
            # Nested Sequential: the checkpoint names are label_emb.0.0 / label_emb.0.2.
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            )
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, dropout, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout), transformer(ch, depth_middle), ResBlock(ch, emb_dim, dropout)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, dropout, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1)
        )

    def set_channels_last(self, enabled: bool = True) -> None:
        """Keep activations and conv weights in NHWC (channels-last) memory: cuDNN's tensor-core convolutions work
        in NHWC, and the transformers' (B, HW, C) token view is then free. Same math; other kernels round
        differently (fp32 agrees to ~1e-6). PyTorch's eager CUDA GroupNorm works in NCHW and converts (forward and
        backward), so the gain, if any, is for torch.compile, which writes its own GroupNorm."""
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = enabled

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute ResBlock/transformer activations in backward to save memory."""
        for m in self.modules():
            if hasattr(m, "checkpoint"):
                m.checkpoint = enabled

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, 4, h, w), timesteps (B,), context (B, 77, 768 | 2048), y (B, adm_in_channels) for SDXL -> eps."""
        dtype = self.time_embed[0].weight.dtype
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.adm_in_channels is not None:
            if y is None or y.shape != (x.shape[0], self.adm_in_channels):
                got = None if y is None else tuple(y.shape)
                raise ValueError(
                    f"UNetModel: this UNet needs the vector conditioning y of shape ({x.shape[0]}, "
                    f"{self.adm_in_channels}) (SDXL: pooled text + size/crop features), got {got}."
                )
            emb = emb + self.label_emb(y.to(dtype))
        elif y is not None:
            raise ValueError("UNetModel: got a vector conditioning y, but this UNet has no label_emb (SD v1).")
        h, context = x.to(dtype), context.to(dtype)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(x.dtype).contiguous()  # callers get the usual NCHW layout back
