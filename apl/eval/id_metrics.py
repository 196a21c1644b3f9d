"""Identity metrics: cosine similarity of generated faces to each person's ground-truth embedding.

A no-face image counts as similarity 0 in the per-identity mean and max (as in the original APL), because an image
without a recognisable face reveals no identity. ID accuracy is the fraction of images recognised as the person
(similarity >= threshold); for anonymisation, lower is better.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apl.eval.checks import checked_embedding
from apl.eval.defaults import DEFAULT_ID_THRESHOLDS
from apl.eval.faces import FaceBackend
from apl.eval.gt_files import load_ground_truth, save_ground_truth  # noqa: F401 - their home before gt_files
from apl.eval.images import (
    ImageReadError,
    LoadReport,
    clean_name,
    identity_from_stem,
    is_hidden,
    is_image_file,
    list_images,
    load_image_rgb,
)
from apl.eval.stats import id_figures, pack_rows
from apl.io import atomic_write_bytes

logger = logging.getLogger(__name__)

# Verification thresholds on cosine similarity of L2-normalised embeddings, per face backend.
# - insightface (ArcFace; buffalo_l's recogniser is w600k_r50): ArcFace verification operating points are commonly
#   put at cosine 0.28-0.4. DeepFace's LFW-tuned ArcFace threshold is cosine distance 0.68, i.e. similarity 0.32; we
#   use 0.32. (DeepFace's entry for the buffalo_l model itself is stricter, 0.45; for a privacy claim the lower value
#   is the conservative side: more generated images count as "still recognisable".)
# - dlib (128-d ResNet): dlib's documented rule is Euclidean distance < 0.6 between the *raw* descriptors, whose norm
#   r is about 1.45 (1.35-1.59 on the photos shipped with insightface). For two vectors of norm r,
#   |a - b|^2 = 2 r^2 (1 - cos), so 0.6 corresponds to cos = 1 - 0.18 / r^2 = 0.91 (DeepFace's tuned dlib cosine
#   distance, 0.07, gives 0.93).
DEFAULT_ID_THRESHOLD = DEFAULT_ID_THRESHOLDS["insightface"]


def default_id_threshold(backend: str) -> float:
    """The default verification threshold for a face backend name."""
    if backend not in DEFAULT_ID_THRESHOLDS:
        raise ValueError(
            f"no default ID threshold for face backend '{backend}' (known: {', '.join(DEFAULT_ID_THRESHOLDS)}); "
            "pass --id_threshold (the cosine at which your recogniser calls two faces one person), or give the "
            "backend a default_id_threshold attribute"
        )
    return DEFAULT_ID_THRESHOLDS[backend]


def _unit(x: np.ndarray, what: str) -> np.ndarray:
    """L2-normalise along the last axis; zero or non-finite vectors are an error."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norm)) or np.any(norm == 0):
        raise ValueError(f"{what} contains a zero or non-finite embedding; cannot compute cosine similarity.")
    return x / norm


def cosine(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """Cosine similarity: (D,)x(D,) -> float, (N,D)x(D,) -> (N,), (N,D)x(M,D) -> (N,M)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"Embedding sizes differ: {a.shape[-1]} vs {b.shape[-1]} (mixing face backends?).")
    out = _unit(a, "first argument") @ _unit(b, "second argument").T
    return float(out) if np.ndim(out) == 0 else out


@dataclass
class IdentityResult:
    """Similarities of one identity's generated images to its ground truth."""

    name: str
    sims: list[float | None]  # one per image; None = no face found
    mean: float  # mean over images, no face counted as 0
    max: float  # max over images, no face counted as 0
    no_face: int  # number of images without a face

    @property
    def n_images(self) -> int:
        """Number of generated images for this identity."""
        return len(self.sims)


def identity_scores(embs_per_image: list[np.ndarray | None], gt: np.ndarray, name: str = "") -> IdentityResult:
    """Cosine of each image's face embedding to `gt`; an image without a face (None) counts as similarity 0."""
    if len(embs_per_image) == 0:
        raise ValueError(f"Identity '{name}' has no images to score.")
    gt = np.asarray(gt).ravel()
    sims: list[float | None] = [None if e is None else cosine(np.asarray(e).ravel(), gt) for e in embs_per_image]
    if any(s is not None and not math.isfinite(s) for s in sims):
        raise ValueError(f"Identity '{name}': a similarity is NaN or inf; the embeddings are broken.")
    counted = [0.0 if s is None else s for s in sims]
    return IdentityResult(
        name=name,
        sims=sims,
        mean=float(np.mean(counted)),
        max=float(np.max(counted)),
        no_face=sum(s is None for s in sims),
    )


def summarize(results: list[IdentityResult], threshold: float) -> dict:
    """Aggregate numbers over identities (apl.eval.stats.id_figures computes them, for the bootstrap too).

    - mean_of_mean, mean_of_max: the original APL's two numbers (mean over identities; no face = 0).
    - id_accuracy: fraction of images *with a detected face* whose similarity >= threshold. Images without a face
      are left out so this measures how often a visible face is still the person; the no-face rate is reported
      beside it so that "no face at all" cannot pass for anonymisation.
    - id_accuracy_all_images: the same count over all images (a no-face image counts as not recognised). It
      flatters a prefix that erases faces; kept for comparison with earlier results.
    - mean_sim_faces: mean similarity over detected faces only (None without any face).
    - images_per_identity: min and max n; mean of max grows with n, so n is reported beside it.
    """
    if not results:
        raise ValueError("No identity results to summarise.")
    sims, valid = pack_rows([r.sims for r in results])
    figures = {k: float(v) for k, v in id_figures(sims, valid, threshold).items()}
    counts = [r.n_images for r in results]
    return {
        **{k: (None if not math.isfinite(v) else v) for k, v in figures.items()},
        "threshold": float(threshold),
        "n_identities": len(results),
        "n_images": int(valid.sum()),
        "n_faces": int((valid & ~np.isnan(sims)).sum()),
        "images_per_identity": {"min": min(counts), "max": max(counts)},
    }


def reference_images(folder: Path) -> dict[str, list[Path]]:
    """Map identity -> reference images: `<Name>-<k>.<ext>` files, `<Name>.<ext>` files (the whole stem is the name,
    so `Jean-Paul Sartre.png` is Jean-Paul Sartre) and `<Name>/` folders. Hidden files and folders are skipped."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for entry in sorted(folder.iterdir()):
        if is_hidden(entry):
            continue
        if entry.is_dir():
            groups[clean_name(entry.name)].extend(list_images(entry, recursive=True))
        elif is_image_file(entry):
            groups[identity_from_stem(entry.stem)].append(entry)
    return dict(groups)


def embed_images(
    paths: list[Path],
    backend: FaceBackend,
    report: LoadReport,
    on_image: Callable[[np.ndarray], None] | None = None,
) -> list[tuple[Path, np.ndarray | None]]:
    """(path, largest face's embedding or None when no face) per readable image; unreadable files are recorded in
    `report` and left out. `on_image` sees every readable image (so callers need not read the files twice)."""
    out = []
    for path in paths:
        try:
            image = load_image_rgb(path)
        except ImageReadError as err:
            logger.warning("Skipping %s", err)
            report.unreadable.append(str(path))
            continue
        report.loaded += 1
        if on_image is not None:
            on_image(image)
        emb = checked_embedding(backend.embed(image), backend, str(path))
        if emb is None:
            report.no_face.append(str(path))
        out.append((path, emb))
    return out


def ground_truth_from_groups(
    images: dict[str, list[Path]], backend: FaceBackend, report: LoadReport
) -> dict[str, np.ndarray]:
    """Per name, the re-normalised mean embedding of the faces detected in its images; faceless names are left
    out and recorded in report.empty_identities."""
    gt: dict[str, np.ndarray] = {}
    for name, paths in images.items():
        embs = [
            np.asarray(e, dtype=np.float64).ravel() for _, e in embed_images(paths, backend, report) if e is not None
        ]
        if not embs:
            logger.warning("No face found in any reference image of '%s'; it has no ground truth.", name)
            report.empty_identities.append(name)
            continue
        gt[name] = _unit(np.mean(embs, axis=0), f"mean embedding of '{name}'").astype(np.float32)
    return gt


def ground_truth_from_folder(
    folder: str | Path, backend: FaceBackend, report: LoadReport | None = None
) -> dict[str, np.ndarray]:
    """Ground truth from reference photos: per identity, the re-normalised mean of its detected-face embeddings.

    Unreadable files and images without a face are skipped and recorded in `report`; an identity with no usable
    face is left out (recorded in report.empty_identities) so that the caller can say which people are missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Reference photo folder {folder} does not exist.")
    report = report if report is not None else LoadReport()
    groups = reference_images(folder)
    if not groups:
        raise ValueError(f"No images in {folder}: expected <Name>-<k>.png files or <Name>/ subfolders of images.")
    return ground_truth_from_groups(groups, backend, report)


def _atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    atomic_write_bytes(data, path)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def write_identity_csv(results: list[IdentityResult], path: str | Path) -> None:
    """Per-identity table: name, n_images, no_face, mean, max, and the per-image similarities (';'-separated)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", "n_images", "no_face", "mean", "max", "sims"])
    for r in results:
        writer.writerow([r.name, r.n_images, r.no_face, _fmt(r.mean), _fmt(r.max), ";".join(_fmt(s) for s in r.sims)])
    _atomic_write(path, buf.getvalue().encode("utf-8"))


def _jsonable(x):
    """Turn numpy scalars/arrays into JSON types; NaN/inf become null rather than invalid JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_summary_json(summary: dict, path: str | Path) -> None:
    """Write a summary dict as indented JSON (atomic)."""
    text = json.dumps(_jsonable(summary), indent=2, sort_keys=False)
    _atomic_write(path, (text + "\n").encode("utf-8"))


@dataclass
class IdentityTable:
    """Collects per-image embeddings while images are generated, then scores them against ground truth."""

    gt: dict[str, np.ndarray]
    embs: dict[str, list[np.ndarray | None]] = field(default_factory=lambda: defaultdict(list))

    def add(self, name: str, emb: np.ndarray | None) -> None:
        """Record one generated image of `name` (None = no face)."""
        if name not in self.gt:
            raise KeyError(f"No ground-truth embedding for '{name}'. Known identities: {sorted(self.gt)[:10]}...")
        self.embs[name].append(emb)

    def results(self) -> list[IdentityResult]:
        """One IdentityResult per identity that has images, in the order they were first added."""
        return [identity_scores(e, self.gt[n], name=n) for n, e in self.embs.items()]
