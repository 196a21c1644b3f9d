"""diffusers / transformers models and pipelines holding our exact weights, for SD v1 and SDXL: the references of
the parity tests and of the diffusers-folder round trips (and of the SDXL benchmark rows to come).

Our state dicts go through diffusers' own single-file converters (`diffusers.loaders.single_file_utils`), an
independent reading of the checkpoint layouts, and are loaded strictly. The SDXL UNet's diffusers config is derived
here from our config's values; tests compare it with SDXL base's published config.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from bench.baselines import SD_SCHEDULE, _load, diffusers_unet, diffusers_vae, hf_text_model

SDXL_PREFIX_L = "conditioner.embedders.0.transformer."
SDXL_PREFIX_G = "conditioner.embedders.1.model."

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0: the values that shape the network.
SDXL_BASE_UNET = {  # the independent reference of the full-size layout test
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "transformer_layers_per_block": [1, 2, 10],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


def _params(config: Mapping, *path: str) -> dict:
    node = config["model"]["params"]
    for key in path:
        node = node[key]
    return dict(node.get("params") or {})


def _embedder(config: Mapping, index: int) -> dict:
    return dict(config["model"]["params"]["conditioner_config"]["params"]["emb_models"][index].get("params") or {})


def sdxl_unet_config(config: Mapping) -> dict:
    """UNet2DConditionModel arguments for the `network_config` of our SDXL config (SGM UNetModel values)."""
    p = _params(config, "network_config")
    mult, mc = list(p["channel_mult"]), int(p["model_channels"])
    depth = p["transformer_depth"]
    depth = [depth] * len(mult) if isinstance(depth, int) else list(depth)
    attn = [2**level in p["attention_resolutions"] for level in range(len(mult))]
    outdim = _embedder(config, 2)["outdim"]  # the size/crop embedders' features per value
    return {
        "sample_size": int(config["model"]["params"].get("image_size", 128)),
        "in_channels": p["in_channels"],
        "out_channels": p["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [mc * m for m in mult],
        "layers_per_block": p["num_res_blocks"],
        "cross_attention_dim": p["context_dim"],
        "attention_head_dim": [mc * m // p["num_head_channels"] for m in mult],  # diffusers' name for head counts
        "use_linear_projection": bool(p.get("use_linear_in_transformer")),
        "transformer_layers_per_block": depth,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": outdim,
        "projection_class_embeddings_input_dim": p["adm_in_channels"],
    }


def diffusers_sdxl_unet(
    config: Mapping,
    sd: Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    unet_config: Mapping | None = None,
) -> UNet2DConditionModel:
    """diffusers' SDXL UNet (text_time added conditioning) with the UNet weights of `sd`, SDPA attention."""
    cfg = dict(unet_config or sdxl_unet_config(config))
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    unet = _load(unet, convert_ldm_unet_checkpoint(sd, cfg), device, dtype, "diffusers SDXL UNet")
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def hf_clip_l(
    config: Mapping, sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu", dtype=torch.float32
) -> HFCLIPTextModel:
    """transformers' CLIPTextModel with the weights of SDXL's first embedder."""
    p = _embedder(config, 0)
    w, n, h = int(p.get("width", 768)), int(p.get("layers", 12)), int(p.get("heads", 12))
    cfg = HFCLIPTextConfig(
        hidden_size=w,
        intermediate_size=4 * w,
        num_hidden_layers=n,
        num_attention_heads=h,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        attn_implementation="sdpa",
    )
    with torch.device(device):
        hf = HFCLIPTextModel(cfg)
    converted = convert_ldm_clip_checkpoint({k: v for k, v in sd.items() if k.startswith(SDXL_PREFIX_L)})
    if not any(k.startswith("text_model.") for k in hf.state_dict()):  # transformers >= 5 dropped this level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return _load(hf, converted, device, dtype, "transformers CLIPTextModel (SDXL text_encoder)")


def hf_clip_g(
    config: Mapping, sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu", dtype=torch.float32
) -> CLIPTextModelWithProjection:
    """transformers' CLIPTextModelWithProjection with the OpenCLIP weights of SDXL's second embedder."""
    p = _embedder(config, 1)
    w, n, h = int(p.get("width", 1280)), int(p.get("layers", 32)), int(p.get("heads", 20))
    cfg = HFCLIPTextConfig(
        hidden_size=w,
        intermediate_size=4 * w,
        num_hidden_layers=n,
        num_attention_heads=h,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=int(p.get("embed_dim", 1280)),
        attn_implementation="sdpa",
    )
    with torch.device(device):
        hf = CLIPTextModelWithProjection(cfg)
    converted = convert_open_clip_checkpoint(hf, dict(sd), prefix=SDXL_PREFIX_G)
    return _load(hf, converted, device, dtype, "transformers CLIPTextModelWithProjection (SDXL text_encoder_2)")


def hf_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """transformers' CLIPTokenizer from the open_clip BPE file; SD v1 / CLIP-L pad with EOS, OpenCLIP with '!'."""
    from ldm.modules.encoders.tokenizer import load_bpe

    vocab, merges = load_bpe()
    # transformers 5.x ignores vocab_file=; vocab=/merges= build the same tokenizer from the open_clip BPE file.
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, pad_token=pad_token, model_max_length=77
    )


def ddim_scheduler() -> DDIMScheduler:
    """DDIM with SD's schedule, as ldm/models/diffusion/ddim.py samples (leading spacing, steps_offset 1)."""
    return DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def sd_pipeline(config: Mapping, sd: Mapping[str, torch.Tensor]) -> StableDiffusionPipeline:
    """StableDiffusionPipeline holding the weights of our SD v1 state dict `sd`."""
    return StableDiffusionPipeline(
        vae=diffusers_vae(config, sd),
        text_encoder=hf_text_model(config, sd),
        tokenizer=hf_tokenizer(),
        unet=diffusers_unet(config, sd),
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(config: Mapping, sd: Mapping[str, torch.Tensor]) -> StableDiffusionXLPipeline:
    """StableDiffusionXLPipeline holding the weights of our SDXL state dict `sd` (no watermark)."""
    return StableDiffusionXLPipeline(
        vae=diffusers_vae(config, sd),
        text_encoder=hf_clip_l(config, sd),
        text_encoder_2=hf_clip_g(config, sd),
        tokenizer=hf_tokenizer(),
        tokenizer_2=hf_tokenizer(pad_token="!"),
        unet=diffusers_sdxl_unet(config, sd),
        scheduler=ddim_scheduler(),
        force_zeros_for_empty_prompt=bool(config["model"]["params"].get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )
