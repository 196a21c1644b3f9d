"""Text-to-image with DDIM on a LatentDiffusion model: latents, decoding to images, grids.

Every image has its own seed: its start code is drawn from it, and with eta > 0 its per-step DDIM noise comes from
a second generator derived from it (`noise_seed`), so results do not depend on the batch size or on which images
a resumed run still has to make.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import CFGDenoiser, sample_ddim
from ldm.models.diffusion.sdxl import DiffusionEngine
from ldm.util import atomic_save


def start_codes(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """One standard-normal start code per seed (drawn on the CPU, so CPU and GPU runs start alike)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def noise_seed(seed: int) -> int:
    """Seed of an image's eta > 0 noise stream: a hash of its seed, so it never replays any image's start code."""
    return int.from_bytes(hashlib.sha256(f"ddim-eta-noise/{int(seed)}".encode()).digest()[:8], "big") >> 1


def step_noises(seeds: Sequence[int], shape: tuple[int, ...], n_steps: int) -> list[torch.Tensor]:
    """n_steps tensors (B, *shape): row b of step i is draw i of image b's own generator (drawn on the CPU)."""
    gens = [torch.Generator().manual_seed(noise_seed(s)) for s in seeds]
    per_image = [torch.randn((n_steps, *shape), generator=g) for g in gens]  # (steps, *shape) per image
    return list(torch.stack(per_image, dim=1).unbind(0))


def _unique_conditioning(model, prompts: Sequence[str], embedding_manager, **size) -> torch.Tensor | dict:
    """Encode each distinct prompt once (dataset generation repeats prompts a lot); SDXL gives a dict of tensors."""
    uniq = list(dict.fromkeys(prompts))
    enc = model.get_learned_conditioning(uniq, embedding_manager=embedding_manager, **size)
    index = [uniq.index(p) for p in prompts]
    if isinstance(enc, dict):
        return {k: v[torch.tensor(index, device=v.device)] for k, v in enc.items()}
    return enc[torch.tensor(index, device=enc.device)]


@torch.no_grad()
def txt2img_latents(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 50,
    scale: float = 7.5,
    eta: float = 0.0,
    negative_prompt: str = "",
    height: int = 512,
    width: int = 512,
    embedding_manager=None,
    x_T: torch.Tensor | None = None,
    disable: bool = True,
) -> torch.Tensor:
    """DDIM latents (B, 4, H/8, W/8) for `prompts` with classifier-free guidance against `negative_prompt`.

    SD v1 and SDXL models alike; for SDXL an empty `negative_prompt` means zero text features (see
    `DiffusionEngine.force_zeros_for_empty_prompt`).

    Image b depends only on its prompt and seeds[b] (start code, and with eta > 0 its own noise stream), not on the
    other images of the batch.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    model.check_image_size(height, width)
    device = model.device
    # SDXL also conditions on the image size (original = target = the size drawn, no crop); SD v1 takes none.
    size = {"target_size": (height, width)} if isinstance(model, DiffusionEngine) else {}
    cond = _unique_conditioning(model, prompts, embedding_manager, **size)
    uncond = model.get_unconditional_conditioning(negative_prompt, **size)  # never carries the prefix
    if x_T is None:
        x_T = start_codes(seeds, (model.channels, height // 8, width // 8), device)
    denoiser = CFGDenoiser(model.apply_model, uncond, scale)
    noises = step_noises(seeds, tuple(x_T.shape[1:]), steps) if eta > 0 else None
    return sample_ddim(
        denoiser, x_T.to(device), cond, model.alphas_cumprod, steps=steps, eta=eta, noises=noises, disable=disable
    )


@torch.no_grad()
def decode_to_images(model, z: torch.Tensor) -> list[Image.Image]:
    """Scaled latents -> list of RGB PIL images."""
    x = model.decode_first_stage(z).float().clamp(-1, 1)
    arr = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def txt2img(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int = 4,
    progress: bool = True,
    on_batch: Callable[[int, list[Image.Image]], None] | None = None,
    **kw,
) -> list[Image.Image]:
    """Images for all prompts in batches; `on_batch(start_index, images)` lets callers save as they go."""
    out: list[Image.Image] = []
    for s in tqdm(range(0, len(prompts), batch_size), desc="txt2img", unit="batch", disable=not progress):
        imgs = decode_to_images(
            model, txt2img_latents(model, prompts[s : s + batch_size], seeds[s : s + batch_size], **kw)
        )
        if on_batch is not None:
            on_batch(s, imgs)
        out.extend(imgs)
    return out


def make_grid(images: Sequence[Image.Image], nrow: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images row-major into one picture (`nrow` images per row; default about square)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    w, h = images[0].size
    rows = math.ceil(len(images) / nrow)
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB").resize((w, h)), (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
    return grid


def save_image(image: Image.Image, path: str | os.PathLike) -> None:
    """Save atomically (a crash never leaves a half-written PNG that a resumed run would take as done)."""
    fmt = (Path(path).suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
    atomic_save(lambda tmp: image.save(tmp, format=fmt), path)


def to_uint8(images: Sequence[Image.Image]) -> np.ndarray:
    """(N, H, W, 3) uint8 array of RGB images."""
    return np.stack([np.asarray(im.convert("RGB")) for im in images])
