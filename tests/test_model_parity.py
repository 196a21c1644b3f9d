"""Our UNet / VAE / text encoder against diffusers and transformers on identical (converted) random weights.

The SD-layout state dict is converted with diffusers' own single-file conversion functions, an independent
reading of the checkpoint layout, so both key naming and numerics are checked.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import randomize_

from bench.baselines import diffusers_unet, diffusers_vae
from bench.baselines import hf_text_model as _hf_text_model
from ldm.checkpoint import build_model

# The diffusers/transformers models are built by bench/baselines.py (one implementation for the tests and the
# benchmark): our SD-layout state dict goes through diffusers' single-file converters and is loaded strictly.

TOL = 1e-4


def hf_text_model(model, sd: dict, device: str = "cpu"):
    """transformers' CLIPTextModel with the text-encoder weights of `sd` (shape from the model's config)."""
    c = model.cond_stage_model.config
    config = {
        "model": {
            "params": {"cond_stage_config": {"params": {"width": c.width, "layers": c.layers, "heads": c.heads}}}
        }
    }
    return _hf_text_model(config, sd, device)


def test_full_size_layout_matches_sd15_and_diffusers(sd_config):
    """The meta-device model has SD v1.5's 1142 tensors, and diffusers/transformers take them with none left over."""
    model = build_model(sd_config, "meta")
    sd = model.state_dict()
    parts = {
        p: sum(k.startswith(p) for k in sd)
        for p in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
    }
    assert len(sd) == 1142
    assert parts == {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}
    assert sum(p.numel() for p in model.model.parameters()) == 859_520_964  # SD v1.5 UNet parameter count
    # Spot checks of well-known SD v1.5 shapes.
    assert sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    # Independent reading: diffusers' converters load everything into diffusers/transformers models.
    unet = diffusers_unet(sd_config, sd, "meta")
    vae = diffusers_vae(sd_config, sd, "meta")
    hf_text_model(model, sd, "meta")
    assert unet.config.cross_attention_dim == 768 and vae.config.latent_channels == 4


def _unet_inputs(model, B=2, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, hw, hw, generator=g)
    t = torch.tensor([3, 871][:B])
    ctx = torch.randn(
        B, 77, model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features, generator=g
    )
    return x, t, ctx


def test_unet_matches_diffusers_tiny(tiny_model, tiny_config):
    unet = diffusers_unet(tiny_config, tiny_model.state_dict())
    x, t, ctx = _unet_inputs(tiny_model)
    with torch.no_grad():
        ours = tiny_model.apply_model(x, t, ctx)
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    assert ours.abs().max() > 1e-2  # the comparison is not between two zero tensors
    assert (ours - ref).abs().max() <= TOL


def test_vae_matches_diffusers_tiny(tiny_model, tiny_config):
    vae = diffusers_vae(tiny_config, tiny_model.state_dict())
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post = tiny_model.encode_first_stage(img)
        ref_post = vae.encode(img).latent_dist
        assert (post.mean - ref_post.mean).abs().max() <= TOL
        assert (post.logvar - ref_post.logvar).abs().max() <= TOL
        z = post.mean
        ours = tiny_model.decode_first_stage(z * tiny_model.scale_factor)
        ref = vae.decode(z).sample
    assert ours.shape == (2, 3, 64, 64)
    assert (ours - ref).abs().max() <= TOL


def test_text_encoder_matches_transformers_tiny(tiny_model):
    hf = hf_text_model(tiny_model, tiny_model.state_dict())
    prompts = ["A close-up portrait of alz", "a dog, on the beach!", ""]
    ids = tiny_model.cond_stage_model.tokenize(prompts)
    with torch.no_grad():
        ours = tiny_model.get_learned_conditioning(prompts)
        ref = hf(input_ids=ids).last_hidden_state
    assert ours.shape == (3, 77, 32)
    assert (ours - ref).abs().max() <= TOL


@pytest.mark.slow
def test_full_size_parity(sd_config):
    """One full-size check of each part with random SD v1.5-size weights (CPU, small spatial size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    try:
        _full_size_parity(sd_config)
    finally:
        torch.set_num_threads(threads)  # later tests compare runs bit for bit: keep the thread count they expect


def _full_size_parity(sd_config):
    torch.manual_seed(0)
    model = randomize_(build_model(copy.deepcopy(sd_config)), std=0.02).eval().requires_grad_(False)
    sd = model.state_dict()
    x, t, ctx = _unet_inputs(model, B=1, hw=16)
    with torch.no_grad():
        ours = model.apply_model(x, t, ctx)
        unet = diffusers_unet(sd_config, sd)
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        del unet
        assert (ours - ref).abs().max() <= TOL, (ours - ref).abs().max()

        img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        vae = diffusers_vae(sd_config, sd)
        assert (model.encode_first_stage(img).mean - vae.encode(img).latent_dist.mean).abs().max() <= TOL
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        assert (model.decode_first_stage(z * model.scale_factor) - vae.decode(z).sample).abs().max() <= TOL
        del vae

        hf = hf_text_model(model, sd)
        prompts = ["A close-up portrait of a person, studio lighting", "alz"]
        ids = model.cond_stage_model.tokenize(prompts)
        assert (model.get_learned_conditioning(prompts) - hf(input_ids=ids).last_hidden_state).abs().max() <= TOL
