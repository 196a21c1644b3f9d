"""Image loading for training: any common mode to a (3, S, S) tensor in [-1, 1], plus counted skip reports."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# Modes whose samples do not fit in 8 bits; they are scaled from their full range instead of being clipped by
# PIL's convert("RGB"), which would turn most of a 16-bit image white.
_WIDE_GREY_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0}
# Modes with transparency: composited on white, the usual background of product and web images.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageError(ValueError):
    """An image file that cannot be used (unreadable, truncated, empty); the message names the path."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageError], tuple[Path, str]]:
        # Custom __init__ arguments must be spelled out for pickling (DataLoader workers send errors back).
        return (type(self), (self.path, self.reason))


def _decode(path: Path) -> Image.Image:
    """Open and fully decode `path`, turning every decoder failure into an ImageError."""
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "the file is empty (0 bytes); delete it or re-download it")
        with Image.open(path) as img:
            img.load()  # decode now: truncation only shows up here, and the file handle closes on exit
            # exif_transpose returns a new image when it rotates and otherwise a copy; either outlives the `with`.
            return ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(path, "no such file") from e
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # OSError covers "image file is truncated" and UnidentifiedImageError; SyntaxError/EOFError come from
        # broken headers in some PIL plugins.
        reason = f"cannot decode image ({type(e).__name__}: {e}); the file is damaged or not an image"
        raise ImageError(path, reason + ", re-export or remove it") from e


def _to_float_channels(img: Image.Image, path: Path) -> list[Image.Image]:
    """Convert to three float ("F" mode) channels in [0, 1]."""
    mode = img.mode
    if mode in _WIDE_GREY_MODES:
        grey = np.asarray(img).astype(np.float32) / _WIDE_GREY_MODES[mode]
        channel = Image.fromarray(np.clip(grey, 0.0, 1.0), mode="F")
        return [channel, channel, channel]
    if mode == "LAB":
        # PIL's convert() does not do colorimetric LAB -> RGB; wrong colours would silently poison training.
        raise ImageError(path, "LAB colour images are not supported; convert the file to RGB")
    if mode == "La":
        img = img.convert("LA")  # PIL has no direct premultiplied-grey -> RGBA conversion
    if (mode == "P" and "transparency" in img.info) or img.mode in _ALPHA_MODES:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    try:
        rgb = img.convert("RGB")
    except ValueError as e:
        raise ImageError(path, f"image mode {mode!r} cannot be converted to RGB ({e}); save it as RGB") from e
    arr = np.asarray(rgb).astype(np.float32) / 255.0
    return [Image.fromarray(np.ascontiguousarray(arr[..., c]), mode="F") for c in range(3)]


def load_rgb(path: str | os.PathLike[str], size: int) -> torch.Tensor:
    """Load an image as a (3, size, size) float32 tensor in [-1, 1]: EXIF-rotated, centre square, Lanczos-resized.

    Handles 1, L, LA, P (with transparency), RGB, RGBA (composited on white), CMYK, YCbCr and 16-bit greyscale
    (I;16, I;16B, I). 16-bit RGB PNGs arrive from PIL already reduced to 8 bits per channel. Truncated files raise
    ImageError; the global `ImageFile.LOAD_TRUNCATED_IMAGES` is left alone.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    path = Path(path)
    img = _decode(path)
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(path, f"the image has zero size ({w}x{h})")
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    # Cropping the centre square first and resampling it to size x size is the same as "shorter side to size, then
    # centre crop", without converting or resizing pixels that are cropped away anyway.
    square = img.crop((left, top, left + side, top + side))
    # Resample in float so 16-bit sources keep their precision and there is no second 8-bit rounding.
    resized = [c.resize((size, size), Image.Resampling.LANCZOS) for c in _to_float_channels(square, path)]
    x = torch.from_numpy(np.stack([np.asarray(c, dtype=np.float32) for c in resized]))  # (3, size, size)
    # Lanczos overshoots at sharp edges; clamp back to the valid range.
    return x.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)


class SkipReport:
    """Counts skipped inputs by reason, keeping a few example paths so the user can find and fix them."""

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self._counts: Counter[str] = Counter()
        self._examples: dict[str, list[str]] = {}

    def add(self, reason: str, path: str | os.PathLike[str], detail: str = "") -> None:
        """Record one skipped input."""
        self._counts[reason] += 1
        examples = self._examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{path} ({detail})" if detail else str(path))

    @property
    def count(self) -> int:
        """Total number of skips."""
        return sum(self._counts.values())

    def by_reason(self) -> dict[str, int]:
        """Skip counts per reason, most frequent first."""
        return dict(self._counts.most_common())

    def examples(self, reason: str) -> list[str]:
        """Up to `max_examples` recorded example paths (with detail) for `reason`."""
        return list(self._examples.get(reason, []))

    def summary(self) -> str:
        """Human-readable report: count per reason with up to `max_examples` example paths each."""
        if not self:
            return "nothing skipped"
        lines = [f"skipped {self.count} input(s):"]
        for reason, n in self.by_reason().items():
            lines.append(f"  {n} x {reason}")
            examples = self._examples[reason]
            for example in examples:
                lines.append(f"      e.g. {example}")
            if n > len(examples):
                lines.append(f"      ... and {n - len(examples)} more")
        return "\n".join(lines)

    def __bool__(self) -> bool:
        return self.count > 0

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"SkipReport({self.by_reason()!r})"
