"""Which images test_id.py scores: the ones it plans to generate, or those of an existing folder; and its grids.

Generated images live in `<root>/images/<mode>/<Name>-<k>.png` (mode 'with' or 'without' the prefix), where root is
--outdir for the default template set and `<outdir>/template_sets/<set>` for the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from apl.eval.generation import Job, image_seed, with_prefix
from apl.eval.images import FACE_FILE, ImageReadError, clean_name, list_images, load_pil_rgb
from apl.io import atomic_save
from apl.runtime import UsageError
from ldm.sampling import make_grid

MODES = ("with", "without")
GRID_THUMB = 256  # longest side of an image in the per-identity grids
SETS_DIR = "template_sets"


@dataclass
class ImageSets:
    """Images to score: mode -> identity -> image paths, plus what could not be assigned to an identity."""

    sets: dict[str, dict[str, list[Path]]] = field(default_factory=dict)
    unrecognised: list[str] = field(default_factory=list)  # files not named <Name>-<k>.<ext>


def _group_by_name(paths: list[Path], out: ImageSets) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in paths:
        match = FACE_FILE.match(path.stem)
        if match is None:
            out.unrecognised.append(str(path))
            continue
        groups.setdefault(clean_name(match.group("name")), []).append(path)
    for name in groups:  # numeric order of k, not string order (…-10 after …-9)
        groups[name].sort(key=lambda p: int(FACE_FILE.match(p.stem).group("k")))
    return groups


def collect_folder(folder: str | Path) -> ImageSets:
    """Images of an existing folder: `with/` and `without/` subfolders (test_id's layout) or one flat set."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--image_folder {folder} does not exist or is not a folder")
    out = ImageSets()
    root = folder / "images" if (folder / "images").is_dir() else folder  # a previous run's --outdir works too
    subsets = [m for m in MODES if (root / m).is_dir()]
    if subsets:
        for mode in subsets:
            out.sets[mode] = _group_by_name(list_images(root / mode), out)
    else:
        out.sets["images"] = _group_by_name(list_images(root), out)
    if not any(out.sets.values()):
        raise UsageError(f"--image_folder {folder} has no images named <Name>-<k>.png (or with/, without/ folders)")
    return out


def plan_images(
    names: list[str],
    modes: list[str],
    n: int,
    seed: int,
    template: str | Sequence[str],
    placeholder: str | None,
    outdir: Path,
) -> dict[str, dict[str, list[Job]]]:
    """Jobs per mode and name; image k of a name uses template k mod T and the same seed with and without the
    prefix (and in every template set)."""
    templates = [template] if isinstance(template, str) else list(template)
    plans: dict[str, dict[str, list[Job]]] = {}
    for mode in modes:
        plans[mode] = {}
        folder = outdir / "images" / mode
        for name in names:
            jobs = []
            for k in range(n):
                prompt = templates[k % len(templates)].format(name=name)
                if mode == "with":
                    prompt = with_prefix(prompt, placeholder)
                jobs.append(Job(prompt, image_seed("test_id", seed, name, k), folder / f"{name}-{k}.png"))
            plans[mode][name] = jobs
    return plans


def stale_images(plans: dict[str, dict[str, list[Job]]], outdir: Path) -> dict[str, list[str]]:
    """Per mode, `<Name>-<k>` images already in the mode's folder that this run does not make (left by an earlier
    run with a larger --n_samples or other names). They are not scored, and not deleted: they are the user's."""
    stale: dict[str, list[str]] = {}
    for mode, per_name in plans.items():
        folder = outdir / "images" / mode
        if not folder.is_dir():
            continue
        planned = {job.path for jobs in per_name.values() for job in jobs}
        found = [str(p) for p in list_images(folder) if FACE_FILE.match(p.stem) and p not in planned]
        if found:
            stale[mode] = found
    return stale


def _thumb(path: Path, size: int) -> Image.Image:
    """The image for a grid cell (grey when unreadable, so rows stay aligned)."""
    try:
        image = load_pil_rgb(path)
    except ImageReadError:
        return Image.new("RGB", (size, size), (128, 128, 128))
    image.thumbnail((size, size))
    return image.resize((size, size)) if image.size != (size, size) else image


def write_grids(sets: dict[str, dict[str, list[Path]]], names: list[str], folder: Path) -> dict[str, Path]:
    """One picture per identity: a row of its images per mode ('with' above 'without')."""
    out: dict[str, Path] = {}
    for name in names:
        rows = [sets[m].get(name, []) for m in sets]
        n = max((len(r) for r in rows), default=0)
        if n == 0:
            continue
        cells = []
        for row in rows:
            cells += [_thumb(p, GRID_THUMB) for p in row]
            cells += [Image.new("RGB", (GRID_THUMB, GRID_THUMB), "white")] * (n - len(row))
        path = folder / f"{name}.png"
        grid = make_grid(cells, nrow=n)
        atomic_save(lambda tmp, grid=grid: grid.save(tmp, format="PNG"), path)
        out[name] = path
    return out
