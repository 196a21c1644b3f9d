"""SDXL base (SGM's `DiffusionEngine`): the SD v1 LatentDiffusion with a two-encoder conditioner and vector input.

Module tree = `sd_xl_base_1.0.safetensors` key layout: `model.diffusion_model.*` (UNet with `label_emb`),
`first_stage_model.*` (the SD VAE, latent scale 0.13025) and `conditioner.embedders.{0,1}.*` (CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14). SGM checkpoints carry no schedule buffers: the schedule comes from the config's
`denoiser_config` (SD's scaled-linear DDPM betas, eps prediction), read as data, never instantiated.

Conditioning is a dict {'crossattn': (B, 77, 2048), 'vector': (B, 2816)}; the vector holds the pooled text and
the size/crop micro-conditioning, which for text-to-image is original = target = the image size, crop (0, 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.encoders.conditioner import SIZE_KEYS, TEXT_KEY, GeneralConditioner, hook_for

Size = tuple[int, int] | Sequence[int] | torch.Tensor  # (height, width) in pixels, or (B, 2)

# DiffusionEngine config keys that only matter for training or for SGM's own samplers: accepted, ignored.
_IGNORED = {
    "sampler_config",
    "optimizer_config",
    "scheduler_config",
    "loss_fn_config",
    "network_wrapper",
    "ckpt_path",
    "use_ema",
    "ema_decay_rate",
    "disable_first_stage_autocast",
    "input_key",
    "log_keys",
    "no_cond_log",
    "compile_model",
    "en_and_decode_n_samples_a_time",
}
# SGM's denoiser classes that make an eps-predicting model on the SD v1 DDPM schedule.
_DENOISER = "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser"
_EPS_SCALING = "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"
_DISCRETIZATION = "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"


def _schedule_of(denoiser_config: Mapping | None) -> tuple[int, float, float]:
    """(timesteps, linear_start, linear_end) from SGM's denoiser block; SD's defaults when there is none."""
    if denoiser_config is None:
        return 1000, 0.00085, 0.012
    params = denoiser_config.get("params") or {}
    scaling = (params.get("scaling_config") or {}).get("target")
    discretization = params.get("discretization_config") or {}
    if denoiser_config.get("target") != _DENOISER or scaling != _EPS_SCALING or (
        discretization.get("target") != _DISCRETIZATION
    ):
        raise ValueError(
            f"DiffusionEngine: denoiser_config must be SDXL base's ({_DENOISER} with EpsScaling and "
            f"LegacyDDPMDiscretization); got {denoiser_config.get('target')!r}, scaling {scaling!r}, discretization "
            f"{discretization.get('target')!r}. v-prediction or EDM SDXL variants are not supported."
        )
    d = discretization.get("params") or {}
    steps = int(params.get("num_idx", 1000))
    if int(d.get("num_timesteps", steps)) != steps:
        raise ValueError("DiffusionEngine: denoiser num_idx and discretization num_timesteps differ.")
    return steps, float(d.get("linear_start", 0.00085)), float(d.get("linear_end", 0.012))


class DiffusionEngine(LatentDiffusion):
    """SDXL: `model.diffusion_model` (UNet), `first_stage_model` (VAE), `conditioner` (GeneralConditioner).

    `force_zeros_for_empty_prompt`: the unconditional branch of classifier-free guidance uses zeros for the text
    parts (context and pooled) when the negative prompt is empty, as SGM's sampling and diffusers'
    StableDiffusionXLPipeline (with no negative prompt) do for SDXL base.
    """

    schedule_persistent = False

    def __init__(
        self,
        network_config: Mapping,
        first_stage_config: Mapping,
        conditioner_config: Mapping,
        denoiser_config: Mapping | None = None,
        scale_factor: float = 0.13025,
        image_size: int = 128,
        force_zeros_for_empty_prompt: bool = True,
        **kwargs,
    ) -> None:
        unknown = set(kwargs) - _IGNORED
        if unknown:
            raise ValueError(f"DiffusionEngine: unsupported config keys {sorted(unknown)}.")
        timesteps, linear_start, linear_end = _schedule_of(denoiser_config)
        unet_params = network_config.get("params") or {}
        super().__init__(
            unet_config=network_config,
            first_stage_config=first_stage_config,
            cond_stage_config=conditioner_config,
            timesteps=timesteps,
            linear_start=linear_start,
            linear_end=linear_end,
            scale_factor=scale_factor,
            channels=int(unet_params.get("in_channels", 4)),
            image_size=image_size,
        )
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        unet = self.model.diffusion_model
        dims = self.conditioner.output_dims
        want = {"crossattn": unet.context_dim, "vector": unet.adm_in_channels}
        if dims != want:
            raise ValueError(
                f"DiffusionEngine: the conditioner gives {dims}, but the UNet takes context_dim "
                f"{want['crossattn']} and adm_in_channels {want['vector']}; the embedders do not fit this UNet."
            )

    def _build_conditioning(self, config: Mapping) -> None:
        from ldm.util import instantiate_from_config

        conditioner = instantiate_from_config(config)
        if not isinstance(conditioner, GeneralConditioner):
            raise ValueError("DiffusionEngine: conditioner_config must build a GeneralConditioner.")
        self.conditioner = conditioner

    @property
    def vae_factor(self) -> int:
        """Pixels per latent along each side (8 for the SD VAE)."""
        return 2 ** (len(self.first_stage_model.encoder.down) - 1)

    def _size_batch(
        self, n: int, original_size: Size | None, crop_coords_top_left: Size, target_size: Size | None
    ) -> dict[str, torch.Tensor]:
        """The micro-conditioning inputs as (n, 2) float tensors; sizes default to the native image size."""
        native = (self.image_size * self.vae_factor,) * 2
        target = native if target_size is None else target_size
        values = (target if original_size is None else original_size, crop_coords_top_left, target)
        out = {}
        for key, v in zip(SIZE_KEYS, values, strict=True):
            t = torch.as_tensor(v, dtype=torch.float32, device=self.device)
            out[key] = t.expand(n, 2) if t.ndim == 1 else t
        return out

    def get_learned_conditioning(
        self,
        prompts: str | Sequence[str] | Mapping[int, torch.Tensor],
        embedding_manager: Any = None,
        *,
        original_size: Size | None = None,
        crop_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
    ) -> dict[str, torch.Tensor]:
        """Prompts -> {'crossattn': (B, 77, 2048), 'vector': (B, 2816)}.

        `embedding_manager`: one prefix hook per text encoder, {0: CLIP ViT-L hook, 1: OpenCLIP hook} (or a list).
        Sizes are (height, width) in pixels: `original_size` defaults to `target_size`, which defaults to the
        native 1024 x 1024."""
        if isinstance(prompts, torch.Tensor):
            raise TypeError(
                "SDXL's get_learned_conditioning takes prompts, or token ids per text encoder {index: (B, 77)} "
                "(tokenize_prompts), not one id tensor: its two encoders pad differently."
            )
        if isinstance(prompts, Mapping):  # ids per encoder, made room for by the caller (training)
            n = len(next(iter(prompts.values())))
        else:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            n = len(prompts)
            for i in self.conditioner.text_embedders:  # each encoder's prefix must leave room for the prompt
                check = getattr(hook_for(embedding_manager, i), "check_prompts_fit", None)
                if check is not None:
                    check(prompts)
        batch: dict[str, Any] = {TEXT_KEY: prompts}
        batch |= self._size_batch(n, original_size, crop_coords_top_left, target_size)
        return self.conditioner(batch, embedding_manager=embedding_manager)

    def get_unconditional_conditioning(
        self,
        negative_prompt: str = "",
        *,
        original_size: Size | None = None,
        crop_coords_top_left: Size = (0, 0),
        target_size: Size | None = None,
    ) -> dict[str, torch.Tensor]:
        """The guidance's unconditional branch (batch 1): the negative prompt, or zero text features for an empty
        one when `force_zeros_for_empty_prompt`; the size/crop features are those of the conditional branch."""
        batch: dict[str, Any] = {TEXT_KEY: [negative_prompt]}
        batch |= self._size_batch(1, original_size, crop_coords_top_left, target_size)
        zero = (TEXT_KEY,) if negative_prompt == "" and self.force_zeros_for_empty_prompt else ()
        return self.conditioner(batch, zero_keys=zero)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """eps prediction for x_noisy (B, 4, h, w) under cond {'crossattn': (B, 77, 2048), 'vector': (B, 2816)}."""
        if not isinstance(cond, Mapping) or not {"crossattn", "vector"} <= cond.keys():
            raise TypeError(
                "SDXL's apply_model needs the conditioning dict {'crossattn', 'vector'} from get_learned_conditioning."
            )
        return self.model(x_noisy, t, cond["crossattn"], cond["vector"])
