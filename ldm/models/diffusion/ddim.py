"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) as plain functions.

SD v1 conventions: 1000 training steps, scaled-linear betas 0.00085 -> 0.012, DDIM timesteps 1, 1 + 1000//S, ...
(CompVis "uniform" / diffusers `timestep_spacing="leading", steps_offset=1`), the last step goes to
alphas_cumprod[0] (diffusers `set_alpha_to_one=False`), no clipping of the predicted x_0.

The model is any eps-predicting callable `model(x_t, t, cond)`; classifier-free guidance is the `CFGDenoiser`
wrapper around it, so the sampler itself knows nothing about prompts. A conditioning is a tensor (SD v1's
(B, 77, 768) context) or a dict of tensors with the batch first (SDXL's {'crossattn', 'vector'}).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

# (x_t (B, C, H, W), t (B,) long, cond) -> predicted noise eps (B, C, H, W)
EpsModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def make_beta_schedule(
    n_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> torch.Tensor:
    """SD v1 "scaled linear" betas: linear in sqrt(beta), squared; float64 (n_timesteps,)."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, n_timesteps, dtype=torch.float64) ** 2


def make_alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) in float64, the only schedule quantity DDIM needs."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.LongTensor:
    """Ascending DDIM timesteps k * (N // S) + 1 for k < S, e.g. [1, 21, ..., 981] for S = 50."""
    # Exactly S steps, as diffusers "leading". CompVis' range(0, N, N // S) yields one extra step when S does not
    # divide N (31 steps for S = 30); for S dividing N (10, 20, 25, 50, 100, ...) both are the same sequence.
    if not 1 <= num_steps <= num_train_timesteps // 2:
        raise ValueError(
            f"num_steps={num_steps} DDIM steps is not possible with {num_train_timesteps} training steps: use 1.."
            f"{num_train_timesteps // 2} (the +1 offset would put the last timestep past {num_train_timesteps - 1})."
        )
    stride = num_train_timesteps // num_steps
    return torch.arange(num_steps, dtype=torch.long) * stride + 1  # type: ignore[return-value]


Cond = torch.Tensor | Mapping[str, torch.Tensor]


def _is_cond(c: Any) -> bool:
    return isinstance(c, torch.Tensor) or (
        isinstance(c, Mapping) and bool(c) and all(isinstance(v, torch.Tensor) for v in c.values())
    )


def _parts(c: Cond) -> dict[str, torch.Tensor]:
    """A conditioning as named tensors ('' for a plain tensor)."""
    return dict(c) if isinstance(c, Mapping) else {"": c}


def _rebuild(like: Cond, parts: dict[str, torch.Tensor]) -> Cond:
    return parts if isinstance(like, Mapping) else parts[""]


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + scale * (eps_c - eps_u), one batched forward."""

    def __init__(self, model: EpsModel, uncond: Any, scale: float) -> None:
        if scale != 1.0 and not _is_cond(uncond):
            raise TypeError(
                f"CFGDenoiser needs the unconditional embedding as a tensor (e.g. the encoded empty prompt, "
                f"(1, 77, 768)) or a dict of tensors (SDXL) when scale != 1; got {type(uncond).__name__}."
            )
        self.model = model
        self.uncond = uncond
        self.scale = float(scale)

    def _uncond_like(self, cond: Cond, batch: int) -> Cond:
        """The unconditional embedding on cond's device/dtype, batch 1 expanded to `batch`; shapes checked."""
        u_parts, c_parts = _parts(self.uncond), _parts(cond)
        if u_parts.keys() != c_parts.keys():
            raise ValueError(f"CFG: uncond has parts {sorted(u_parts)} but cond has {sorted(c_parts)}.")
        out = {}
        for k, c in c_parts.items():
            u = u_parts[k].to(device=c.device, dtype=c.dtype)
            if u.shape[0] == 1 and batch != 1:
                u = u.expand(batch, *u.shape[1:])  # one negative prompt shared by the whole batch
            if u.shape[0] != batch or c.shape[0] != batch or u.shape[1:] != c.shape[1:]:
                name = f" {k!r}" if k else ""
                raise ValueError(
                    f"CFG shapes do not fit: x has batch {batch}, cond{name} {tuple(c.shape)}, uncond{name} "
                    f"{tuple(u_parts[k].shape)}; uncond must be batch 1 or {batch} with the same feature shape as "
                    "cond."
                )
            out[k] = u
        return _rebuild(cond, out)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Guided eps for x (B, C, H, W) at t (B,) under cond (B, ...); scale 1 is the plain conditional model."""
        if self.scale == 1.0:  # guidance is the identity: save the unconditional half of the batch
            return self.model(x, t, cond)
        uncond = _parts(self._uncond_like(cond, x.shape[0]))
        both = _rebuild(cond, {k: torch.cat([uncond[k], c]) for k, c in _parts(cond).items()})
        eps_uncond, eps_cond = self.model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return eps_uncond + self.scale * (eps_cond - eps_uncond)


def ddim_sigma(alpha_t: float, alpha_prev: float, eta: float) -> float:
    """sigma_t of DDIM eq. 16: eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))."""
    return eta * math.sqrt((1.0 - alpha_prev) / (1.0 - alpha_t) * (1.0 - alpha_t / alpha_prev))


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: float,
    alpha_prev: float,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update (eq. 12) from x_t to x_prev given eps; returns (x_prev, pred_x0) in x's dtype.

    alpha_t / alpha_prev are alphas_cumprod at t and at the previous DDIM timestep (python floats, float64).
    With eta > 0, `noise` (standard normal, shape of x) is scaled by sigma_t and added.
    """
    sigma = ddim_sigma(alpha_t, alpha_prev, eta) if eta > 0 else 0.0
    if sigma > 0 and noise is None:
        raise ValueError(f"ddim_step with eta={eta} needs a noise tensor of shape {tuple(x.shape)}.")
    # fp16/bf16 latents are updated in fp32 and cast back: dividing by sqrt(alpha_t) (~0.07 at t=981) would
    # otherwise amplify bf16's 3-digit rounding at every step. fp32/fp64 latents are computed in their own dtype.
    work = torch.promote_types(x.dtype, torch.float32)
    x_w, eps_w = x.to(work), eps.to(work)
    pred_x0 = (x_w - math.sqrt(1.0 - alpha_t) * eps_w) / math.sqrt(alpha_t)
    direction = math.sqrt(1.0 - alpha_prev - sigma**2) * eps_w  # "direction pointing to x_t"
    x_prev = math.sqrt(alpha_prev) * pred_x0 + direction
    if sigma > 0:
        x_prev = x_prev + sigma * noise.to(device=x.device, dtype=work)
    return x_prev.to(x.dtype), pred_x0.to(x.dtype)


@torch.no_grad()
def sample_ddim(
    model: EpsModel,
    x_T: torch.Tensor,
    cond: Any,
    alphas_cumprod: torch.Tensor,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noises: Sequence[torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    disable: bool = False,
    t_start: int | None = None,
    t_end: int | None = None,
) -> torch.Tensor:
    """DDIM sampling from x_T with `steps` steps; returns the final latent x_0 (same dtype as x_T).

    Step i (0 <= i < steps) takes the latent at timestep tau_i = ddim_timesteps(steps).flip(0)[i] (981, 961, ...
    for 50 steps) to tau_i - N // steps, the last one to alphas_cumprod[0]. The model sees t = tau_i.

    t_start = k (partial sampling, img2img / ESD style): x_T is the latent at timestep tau_k, e.g.
    `q_sample(x0, ddim_timesteps(steps).flip(0)[k], noise)`; only steps k..steps-1 run (steps - k model calls).
    None or 0 is full sampling from pure noise.
    t_end = m: stop after step m - 1 and return the latent at timestep tau_m (ESD's "sample until t");
    None means run to the end.
    eta: 0 is deterministic DDIM; eta > 0 adds sigma_t * noise per step, the noise taken from `noises` (one
    tensor of x's shape per step that runs) or else drawn with `generator`.
    callback(i, x, pred_x0) runs after each step with the step index i in the full schedule and the new latent.
    """
    acp = alphas_cumprod.detach().to("cpu", torch.float64)
    n_train = acp.shape[0]
    timesteps = ddim_timesteps(steps, n_train).flip(0).tolist()  # descending: 981, 961, ..., 1
    stride = n_train // steps
    start = 0 if t_start is None else int(t_start)
    end = steps if t_end is None else int(t_end)
    if not 0 <= start <= end <= steps:
        raise ValueError(f"need 0 <= t_start <= t_end <= steps={steps}; got t_start={t_start}, t_end={t_end}.")
    if noises is not None and eta > 0 and len(noises) != end - start:
        raise ValueError(
            f"noises has {len(noises)} tensors but {end - start} DDIM steps run (steps={steps}, "
            f"t_start={start}, t_end={end}): pass one noise tensor per step."
        )
    x = x_T
    for k, i in enumerate(tqdm(range(start, end), desc="DDIM", disable=disable)):
        t = timesteps[i]
        alpha_t = acp[t].item()
        alpha_prev = acp[t - stride].item() if t - stride >= 0 else acp[0].item()
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device), cond)
        noise = None
        if eta > 0:
            if noises is not None:
                noise = noises[k]
            else:
                # Draw on the generator's device so a CPU generator gives the same noise for CPU and GPU runs.
                device = generator.device if generator is not None else x.device
                noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        x, pred_x0 = ddim_step(x, eps, alpha_t, alpha_prev, eta, noise)
        if callback is not None:
            callback(i, x, pred_x0)
    return x
