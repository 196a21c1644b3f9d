"""DDIM sampler and CFG wrapper against diffusers' DDIMScheduler configured as SD v1."""

import pytest
import torch

from ldm.models.diffusion.ddim import (
    CFGDenoiser,
    ddim_step,
    ddim_timesteps,
    make_alphas_cumprod,
    make_beta_schedule,
    sample_ddim,
)

diffusers = pytest.importorskip("diffusers")

B, C, H, W, D = 2, 4, 8, 8, 16  # latents (B, C, H, W), text conditioning (B, 77, D)


class TinyEps(torch.nn.Module):
    """Deterministic eps model of x, t and cond that keeps latents at SD scale.

    The main term is the exact eps-predictor for data x0 ~ N(0, S^2) (so trajectories stay bounded like real
    latents, |x| of a few units); a fixed random conv and a projection of cond perturb it so x, t and cond all matter.
    """

    S = 1.0

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1).requires_grad_(False)
        self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
        self.conv.bias.copy_(torch.randn(C, generator=g) * 0.1)
        self.proj = torch.randn(D, C, generator=g) / D**0.5
        self.acp = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
        self.calls: list[tuple[int, list[int]]] = []  # (batch size, timesteps) per forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.calls.append((x.shape[0], t.tolist()))
        a = self.acp[t.cpu()].to(x.dtype)[:, None, None, None]
        optimal = (1 - a).sqrt() * x / (a * self.S**2 + 1 - a)
        h = torch.nn.functional.conv2d(x, self.conv.weight.to(x.dtype), self.conv.bias.to(x.dtype), padding=1)
        c = (cond.mean(1) @ self.proj.to(cond.dtype)).to(x.dtype)  # (B, C)
        return optimal + 0.2 * torch.tanh(h) + 0.1 * c[:, :, None, None]


@pytest.fixture
def model() -> TinyEps:
    return TinyEps()


def sd_scheduler():
    return diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(B, C, H, W, generator=g)
    cond = torch.randn(B, 77, D, generator=g)
    uncond = torch.randn(1, 77, D, generator=g)
    return x_T, cond, uncond


def diffusers_trajectory(model, x, cond, uncond, steps, eta, scale, noises, start=0):
    """Reference loop: diffusers' step, CFG done by hand; returns (timesteps, latents after each step)."""
    sched = sd_scheduler()
    sched.set_timesteps(steps)
    ts = sched.timesteps[start:]
    latents = []
    for k, t in enumerate(ts):
        tb = t.expand(x.shape[0]).long()
        if scale == 1.0:
            eps = model(x, tb, cond)
        else:
            u = uncond.expand(x.shape[0], -1, -1)
            eps_u, eps_c = model(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([u, cond])).chunk(2)
            eps = eps_u + scale * (eps_c - eps_u)
        noise = noises[k] if eta > 0 else None
        x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        latents.append(x)
    return ts.tolist(), latents


def test_betas_match_diffusers():
    betas = make_beta_schedule()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    sched = sd_scheduler()
    torch.testing.assert_close(betas.float(), sched.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(make_alphas_cumprod(betas).float(), sched.alphas_cumprod, rtol=1e-5, atol=1e-8)
    assert betas[0].item() == pytest.approx(0.00085) and betas[-1].item() == pytest.approx(0.012)


@pytest.mark.parametrize("steps", [1, 7, 10, 20, 25, 30, 50, 100, 500])
def test_timesteps_match_diffusers(steps):
    sched = sd_scheduler()
    sched.set_timesteps(steps)
    ts = ddim_timesteps(steps)
    assert ts.dtype == torch.long and len(ts) == steps
    assert ts.flip(0).tolist() == sched.timesteps.tolist()
    assert ts[0] == 1 and ts.max() <= 999


def test_timesteps_examples_and_errors():
    assert ddim_timesteps(50)[:3].tolist() == [1, 21, 41] and ddim_timesteps(50)[-1] == 981
    assert ddim_timesteps(20).tolist() == list(range(1, 1000, 50))
    for bad in (0, -3, 501, 1000):
        with pytest.raises(ValueError, match="DDIM steps"):
            ddim_timesteps(bad)


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_trajectory_matches_diffusers(model, steps, eta, scale):
    x_T, cond, uncond = inputs()
    g = torch.Generator().manual_seed(2)
    noises = [torch.randn(B, C, H, W, generator=g) for _ in range(steps)]
    ref_ts, ref_latents = diffusers_trajectory(model, x_T, cond, uncond, steps, eta, scale, noises)

    model.calls.clear()
    ours: list[torch.Tensor] = []
    denoiser = CFGDenoiser(model, uncond, scale)
    acp = make_alphas_cumprod(make_beta_schedule())
    out = sample_ddim(
        denoiser,
        x_T,
        cond,
        acp,
        steps=steps,
        eta=eta,
        noises=noises,
        disable=True,
        callback=lambda i, x, x0: ours.append(x),
    )

    assert [ts[0] for _, ts in model.calls] == ref_ts  # the model saw the same timesteps, in order
    assert all(bs == (B if scale == 1.0 else 2 * B) for bs, _ in model.calls)  # CFG: one batched forward
    assert len(ours) == len(ref_latents) == steps
    for i, (a, b) in enumerate(zip(ours, ref_latents, strict=True)):
        assert (a - b).abs().max().item() <= 1e-5, f"step {i}: max abs diff {(a - b).abs().max().item():.2e}"
    assert torch.equal(out, ours[-1])
    assert 1.0 < out.abs().max() < 20.0  # SD-like latent scale, so the 1e-5 tolerance is meaningful
    if eta > 0:  # the noise really entered: eta 0 gives a different result
        det = sample_ddim(denoiser, x_T, cond, acp, steps=steps, eta=0.0, disable=True)
        assert (det - out).abs().max() > 1e-2


def test_diffusers_alphas_give_same_result(model):
    # The schedule buffer stored in checkpoints is float32; the sampler must accept it too.
    x_T, cond, _ = inputs()
    a64 = sample_ddim(model, x_T, cond, make_alphas_cumprod(make_beta_schedule()), steps=20, disable=True)
    a32 = sample_ddim(model, x_T, cond, sd_scheduler().alphas_cumprod, steps=20, disable=True)
    assert (a64 - a32).abs().max() <= 1e-5


def test_cfg_scale_one_is_plain_model(model):
    x_T, cond, uncond = inputs()
    t = torch.full((B,), 501, dtype=torch.long)
    model.calls.clear()
    assert torch.equal(CFGDenoiser(model, uncond, 1.0)(x_T, t, cond), model(x_T, t, cond))
    assert [bs for bs, _ in model.calls] == [B, B]  # no unconditional half computed
    # scale 0 is the unconditional prediction, as the formula says.
    torch.testing.assert_close(CFGDenoiser(model, uncond, 0.0)(x_T, t, cond), model(x_T, t, uncond.expand(B, -1, -1)))


def test_cfg_uncond_batch_one_is_expanded(model):
    x_T, cond, uncond = inputs()
    t = torch.full((B,), 301, dtype=torch.long)
    one = CFGDenoiser(model, uncond, 7.0)(x_T, t, cond)
    full = CFGDenoiser(model, uncond.repeat(B, 1, 1), 7.0)(x_T, t, cond)
    torch.testing.assert_close(one, full, rtol=0, atol=1e-6)
    # Guidance really changes the prediction.
    assert (one - model(x_T, t, cond)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="uncond must be batch 1 or 2"):
        CFGDenoiser(model, torch.randn(3, 77, D), 7.0)(x_T, t, cond)
    with pytest.raises(TypeError, match="unconditional embedding"):
        CFGDenoiser(model, None, 7.0)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_partial_sampling_t_start(model, eta):
    # t_start = k: x is the latent at the k-th (descending) DDIM timestep; only the last steps run,
    # as diffusers img2img does with timesteps[k:].
    steps, k = 20, 12
    x_T, cond, uncond = inputs()
    noises = [torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(5 + j)) for j in range(steps - k)]
    ref_ts, ref_latents = diffusers_trajectory(model, x_T, cond, uncond, steps, eta, 3.0, noises, start=k)
    model.calls.clear()
    seen = []
    out = sample_ddim(
        CFGDenoiser(model, uncond, 3.0),
        x_T,
        cond,
        make_alphas_cumprod(make_beta_schedule()),
        steps=steps,
        eta=eta,
        noises=noises,
        disable=True,
        t_start=k,
        callback=lambda i, x, x0: seen.append(i),
    )
    assert seen == list(range(k, steps))
    assert [ts[0] for _, ts in model.calls] == ref_ts == ddim_timesteps(steps).flip(0)[k:].tolist()
    assert (out - ref_latents[-1]).abs().max() <= 1e-5


def test_t_end_stops_early(model):
    x_T, cond, _ = inputs()
    acp = make_alphas_cumprod(make_beta_schedule())
    traj = []
    sample_ddim(model, x_T, cond, acp, steps=10, disable=True, callback=lambda i, x, x0: traj.append(x))
    head = sample_ddim(model, x_T, cond, acp, steps=10, disable=True, t_end=4)
    tail = sample_ddim(model, head, cond, acp, steps=10, disable=True, t_start=4)
    assert torch.equal(head, traj[3])
    assert torch.equal(tail, traj[-1])
    assert torch.equal(sample_ddim(model, x_T, cond, acp, steps=10, disable=True, t_start=3, t_end=3), x_T)
    with pytest.raises(ValueError, match="t_start"):
        sample_ddim(model, x_T, cond, acp, steps=10, disable=True, t_start=5, t_end=4)


def test_generator_noise_is_reproducible_and_checked(model):
    x_T, cond, _ = inputs()
    acp = make_alphas_cumprod(make_beta_schedule())

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return sample_ddim(model, x_T, cond, acp, steps=10, eta=1.0, disable=True, generator=g)

    assert torch.equal(run(3), run(3))
    assert (run(3) - run(4)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="one noise tensor per step"):
        sample_ddim(model, x_T, cond, acp, steps=10, eta=1.0, noises=[torch.randn_like(x_T)] * 9, disable=True)
    with pytest.raises(ValueError, match="needs a noise tensor"):
        ddim_step(x_T, x_T, 0.5, 0.9, eta=1.0)


def test_ddim_step_is_exact_for_true_eps():
    # If eps is the true noise, pred_x0 recovers x0 and eta=0 lands exactly on the prev-timestep point.
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    acp = make_alphas_cumprod(make_beta_schedule())
    a_t, a_prev = acp[501].item(), acp[451].item()
    x_t = a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps
    x_prev, pred_x0 = ddim_step(x_t, eps, a_t, a_prev)
    torch.testing.assert_close(pred_x0, x0)
    torch.testing.assert_close(x_prev, a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype(model, dtype):
    x_T, cond, uncond = inputs()
    acp = make_alphas_cumprod(make_beta_schedule())
    ref = sample_ddim(
        CFGDenoiser(model, uncond, 5.0),
        x_T,
        cond,
        acp,
        steps=10,
        eta=0.5,
        disable=True,
        generator=torch.Generator().manual_seed(0),
    )
    dtypes = []
    out = sample_ddim(
        CFGDenoiser(model, uncond.to(dtype), 5.0),
        x_T.to(dtype),
        cond.to(dtype),
        acp,
        steps=10,
        eta=0.5,
        disable=True,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, x, x0: dtypes.append((x.dtype, x0.dtype)),
    )
    assert out.dtype == dtype and set(dtypes) == {(dtype, dtype)}
    tol = 0.05 if dtype == torch.float16 else 0.25
    assert (out.float() - ref).abs().max() < tol
