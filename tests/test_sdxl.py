"""SDXL: the full-size key layout on `meta`, and parity of the tiny SDXL with diffusers / transformers (fp32, 1e-4).

References are built by bench/pipelines.py: our SGM-layout state dict goes through diffusers' single-file
converters, an independent reading of the checkpoint layout, into diffusers' and transformers' models.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ROOT, TINY_SDXL_CONFIG

from ldm.checkpoint import build_model
from ldm.modules.encoders.conditioner import ConcatTimestepEmbedderND
from ldm.sampling import decode_to_images, txt2img_latents
from ldm.util import load_config

pipelines = pytest.importorskip("bench.pipelines")

SDXL_CONFIG = ROOT / "configs" / "sdxl" / "sd_xl_base.yaml"
TOL = 1e-4
# No '!' here: diffusers' tokenizer_2 turns it into its pad token (id 0), open_clip and SGM into '!</w>' (256), and we
# follow open_clip (diffusers issue #4153; test_openclip_matches_open_clip checks our side).
PROMPTS = ["A close-up portrait of alz, studio light", "a dog on the beach, at noon"]



def _numel(sd, prefix: str) -> int:
    return sum(v.numel() for k, v in sd.items() if k.startswith(prefix))


def test_full_size_layout_is_sdxl_base():
    """The meta-device model has SDXL base's layout: diffusers calls it 'xl_base', and its converters put every tensor
    into diffusers' UNet (SDXL base's published config), AutoencoderKL and both transformers text encoders, with
    nothing missing, left over or mis-shaped."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    config = load_config(SDXL_CONFIG)
    model = build_model(config, "meta")
    sd = model.state_dict()
    assert infer_diffusers_model_type(sd) == "xl_base"
    assert not any(k.startswith(("cond_stage_model.", "betas", "alphas")) for k in sd)  # SGM files have neither
    # Well-known SDXL base shapes, and where attention is (none at the first level).
    shapes = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),  # linear, not a 1x1 conv
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert not any(k.startswith(("model.diffusion_model.input_blocks.1.1.", "model.diffusion_model.input_blocks.2.1."))
                   for k in sd)
    assert sum(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in sd) == 32 * 12

    assert pipelines.sdxl_unet_config(config) == pipelines.SDXL_BASE_UNET  # our values = SDXL base's config
    unet = pipelines.diffusers_sdxl_unet(config, sd, "meta", unet_config=pipelines.SDXL_BASE_UNET)
    vae = pipelines.diffusers_vae(config, sd, "meta")
    clip_l = pipelines.hf_clip_l(config, sd, "meta")
    clip_g = pipelines.hf_clip_g(config, sd, "meta")
    # The converters drop what they do not know: the same parameter count on both sides means nothing was dropped.
    for prefix, ref in [
        ("model.diffusion_model.", unet),
        ("first_stage_model.", vae),
        ("conditioner.embedders.0.", clip_l),
        ("conditioner.embedders.1.", clip_g),
    ]:
        assert _numel(sd, prefix) == sum(p.numel() for p in ref.state_dict().values()), prefix
    assert _numel(sd, "model.diffusion_model.") == 2_567_463_684
    assert vae.config.scaling_factor == model.scale_factor == 0.13025


def test_openclip_layout_is_open_clips_vit_bigg():
    """Our OpenCLIP tower has the key names and shapes of open_clip's own ViT-bigG-14 text tower (built on meta),
    the `logit_scale` of the full CLIP aside: SDXL files carry it, it plays no part in text features, and the loader
    tolerates it by name."""
    open_clip = pytest.importorskip("open_clip")
    with torch.device("meta"):
        ref = open_clip.CLIP(**open_clip.get_model_config("ViT-bigG-14"))
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.startswith("visual.")}
    prefix = "conditioner.embedders.1.model."
    ours = {k.removeprefix(prefix): tuple(v.shape) for k, v in build_model(SDXL_CONFIG, "meta").state_dict().items()
            if k.startswith(prefix)}
    assert theirs.keys() - ours.keys() == {"logit_scale"}
    assert ours == {k: v for k, v in theirs.items() if k != "logit_scale"}


def test_stability_config_names_build_the_same_model():
    """Stability's sd_xl_base.yaml names its classes `sgm.*`; they resolve to the same classes and key layout."""
    ours = load_config(TINY_SDXL_CONFIG)
    sgm = copy.deepcopy(ours)
    p = sgm["model"]["params"]
    sgm["model"]["target"] = "sgm.models.diffusion.DiffusionEngine"
    p["network_config"]["target"] = "sgm.modules.diffusionmodules.openaimodel.UNetModel"
    p["first_stage_config"]["target"] = "sgm.models.autoencoder.AutoencoderKLInferenceWrapper"
    p["conditioner_config"]["target"] = "sgm.modules.GeneralConditioner"
    for entry, name in zip(p["conditioner_config"]["params"]["emb_models"], ["FrozenCLIPEmbedder",
                           "FrozenOpenCLIPEmbedder2"] + ["ConcatTimestepEmbedderND"] * 3, strict=True):
        entry["target"] = f"sgm.modules.encoders.modules.{name}"
    a, b = (build_model(c, "meta").state_dict() for c in (ours, sgm))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.fixture(scope="module")
def pipe(tiny_sdxl, tiny_sdxl_config):
    return pipelines.sdxl_pipeline(tiny_sdxl_config, tiny_sdxl.state_dict())


def test_openclip_matches_open_clip(tiny_sdxl):
    """Tokens, penultimate hidden state and pooled output against open_clip itself, on the same weights."""
    open_clip = pytest.importorskip("open_clip")
    ours = tiny_sdxl.conditioner.embedders[1]
    cfg = {"embed_dim": 40, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
           "patch_size": 8}, "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 3,
           "layers": 3}}
    ref = open_clip.CLIP(**cfg).eval()
    text = {k: v for k, v in ours.model.state_dict().items()}
    missing, unexpected = ref.load_state_dict(text, strict=False)
    assert not unexpected and {k for k in missing if not k.startswith("visual.")} == {"logit_scale"}
    prompts = ["a dog on the beach!", "A close-up portrait of alz, studio light"]
    ids = ours.tokenize(prompts)
    assert torch.equal(ids, open_clip.tokenize(prompts))  # pads with 0, '!' is '!</w>' (256)
    seen = []
    ref.transformer.resblocks[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        pooled_ref = ref.encode_text(ids)
        hidden, pooled = ours(prompts)
    assert (hidden - seen[0]).abs().max() <= TOL and (pooled - pooled_ref).abs().max() <= TOL


def test_unet_with_added_conditioning_matches_diffusers(tiny_sdxl, pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3, 871])
    ctx = torch.randn(2, 77, 80, generator=g)
    pooled = torch.randn(2, 40, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [1024, 768, 12, 20, 512, 640]])
    fourier = ConcatTimestepEmbedderND(16)
    y = torch.cat([pooled, fourier(time_ids[:, :2]), fourier(time_ids[:, 2:4]), fourier(time_ids[:, 4:])], 1)
    with torch.no_grad():
        ours = tiny_sdxl.apply_model(x, t, {"crossattn": ctx, "vector": y})
        ref = pipe.unet(x, t, encoder_hidden_states=ctx,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        no_y = tiny_sdxl.apply_model(x, t, {"crossattn": ctx, "vector": torch.zeros_like(y)})
    assert ours.abs().max() > 1e-2 and (ours - no_y).abs().max() > 1e-2  # y really enters
    assert (ours - ref).abs().max() <= TOL


def test_text_encoders_match_transformers(tiny_sdxl, pipe):
    clip_l, clip_g = tiny_sdxl.conditioner.embedders[:2]
    ids_l, ids_g = clip_l.tokenize(PROMPTS), clip_g.tokenize(PROMPTS)
    assert ids_l[0, -1] == 49407 and ids_g[0, -1] == 0  # CLIP pads with EOS, OpenCLIP with '!'
    with torch.no_grad():
        hidden_l = clip_l(PROMPTS)
        hidden_g, pooled = clip_g(PROMPTS)
        ref_l = pipe.text_encoder(ids_l, output_hidden_states=True).hidden_states[-2]
        ref_g = pipe.text_encoder_2(ids_g, output_hidden_states=True)
        cond = tiny_sdxl.get_learned_conditioning(PROMPTS, target_size=(64, 96))
    assert hidden_l.shape == (2, 77, 32) and hidden_g.shape == (2, 77, 48) and pooled.shape == (2, 40)
    assert (hidden_l - ref_l).abs().max() <= TOL
    assert (hidden_g - ref_g.hidden_states[-2]).abs().max() <= TOL
    assert (pooled - ref_g.text_embeds).abs().max() <= TOL
    assert pooled.abs().max() > 1e-2
    # The conditioner: context = [CLIP | OpenCLIP], vector = [pooled | size features of (64, 96), (0, 0), (64, 96)]
    fourier = ConcatTimestepEmbedderND(16)
    sizes = torch.tensor([[64.0, 96.0], [0.0, 0.0], [64.0, 96.0]])
    vector = torch.cat([pooled, *(fourier(s[None]).expand(2, -1) for s in sizes)], -1)
    torch.testing.assert_close(cond["crossattn"], torch.cat([hidden_l, hidden_g], -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond["vector"], vector, rtol=0, atol=1e-6)  # sin/cos may differ in the last bit


@pytest.mark.parametrize("negative", ["blurry, low quality", ""])
def test_ddim_cfg_sample_matches_sdxl_pipeline(tiny_sdxl, pipe, negative):
    """Our txt2img against StableDiffusionXLPipeline (DDIM, CFG 5) from the same start noise, latents and images.
    An empty negative prompt means zero text features on both sides (force_zeros_for_empty_prompt)."""
    steps, scale, hw = 8, 5.0, 64
    seeds = [3, 4]
    ours = txt2img_latents(tiny_sdxl, PROMPTS, seeds, steps=steps, scale=scale, negative_prompt=negative,
                           height=hw, width=hw)
    x_T = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    kw = dict(prompt=PROMPTS, height=hw, width=hw, num_inference_steps=steps, guidance_scale=scale, latents=x_T)
    kw["negative_prompt"] = [negative] * 2 if negative else None
    with torch.no_grad():
        ref = pipe(**kw, output_type="latent").images
        ref_img = pipe(**kw, output_type="pt").images  # (B, 3, H, W) in [0, 1]
    assert ours.abs().max() > 0.1 and (ours - x_T).abs().max() > 0.1
    assert (ours - ref).abs().max() <= TOL, (ours - ref).abs().max()
    img = (tiny_sdxl.decode_first_stage(ours) / 2 + 0.5).clamp(0, 1)
    assert (img - ref_img).abs().max() <= TOL
    assert len(decode_to_images(tiny_sdxl, ours)) == 2


def test_empty_negative_prompt_is_zeros_or_encoded(tiny_sdxl):
    zeros = tiny_sdxl.get_unconditional_conditioning("", target_size=(64, 64))
    assert not zeros["crossattn"].any() and not zeros["vector"][:, :40].any() and zeros["vector"][:, 40:].any()
    model = copy.copy(tiny_sdxl)
    model.force_zeros_for_empty_prompt = False
    encoded = model.get_unconditional_conditioning("", target_size=(64, 64))
    plain = tiny_sdxl.get_learned_conditioning([""], target_size=(64, 64))
    assert torch.equal(encoded["crossattn"], plain["crossattn"]) and encoded["crossattn"].any()


class _ShiftHook(torch.nn.Module):
    """A stand-in prefix: token `token` becomes N vectors, the rest shifts right (the APL insertion rule)."""

    def __init__(self, token: int, n: int, width: int) -> None:
        super().__init__()
        self.token, self.n = token, n
        self.vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(width))
        self.widths: list[int] = []

    def _src(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source token of each output position, and the position relative to the placeholder."""
        hit = ids == self.token  # at most one placeholder per row in this test
        pos = torch.where(hit.any(1, keepdim=True), hit.int().argmax(1, keepdim=True), ids.shape[1])
        j = torch.arange(ids.shape[1]).expand_as(ids)
        rel = j - pos
        return torch.where(rel >= self.n, j - self.n + 1, torch.where(rel > 0, pos, j)), rel

    def expand_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.gather(1, self._src(ids)[0])

    def forward(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        self.widths.append(embeds.shape[-1])
        src, rel = self._src(ids)
        out = embeds.gather(1, src[..., None].expand_as(embeds))
        inside = ((rel >= 0) & (rel < self.n))[..., None]
        return torch.where(inside, self.vectors[rel.clamp(0, self.n - 1)], out)


def test_prefix_hooks_reach_both_encoders(tiny_sdxl):
    """One hook per text encoder, each seeing its own width; the pooled output is read where the EOS moved to."""
    alz = 41128
    hooks = {0: _ShiftHook(alz, 3, 32), 1: _ShiftHook(alz, 3, 48)}
    prompts = ["alz a portrait", "a portrait"]
    with torch.no_grad():
        plain = tiny_sdxl.get_learned_conditioning(prompts)
        hooked = tiny_sdxl.get_learned_conditioning(prompts, embedding_manager=hooks)
        clip_g = tiny_sdxl.conditioner.embedders[1]
        ids = clip_g.tokenize(prompts[:1])
        x = clip_g.model.token_embedding(ids)
        shifted = hooks[1](ids, x)
        # Independent pooled value: run the tower on the shifted embeddings and read the EOS at its new place (+2).
        eos = int((ids[0] == 49407).nonzero()[0]) + 2
        h = shifted + clip_g.model.positional_embedding
        for block in clip_g.model.transformer.resblocks:
            h = block(h)
        pooled_ref = clip_g.model.ln_final(h)[0, eos] @ clip_g.model.text_projection
    assert hooks[0].widths == [32] and hooks[1].widths[0] == 48
    assert (hooked["crossattn"][0] - plain["crossattn"][0]).abs().max() > 1e-3
    torch.testing.assert_close(hooked["crossattn"][1], plain["crossattn"][1])  # rows without the placeholder
    torch.testing.assert_close(hooked["vector"][0, :40], pooled_ref, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="one hook per"):
        tiny_sdxl.get_learned_conditioning(prompts, embedding_manager=hooks[0])


# ------------------------------------------------------------------------------------------ single-file checkpoints
def test_sdxl_checkpoint_round_trip_with_the_extras_of_real_files(tmp_path, tiny_sdxl, tiny_sdxl_config):
    """SGM files carry no schedule buffers; sd_xl_base_1.0 adds position_ids and OpenCLIP's logit_scale."""
    from safetensors.torch import save_file

    from ldm.checkpoint import load_model, save_checkpoint

    sd = tiny_sdxl.state_dict()
    assert not any(k in sd for k in ("betas", "alphas_cumprod"))
    path = tmp_path / "xl.safetensors"
    save_checkpoint(tiny_sdxl, path, dtype=torch.float16)
    back = load_model(tiny_sdxl_config, path)
    assert all(torch.equal(v, sd[k].half().float()) for k, v in back.state_dict().items())
    assert torch.equal(back.alphas_cumprod, tiny_sdxl.alphas_cumprod)  # rebuilt from the config
    extras = {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6055),
    }
    save_file({k: v.contiguous() for k, v in sd.items()} | extras, str(path))
    load_model(tiny_sdxl_config, path)


def test_a_file_of_the_other_family_names_the_config(tmp_path, tiny_sdxl, tiny_sdxl_config, tiny_model, tiny_config):
    from ldm.checkpoint import CheckpointError, load_model, save_checkpoint

    save_checkpoint(tiny_sdxl, tmp_path / "xl.safetensors")
    save_checkpoint(tiny_model, tmp_path / "v1.safetensors")
    with pytest.raises(CheckpointError, match=r"xl\.safetensors .*SDXL checkpoint: load it with --config_path "
                                              r"configs/sdxl/sd_xl_base\.yaml"):
        load_model(tiny_config, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match=r"v1\.safetensors .*SD v1\.x checkpoint: load it with --config_path "
                                              r"configs/stable-diffusion/v1-inference\.yaml"):
        load_model(tiny_sdxl_config, tmp_path / "v1.safetensors")
