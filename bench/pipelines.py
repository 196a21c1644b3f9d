"""diffusers / transformers models and pipelines holding our exact weights, for SD v1 and SDXL: the references of
the parity tests, of the diffusers-folder round trips and of the benchmark (`reference_unet`, `reference_text`).

Our state dicts go through diffusers' own single-file converters (`diffusers.loaders.single_file_utils`), an
independent reading of the checkpoint layouts, and are loaded strictly. The SDXL UNet's diffusers config is derived
here from our config's values; tests compare it with SDXL base's published config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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
from torch import nn
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from bench.baselines import (
    SD_SCHEDULE,
    CLIPText,
    PrefixInserter,
    UNetInputs,
    _load,
    attach_prefix,
    diffusers_unet,
    diffusers_vae,
    hf_text_model,
)
from ldm.modules.encoders.openclip import OPENCLIP_PAD_TOKEN_ID
from ldm.modules.encoders.tokenizer import CLIPTokenizer as BPETokenizer

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


# ----- the benchmark's reference side, for either family -----

PrefixInit = Callable[[int, int], torch.Tensor]  # (text encoder index, width) -> the prefix's starting (N, width)


def is_sdxl_config(config: Mapping) -> bool:
    """An SDXL (SGM DiffusionEngine) config: it has a conditioner instead of SD v1's cond_stage_config."""
    return "conditioner_config" in (config["model"].get("params") or {})


class SDXLText(nn.Module):
    """SDXL's conditioning as StableDiffusionXLPipeline.encode_prompt builds it with transformers' two encoders:
    the penultimate hidden states of CLIPTextModel and CLIPTextModelWithProjection concatenated (768 + 1280), the
    latter's text_embeds (pooled), and time_ids (original size, crop top-left, target size) = (H, W, 0, 0, H, W)
    in the text's dtype, as the pipeline makes them for an uncropped H x W image.

    The prefix: one PrefixInserter per encoder on expanded ids (the placeholder N times), so text_encoder_2 pools
    at the end-of-text token where the prefix moved it. Prompts are tokenized with our BPE tokenizer as our model
    does (CLIP pads with EOS, OpenCLIP with 0). `uncond(n)`: zeros for the empty negative prompt with
    `force_zeros` (SDXL base's force_zeros_for_empty_prompt), else the encoded empty prompt."""

    def __init__(
        self,
        clip_l: HFCLIPTextModel,
        clip_g: CLIPTextModelWithProjection,
        size: tuple[int, int],
        inserters: Sequence[PrefixInserter] | None = None,
        force_zeros: bool = True,
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleList([clip_l, clip_g])
        self.tokenizers = [BPETokenizer(), BPETokenizer(pad_token_id=OPENCLIP_PAD_TOKEN_ID)]
        self.inserters = nn.ModuleList(inserters or [])
        if self.inserters and len(self.inserters) != 2:
            raise ValueError(f"SDXLText: one PrefixInserter per text encoder (2), got {len(self.inserters)}")
        for enc, ins in zip(self.encoders, self.inserters, strict=False):
            if not ins.expanded:
                raise ValueError("SDXLText: the inserters must take expanded ids (PrefixInserter(expanded=True))")
            attach_prefix(enc, ins)
        self.size = (int(size[0]), int(size[1]))
        self.force_zeros = bool(force_zeros)

    @property
    def device(self) -> torch.device:
        return self.encoders[0].device

    def time_ids(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        h, w = self.size
        return torch.tensor([h, w, 0, 0, h, w], dtype=dtype, device=self.device).expand(n, 6)

    def _inputs(self, context: torch.Tensor, pooled: torch.Tensor) -> UNetInputs:
        n = context.shape[0]
        return {"encoder_hidden_states": context,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids(n, context.dtype)}}

    def forward(self, prompts: Sequence[str]) -> UNetInputs:
        hidden = []
        for i, (enc, tok) in enumerate(zip(self.encoders, self.tokenizers, strict=True)):
            ids = tok(list(prompts)).to(self.device)
            if self.inserters:
                ids = self.inserters[i].expand_ids(ids)
            out = enc(input_ids=ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return self._inputs(torch.cat(hidden, dim=-1), out.text_embeds)

    def uncond(self, n: int) -> UNetInputs:
        if not self.force_zeros:
            one = self([""])
            return self._inputs(one["encoder_hidden_states"].expand(n, -1, -1),
                                one["added_cond_kwargs"]["text_embeds"].expand(n, -1))
        l_cfg, g_cfg = self.encoders[0].config, self.encoders[1].config
        dtype = self.encoders[1].dtype
        length = self.tokenizers[0].model_max_length
        context = torch.zeros(n, length, l_cfg.hidden_size + g_cfg.hidden_size, dtype=dtype, device=self.device)
        return self._inputs(context, torch.zeros(n, g_cfg.projection_dim, dtype=dtype, device=self.device))

    def inputs_of(self, cond: Mapping[str, torch.Tensor]) -> UNetInputs:
        """The UNet inputs for our model's conditioning {'crossattn', 'vector'}: the vector's pooled text part as
        text_embeds (diffusers computes the size features from time_ids itself)."""
        pooled = cond["vector"][:, : self.encoders[1].config.projection_dim]
        return self._inputs(cond["crossattn"], pooled)


def reference_unet(
    config: Mapping, sd: Mapping[str, torch.Tensor], device: str | torch.device = "cpu", dtype=torch.float32
) -> UNet2DConditionModel:
    """diffusers' UNet of the config's family (SD v1 or SDXL) with the weights of `sd`."""
    return (diffusers_sdxl_unet if is_sdxl_config(config) else diffusers_unet)(config, sd, device, dtype)


def reference_text(
    config: Mapping,
    sd: Mapping[str, torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype,
    image_size: int,
    prefix: PrefixInit | None = None,
    placeholder: str = "alz",
) -> CLIPText | SDXLText:
    """The text side of the config's family with the weights of `sd`: prompts -> UNet inputs, as the family's
    diffusers pipeline builds them. With `prefix`, a learned prefix at `placeholder` in every text encoder,
    starting from prefix(encoder index, width); its parameters are `prefix_parameters(text)`."""
    token = BPETokenizer().token_id(placeholder)

    def inserter(index: int, width: int, expanded: bool) -> PrefixInserter:
        return PrefixInserter(token, prefix(index, width), expanded=expanded).to(device)

    if is_sdxl_config(config):
        clip_l, clip_g = hf_clip_l(config, sd, device, dtype), hf_clip_g(config, sd, device, dtype)
        inserters = None
        if prefix is not None:
            inserters = [inserter(i, enc.config.hidden_size, True) for i, enc in enumerate((clip_l, clip_g))]
        force_zeros = bool(config["model"]["params"].get("force_zeros_for_empty_prompt", True))
        return SDXLText(clip_l, clip_g, (image_size, image_size), inserters, force_zeros).to(device)
    hf = hf_text_model(config, sd, device, dtype)
    ins = inserter(0, hf.config.hidden_size, False) if prefix is not None else None
    return CLIPText(hf, BPETokenizer(), ins)


def prefix_parameters(text: CLIPText | SDXLText) -> list[nn.Parameter]:
    """The learned vectors of a text side's prefix (what Adam trains), encoder by encoder."""
    return [m.vectors for m in text.modules() if isinstance(m, PrefixInserter)]
