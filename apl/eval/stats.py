"""Statistics of the evaluation as pure functions over arrays: identity figures, bootstrap intervals, FID and KID.

Identity data is a matrix per mode: S (I, K) cosine similarities, NaN where the image has no face, and a mask of
which of the K cells hold an image (identity i's n_i images fill its first n_i cells). Every figure is computed by
one vectorised function, for the data itself and for each bootstrap resample, so intervals and point values can
never disagree about what a figure means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

ID_FIGURES = (
    "mean_of_mean",  # mean over identities of the per-identity mean similarity (no face = 0), the original's
    "mean_of_max",  # mean over identities of the per-identity max similarity (no face = 0), the original's
    "id_accuracy",  # recognised / detected faces
    "id_accuracy_all_images",  # recognised / all images (a no-face image counts as not recognised: flatters)
    "no_face_rate",  # images without a detected face / all images
    "mean_sim_faces",  # mean similarity over detected faces only (no-face images left out)
)
BOOTSTRAP_LEVELS = ("identities", "two_level")
CI_LEVEL = 0.95


def pack_rows(rows: Sequence[Sequence[float | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-identity values (None = no face) -> (S (I, K) with NaN for None, valid (I, K)); K = longest row."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every identity needs at least one image")
    width = max(len(r) for r in rows)
    sims = np.full((len(rows), width), np.nan)
    valid = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        sims[i, : len(row)] = [np.nan if v is None else float(v) for v in row]
        valid[i, : len(row)] = True
    if not np.all(np.isfinite(sims[valid]) | np.isnan(sims[valid])):
        raise ValueError("similarities must be finite numbers (or None for no face)")
    return sims, valid


def id_figures(sims: np.ndarray, valid: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Every identity figure of (..., I, K) similarity matrices; leading axes are batch axes (e.g. resamples).

    A figure that is undefined (no detected face, for id_accuracy and mean_sim_faces) is NaN.
    """
    face = valid & ~np.isnan(sims)
    counted = np.where(face, sims, 0.0)  # a no-face image counts as similarity 0 (the original's rule)
    n_img = valid.sum(-1)  # (..., I)
    per_mean = np.where(valid, counted, 0.0).sum(-1) / n_img
    per_max = np.where(valid, counted, -np.inf).max(-1)
    faces = face.sum((-1, -2)).astype(np.float64)
    images = n_img.sum(-1).astype(np.float64)
    hits = (face & (np.where(face, sims, -np.inf) >= threshold)).sum((-1, -2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "mean_of_mean": per_mean.mean(-1),
            "mean_of_max": per_max.mean(-1),
            "id_accuracy": np.where(faces > 0, hits / np.maximum(faces, 1), np.nan),
            "id_accuracy_all_images": hits / images,
            "no_face_rate": 1.0 - faces / images,
            "mean_sim_faces": np.where(faces > 0, np.where(face, sims, 0.0).sum((-1, -2)) / np.maximum(faces, 1),
                                       np.nan),
        }


def _resample_rows(rng: np.random.Generator, n_rows: int, n_boot: int) -> np.ndarray:
    return rng.integers(0, n_rows, size=(n_boot, n_rows))


def _resample_within(rng: np.random.Generator, valid: np.ndarray) -> np.ndarray:
    """Column indices (B, I, K) drawing, for every row, K of its n_i filled cells with replacement."""
    n = valid.sum(-1, keepdims=True)  # (B, I, 1)
    return np.minimum((rng.random(valid.shape) * n).astype(np.int64), n - 1)


def bootstrap_id(
    tables: Mapping[str, tuple[np.ndarray, np.ndarray]],
    threshold: float,
    n_boot: int,
    seed: int = 0,
    level: str = "identities",
    chunk: int = 200,
) -> dict[str, dict[str, np.ndarray]]:
    """Bootstrap replicates (n_boot,) of every figure, per table (mode).

    Identities are resampled with replacement; tables with the same number of rows share the resampled rows, so
    when the caller aligns them (row i = the same person in every mode) differences between modes are paired.
    `level='two_level'` also resamples each drawn identity's images, independently per table. Deterministic: the
    same inputs and seed give the same replicates.
    """
    if level not in BOOTSTRAP_LEVELS:
        raise ValueError(f"bootstrap level must be one of {BOOTSTRAP_LEVELS}, got {level!r}")
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, list[np.ndarray]]] = {m: {f: [] for f in ID_FIGURES} for m in tables}
    rows_by_count: dict[int, np.ndarray] = {}
    for n_rows in sorted({s.shape[0] for s, _ in tables.values()}):
        rows_by_count[n_rows] = _resample_rows(rng, n_rows, n_boot)
    for start in range(0, n_boot, chunk):
        for mode, (sims, valid) in tables.items():
            idx = rows_by_count[sims.shape[0]][start : start + chunk]  # (b, I)
            s, v = sims[idx], valid[idx]  # (b, I, K)
            if level == "two_level":
                cols = _resample_within(rng, v)
                s = np.take_along_axis(s, cols, -1)
            for name, values in id_figures(s, v, threshold).items():
                out[mode][name].append(values)
    return {m: {f: np.concatenate(v) for f, v in figs.items()} for m, figs in out.items()}


def bootstrap_means(
    tables: Mapping[str, np.ndarray], n_boot: int, seed: int = 0, level: str = "identities", chunk: int = 200
) -> dict[str, np.ndarray]:
    """Bootstrap replicates (n_boot,) of the mean of each (P, K) table (P units, e.g. prompts, of K values each).

    Units are resampled with replacement, shared by tables with the same P (paired); 'two_level' also resamples
    the K values within each unit.
    """
    if level not in BOOTSTRAP_LEVELS:
        raise ValueError(f"bootstrap level must be one of {BOOTSTRAP_LEVELS}, got {level!r}")
    rng = np.random.default_rng(seed)
    rows = {p: _resample_rows(rng, p, n_boot) for p in sorted({t.shape[0] for t in tables.values()})}
    out: dict[str, list[np.ndarray]] = {k: [] for k in tables}
    for start in range(0, n_boot, chunk):
        for key, table in tables.items():
            t = np.asarray(table, dtype=np.float64)[rows[table.shape[0]][start : start + chunk]]  # (b, P, K)
            if level == "two_level":
                t = np.take_along_axis(t, _resample_within(rng, np.ones(t.shape, dtype=bool)), -1)
            out[key].append(t.mean((-1, -2)))
    return {k: np.concatenate(v) for k, v in out.items()}


def percentile_interval(replicates: np.ndarray, level: float = CI_LEVEL) -> list[float] | None:
    """The percentile interval [lo, hi] of bootstrap replicates, ignoring undefined (NaN) ones; None if more than
    half are undefined (the figure does not exist in most resamples)."""
    r = np.asarray(replicates, dtype=np.float64)
    ok = r[np.isfinite(r)]
    if ok.size == 0 or ok.size * 2 < r.size:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(ok, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def intervals(replicates: Mapping[str, np.ndarray], level: float = CI_LEVEL) -> dict[str, list[float] | None]:
    """percentile_interval of each figure."""
    return {k: percentile_interval(v, level) for k, v in replicates.items()}


def paired_differences(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Replicates of a - b per figure (a and b from one bootstrap_* call, so that they are paired)."""
    return {k: np.asarray(a[k]) - np.asarray(b[k]) for k in a if k in b}


# ------------------------------------------------------------------------------------------------------- FID / KID
def _as_f64(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != 2 or t.shape[0] < 2:
        raise ValueError(f"{what}: expected an (N, D) feature matrix with N >= 2, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: the features hold NaN or inf (a broken feature extractor or broken images)")
    return t


def frechet_distance(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """FID between feature sets x (N, D) and y (M, D): |mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^(1/2)).

    Unbiased (N-1) covariances; the trace of the matrix square root is the sum of the square roots of the
    eigenvalues of S_x S_y (real parts), as in torchmetrics. Strongly biased upwards when N is small against D.
    """
    x, y = _as_f64(x, "first feature set"), _as_f64(y, "second feature set")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T).reshape(x.shape[1], -1), torch.cov(y.T).reshape(y.shape[1], -1)
    root_trace = torch.linalg.eigvals(cov_x @ cov_y).sqrt().real.sum()
    return float((mu_x - mu_y).square().sum() + cov_x.trace() + cov_y.trace() - 2.0 * root_trace)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """k(a, b) = (a.b / D + coef)^degree, the kernel of KID (Binkowski et al. 2018), (N, M)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """The unbiased estimate of MMD^2 with the polynomial kernel: its expectation is 0 when x and y come from one
    distribution, so it can be (slightly) negative."""
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 samples per set, got {m} and {n}")
    k_xx, k_yy = polynomial_kernel(x, x, degree, coef), polynomial_kernel(y, y, degree, coef)
    k_xy = polynomial_kernel(x, y, degree, coef)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


def kid_subset_size(n_x: int, n_y: int, requested: int) -> int:
    """Images per KID subset: the requested size (0 = no limit), capped at half the smaller set so that subsets
    differ and their spread means something, and at least 2."""
    cap = max(2, min(n_x, n_y) // 2)
    return cap if requested <= 0 else max(2, min(requested, cap))


def kernel_inception_distance(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict:
    """KID: the mean of mmd2_unbiased over random subsets (each drawn without replacement from both sets), its
    standard deviation over the subsets and their percentile interval (the spread of a KID at this subset size)."""
    x, y = _as_f64(x, "first feature set"), _as_f64(y, "second feature set")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    size = kid_subset_size(x.shape[0], y.shape[0], subset_size)
    gen = torch.Generator().manual_seed(seed)
    values = np.array([
        mmd2_unbiased(x[torch.randperm(x.shape[0], generator=gen)[:size]],
                      y[torch.randperm(y.shape[0], generator=gen)[:size]])
        for _ in range(n_subsets)
    ])
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return {
        "kid_mean": float(values.mean()),
        "kid_std": float(values.std(ddof=1)) if n_subsets > 1 else 0.0,
        "kid_interval95": [float(lo), float(hi)],
        "subset_size": size,
        "subsets": n_subsets,
    }


# FID of two samples of one distribution, measured with the project's own FID code on random 2048-d features:
# most of a small-N FID is this finite-sample bias, which falls roughly like D / N.
FID_SAME_DISTRIBUTION_2048 = {100: 135.9, 400: 74.4, 2000: 16.8, 5000: 6.7}


def fid_sample_warning(n_a: int, n_b: int, dim: int) -> str | None:
    """A warning when FID's sample size is small against the feature dimension (then FID is mostly bias)."""
    n = min(n_a, n_b)
    if n >= 2 * dim:
        return None
    rank = " (fewer images than features: the covariances are singular)" if n <= dim else ""
    return (
        f"FID on {n} images per set with {dim}-d features{rank} is mostly finite-sample bias, not a difference "
        f"between the sets (two samples of ONE distribution of random 2048-d features score "
        + ", ".join(f"{v} at {k}" for k, v in FID_SAME_DISTRIBUTION_2048.items())
        + "); compare only FIDs of equal N, read KID (unbiased) and the 'without vs without_independent' floor"
    )


def format_interval(ci: Sequence[float] | None, digits: int = 4) -> str:
    """'[lo, hi]' or '' when there is no interval."""
    if not ci:
        return ""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"
