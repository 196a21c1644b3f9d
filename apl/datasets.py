"""Finding APL training data on disk: the face set (`<Person Name>-<k>.png`) and the general caption set.

Only file names and captions are checked here; images are decoded (and bad ones counted as skips) when their
latents are cached, see `apl.latent_cache`.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from apl.images import SkipReport
from apl.people import load_indexed_prompts, load_prompts

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_FACE_NAME = re.compile(r"^(?P<name>.+)-(?P<k>\d+)$")
_LAION_NAME = re.compile(r"^laion_(?P<index>\d+)$", re.IGNORECASE)


@dataclass
class FaceSample:
    """One face image and the person it shows (the name as spelled in the people file)."""

    path: Path  # image file
    name: str  # key into the people dict


@dataclass
class GeneralSample:
    """One general (non-person) caption, with its image or None when latents are generated from the caption."""

    path: Path | None  # image file, or None for caption-only samples
    caption: str


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _require_folder(folder: str | os.PathLike[str], what: str) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"{what} folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise ValueError(f"{what} folder {folder} is a file, not a folder")
    return folder


def _visible_entries(folder: Path) -> list[Path]:
    """Folder entries in sorted order, without hidden files such as .DS_Store."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _name_key(name: str) -> str:
    """Loose form of a name for matching file names: NFC, case-folded, '_' as space, single spaces."""
    name = unicodedata.normalize("NFC", name).replace("_", " ")
    return " ".join(name.split()).casefold()


def scan_face_folder(
    folder: str | os.PathLike[str],
    people: dict[str, str] | None,
    report: SkipReport,
    people_source: str = "people.tsv",
) -> list[FaceSample]:
    """List `<Person Name>-<k>.<png|jpg|jpeg|webp>` files; the name is the text before the last '-'.

    With `people`, names are matched exactly, then ignoring case, '_' versus space and Unicode normalisation;
    files of people without a description are counted skips, as are files that do not follow the pattern.
    """
    folder = _require_folder(folder, "face image")
    entries = _visible_entries(folder)
    if not any(p.is_file() and _is_image(p) for p in entries):
        raise ValueError(
            f"face image folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)}); expected files named "
            "'<Person Name>-<k>.png', e.g. made by dataset_generation.py"
        )
    loose = {_name_key(name): name for name in people} if people is not None else {}
    samples: list[FaceSample] = []
    for path in entries:
        if path.is_dir():
            report.add("subfolder (face folders are not scanned recursively)", path)
            continue
        if not _is_image(path):
            report.add(f"not an image file (expected {', '.join(IMAGE_EXTENSIONS)})", path)
            continue
        match = _FACE_NAME.match(path.stem)
        if match is None:
            report.add("file name does not match '<Person Name>-<k>.<ext>' (k a number)", path)
            continue
        name = unicodedata.normalize("NFC", match.group("name").strip())
        if people is not None:
            if name not in people:
                found = loose.get(_name_key(name))
                if found is None:
                    report.add(f"no attribute description for {name!r} in {people_source}", path)
                    continue
                name = found
        samples.append(FaceSample(path=path, name=name))
    if not samples:
        raise ValueError(f"no usable face images in {folder}:\n{report.summary()}")
    return samples


def _scan_metadata(folder: Path, metadata: Path, report: SkipReport) -> list[GeneralSample]:
    """Layout 1: `metadata.jsonl` with one {"file_name": ..., "text": ...} object per line."""
    samples: list[GeneralSample] = []
    listed: set[Path] = set()
    with open(metadata, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                report.add("bad metadata.jsonl line (not JSON)", metadata, f"line {lineno}: {e}")
                continue
            if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
                report.add("bad metadata.jsonl line (no 'file_name' string)", metadata, f"line {lineno}")
                continue
            path = folder / record["file_name"]
            listed.add(path)
            text = record.get("text")
            if not isinstance(text, str):
                report.add("bad metadata.jsonl line (no 'text' string)", metadata, f"line {lineno}")
                continue
            if not path.is_file():
                report.add("image listed in metadata.jsonl is missing", path, f"line {lineno}")
                continue
            if not text.strip():
                report.add("empty caption", path, f"metadata.jsonl line {lineno}")
                continue
            samples.append(GeneralSample(path=path, caption=text.strip()))
    for path in _visible_entries(folder):
        if path.is_file() and _is_image(path) and path not in listed:
            report.add("image has no caption (not listed in metadata.jsonl)", path)
    return samples


def _sidecars(image: Path) -> list[Path]:
    """Caption files accepted next to an image: `cat.txt` and `cat.jpg.txt`."""
    return [image.with_suffix(".txt"), image.with_name(image.name + ".txt")]


def _scan_sidecars(images: list[Path], report: SkipReport) -> list[GeneralSample]:
    """Layout 2: a `<image>.txt` caption next to each image."""
    samples: list[GeneralSample] = []
    for path in images:
        sidecar = next((s for s in _sidecars(path) if s.is_file()), None)
        if sidecar is None:
            report.add("image has no caption (no sidecar .txt)", path)
            continue
        try:
            caption = sidecar.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError as e:
            report.add("caption file is not UTF-8 text", sidecar, str(e))
            continue
        if not caption:
            report.add("empty caption", sidecar)
            continue
        samples.append(GeneralSample(path=path, caption=caption))
    return samples


def _scan_laion(images: list[Path], prompts_file: Path, report: SkipReport) -> list[GeneralSample]:
    """Layout 3 (the original): `laion_<i>.jpg` captioned by the prompts-file line whose index is i."""
    captions = load_indexed_prompts(prompts_file)
    samples: list[GeneralSample] = []
    for path in images:
        match = _LAION_NAME.match(path.stem)
        if match is None:
            report.add("file name does not match 'laion_<i>.<ext>'", path)
            continue
        index = int(match.group("index"))
        caption = captions.get(index)
        if caption is None:
            report.add(f"image has no caption (no line with index in {prompts_file.name})", path, f"index {index}")
            continue
        if not caption:
            report.add("empty caption", path, f"{prompts_file.name} index {index}")
            continue
        samples.append(GeneralSample(path=path, caption=caption))
    return samples


def scan_general_folder(
    folder: str | os.PathLike[str],
    report: SkipReport,
    prompts_file: str | os.PathLike[str] | None = None,
) -> list[GeneralSample]:
    """List captioned general images; the layout is detected in this order:

    1. `metadata.jsonl` in the folder ({"file_name", "text"} per line);
    2. sidecar captions `<image>.txt` (`cat.txt` or `cat.jpg.txt`) next to the images;
    3. the original layout: `laion_<i>.jpg` captioned by `prompts_file` (default: `prompts.txt` in the folder),
       whose lines are `<index> <caption>`.
    """
    folder = _require_folder(folder, "general image")
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        samples = _scan_metadata(folder, metadata, report)
    else:
        images = [p for p in _visible_entries(folder) if p.is_file() and _is_image(p)]
        laion = [p for p in images if _LAION_NAME.match(p.stem)]
        if any(s.is_file() for p in images for s in _sidecars(p)):
            samples = _scan_sidecars(images, report)
        elif laion:
            prompts = Path(prompts_file) if prompts_file is not None else folder / "prompts.txt"
            if not prompts.is_file():
                raise ValueError(
                    f"{folder} has laion_<i> images but the captions file {prompts} does not exist; pass the "
                    "prompts file ('<index> <caption>' per line, e.g. the shipped prompts.txt)"
                )
            samples = _scan_laion(images, prompts, report)
        else:
            found = f"{len(images)} image(s) but" if images else "no images and"
            raise ValueError(
                f"general image folder {folder}: no caption layout found ({found} none of: a metadata.jsonl with "
                "{'file_name', 'text'} lines; sidecar '<image>.txt' captions; 'laion_<i>.jpg' images captioned by "
                "a prompts file)"
            )
    if not samples:
        raise ValueError(f"no usable captioned images in {folder}:\n{report.summary()}")
    return samples


def caption_only_samples(prompts_file: str | os.PathLike[str]) -> list[GeneralSample]:
    """General samples without images (path None), for latents generated by the model from the captions."""
    return [GeneralSample(path=None, caption=caption) for caption in load_prompts(prompts_file)]
