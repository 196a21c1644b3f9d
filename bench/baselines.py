"""The reference side of the benchmark: diffusers / transformers models holding our exact weights, and the
training steps and DDIM loop a diffusers user would write with them.

Weights go through diffusers' own single-file converters (an independent reading of the SD v1 layout), so both
sides of every comparison run the same numbers. The learned prefix enters Hugging Face's CLIP text model through
a forward hook on its token embedding, the way the original APL code patched it.

The steps and the sampler are written once for any model family: a text side (`CLIPText` here for SD v1,
`bench.pipelines.SDXLText` for SDXL) turns prompts into the keyword inputs of `UNet2DConditionModel.forward`
(`encoder_hidden_states`, and for SDXL `added_cond_kwargs`), as the family's diffusers pipeline builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel

from ldm.modules.encoders.modules import CLIPTextConfig

# SD v1's scheduler settings (scaled-linear betas, "leading" spacing with steps_offset 1, no x0 clipping).
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
)
Tokenize = Callable[[Sequence[str]], torch.Tensor]  # prompts -> token ids (B, 77) on the CPU
UNetInputs = dict  # UNet2DConditionModel.forward keywords besides sample and timestep (conditioning)


def _load(module: nn.Module, converted: Mapping[str, torch.Tensor], device, dtype, what: str) -> nn.Module:
    """Load converted tensors (moved to device/dtype) strictly; the name says which model disagreed."""
    tensors = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in converted.items()
    }
    missing, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(
            f"{what}: converted SD weights do not fit the model (missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}); diffusers/transformers versions differ from requirements-dev.txt?"
        )
    for sub in module.modules():  # non-persistent float buffers (none today) were built in the default dtype
        for name, buf in sub.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != dtype:
                setattr(sub, name, buf.to(dtype))
    return module.eval().requires_grad_(False)


def diffusers_unet(
    config: Mapping, sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu", dtype=torch.float32
) -> UNet2DConditionModel:
    """diffusers' UNet with the weights of our SD-layout state dict `sd`, attention through PyTorch SDPA."""
    cfg = create_unet_diffusers_config_from_ldm(config, sd)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    unet = _load(unet, convert_ldm_unet_checkpoint(sd, cfg), device, dtype, "diffusers UNet")
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def diffusers_vae(
    config: Mapping, sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu", dtype=torch.float32
) -> AutoencoderKL:
    """diffusers' AutoencoderKL with the weights of `sd`, attention through PyTorch SDPA."""
    cfg = create_vae_diffusers_config_from_ldm(config, sd)
    with torch.device(device):
        vae = AutoencoderKL(**cfg)
    vae = _load(vae, convert_ldm_vae_checkpoint(sd, cfg), device, dtype, "diffusers AutoencoderKL")
    vae.set_attn_processor(AttnProcessor2_0())
    return vae


def clip_config(config: Mapping) -> CLIPTextConfig:
    """Our text-encoder shape from a CompVis config (the `cond_stage_config` params; SD v1 defaults)."""
    params = dict(config["model"]["params"]["cond_stage_config"].get("params") or {})
    return CLIPTextConfig(
        width=int(params.get("width", 768)), layers=int(params.get("layers", 12)), heads=int(params.get("heads", 12))
    )


def hf_text_model(
    config: Mapping, sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu", dtype=torch.float32
) -> HFCLIPTextModel:
    """transformers' CLIPTextModel (SDPA attention) with the text-encoder weights of `sd`."""
    c = clip_config(config)
    cfg = HFCLIPTextConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.width,
        intermediate_size=c.width * c.mlp_ratio,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        max_position_embeddings=c.max_length,
        hidden_act="quick_gelu",
        layer_norm_eps=c.eps,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        hf = HFCLIPTextModel(cfg)
    converted = {k: v for k, v in convert_ldm_clip_checkpoint(sd).items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in hf.state_dict()):  # transformers >= 5 dropped this level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return _load(hf, converted, device, dtype, "transformers CLIPTextModel")


def token_embedding(hf: HFCLIPTextModel) -> nn.Embedding:
    """The token-embedding layer, wherever this transformers version keeps it."""
    return getattr(hf, "text_model", hf).embeddings.token_embedding


class PrefixInserter(nn.Module):
    """N learned vectors replacing the first occurrence of one placeholder token, batched, with no host sync.

    Same rule as our EmbeddingManager for a single occurrence: the placeholder's embedding becomes the N vectors,
    later tokens shift right by N - 1 and the row keeps its length. With `expanded`, the ids the text model gets
    are already shifted (`expand_ids`: the placeholder N times, as a diffusers multi-vector textual inversion's
    tokenizer writes it), so the model itself finds the moved end-of-text token where it pools (SDXL's OpenCLIP);
    the hook then only puts the vectors in.
    """

    def __init__(self, token_id: int, vectors: torch.Tensor, expanded: bool = False) -> None:
        super().__init__()
        self.token_id = int(token_id)
        self.expanded = bool(expanded)
        self.vectors = nn.Parameter(vectors.detach().float().clone())  # (N, D), trained in fp32

    def _layout(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source index of each output position, in-prefix mask, index into the vectors), all (B, L)."""
        B, L = ids.shape
        N = self.vectors.shape[0]
        hit = ids == self.token_id
        has = hit.any(1, keepdim=True)
        pos = hit.int().argmax(1, keepdim=True)  # first occurrence (0 for rows without one, masked by `has`)
        j = torch.arange(L, device=ids.device).expand(B, L)
        rel = j - pos
        in_prefix = has & (rel >= 0) & (rel < N)
        src = torch.where(has & (rel >= N), j - (N - 1), j)  # token j - N + 1 lands at output position j
        return src, in_prefix, rel.clamp(0, N - 1)

    def expand_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The ids of the expanded row: the placeholder N times, later tokens shifted, cut back to the length."""
        src, in_prefix, _ = self._layout(ids)
        return torch.where(in_prefix, self.token_id, ids.gather(1, src))

    def forward(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        B, L, D = embeds.shape
        src, in_prefix, index = self._layout(ids.to(embeds.device))
        tokens = embeds if self.expanded else embeds.gather(1, src.unsqueeze(-1).expand(B, L, D))
        vectors = self.vectors.to(embeds.dtype)[index]  # (B, L, D)
        return torch.where(in_prefix.unsqueeze(-1), vectors, tokens)


def attach_prefix(hf: HFCLIPTextModel, inserter: PrefixInserter) -> torch.utils.hooks.RemovableHandle:
    """Route the token embeddings of `hf` through `inserter` (a forward hook; returns its handle)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return inserter(args[0], output)

    return token_embedding(hf).register_forward_hook(hook)


def concat_inputs(a: UNetInputs, b: UNetInputs) -> UNetInputs:
    """Two UNet inputs of the same structure batched together (nested dicts concatenated key by key)."""
    return {k: concat_inputs(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]]) for k, v in a.items()}


class CLIPText(nn.Module):
    """SD v1's conditioning with transformers: CLIPTextModel's last hidden state, the prefix through `inserter`.

    `text(prompts)` gives the UNet inputs, `text.uncond(n)` those of the empty prompt for guidance."""

    def __init__(self, hf: HFCLIPTextModel, tokenize: Tokenize, inserter: PrefixInserter | None = None) -> None:
        super().__init__()
        self.hf, self.tokenize, self.inserter = hf, tokenize, inserter
        if inserter is not None:
            attach_prefix(hf, inserter)

    @property
    def device(self) -> torch.device:
        return self.hf.device

    def forward(self, prompts: Sequence[str]) -> UNetInputs:
        return {"encoder_hidden_states": _encode(self.hf, self.tokenize(prompts), self.device)}

    def uncond(self, n: int) -> UNetInputs:
        return {"encoder_hidden_states": self([""])["encoder_hidden_states"].expand(n, -1, -1)}

    def inputs_of(self, cond: torch.Tensor) -> UNetInputs:
        """The UNet inputs for our model's conditioning (B, 77, D)."""
        return {"encoder_hidden_states": cond}


def text_parts(inputs: UNetInputs) -> dict[str, torch.Tensor]:
    """The text features in UNet inputs, by name: 'text' (the context), and 'pooled' where the family has it."""
    parts = {"text": inputs["encoder_hidden_states"]}
    added = inputs.get("added_cond_kwargs") or {}
    if "text_embeds" in added:
        parts["pooled"] = added["text_embeds"]
    return parts


def sd_ddpm_scheduler() -> DDPMScheduler:
    """The training-noise scheduler SD v1 was trained with."""
    return DDPMScheduler(**SD_SCHEDULE)


def sd_ddim_scheduler() -> DDIMScheduler:
    """DDIM as StableDiffusionPipeline configures it for SD v1.5."""
    return DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def _encode(hf: HFCLIPTextModel, ids: torch.Tensor, device) -> torch.Tensor:
    return hf(input_ids=ids.to(device)).last_hidden_state  # (B, 77, D)


def original_style_step(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text: CLIPText,
    opt: torch.optim.Optimizer,
    image: torch.Tensor,
    private: Sequence[str],
    neutral: Sequence[str],
    negative_guidance: float = 1.0,
) -> Callable[[], None]:
    """One step as the original trained: VAE encode, two text encodes, THREE UNet passes, MSE, Adam (fp32)."""
    sched = sd_ddpm_scheduler()
    device = image.device

    def step() -> None:
        with torch.no_grad():
            z0 = vae.encode(image).latent_dist.sample() * vae.config.scaling_factor
            cond_n = text(neutral)
        t = torch.randint(0, sched.config.num_train_timesteps, (image.shape[0],), device=device)
        z_t = sched.add_noise(z0, torch.randn_like(z0), t)
        cond_p = text(private)  # carries the prefix (grad)
        with torch.no_grad():
            eps_n = unet(z_t, t, **cond_n).sample
            eps_p0 = unet(z_t, t, **cond_p).sample  # the original's separate no-grad pass
        eps_p = unet(z_t, t, **cond_p).sample
        loss = F.mse_loss(eps_p, eps_n - negative_guidance * (eps_p0 - eps_n))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def cached_latent_step(
    unet: UNet2DConditionModel,
    text: Callable[[Sequence[str]], UNetInputs],
    opt: torch.optim.Optimizer,
    z0: torch.Tensor,
    private: Sequence[str],
    neutral: Sequence[str],
    negative_guidance: float = 1.0,
) -> Callable[[], None]:
    """The same loss as apl_loss with diffusers: cached latents, one no-grad + one grad UNet pass, Adam on the
    prefix (the parameters `opt` holds); `text` is the family's text side (CLIPText, SDXLText)."""
    sched = sd_ddpm_scheduler()
    device, dtype = z0.device, unet.dtype

    def step() -> None:
        t = torch.randint(0, sched.config.num_train_timesteps, (z0.shape[0],), device=device)
        z_t = sched.add_noise(z0, torch.randn_like(z0), t).to(dtype)
        with torch.no_grad():
            eps_n = unet(z_t, t, **text(neutral)).sample.float()
        eps_p = unet(z_t, t, **text(private)).sample.float()
        target = eps_n - negative_guidance * (eps_p.detach() - eps_n)
        loss = ((eps_p - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@torch.no_grad()
def ddim_sample(
    unet: UNet2DConditionModel,
    text: CLIPText,
    prompts: Sequence[str],
    latent_hw: int,
    steps: int = 50,
    scale: float = 7.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The denoising loop of StableDiffusionPipeline / StableDiffusionXLPipeline (DDIM, classifier-free guidance,
    the unconditional half first), latents in the UNet's dtype; `text` is the family's text side."""
    device, dtype = unet.device, unet.dtype
    inputs = concat_inputs(text.uncond(len(prompts)), text(prompts))
    sched = sd_ddim_scheduler()
    sched.set_timesteps(steps, device=device)
    shape = (len(prompts), unet.config.in_channels, latent_hw, latent_hw)
    latents = torch.randn(shape, generator=generator, device=device, dtype=dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = unet(x, t, **inputs).sample.chunk(2)
        latents = sched.step(eps_u + scale * (eps_c - eps_u), t, latents).prev_sample
    return latents


@torch.no_grad()
def vae_decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in about [-1, 1], as the pipelines decode (the VAE's scaling_factor: SD v1
    0.18215, SDXL 0.13025, from the config's scale_factor)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
