"""On-disk cache of VAE latents of training images, so training steps never run the VAE encoder.

An entry is keyed by the image's content (sha256), the VAE weights (`model_key`) and the image size: renaming a
file keeps its entry, editing it or switching VAE makes a new one. Entries are single-tensor safetensors files.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from apl.images import ImageError, SkipReport, load_rgb
from apl.io import atomic_save

_FORMAT = "apl-latent-v1"  # bump when the stored layout or the image preprocessing changes
_TENSOR_KEY = "latent"
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LatentCache:
    """Latents of image files stored under `cache_dir`, valid for one VAE (`model_key`) and one image size."""

    def __init__(self, cache_dir: str | os.PathLike[str], model_key: str, size: int) -> None:
        if not isinstance(model_key, str) or not model_key:
            raise ValueError(f"model_key must be a non-empty string identifying the VAE weights, got {model_key!r}")
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive integer (image side in pixels), got {size!r}")
        self.cache_dir = Path(cache_dir)
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise ValueError(f"latent cache folder {self.cache_dir} is a file; pass a folder")
        self.model_key = model_key
        self.size = size

    def key(self, path: str | os.PathLike[str]) -> str:
        """Cache key of an image file: a hash of its content digest, the model key and the size."""
        parts = (_FORMAT, file_digest(path), self.model_key, str(self.size))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def _entry(self, key: str) -> Path:
        # Two-character shards keep folders small for 100k-image sets.
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def _load(self, key: str) -> torch.Tensor | None:
        entry = self._entry(key)
        if not entry.is_file():
            return None
        try:
            with safe_open(str(entry), framework="pt") as f:
                meta = f.metadata() or {}
                latent = f.get_tensor(_TENSOR_KEY)
        except (SafetensorError, OSError) as e:
            # A damaged entry (e.g. disk full on another tool's write) is not fatal: it is encoded again.
            warnings.warn(f"ignoring unreadable latent cache entry {entry} ({e}); it will be re-encoded", stacklevel=3)
            return None
        if not bool(torch.isfinite(latent).all()):  # written by a run whose VAE overflowed, or damaged on disk
            warnings.warn(f"latent cache entry {entry} holds NaN/inf values; it will be re-encoded", stacklevel=3)
            return None
        if meta.get("model_key") != self.model_key or meta.get("size") != str(self.size):
            warnings.warn(
                f"latent cache entry {entry} was written for another model or size; re-encoding", stacklevel=3
            )
            return None
        return latent

    def _store(self, key: str, latent: torch.Tensor, source: Path) -> None:
        if not isinstance(latent, torch.Tensor) or latent.ndim != 3:
            shape = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"a cached latent must be one (C, h, w) tensor, got {shape} for {source}")
        tensors = {_TENSOR_KEY: latent.detach().to("cpu").contiguous()}
        meta = {"format": _FORMAT, "model_key": self.model_key, "size": str(self.size), "source": source.name}
        atomic_save(lambda tmp: save_file(tensors, str(tmp), metadata=meta), self._entry(key))

    def get(self, path: str | os.PathLike[str]) -> torch.Tensor | None:
        """The cached (C, h, w) latent of an image file, or None on a miss."""
        return self._load(self.key(path))

    def put(self, path: str | os.PathLike[str], latent: torch.Tensor) -> None:
        """Store the (C, h, w) latent of an image file (atomic: readers never see a partial entry)."""
        self._store(self.key(path), latent, Path(path))

    def encode_all(
        self,
        paths: Iterable[str | os.PathLike[str]],
        encode_fn: Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
        report: SkipReport,
        progress: bool = True,
    ) -> dict[Path, torch.Tensor]:
        """Latents of all `paths`, encoding only cache misses with `encode_fn` in batches of `batch_size`.

        `encode_fn` maps a (B, 3, size, size) batch in [-1, 1] (CPU float32) to (B, C, h, w) latents, already
        multiplied by the latent scale. Unreadable images are added to `report` and left out of the result.
        Files with identical content are encoded once.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        unique = list(dict.fromkeys(Path(p) for p in paths))
        result: dict[Path, torch.Tensor] = {}
        misses: dict[str, list[Path]] = {}  # key -> every path with that content
        with tqdm(total=len(unique), desc="caching latents", unit="img", disable=not progress) as bar:
            for path in unique:
                try:
                    key = self.key(path)
                except OSError as e:
                    report.add("unreadable image", path, f"{type(e).__name__}: {e.strerror or e}")
                    bar.update()
                    continue
                if key in misses:
                    misses[key].append(path)
                    continue
                latent = self._load(key)
                if latent is None:
                    misses[key] = [path]
                else:
                    result[path] = latent
                    bar.update()
            batch: list[tuple[str, list[Path], torch.Tensor]] = []
            for key, same in misses.items():
                try:
                    image = load_rgb(same[0], self.size)
                except ImageError as e:
                    for path in same:
                        report.add("unreadable image", path, e.reason)
                    bar.update(len(same))
                    continue
                batch.append((key, same, image))
                if len(batch) == batch_size:
                    bar.update(self._encode_batch(batch, encode_fn, result, report))
                    batch = []
            if batch:
                bar.update(self._encode_batch(batch, encode_fn, result, report))
        return {path: result[path] for path in unique if path in result}

    def _encode_batch(
        self,
        batch: list[tuple[str, list[Path], torch.Tensor]],
        encode_fn: Callable[[torch.Tensor], torch.Tensor],
        result: dict[Path, torch.Tensor],
        report: SkipReport,
    ) -> int:
        """Encode and store one batch; returns the number of paths it covered. An image whose latent is not finite
        (SD's VAE overflows in fp16 on some images) is skipped and counted, never cached."""
        images = torch.stack([image for _, _, image in batch])  # (B, 3, size, size)
        with torch.no_grad():
            latents = encode_fn(images)
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[0] != len(batch):
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"encode_fn returned {shape} for a batch of {len(batch)} images; expected (B, C, h, w)")
        done = 0
        for (key, same, _), latent in zip(batch, latents, strict=True):
            latent = latent.detach().to("cpu").clone()  # own storage, so the batch tensor can be freed
            if not bool(torch.isfinite(latent).all()):
                for path in same:
                    report.add(
                        "VAE latent not finite",
                        path,
                        "the VAE overflowed on it (SD's VAE does in fp16): use --precision bf16 or fp32",
                    )
                done += len(same)
                continue
            self._store(key, latent, same[0])
            for path in same:
                result[path] = latent
            done += len(same)
        return done
