"""StaticStep: the training step on static buffers (eager on the CPU, one CUDA graph on a GPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_
from torch.utils._python_dispatch import TorchDispatchMode

from apl.step import StaticStep, apl_loss
from ldm.checkpoint import build_model
from ldm.modules.embedding_manager import EmbeddingManager


@pytest.fixture(scope="module")
def strong_tiny_model(tiny_config):
    """Larger random weights: the tiny model's eps then depends clearly on the text."""
    return randomize_(build_model(copy.deepcopy(tiny_config)), std=0.15).eval().requires_grad_(False)


PRIVATE = ["alz A photo of Tom Hanks", "alz a red car"]
NEUTRAL = ["A photo of a male person, short brown hair.", "a red car"]
# Ops that make the host wait for the device, or whose output shape depends on tensor values: either one breaks
# CUDA graph capture (and costs a sync per step without a graph).
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "is_nonzero", "equal")


def _inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, model.channels, 8, 8, generator=g)
    noise = torch.randn(batch, model.channels, 8, 8, generator=g)
    t = torch.randint(0, model.num_timesteps, (batch,), generator=g)
    tok = model.cond_stage_model.tokenizer
    return z0, t, noise, tok(PRIVATE[:batch]), tok(NEUTRAL[:batch])


def _em(model, seed=0):
    return EmbeddingManager(model.cond_stage_model, ["alz"], 4, generator=torch.Generator().manual_seed(seed))


def test_static_step_equals_apl_loss_and_outputs_are_reused(tiny_model):
    """run() gives the same loss and prefix gradient as apl_loss + backward on strings; the outputs are the same
    tensors every run (the next run overwrites them), as they are with a CUDA graph."""
    em = _em(tiny_model)
    step = StaticStep(tiny_model, em, 2, (tiny_model.channels, 8, 8))
    z0, t, noise, private_ids, neutral_ids = _inputs(tiny_model)
    step.load(z0, t, noise, private_ids, neutral_ids)
    loss, grads = step.run()
    first_loss, first_grad = loss.clone(), grads[0].clone()

    ref = apl_loss(tiny_model, em, tiny_model.q_sample(z0, t, noise), t, PRIVATE, NEUTRAL)
    em.zero_grad(set_to_none=True)
    ref.mean().backward()
    ref_grad = em.embedding_parameters()[0].grad
    assert torch.equal(first_loss, ref.detach()) and torch.equal(first_grad, ref_grad)
    assert first_grad.abs().sum() > 0  # the gradient reaches the prefix

    step.load(*_inputs(tiny_model, seed=1))
    loss2, grads2 = step.run()
    assert loss2 is loss and grads2[0] is grads[0]  # static outputs: clone what you keep
    assert not torch.equal(loss2, first_loss)


def test_static_step_body_has_no_host_sync(tiny_model):
    """The step's device work contains no op that syncs with the host or has a value-dependent shape."""
    em = _em(tiny_model)
    step = StaticStep(tiny_model, em, 2, (tiny_model.channels, 8, 8))
    step.load(*_inputs(tiny_model))
    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        step._body()
    assert "convolution" in seen and "_scaled_dot_product_flash_attention_for_cpu" in seen  # it did record the step
    assert "searchsorted" in seen  # the prefix insertion ran, without a sync
    bad = sorted(op for op in seen if op in SYNCING_OPS)
    assert not bad, f"host-syncing ops inside the training step: {bad}"


def test_fp16_needs_loss_scaling_and_gets_it(tiny_model):
    """With fp16 weights the prefix gradient underflows to exactly zero (the loss is a mean over many latent values);
    with a GradScaler the unscaled gradient matches the fp32 one."""
    model = copy.deepcopy(tiny_model)
    inputs = _inputs(model)

    def prefix_grad(scaler=None) -> torch.Tensor:
        em = _em(model)
        step = StaticStep(model, em, 2, (model.channels, 8, 8), scaler=scaler)
        step.load(*inputs)
        _, grads = step.run()
        return grads[0].clone() / (1.0 if scaler is None else scaler.get_scale())

    ref = prefix_grad()
    model.set_precision(torch.float16)
    assert torch.count_nonzero(prefix_grad()) == 0
    scaled = prefix_grad(torch.amp.GradScaler("cpu", init_scale=2.0**16))
    cos = torch.nn.functional.cosine_similarity(scaled.flatten().double(), ref.flatten().double(), dim=0)
    assert cos > 0.99, float(cos)  # fp16's own rounding; unscaled, nothing at all survives


def test_load_checks_shapes(tiny_model):
    step = StaticStep(tiny_model, _em(tiny_model), 2, (tiny_model.channels, 8, 8))
    z0, t, noise, p, n = _inputs(tiny_model)
    with pytest.raises(ValueError, match=r"got shape \(1, 77\), the buffer is \(2, 77\)"):
        step.load(z0, t, noise, p[:1], n)


def test_graph_needs_cuda(tiny_model):
    with pytest.raises(ValueError, match="CUDA graph needs a CUDA device"):
        StaticStep(tiny_model, _em(tiny_model), 2, (tiny_model.channels, 8, 8), graph=True)
    with pytest.raises(ValueError, match="warmup >= 1 eager runs before capture; got 0"):
        StaticStep(tiny_model, _em(tiny_model), 2, (tiny_model.channels, 8, 8), graph=True, warmup=0)


# GPU kernels are not bit-deterministic (flash-attention backward and some cuDNN backward kernels add atomically),
# so eager and replayed steps agree to rounding noise, not bit for bit; a stale or mis-wired graph is off by far more.
CUDA_TOL = {torch.float32: dict(rtol=1e-4, cos=0.99999), torch.bfloat16: dict(rtol=2e-2, cos=0.999),
            torch.float16: dict(rtol=1e-2, cos=0.999)}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_cuda_graph_replays_like_eager(tiny_config, dtype, grad_ckpt):
    """Four steps, each with new inputs and a prefix changed in place (as Adam and the NaN restore do): the replayed
    graph gives the eager step's loss and prefix gradient; fp16 with the loss scaler, as train.py runs it."""
    torch.manual_seed(0)
    model = build_model(copy.deepcopy(tiny_config)).to("cuda").set_precision(dtype).eval().requires_grad_(False)
    model.model.diffusion_model.set_gradient_checkpointing(grad_ckpt)
    runs = {}
    for graph in (False, True):
        em = _em(model).to("cuda")
        prefix = em.embedding_parameters()[0]
        start = prefix.detach().clone()
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16) if dtype == torch.float16 else None
        step = StaticStep(model, em, 2, (model.channels, 8, 8), graph=graph, scaler=scaler)
        losses, grads = [], []
        for s in range(4):
            with torch.no_grad():
                prefix.copy_(start + 0.25 * s)
            step.load(*(x.cuda() for x in _inputs(model, seed=s)))
            loss, g = step.run()
            losses.append(loss.clone())
            grads.append(g[0].clone() / (1.0 if scaler is None else scaler.get_scale()))
        runs[graph] = (torch.stack(losses), torch.stack(grads))
        assert (step.graph is not None) == graph
    tol = CUDA_TOL[dtype]
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=tol["rtol"], atol=1e-6)
    assert len(set(runs[True][0][:, 0].tolist())) == 4  # every replay saw its own inputs
    for g_graph, g_eager in zip(runs[True][1], runs[False][1], strict=True):
        assert g_eager.abs().sum() > 0
        cos = torch.nn.functional.cosine_similarity(g_graph.flatten().double(), g_eager.flatten().double(), dim=0)
        assert cos > tol["cos"], float(cos)


def test_channels_last_unet_and_step_match_the_default_layout(tiny_model):
    """--channels_last: the UNet runs NHWC inside, returns NCHW, and the step's loss and prefix gradient agree with
    the default layout (fp32 rounding); the step stays free of host syncs."""
    model = copy.deepcopy(tiny_model)
    unet = model.model.diffusion_model
    z0, t, noise, private_ids, neutral_ids = _inputs(model)
    with torch.no_grad():
        ctx = model.get_learned_conditioning(NEUTRAL)
        ref = model.apply_model(noise, t, ctx)
    step = StaticStep(model, _em(model), 2, (model.channels, 8, 8))
    step.load(z0, t, noise, private_ids, neutral_ids)
    loss_ref, grads_ref = (x.clone() for x in (step.run()[0], step.run()[1][0]))

    unet.set_channels_last(True)
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model.apply_model(noise, t, ctx)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    loss, grads = step.run()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], grads_ref, rtol=1e-4, atol=1e-9)
    unet.set_channels_last(False)
    assert unet.input_blocks[0][0].weight.is_contiguous()


def test_staged_leaves_cpu_copies_alone():
    """Only a CPU tensor bound for a GPU is pinned; CPU-to-CPU (and device-resident) tensors pass through."""
    from ldm.util import staged

    t = torch.zeros(3)
    assert staged(t, "cpu") is t and staged(t, torch.device("cpu")) is t


@pytest.mark.parametrize("g", [0.5, 1.0, 2.0])
def test_apl_loss_value_and_gradient_closed_form(strong_tiny_model, g):
    """loss = (1+g)^2 * mse(eps_p, eps_n); d loss = (1+g) * d mse (the stop-gradient on eps_p in the target)."""
    m = strong_tiny_model
    em = EmbeddingManager(m.cond_stage_model, ["alz"], 4, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 700])
    loss = apl_loss(m, em, z, t, PRIVATE, NEUTRAL, negative_guidance=g)
    loss.mean().backward()
    grad = em.embedding_parameters()[0].grad.clone()
    em.zero_grad(set_to_none=True)
    with torch.no_grad():
        eps_n = m.apply_model(z, t, m.get_learned_conditioning(NEUTRAL))
    eps_p = m.apply_model(z, t, m.get_learned_conditioning(PRIVATE, embedding_manager=em))
    mse = ((eps_p - eps_n) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.detach(), (1 + g) ** 2 * mse.detach(), rtol=1e-5, atol=0)
    mse.mean().backward()
    ref = em.embedding_parameters()[0].grad
    assert ref.abs().sum() > 0
    torch.testing.assert_close(grad, (1 + g) * ref, rtol=1e-4, atol=1e-10)


def test_q_sample_closed_form(tiny_model):
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    ac = tiny_model.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(tiny_model.q_sample(x0, t, noise), ac.sqrt() * x0 + (1 - ac).sqrt() * noise)


def test_gap_does_not_depend_on_g_and_the_name_reference_changes_the_direction(strong_tiny_model):
    """apl_terms' gap is MSE(eps_p, eps_n) for every g (what log.jsonl's 'gap' compares across runs). With the
    original reference only the gradient's length depends on g (Adam ignores it); with reference='name' (the
    prompt without the placeholder, ESD-style) the target is eps_n - g (eps_name - eps_n) and g turns the gradient."""
    from apl.step import apl_terms

    m = strong_tiny_model
    em = EmbeddingManager(m.cond_stage_model, ["alz"], 4, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    named = [p.removeprefix("alz ") for p in PRIVATE]

    def grad_and_terms(g, reference=None):
        em.zero_grad(set_to_none=True)
        loss, gap = apl_terms(m, em, z, t, PRIVATE, NEUTRAL, g, reference)
        loss.mean().backward()
        return em.embedding_parameters()[0].grad.flatten().clone(), loss.detach(), gap

    g0, loss0, gap0 = grad_and_terms(0.0)
    g3, loss3, gap3 = grad_and_terms(3.0)
    torch.testing.assert_close(gap0, gap3)
    torch.testing.assert_close(loss3, 16 * gap0, rtol=1e-5, atol=0)
    assert torch.nn.functional.cosine_similarity(g0, g3, dim=0) > 0.9999
    n0, _, gap_n = grad_and_terms(0.0, named)
    n3, loss_n3, _ = grad_and_terms(3.0, named)
    torch.testing.assert_close(gap_n, gap0)  # the gap is the same quantity whatever the reference
    torch.testing.assert_close(n0, g0)  # g = 0: both references give the plain MSE to eps_n
    assert torch.nn.functional.cosine_similarity(n0, n3, dim=0) < 0.999  # g now changes where the prefix goes
    with torch.no_grad():
        eps_n = m.apply_model(z, t, m.get_learned_conditioning(NEUTRAL))
        eps_r = m.apply_model(z, t, m.get_learned_conditioning(named))
        eps_p = m.apply_model(z, t, m.get_learned_conditioning(PRIVATE, embedding_manager=em))
    target = eps_n - 3.0 * (eps_r - eps_n)
    torch.testing.assert_close(loss_n3, ((eps_p - target) ** 2).mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-7)


def test_static_step_with_the_name_reference_equals_apl_terms(tiny_model):
    from apl.step import apl_terms

    em = _em(tiny_model)
    step = StaticStep(tiny_model, em, 2, (tiny_model.channels, 8, 8), negative_guidance=2.0, reference="name")
    tok = tiny_model.cond_stage_model.tokenizer
    named = [p.removeprefix("alz ") for p in PRIVATE]
    z0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with pytest.raises(ValueError, match="reference_ids are needed"):
        step.load(z0, t, noise, tok(PRIVATE), tok(NEUTRAL))
    step.load(z0, t, noise, tok(PRIVATE), tok(NEUTRAL), tok(named))
    loss, grads = step.run()
    ref, gap = apl_terms(tiny_model, em, tiny_model.q_sample(z0, t, noise), t, PRIVATE, NEUTRAL, 2.0, named)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(step.gap, gap)
