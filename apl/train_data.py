"""Training data of APL: identity and general latents, and the per-step batch plan.

Every random choice of step s (which samples, which prefix/template, t, noise) comes from generators seeded by
(seed, s) alone. So a resumed run continues exactly where it stopped, and with data parallelism every rank
computes the same global batch plan and takes its own slice: ranks see different data, and N ranks of batch B
train like one process of batch N*B.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from apl.fingerprint import module_fingerprint
from apl.generated import generate_general_latents
from apl.images import SkipReport
from apl.latent_cache import LatentCache
from apl.people import NO_PHRASE_PROB, PREFIXES, general_prompts, load_people, load_templates, sample_identity_prompts
from apl.runtime import UsageError, shipped_file
from ldm.modules.prefix import tokenizer_of
from ldm.util import to_device


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
    notes: list[str] = field(default_factory=list)  # changes made to the inputs (cut captions), said at start and end

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
    reference: str  # the private prompt without the placeholder (the named person): the ESD-style reference


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
    no_phrase_prob: float = NO_PHRASE_PROB,
) -> list[PlannedSample]:
    """The texts and sample indices of the whole (global) batch of one step."""
    rng = random.Random(f"apl-plan:{seed}:{step}")
    plan = []
    lead = f"{placeholder} "
    for _ in range(global_batch):
        use_id = data.face_latents is not None and (data.general_latents is None or rng.random() < id_ratio)
        if use_id:
            i = rng.randrange(len(data.face_names))
            name = data.face_names[i]
            private, neutral = sample_identity_prompts(
                name, data.people[name], data.templates, rng, placeholder, id_target, no_phrase_prob
            )
            plan.append(PlannedSample("id", i, private, neutral, private.removeprefix(lead)))
        else:
            i = rng.randrange(len(data.general_captions))
            private, neutral = general_prompts(data.general_captions[i], placeholder)
            plan.append(PlannedSample("general", i, private, neutral, neutral))
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
    stored z_0 otherwise. Index tensors and noise go to the device from pinned memory, so no host sync happens."""
    first = data.face_latents if data.face_latents is not None else data.general_latents
    device = first.device
    out = torch.empty((len(plan), *vae_noise.shape[1:]), device=device)
    vae_noise = to_device(vae_noise, device)
    for kind, latents, moments in (
        ("id", data.face_latents, True),
        ("general", data.general_latents, data.general_is_moments),
    ):
        rows = [i for i, p in enumerate(plan) if p.kind == kind]
        if not rows:
            continue
        rows_t = to_device(torch.tensor(rows), device)
        lat = latents.index_select(0, to_device(torch.tensor([plan[i].index for i in rows]), device))
        if moments:
            mean, logvar = lat.float().chunk(2, dim=1)
            out[rows_t] = scale_factor * (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * vae_noise[rows_t])
        else:
            out[rows_t] = lat.float()
    return out


DEFAULT_PROMPTS_FILE = "prompts.txt"  # the shipped captions; a general folder's own prompts.txt wins over it


def make_room_for_prefix(
    general: list, people: dict[str, str], templates: list[str], tokenizer, num_vectors: int
) -> tuple[list, list[str]]:
    """Fit every training prompt into CLIP's 75 content positions once `alz` becomes `num_vectors` vectors.

    The insertion cuts a row back to 77 positions: a longer private prompt would lose its end-of-text token and its
    last words while the neutral side keeps them. General captions longer than 75 - N tokens are cut at a word
    boundary, the same on both sides (returned with a note); an identity prompt that cannot fit (a long name or
    template) is refused, naming it."""
    room = tokenizer.model_max_length - 2 - num_vectors  # content tokens left beside the N vectors
    notes: list[str] = []
    fitted, cut = [], []
    for g in general:
        short = tokenizer.truncate(g.caption, room)
        if short != g.caption:
            cut.append(g.caption)
            g = replace(g, caption=short)
        fitted.append(g)
    if cut:
        notes.append(
            f"{len(cut)} general caption(s) are longer than the {room} CLIP tokens left beside the prefix's "
            f"{num_vectors} vectors; they were cut at a word boundary, the same with and without the prefix "
            f"(e.g. {cut[0][:60]!r}...)"
        )
    if people:
        count = lambda text: len(tokenizer.encode(text))  # noqa: E731
        pre = max(PREFIXES, key=count)
        post = max(templates, key=count) if templates else ""
        for name in people:
            if count(pre) + count(name) + count(post) > room:
                longest = f"{pre}{name} {post}".strip()
                raise UsageError(
                    f"the identity prompt {'alz ' + longest!r} has {count(longest)} CLIP tokens besides 'alz'; with "
                    f"the prefix's {num_vectors} vectors only {room} fit in CLIP's 77 positions. Shorten the name in "
                    "--people_file or the longest template in --templates_file (or use fewer --num_vectors)"
                )
    return fitted, notes


def prepare_data(cfg, model, fabric, report: SkipReport) -> TrainData:
    """Scan the data, then cache VAE moments of images / generate general latents (rank 0 first).

    `cfg` is the trainer's TrainConfig; `fabric` the Lightning Fabric of the run."""
    from apl.datasets import caption_only_samples, scan_face_folder, scan_general_folder

    people = load_people(shipped_file(cfg.people_file))
    templates = load_templates(shipped_file(cfg.templates_file))
    prompts_file = shipped_file(cfg.prompts_file)
    faces = scan_face_folder(cfg.face_dir, people, report, Path(cfg.people_file).name) if cfg.id_ratio > 0 else []
    use_images = cfg.general_source == "images" or (cfg.general_source == "auto" and cfg.general_dir)
    general = []
    if cfg.id_ratio < 1:
        if use_images:
            if not cfg.general_dir:
                raise UsageError("--general_source images needs --general_dir")
            own = Path(cfg.general_dir) / "prompts.txt"  # the laion_<i> layout's captions usually sit beside it
            use = own if own.is_file() and cfg.prompts_file == DEFAULT_PROMPTS_FILE else prompts_file
            general = scan_general_folder(cfg.general_dir, report, use)
        else:
            general = caption_only_samples(prompts_file)
        general = general[: cfg.max_general] if cfg.max_general else general
    named = {f.name: people[f.name] for f in faces}
    general, notes = make_room_for_prefix(general, named, templates, tokenizer_of(model), cfg.num_vectors)
    progress = cfg.progress and fabric.is_global_zero
    device = fabric.device

    def encode_moments(x: torch.Tensor) -> torch.Tensor:
        post = model.encode_first_stage(x.to(device))
        return torch.cat([post.mean, post.logvar], dim=1).float().cpu()

    cache = LatentCache(
        Path(cfg.cache_dir) / "latents", module_fingerprint(model.first_stage_model) + "-moments", cfg.image_size
    )
    with fabric.rank_zero_first():
        enc = cache.encode_all([f.path for f in faces], encode_moments, 8, report, progress) if faces else {}
        gen_img = (
            cache.encode_all([g.path for g in general], encode_moments, 8, report, progress)
            if (general and use_images)
            else {}
        )
        gen_z0 = None
        if general and not use_images:
            gen_z0 = generate_general_latents(
                model,
                [g.caption for g in general],
                Path(cfg.cache_dir) / "generated",
                module_fingerprint(model),
                steps=cfg.ddim_steps,
                scale=cfg.start_guidance,
                size=cfg.image_size,
                seed=cfg.seed,
                batch_size=8,
                progress=progress,
            )
    faces = [f for f in faces if f.path in enc]
    if cfg.id_ratio > 0 and not faces:
        raise UsageError(f"no readable face images in {cfg.face_dir}:\n{report.summary()}")
    if use_images:
        general = [g for g in general if g.path in gen_img]
        general_latents = torch.stack([gen_img[g.path] for g in general]) if general else None
    else:
        general_latents = torch.stack(gen_z0) if gen_z0 else None
    if cfg.id_ratio < 1 and general_latents is None:
        raise UsageError(f"no usable general samples:\n{report.summary()}")
    return TrainData(
        face_latents=torch.stack([enc[f.path] for f in faces]) if faces else None,
        face_names=[f.name for f in faces],
        general_latents=general_latents,
        general_captions=[g.caption for g in general],
        people=people,
        templates=templates,
        report=report,
        notes=notes,
    )
