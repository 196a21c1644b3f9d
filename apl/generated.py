"""General samples without images: latents the frozen model draws itself for non-person captions.

Users rarely have LAION images. Like ESD, APL can train its "leave everything else unchanged" branch on the model's
own samples: for each caption, DDIM from a fixed start code (`--ddim_steps`, guidance `--start_guidance`) gives
z_0, which training then noises to a random t with `q_sample`, exactly as for an image latent. Each z_0 is cached
on disk, keyed by caption, seed, sampler settings and a fingerprint of the weights, so it is drawn once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from apl.io import atomic_save
from ldm.sampling import txt2img_latents


def _key(caption: str, seed: int, steps: int, scale: float, size: int, model_key: str) -> str:
    text = "\0".join(["apl-generated-v1", caption, str(seed), str(steps), repr(float(scale)), str(size), model_key])
    return hashlib.sha256(text.encode()).hexdigest()


def generate_general_latents(
    model,
    captions: Sequence[str],
    cache_dir: str | os.PathLike,
    model_key: str,
    *,
    steps: int = 50,
    scale: float = 3.0,
    size: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> list[torch.Tensor]:
    """z_0 (4, size/8, size/8) for every caption (cached); caption i uses start-code seed `seed + i`."""
    cache_dir = Path(cache_dir)
    keys = [_key(c, seed + i, steps, scale, size, model_key) for i, c in enumerate(captions)]
    out: list[torch.Tensor | None] = [None] * len(captions)
    todo = []
    for i, k in enumerate(keys):
        f = cache_dir / f"{k}.safetensors"
        if f.is_file():
            try:
                z0 = load_file(str(f))["z0"]
                if bool(torch.isfinite(z0).all()):
                    out[i] = z0
                    continue
            except (SafetensorError, OSError, KeyError):
                pass  # a damaged entry is simply drawn again and overwritten
        todo.append(i)
    for s in tqdm(
        range(0, len(todo), batch_size),
        desc="generating general latents",
        unit="batch",
        disable=not progress or not todo,
    ):
        idx = todo[s : s + batch_size]
        z = (
            txt2img_latents(
                model,
                [captions[i] for i in idx],
                [seed + i for i in idx],
                steps=steps,
                scale=scale,
                height=size,
                width=size,
            )
            .float()
            .cpu()
        )
        for i, zi in zip(idx, z, strict=False):
            zi = zi.clone()
            if not bool(torch.isfinite(zi).all()):
                raise ValueError(
                    f"the model drew NaN/inf latents for the general caption {captions[i]!r} (DDIM {steps} steps, "
                    f"guidance {scale:g}): its weights overflow in {str(model.dtype).replace('torch.', '')}; train "
                    "with --precision bf16 or fp32, or give general images with --general_dir"
                )
            atomic_save(lambda p, zi=zi: save_file({"z0": zi}, str(p)), cache_dir / f"{keys[i]}.safetensors")
            out[i] = zi
    return out  # type: ignore[return-value]
