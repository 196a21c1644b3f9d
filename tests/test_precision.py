"""Half precision and gradient checkpointing of our model (CPU): same function, stated tolerances."""

from __future__ import annotations

import copy

import pytest
import torch

from ldm.checkpoint import build_model
from ldm.modules.embedding_manager import EmbeddingManager


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_close_to_fp32(tiny_model, dtype, tol):
    half = copy.deepcopy(tiny_model).set_precision(dtype)
    assert half.alphas_cumprod.dtype == torch.float32  # the schedule never leaves fp32
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    prompts = ["a photo of a cat", "alz a close-up portrait"]
    with torch.no_grad():
        ref = tiny_model.apply_model(x, t, tiny_model.get_learned_conditioning(prompts))
        out = half.apply_model(x, t, half.get_learned_conditioning(prompts))
        img = half.decode_first_stage(x)
    assert out.dtype == torch.float32 and img.dtype == dtype  # UNet returns the latent's dtype
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < tol, rel


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(tiny_config)).eval().requires_grad_(False)
    em = EmbeddingManager(model.cond_stage_model, ["alz"], 4, generator=torch.Generator().manual_seed(0))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])

    def grad() -> torch.Tensor:
        em.zero_grad()
        c = model.get_learned_conditioning(["alz a photo", "alz a dog"], embedding_manager=em)
        model.apply_model(x, t, c).square().mean().backward()
        return em.embedding_parameters()[0].grad.clone()

    plain = grad()
    model.model.diffusion_model.set_gradient_checkpointing(True)
    assert all(m.checkpoint for m in model.modules() if hasattr(m, "checkpoint"))
    ckpt = grad()
    assert plain.abs().max() > 0 and torch.allclose(plain, ckpt, atol=1e-6, rtol=1e-5)
