"""LatentDiffusion for SD v1: the frozen UNet, VAE and text encoder plus the DDPM noise schedule.

Only what APL needs from the CompVis class: the schedule buffers (checkpoint key names), `q_sample`,
`apply_model`, `get_learned_conditioning`, and the first-stage encode/decode helpers. Training lives in `apl/`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldm.models.diffusion.ddim import make_beta_schedule

# Names of the 12 schedule buffers stored at the top level of SD v1 checkpoints.
SCHEDULE_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# Training-only keys of the CompVis config: accepted, ignored.
_IGNORED = {
    "num_timesteps_cond",
    "log_every_t",
    "first_stage_key",
    "cond_stage_key",
    "cond_stage_trainable",
    "monitor",
    "use_ema",
    "scheduler_config",
    "personalization_config",  # textual-inversion configs: its EmbeddingManager is APL's own, built separately
    "ckpt_path",
    "ignore_keys",
    "loss_type",
    "learn_logvar",
    "logvar_init",
    "cond_stage_forward",
    "concat_mode",
    "use_positional_encodings",
    "l_simple_weight",
    "original_elbo_weight",
    "v_posterior",
    "clip_denoised",
    "load_only_unet",
    "first_stage_ckpts",
    "make_it_fit",
    "reset_ema",
    "reset_num_ema_updates",
    "scale_by_std",
    "unet_trainable",
}


def schedule_tensors(timesteps: int, linear_start: float, linear_end: float) -> dict[str, torch.Tensor]:
    """The DDPM schedule of Ho et al. 2020 (eqs. 4, 6, 7) for SD's scaled-linear betas, as float32 tensors."""
    with torch.device("cpu"):  # real values even while the model is being built on the meta device
        return _schedule_tensors(timesteps, linear_start, linear_end)


def _schedule_tensors(timesteps: int, linear_start: float, linear_end: float) -> dict[str, torch.Tensor]:
    betas = make_beta_schedule(timesteps, linear_start, linear_end).double()
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in values.items()}


def _extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] shaped (B, 1, 1, 1) to broadcast against x."""
    return a.to(t.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


class DiffusionWrapper(nn.Module):
    """Gives the `model.diffusion_model.*` key level; SD v1 conditions by cross-attention only, SDXL adds `y`."""

    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.diffusion_model(x, t, context, y)


class LatentDiffusion(nn.Module):
    """SD v1 model: `model.diffusion_model` (UNet), `first_stage_model` (VAE), `cond_stage_model` (CLIP text).

    SDXL (ldm/models/diffusion/sdxl.py) is a subclass with another conditioning model and its own conditioning
    methods; the schedule, noising and first-stage helpers here are shared."""

    # SD v1 checkpoints store the 12 schedule buffers; SGM (SDXL) checkpoints store none.
    schedule_persistent = True

    def __init__(
        self,
        unet_config: Mapping,
        first_stage_config: Mapping,
        cond_stage_config: Mapping,
        timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        scale_factor: float = 0.18215,
        beta_schedule: str = "linear",
        parameterization: str = "eps",
        conditioning_key: str = "crossattn",
        channels: int = 4,
        image_size: int = 64,
        **kwargs,
    ) -> None:
        super().__init__()
        from ldm.util import instantiate_from_config  # late import: util's registry imports this module

        unknown = set(kwargs) - _IGNORED
        if unknown:
            raise ValueError(f"LatentDiffusion: unsupported config keys {sorted(unknown)}.")
        if parameterization != "eps":
            raise ValueError(
                f"LatentDiffusion: parameterization {parameterization!r} is not SD v1's 'eps' "
                "(v-prediction models are SD 2.x)."
            )
        if beta_schedule != "linear" or conditioning_key != "crossattn":
            raise ValueError("LatentDiffusion: SD v1 uses beta_schedule 'linear' and conditioning_key 'crossattn'.")
        self.num_timesteps = int(timesteps)
        self.linear_start, self.linear_end = float(linear_start), float(linear_end)
        self.scale_factor = float(scale_factor)
        self.channels, self.image_size = channels, image_size
        self.model = DiffusionWrapper(instantiate_from_config(unet_config))
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self._build_conditioning(cond_stage_config)
        self.register_schedule()

    def _build_conditioning(self, config: Mapping) -> None:
        """The text encoder under the checkpoint's key prefix (`cond_stage_model.*` for SD v1)."""
        from ldm.util import instantiate_from_config

        self.cond_stage_model = instantiate_from_config(config)

    def register_schedule(self) -> None:
        """(Re)build the 12 schedule buffers in float32 on the CPU or the model's device."""
        device = self.first_stage_model.quant_conv.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        for name, value in schedule_tensors(self.num_timesteps, self.linear_start, self.linear_end).items():
            self.register_buffer(name, value.to(device), persistent=self.schedule_persistent)

    # The schedule must stay float32 whatever the weights' precision, so precision is set per sub-model.
    def set_precision(self, dtype: torch.dtype) -> LatentDiffusion:
        """Cast UNet, VAE and text encoder(s) to `dtype`; schedule buffers (the model's own) stay float32."""
        for m in self.children():
            m.to(dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.model.diffusion_model.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse image sides the UNet cannot take: 8 pixels per latent, and the latent is halved once per
        down-sampling level, so each side must be a multiple of 8 * 2**levels (64 for SD v1's three levels)."""
        from ldm.modules.diffusionmodules.openaimodel import Downsample

        levels = sum(isinstance(m, Downsample) for m in self.model.diffusion_model.modules())
        step = 8 * 2**levels
        if height % step or width % step or height <= 0 or width <= 0:
            near = max(step, round(max(height, width) / step) * step)
            raise ValueError(
                f"image size {height}x{width}: this model's UNet halves the latent {levels} time(s), so each side "
                f"must be a positive multiple of {step} pixels (e.g. {near})"
            )

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (Ho et al. 2020, eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """eps prediction; `cond` is the (B, 77, 768) context, or CompVis' {'c_crossattn': [context]}/list forms."""
        if isinstance(cond, Mapping):
            cond = cond["c_crossattn"]
        if isinstance(cond, (list, tuple)):
            cond = torch.cat(list(cond), dim=1)
        return self.model(x_noisy, t, cond)

    def get_learned_conditioning(
        self, prompts: str | Sequence[str] | torch.Tensor, embedding_manager=None
    ) -> torch.Tensor:
        """Prompts (or their token ids (B, 77)) -> text context (B, 77, 768); `embedding_manager` inserts the
        learned prefix."""
        if isinstance(prompts, str):
            prompts = [prompts]
        elif not isinstance(prompts, torch.Tensor):
            prompts = list(prompts)
        if embedding_manager is not None and not isinstance(prompts, torch.Tensor):
            embedding_manager.check_prompts_fit(prompts)  # token ids come from callers that made room themselves
        return self.cond_stage_model(prompts, embedding_manager=embedding_manager)

    def get_unconditional_conditioning(self, negative_prompt: str = "", **_: Any) -> torch.Tensor:
        """The conditioning classifier-free guidance pushes away from: the encoded negative prompt (1, 77, 768).

        Keyword arguments that SDXL's version takes (image size) do not change SD v1's."""
        return self.get_learned_conditioning([negative_prompt])

    def encode_first_stage(self, x: torch.Tensor):
        """Image in [-1, 1] (B, 3, H, W) -> DiagonalGaussianDistribution over unscaled latents."""
        return self.first_stage_model.encode(x.to(self.first_stage_model.quant_conv.weight.dtype))

    def get_first_stage_encoding(self, posterior, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample the posterior and scale it into the diffusion model's latent space."""
        z = posterior.sample(generator) if hasattr(posterior, "sample") else posterior
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image roughly in [-1, 1]."""
        return self.first_stage_model.decode(z.to(self.first_stage_model.quant_conv.weight.dtype) / self.scale_factor)
