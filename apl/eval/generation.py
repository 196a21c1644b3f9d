"""Generating evaluation images: the model and prefix named by the flags, per-image seeds, batched saving."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from apl.eval.faces import FaceBackendUnavailable
from apl.eval.images import ImageReadError, clean_name
from apl.eval.quality import ClipWeightsMissing, InceptionWeightsMissing, has_placeholder
from apl.runtime import DEFAULT_CKPT, UsageError, is_tiny, load_model_for_cli, pick_device, pick_dtype, shipped_file
from ldm.checkpoint import CheckpointError
from ldm.sampling import save_image, txt2img
from ldm.util import ConfigError

# What the evaluation scripts turn into one `<script>: error: <message>` line (exit 2) instead of a traceback.
# FileNotFoundError (missing packs, weights, files) is an OSError; EmbeddingFileError is a ValueError.
CLI_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    CheckpointError,
    ConfigError,
    ClipWeightsMissing,
    InceptionWeightsMissing,
    FaceBackendUnavailable,
    ImageReadError,
    OSError,
    ValueError,
    ModuleNotFoundError,
)


# Each script draws its seeds in its own domain: test_id's image k of a person never starts from the noise of the
# face-set image k that its ground truth was computed from, and FID/CLIP images never reuse either.
SEED_DOMAINS = ("test_id", "dataset", "quality")


def shipped(path: str | os.PathLike | None) -> str | None:
    """A relative default such as `people.tsv`: taken from the working folder, else from the repository root."""
    return None if path is None else str(shipped_file(path))


def image_seed(domain: str, base: int, key: str, k: int) -> int:
    """Seed of image k of `key` (a name, or a prompt's index) in `domain`: the first 63 bits of
    sha256("<domain>/<base>/<key>/<k>").

    Independent of batch size, order and resumed runs; unlike `base + offset + k`, --seed 1 and --seed 2 share no
    image seed, and the domains ('test_id', 'dataset', 'quality') never share one either.
    """
    if domain not in SEED_DOMAINS:
        raise ValueError(f"unknown seed domain {domain!r}; use one of {', '.join(SEED_DOMAINS)}")
    digest = hashlib.sha256(f"{domain}/{int(base)}/{key}/{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def check_name(name: str) -> str:
    """An identity name usable in `<Name>-<k>.png` file names; raises UsageError otherwise."""
    clean = clean_name(name)
    if not clean:
        raise UsageError("an identity name is empty; give names such as --names 'Tom Hanks'")
    if "/" in clean or "\\" in clean or clean.startswith("."):
        raise UsageError(f"identity name {name!r} cannot be a file name (no slashes, no leading '.')")
    return clean


def with_prefix(prompt: str, placeholder: str) -> str:
    """The prompt as generated with the prefix: the placeholder word in front, unless the prompt already has it
    (as a whole word, any case)."""
    if has_placeholder(prompt, placeholder):
        return prompt
    return f"{placeholder} {prompt}"


@dataclass
class Job:
    """One image to generate and where it goes."""

    prompt: str
    seed: int
    path: Path


@dataclass
class LoadedModel:
    """A loaded text-to-image model plus the learned prefix (None without one)."""

    model: object
    embedding_manager: object | None
    placeholder: str | None
    device: str

    @property
    def size(self) -> int:
        """Image side in pixels (8 x the latent size: 512 for SD v1, 64 for the tiny model)."""
        return self.model.image_size * 8


def load_model_and_prefix(
    config_path: str,
    ckpt_path: str | None,
    device: str,
    precision: str,
    embedding: str | None = None,
    placeholder: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """The SD model (and APL prefix when `embedding` is given) for a script run."""
    dev = pick_device(device)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: this machine has no usable Apple MPS backend; use --device cpu or cuda")
    config_path = shipped(config_path)
    if not Path(config_path).is_file():
        raise UsageError(f"--config_path {config_path} does not exist; use configs/stable-diffusion/v1-inference.yaml")
    model = load_model_for_cli(config_path, ckpt_path, dev, pick_dtype(precision, dev), seed=seed)
    em = None
    if embedding is not None:
        from ldm.modules.prefix import load_prefix

        if not Path(embedding).is_file():
            raise UsageError(f"--embedding {embedding} does not exist; pass a trained prefix file (.pt/.safetensors)")
        em = load_prefix(model, embedding).to(dev)  # SD v1: one manager; SDXL: one per text encoder
        known = list(em.string_to_token_dict)
        if placeholder is None:
            placeholder = known[0]
        elif placeholder not in known:
            raise UsageError(f"--placeholder {placeholder!r} is not in {embedding} (it holds {known})")
    return LoadedModel(model=model, embedding_manager=em, placeholder=placeholder, device=str(dev))


def generate(
    gen: LoadedModel,
    jobs: Sequence[Job],
    *,
    batch_size: int,
    steps: int,
    scale: float,
    negative_prompt: str = "",
    desc: str = "images",
    on_image: Callable[[Job, Image.Image], None] | None = None,
) -> int:
    """Generate and save every job's image (atomic PNG writes), batch by batch; returns how many were made."""
    done = 0
    with tqdm(total=len(jobs), desc=desc, unit="img", disable=None) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]

            def save(_first: int, images: list[Image.Image], chunk: Sequence[Job] = chunk) -> None:
                for job, image in zip(chunk, images, strict=True):
                    save_image(image, job.path)
                    if on_image is not None:
                        on_image(job, image)

            txt2img(
                gen.model,
                [j.prompt for j in chunk],
                [j.seed for j in chunk],
                batch_size=len(chunk),
                progress=False,
                on_batch=save,
                steps=steps,
                scale=scale,
                negative_prompt=negative_prompt,
                height=gen.size,
                width=gen.size,
                embedding_manager=gen.embedding_manager,
            )
            done += len(chunk)
            bar.update(len(chunk))
    return done


def modes_for(mode: str) -> list[str]:
    """'both' -> ['with', 'without']; otherwise the one mode."""
    return ["with", "without"] if mode == "both" else [mode]


def require_embedding(mode: str, embedding: str | None) -> None:
    """Modes with the prefix need an embedding file; say so before any model is loaded."""
    if mode in ("with", "both") and not embedding:
        raise UsageError(
            f"--mode {mode} generates with the APL prefix and needs --embedding FILE (a trained .pt/.safetensors); "
            "use --mode without to evaluate the plain model"
        )
    if mode in ("with", "both") and not Path(embedding).is_file():
        raise UsageError(f"--embedding {embedding} does not exist; pass a trained prefix file (.pt/.safetensors)")


def used_checkpoint(config_path: str, ckpt_path: str | None) -> str | None:
    """The checkpoint a run really loads: None where load_model_for_cli builds the random tiny model instead."""
    if ckpt_path in (None, "", "none") or (is_tiny(shipped(config_path)) and str(ckpt_path) == DEFAULT_CKPT):
        return None
    return str(ckpt_path)


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def check_prompt_room(gen: LoadedModel, prompts: Sequence[str], source: str) -> None:
    """Refuse prompts that the prefix would push past CLIP's 75 content tokens: the text encoder would cut their
    end (and the end-of-text token) on the prefix side only, so 'with' and 'without' would see different prompts."""
    em = gen.embedding_manager
    if em is None or not prompts:
        return
    for prompt in prompts:
        need, have = em.prompt_room(prompt)  # positions with BOS/EOS, each placeholder as its N vectors
        if need > have:
            raise UsageError(
                f"{source}: the prompt {_short(prompt)!r} needs {need} of CLIP's {have} positions with the "
                f"{em.num_vectors_per_token}-vector prefix, so its end would be cut on the prefix side only. Shorten "
                f"it by {need - have} tokens or more"
            )
