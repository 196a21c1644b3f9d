"""Training data of APL: identity and general latents, and the per-step batch plan.

Every random choice of step s (which samples, which prefix/template, t, noise) comes from generators seeded by
(seed, s) alone. So a resumed run continues exactly where it stopped, and with data parallelism every rank
computes the same global batch plan and takes its own slice: ranks see different data, and N ranks of batch B
train like one process of batch N*B.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from apl.images import SkipReport
from apl.people import general_prompts, sample_identity_prompts


@dataclass
class TrainData:
    """Latents and texts of both branches. Image latents are VAE moments (mean | logvar, 8 channels) so that every
    step draws a fresh posterior sample like the original's per-step encoding; generated latents are z_0 (4 ch)."""

    face_latents: torch.Tensor | None  # (Nf, 8, h, w) moments, unscaled
    face_names: list[str]
    general_latents: torch.Tensor | None  # (Ng, 8, h, w) moments or (Ng, 4, h, w) scaled z_0
    general_captions: list[str]
    people: dict[str, str]
    templates: list[str]
    report: SkipReport = field(default_factory=SkipReport)

    @property
    def general_is_moments(self) -> bool:
        return self.general_latents is not None and self.general_latents.shape[1] == 8

    def to(self, device: torch.device | str) -> TrainData:
        """Move the latents (the only tensors) to `device`, in place; returns self."""
        if self.face_latents is not None:
            self.face_latents = self.face_latents.to(device)
        if self.general_latents is not None:
            self.general_latents = self.general_latents.to(device)
        return self

    def describe(self) -> str:
        nf, ng = len(self.face_names), len(self.general_captions)
        kind = "images" if self.general_is_moments else "self-generated latents"
        return (
            f"{nf} face images of {len(set(self.face_names))} people; {ng} general samples ({kind}); "
            f"{len(self.templates)} templates"
        )


@dataclass
class PlannedSample:
    kind: str  # "id" | "general"
    index: int  # into face_* or general_*
    private: str  # prompt with the placeholder
    neutral: str  # the target prompt


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))


def plan_batch(
    data: TrainData,
    step: int,
    seed: int,
    global_batch: int,
    id_ratio: float,
    placeholder: str = "alz",
    id_target: str = "attributes",
) -> list[PlannedSample]:
    """The texts and sample indices of the whole (global) batch of one step."""
    rng = random.Random(f"apl-plan:{seed}:{step}")
    plan = []
    for _ in range(global_batch):
        use_id = data.face_latents is not None and (data.general_latents is None or rng.random() < id_ratio)
        if use_id:
            i = rng.randrange(len(data.face_names))
            name = data.face_names[i]
            private, neutral = sample_identity_prompts(
                name, data.people[name], data.templates, rng, placeholder, id_target
            )
            plan.append(PlannedSample("id", i, private, neutral))
        else:
            i = rng.randrange(len(data.general_captions))
            private, neutral = general_prompts(data.general_captions[i], placeholder)
            plan.append(PlannedSample("general", i, private, neutral))
    return plan


def step_noise(
    seed: int, step: int, global_batch: int, latent_shape: tuple[int, int, int], num_timesteps: int = 1000
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """t (G,), diffusion noise (G, 4, h, w) and VAE posterior noise (G, 4, h, w) of one step, on the CPU."""
    g = step_generator(seed, step)
    t = torch.randint(0, num_timesteps, (global_batch,), generator=g)
    noise = torch.randn((global_batch, *latent_shape), generator=g)
    vae_noise = torch.randn((global_batch, *latent_shape), generator=g)
    return t, noise, vae_noise


def clean_latents(
    data: TrainData, plan: list[PlannedSample], vae_noise: torch.Tensor, scale_factor: float
) -> torch.Tensor:
    """z_0 (b, 4, h, w) of planned samples on the latents' device: scale * (mean + std * eps) for images, the
    stored z_0 otherwise. Index tensors go to the device with non_blocking copies, so no host sync happens."""
    first = data.face_latents if data.face_latents is not None else data.general_latents
    device = first.device
    out = torch.empty((len(plan), *vae_noise.shape[1:]), device=device)
    vae_noise = vae_noise.to(device, non_blocking=True)
    for kind, latents, moments in (
        ("id", data.face_latents, True),
        ("general", data.general_latents, data.general_is_moments),
    ):
        rows = [i for i, p in enumerate(plan) if p.kind == kind]
        if not rows:
            continue
        rows_t = torch.tensor(rows).to(device, non_blocking=True)
        lat = latents.index_select(0, torch.tensor([plan[i].index for i in rows]).to(device, non_blocking=True))
        if moments:
            mean, logvar = lat.float().chunk(2, dim=1)
            out[rows_t] = scale_factor * (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * vae_noise[rows_t])
        else:
            out[rows_t] = lat.float()
    return out
