"""Reading evaluation images from disk: one image, or a whole folder with a count of what could not be read."""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# The face-set file name that train.py (apl.datasets.scan_face_folder) reads: the name, '-', a number.
FACE_FILE = re.compile(r"^(?P<name>.+)-(?P<k>\d+)$")


class ImageReadError(ValueError):
    """An image file that does not exist or cannot be decoded."""


@dataclass
class LoadReport:
    """What happened while reading a folder: how many images were used, which were skipped and why."""

    loaded: int = 0  # images decoded successfully
    unreadable: list[str] = field(default_factory=list)  # paths that could not be decoded
    no_face: list[str] = field(default_factory=list)  # readable images in which no face was found
    empty_identities: list[str] = field(default_factory=list)  # identities with no usable face at all

    def as_dict(self) -> dict:
        """Counts and paths, ready for a JSON summary."""
        return {
            "loaded": self.loaded,
            "unreadable": len(self.unreadable),
            "no_face": len(self.no_face),
            "unreadable_files": list(self.unreadable),
            "no_face_files": list(self.no_face),
            "empty_identities": list(self.empty_identities),
        }


def clean_name(name: str) -> str:
    """An identity name as people files and --names give it: NFC Unicode, single spaces, no outer spaces."""
    return " ".join(unicodedata.normalize("NFC", name).split())


def identity_from_stem(stem: str) -> str:
    """The person a file stem names: `<Name>-<k>` (k a number) gives Name, any other stem is the name itself."""
    match = FACE_FILE.match(stem)
    return clean_name(match.group("name") if match else stem)


def is_hidden(path: Path) -> bool:
    """Dot files: `.DS_Store`, macOS `._photo.png` AppleDouble files, editor and tool droppings."""
    return path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """True for a visible regular file with a known image extension (case-insensitive)."""
    return not is_hidden(path) and path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (not hidden ones, nor any inside hidden folders), sorted by path so every run sees
    them in the same order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist or is not a folder.")
    pattern = "**/*" if recursive else "*"
    return sorted(
        p
        for p in folder.glob(pattern)
        if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_pil_rgb(path: str | Path) -> Image.Image:
    """Open an image as an RGB PIL image, applying the EXIF orientation that cameras store."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"Image file {path} does not exist.")
    try:
        with Image.open(path) as img:
            # Phones store rotation as an EXIF tag; reference photos must be upright for face detection.
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageReadError(f"Cannot read image {path}: {err}. Is it a complete PNG/JPEG file?") from err


def load_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an HxWx3 uint8 RGB array; unreadable files raise ImageReadError naming the file."""
    return np.asarray(load_pil_rgb(path), dtype=np.uint8).copy()


def load_image_folder(folder: str | Path, report: LoadReport | None = None) -> list[Image.Image]:
    """All readable images in `folder` (sorted) as RGB PIL images; unreadable files are skipped and counted."""
    report = report if report is not None else LoadReport()
    images = []
    for path in list_images(folder):
        try:
            images.append(load_pil_rgb(path))
        except ImageReadError as err:
            logger.warning("Skipping %s", err)
            report.unreadable.append(str(path))
            continue
        report.loaded += 1
    return images
