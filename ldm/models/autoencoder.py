"""AutoencoderKL of SD v1 (`first_stage_model.*`): encoder, decoder, (post-)quant 1x1 convs, diagonal Gaussian."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder


class DiagonalGaussianDistribution:
    """Posterior q(z|x) = N(mean, exp(logvar)) from the encoder's moments (B, 2z, h, w)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder; `lossconfig`/`monitor` of the training config are accepted and ignored."""

    def __init__(
        self,
        ddconfig: Mapping,
        embed_dim: int,
        lossconfig: Mapping | None = None,
        monitor: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        unknown = set(kwargs) - {"ckpt_path", "ignore_keys", "image_key", "colorize_nlabels"}
        if unknown:
            raise ValueError(f"AutoencoderKL: unsupported config keys {sorted(unknown)}.")
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL: ddconfig.double_z must be true for a KL autoencoder.")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image in [-1, 1] (B, 3, H, W) -> posterior over (B, embed_dim, H/8, W/8)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent -> image, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> torch.Tensor:
        posterior = self.encode(x)
        return self.decode(posterior.sample() if sample_posterior else posterior.mode())
