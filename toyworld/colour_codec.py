"""A starting point for the toy VAE: weights that make SD's AutoencoderKL an exact linear colour codec.

Why: trained from random weights, a small SD-architecture VAE learns very slowly on a CPU, and at 32 channels its
GroupNorm(32) layers normalise every channel on its own, which erases the absolute colour of a picture. Started
from this codec instead, the VAE already keeps the colours and layout (the latent is the 8x8 block mean of the
picture, its 4th channel free) and training only has to add detail.

How the signal passes the layers unchanged:
- residual blocks and attention add a branch whose last layer is zero, so they pass their input on; where a block
  changes the width, its 1x1 shortcut copies the channels;
- the encoder's stride-2 convolutions average 2x2 blocks (three of them: 8x8 means); the decoder's upsampling
  convolutions smooth the nearest-neighbour copies with a [1, 2, 1] tent (close to bilinear);
- the output GroupNorm + SiLU of each side: every signal travels as a pair (+s, -s) in one group of two channels,
  so the group mean is exactly 0; s is kept near 1e-4, far below sqrt(eps) = 1e-3, so the normalisation divides by
  ~1e-3 whatever the picture; and SiLU(n) - SiLU(-n) = n exactly, which the next convolution takes.
This needs 2 channels per group (64) at the encoder's and the decoder's output norms, as configs/toy/toy-sd.yaml has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.model import AttnBlock, Downsample, ResnetBlock
from ldm.modules.diffusionmodules.openaimodel import Upsample

AMPLITUDE = 1e-4  # size of the travelling signal (fp16 keeps it as a normal number)


def _zero(*layers: nn.Module) -> None:
    for layer in layers:
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def _pairs_in(conv: nn.Conv2d, n_signals: int, amplitude: float) -> None:
    """conv maps input channel k to the pair (+a x_k, -a x_k) on output channels (2k, 2k+1), centre tap only."""
    _zero(conv)
    c = conv.kernel_size[0] // 2
    for k in range(n_signals):
        conv.weight.data[2 * k, k, c, c] = amplitude
        conv.weight.data[2 * k + 1, k, c, c] = -amplitude


def _pairs_out(conv: nn.Conv2d, n_signals: int, gain: float) -> None:
    """conv maps SiLU(+n), SiLU(-n) on channels (2k, 2k+1) to gain * n on output channel k."""
    _zero(conv)
    c = conv.kernel_size[0] // 2
    for k in range(n_signals):
        conv.weight.data[k, 2 * k, c, c] = gain
        conv.weight.data[k, 2 * k + 1, c, c] = -gain


def _copy(conv: nn.Conv2d) -> None:
    _zero(conv)
    c = conv.kernel_size[0] // 2
    for k in range(min(conv.in_channels, conv.out_channels)):
        conv.weight.data[k, k, c, c] = 1.0


@torch.no_grad()
def init_colour_codec(vae: AutoencoderKL, logvar: float = -12.0, amplitude: float = AMPLITUDE) -> None:
    """Set every weight of `vae` so that encode(x).mean = 8x8 block means of x (3 channels, 4th zero) and
    decode(z) = the smooth upsampling of z's first 3 channels. See the module docstring."""
    for norm in (vae.encoder.norm_out, vae.decoder.norm_out):
        if norm.num_channels // norm.num_groups < 2:
            raise ValueError(f"the colour codec needs >= 2 channels per GroupNorm group at the output norms, got "
                             f"{norm.num_channels} channels in {norm.num_groups} groups")
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
    for m in vae.modules():
        if isinstance(m, ResnetBlock):
            _zero(m.conv2)
            if hasattr(m, "nin_shortcut"):
                _copy(m.nin_shortcut)
        elif isinstance(m, AttnBlock):
            _zero(m.proj_out)
        elif isinstance(m, Downsample):  # pad right/bottom, 3x3 stride 2: taps (0..1, 0..1) are the 2x2 block
            _zero(m.conv)
            for k in range(m.conv.out_channels):
                m.conv.weight.data[k, k, :2, :2] = 0.25
        elif isinstance(m, Upsample):
            _zero(m.conv)
            tent = torch.tensor([1.0, 2.0, 1.0])
            kernel = torch.outer(tent, tent) / 16
            for k in range(m.conv.out_channels):
                m.conv.weight.data[k, k] = kernel
    z = vae.quant_conv.out_channels // 2
    gain = math.sqrt(vae.encoder.norm_out.eps) / amplitude  # undo amplitude / sqrt(eps)
    _pairs_in(vae.encoder.conv_in, 3, amplitude)
    _pairs_out(vae.encoder.conv_out, 3, gain)
    vae.encoder.conv_out.bias.data[z:] = logvar  # a small, fixed posterior spread
    _copy(vae.quant_conv)
    _copy(vae.post_quant_conv)
    _pairs_in(vae.decoder.conv_in, 3, amplitude)
    _pairs_out(vae.decoder.conv_out, 3, gain)


def tent_upsample(z: torch.Tensor, times: int = 3) -> torch.Tensor:
    """What the codec's decoder does to (B, C, h, w) block means: `times` x (nearest 2x, then the [1, 2, 1] tent
    with zero padding), as a cheap function (the same numbers, without running the 64-channel network)."""
    tent = torch.tensor([1.0, 2.0, 1.0], dtype=z.dtype, device=z.device)
    kernel = (torch.outer(tent, tent) / 16).expand(z.shape[1], 1, 3, 3)
    for _ in range(times):
        z = F.conv2d(F.interpolate(z, scale_factor=2.0, mode="nearest"), kernel, padding=1, groups=z.shape[1])
    return z


def codec_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) of a VAE set up by `init_colour_codec`, computed directly: 8x8 block means, upsampled."""
    return tent_upsample(F.avg_pool2d(x, 8))
