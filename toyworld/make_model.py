"""Make the toy-world text-to-image model: an SD v1-architecture model (this repo's `ldm` classes, config
configs/toy/toy-sd.yaml) trained from a seed on rendered toy people and scenes, saved as an SD v1-layout
.safetensors that loads through the same strict loader as real checkpoints.

    python -m toyworld.make_model                       # ~38 min on 2 CPU cores -> toyworld/assets/toy-sd.safetensors
    python -m toyworld.make_model --finetune_from toyworld/assets/toy-sd.safetensors --style pop \
        --unet_steps 800 --out outputs/toy/toy-sd-pop.safetensors   # the restyled second model (transfer test)

Stages: render pictures with captions -> set the VAE to the fixed colour codec (toyworld/colour_codec.py: latents
are 8x8 block means; an SD-architecture VAE does not learn in minutes on a CPU) and rescale its latents so that
0.18215 * z has unit variance, as SD's -> encode the pictures -> train UNet and CLIP text encoder together on
eps-prediction (SD's noise schedule, 10 % empty captions for classifier-free guidance, EMA weights) -> a second,
shorter stage on a fresh set of pictures that is mostly anonymous people (--desc_*: it teaches the model to draw a
*description* faithfully, which is the picture APL's prefix learns to imitate; the first stage alone left gender,
glasses and beard weakly bound to their words) -> save fp16.
With --finetune_from, only the UNet trains, one stage, on pictures drawn in --style; VAE and text encoder stay.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from apl.io import atomic_write_text
from apl.latent_cache import file_digest
from ldm.checkpoint import build_model, load_model, save_checkpoint
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.sampling import make_grid, save_image, txt2img
from ldm.util import load_config
from toyworld.colour_codec import init_colour_codec
from toyworld.world import PEOPLE_JSON, load_named_people, training_sample

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy" / "toy-sd.yaml"
CHECKPOINT = Path(__file__).resolve().parent / "assets" / "toy-sd.safetensors"
PREVIEW_PROMPTS = (
    "A close-up portrait of Anya Brandt",
    "A close-up portrait of Bruno Castell",
    "A photo of Kira Tanaka in a sunny park",
    "A close-up portrait of a male person, dark skin, short red hair, beard.",
    "A photo of a female person at the beach, light skin, long blonde hair, glasses.",
    "A red circle and a blue star in a city at night",
    "A yellow triangle at sunset",
    "",
)


# ------------------------------------------------------------------------------------------------------ pictures
def _render_chunk(job: tuple[int, int, int, int, int, str | None]) -> list[tuple[np.ndarray, str, str]]:
    """Pictures [lo, hi) of the training set (run in a worker process)."""
    lo, hi, n_named, n_anonymous, seed, style = job
    people = load_named_people()
    out = []
    for i in range(lo, hi):
        s = training_sample(i, people, n_named, n_anonymous, seed, style)
        out.append((np.asarray(s.image), s.caption, s.kind))
    return out


def render_training_set(
    n_named: int, n_anonymous: int, n_scenes: int, seed: int, style: str | None, workers: int
) -> tuple[np.ndarray, list[str], list[str]]:
    """(pictures (N, 64, 64, 3) uint8, captions, kinds) of the toy world's training set."""
    total = len(load_named_people()) * n_named + n_anonymous + n_scenes
    bounds = np.linspace(0, total, 8 * max(1, workers) + 1).astype(int)
    jobs = [(int(a), int(b), n_named, n_anonymous, seed, style) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            if b > a]
    with Pool(max(1, workers)) as pool:
        parts = list(tqdm(pool.imap(_render_chunk, jobs), total=len(jobs), desc="render"))
    rows = [r for part in parts for r in part]
    return np.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows]


def kind_counts(kinds: list[str]) -> dict[str, int]:
    """How many pictures of each kind a rendered set holds (for the model record)."""
    return {k: kinds.count(k) for k in ("named", "anonymous", "scene")}


def _to_model(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------ training
def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def codec_psnr(model: LatentDiffusion, images: np.ndarray, seed: int) -> float:
    """PSNR (dB, pictures in [-1, 1]) of decode(encode(x)) on a sample of the training pictures."""
    x = _to_model(images[np.random.default_rng(seed).choice(len(images), min(256, len(images)), replace=False)])
    rec = model.first_stage_model.decode(model.first_stage_model.encode(x).mean)
    return round(10 * math.log10(4 / F.mse_loss(rec, x).item()), 2)


@torch.no_grad()
def normalise_latents(model: LatentDiffusion, images: np.ndarray, seed: int) -> float:
    """Rescale the VAE's latent space (exactly: encoder output x a, decoder input / a) so that scale_factor * z has
    unit standard deviation, as SD's 0.18215 gives for its own VAE; returns a."""
    vae = model.first_stage_model
    sample = images[np.random.default_rng(seed).choice(len(images), min(512, len(images)), replace=False)]
    std = float(vae.encode(_to_model(sample)).mean.std())
    a = 1.0 / (model.scale_factor * std)
    z = vae.quant_conv.out_channels // 2
    vae.quant_conv.weight[:z] *= a
    vae.quant_conv.bias[:z] *= a
    vae.quant_conv.bias[z:] += 2 * math.log(a)  # log-variance of a * z
    vae.post_quant_conv.weight /= a
    return a


@torch.no_grad()
def encode_moments(model: LatentDiffusion, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """(N, 8, 8, 8) posterior moments (mean | logvar) of every picture."""
    out = []
    for i in tqdm(range(0, len(images), batch), desc="encode"):
        post = model.first_stage_model.encode(_to_model(images[i : i + batch]))
        out.append(torch.cat([post.mean, post.logvar], dim=1))
    return torch.cat(out)


def train_diffusion(
    model: LatentDiffusion,
    moments: torch.Tensor,
    captions: list[str],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    train_text: bool = True,
    ema_decay: float = 0.999,
    drop: float = 0.1,
) -> dict:
    """eps-prediction on the VAE latents (SD's schedule and loss), UNet and (optionally) text encoder together.

    Ends with the EMA weights loaded into the model."""
    unet, text = model.model.diffusion_model, model.cond_stage_model
    params = list(unet.parameters()) + (list(text.parameters()) if train_text else [])
    unet.train().requires_grad_(True)
    text.train().requires_grad_(train_text)
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    bar = tqdm(range(steps), desc="UNet" + (" + text encoder" if train_text else ""))
    recent: list[float] = []
    ids = text.tokenize(captions)  # tokenized once (the same ids as tokenizing every batch)
    empty = text.tokenize([""])[0]
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * _cosine_lr(step, steps, max(1, steps // 25))
        idx = torch.randint(0, len(moments), (batch,), generator=g)
        mean, logvar = moments[idx].chunk(2, dim=1)
        z0 = model.scale_factor * (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g))
        t = torch.randint(0, model.num_timesteps, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        tokens = torch.stack([empty if rng.random() < drop else ids[int(i)] for i in idx])
        with torch.set_grad_enabled(train_text):
            context = text(tokens)
        eps = model.apply_model(model.q_sample(z0, t, noise), t, context)
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params, strict=True):
                e.lerp_(p.detach(), 1 - d)
        recent = (recent + [loss.item()])[-200:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    with torch.no_grad():
        for e, p in zip(ema, params, strict=True):
            p.copy_(e)
    unet.eval().requires_grad_(False)
    text.eval().requires_grad_(False)
    return {"diffusion_loss_last200": round(sum(recent) / max(1, len(recent)), 5)}


def init_text_encoder(model: LatentDiffusion) -> None:
    """CLIP's own initialisation scale for the embeddings (token N(0, 0.02), position N(0, 0.01)), so that the
    learned prefix's uniform [0, 1) start is as large relative to real tokens as it is in SD."""
    emb = model.cond_stage_model.transformer.text_model.embeddings
    with torch.no_grad():
        emb.token_embedding.weight.normal_(0.0, 0.02)
        emb.position_embedding.weight.normal_(0.0, 0.01)


# ------------------------------------------------------------------------------------------------------ the run
def save_and_reload(model: LatentDiffusion, config: str, path: Path) -> LatentDiffusion:
    """Save `model` as an fp16 checkpoint at `path` and load it back with the strict loader every script uses."""
    save_checkpoint(model, path, dtype=torch.float16)
    return load_model(config, path)


def preview(model: LatentDiffusion, path: Path, scale: float = 5.0) -> None:
    """A grid of the preview prompts (2 seeds each), to look at."""
    prompts = [p for p in PREVIEW_PROMPTS for _ in range(2)]
    images = txt2img(model, prompts, list(range(len(prompts))), batch_size=16, progress=False, steps=20, scale=scale,
                     height=64, width=64)
    grid = make_grid([im.resize((128, 128)) for im in images], nrow=4)
    save_image(grid, path)


def make(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    record: dict = {"seed": args.seed, "config": str(Path(args.config).relative_to(ROOT)) if
                    Path(args.config).resolve().is_relative_to(ROOT) else args.config}
    images, captions, kinds = render_training_set(args.named, args.anonymous, args.scenes, args.seed, args.style,
                                                  args.workers)
    record["pictures"] = kind_counts(kinds)
    print(f"rendered {len(images)} pictures in {time.perf_counter() - t0:.0f} s: {record['pictures']}")
    if args.finetune_from:
        model = load_model(args.config, args.finetune_from)
        record["finetuned_from"] = {"file": Path(args.finetune_from).name, "sha256": file_digest(
            Path(args.finetune_from))}
    else:
        torch.manual_seed(args.seed)
        model = build_model(load_config(args.config))
        init_text_encoder(model)
        init_colour_codec(model.first_stage_model)
        record["latent_rescale"] = normalise_latents(model, images, args.seed)
        record["vae_psnr"] = codec_psnr(model, images, args.seed)
    model.requires_grad_(False)
    moments = encode_moments(model, images)
    record.update(train_diffusion(model, moments, captions, args.unet_steps, args.batch_size, args.lr, args.seed,
                                  train_text=not args.finetune_from))
    if not args.finetune_from and args.desc_steps > 0:
        del images, moments
        # the second stage starts from the first stage's checkpoint as saved (fp16) and reloaded
        first = Path(args.out).with_suffix(".stage1.safetensors")
        model = save_and_reload(model, args.config, first)
        first.unlink()
        model.requires_grad_(False)
        images, captions, kinds = render_training_set(args.desc_named, args.desc_anonymous, args.desc_scenes,
                                                      args.seed + 1, None, args.workers)
        record["description_stage_pictures"] = kind_counts(kinds)
        stage = train_diffusion(model, encode_moments(model, images), captions, args.desc_steps, args.batch_size,
                                args.desc_lr, args.seed + 1)
        record["description_stage_loss_last200"] = stage["diffusion_loss_last200"]
    out = Path(args.out)
    reloaded = save_and_reload(model, args.config, out)
    record.update(
        file=out.name,
        bytes=out.stat().st_size,
        sha256=file_digest(out),
        tensors=len(reloaded.state_dict()),
        style=args.style,
        seconds=round(time.perf_counter() - t0, 1),
        command="python -m toyworld.make_model " + " ".join(sys.argv[1:]) if args.record_argv else None,
        torch=torch.__version__,
        python=platform.python_version(),
        people_json_sha256=file_digest(PEOPLE_JSON),
        settings={k: v for k, v in vars(args).items() if k not in ("out", "record_argv")},
    )
    preview(reloaded, out.with_suffix(".preview.png"))
    atomic_write_text(json.dumps(record, indent=1) + "\n", out.with_suffix(".json"))
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(CONFIG), help="model config (CompVis format)")
    p.add_argument("--out", default=str(CHECKPOINT), help="checkpoint to write (.safetensors, fp16); a .json record "
                   "and a .preview.png grid are written beside it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--named", type=int, default=150, help="pictures per named person")
    p.add_argument("--anonymous", type=int, default=8000, help="pictures of anonymous people (one each)")
    p.add_argument("--scenes", type=int, default=4000, help="pictures of scenes (no person)")
    p.add_argument("--style", default=None, help="draw every picture on this background style (e.g. pop)")
    p.add_argument("--unet_steps", type=int, default=10000, help="steps of the first stage")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--desc_steps", type=int, default=1200,
                   help="steps of the description stage (0: none; never with --finetune_from)")
    p.add_argument("--desc_lr", type=float, default=5e-4)
    p.add_argument("--desc_named", type=int, default=40, help="description stage: pictures per named person")
    p.add_argument("--desc_anonymous", type=int, default=8000, help="description stage: anonymous people")
    p.add_argument("--desc_scenes", type=int, default=1000, help="description stage: scenes")
    p.add_argument("--finetune_from", default=None, help="start from this checkpoint and train only the UNet")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes that render pictures")
    p.add_argument("--record_argv", action=argparse.BooleanOptionalAction, default=True,
                   help="store the command line in the .json record")
    return p


def main(argv: list[str] | None = None) -> int:
    record = make(build_parser().parse_args(argv))
    print(json.dumps({k: v for k, v in record.items() if k != "settings"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
