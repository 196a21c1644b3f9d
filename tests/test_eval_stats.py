"""The evaluation's statistics as pure functions: identity figures, bootstrap intervals, FID and KID."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import _compute_fid

from apl.eval.id_metrics import identity_scores, summarize
from apl.eval.stats import (
    bootstrap_id,
    bootstrap_means,
    fid_sample_warning,
    frechet_distance,
    id_figures,
    kernel_inception_distance,
    kid_subset_size,
    mmd2_unbiased,
    pack_rows,
    paired_differences,
    percentile_interval,
)

E1 = np.array([1.0, 0.0, 0.0])


def _rows(rng: np.random.Generator, n_ids: int, k: int, mean: float, no_face: float = 0.0) -> list[list]:
    """Per-identity similarities: identity effect + image noise, some images without a face (None)."""
    rows = []
    for _ in range(n_ids):
        centre = mean + 0.1 * rng.standard_normal()
        rows.append([None if rng.random() < no_face else float(np.clip(centre + 0.1 * rng.standard_normal(), -1, 1))
                     for _ in range(k)])
    return rows


def test_pack_rows_and_figures_match_summarize():
    a = identity_scores([E1, None, np.array([1.0, 1.0, 0.0]), -E1], gt=E1, name="A")
    b = identity_scores([np.array([0.2, 0.98, 0.0]), None], gt=E1, name="B")
    sims, valid = pack_rows([a.sims, b.sims])
    assert sims.shape == (2, 4) and valid.sum() == 6 and np.isnan(sims[0, 1])
    figs = id_figures(sims, valid, 0.5)
    s = summarize([a, b], 0.5)
    for key, value in figs.items():
        assert s[key] == pytest.approx(float(value)), key
    assert s["mean_sim_faces"] == pytest.approx((1.0 + 2**-0.5 - 1.0 + 0.2 / np.hypot(0.2, 0.98)) / 4)
    assert s["images_per_identity"] == {"min": 2, "max": 4}
    # Batched: leading axes are resamples.
    batch = id_figures(np.stack([sims, sims]), np.stack([valid, valid]), 0.5)
    assert batch["mean_of_max"].shape == (2,) and np.allclose(batch["mean_of_max"], figs["mean_of_max"])
    only_none, v = pack_rows([[None, None]])
    assert np.isnan(id_figures(only_none, v, 0.3)["id_accuracy"])  # undefined, not 0
    with pytest.raises(ValueError):
        pack_rows([[0.1], []])


def test_bootstrap_is_seeded_deterministic_and_paired():
    rng = np.random.default_rng(0)
    with_ = pack_rows(_rows(rng, 30, 4, 0.2, no_face=0.1))
    without = pack_rows(_rows(rng, 30, 4, 0.6))
    tables = {"with": with_, "without": without}
    a = bootstrap_id(tables, 0.4, 300, seed=1)
    b = bootstrap_id(tables, 0.4, 300, seed=1)
    c = bootstrap_id(tables, 0.4, 300, seed=2)
    for fig in a["with"]:
        np.testing.assert_array_equal(a["with"][fig], b["with"][fig])
    assert not np.array_equal(a["with"]["mean_of_mean"], c["with"]["mean_of_mean"])
    assert a["with"]["mean_of_mean"].shape == (300,)
    # The point value sits inside its interval; the paired difference interval excludes 0 here.
    point = id_figures(*with_, 0.4)
    for fig in ("mean_of_mean", "mean_of_max", "id_accuracy", "no_face_rate", "mean_sim_faces"):
        lo, hi = percentile_interval(a["with"][fig])
        assert lo <= float(point[fig]) <= hi, fig
    lo, hi = percentile_interval(paired_differences(a["with"], a["without"])["mean_of_mean"])
    assert hi < 0
    # Paired resampling: the same identities drawn in both tables, so a table minus itself is exactly 0.
    same = bootstrap_id({"x": with_, "y": with_}, 0.4, 50, seed=0)
    assert np.all(paired_differences(same["x"], same["y"])["mean_of_mean"] == 0)


def test_bootstrap_interval_covers_the_population_value_about_95_percent_of_the_time():
    """Coverage check of the identity-level bootstrap on simulated studies with a known population mean."""
    hits, trials = 0, 60
    for t in range(trials):
        rng = np.random.default_rng(100 + t)
        rows = _rows(rng, 40, 4, 0.3)
        reps = bootstrap_id({"m": pack_rows(rows)}, 0.5, 300, seed=t)["m"]["mean_of_mean"]
        lo, hi = percentile_interval(reps)
        hits += lo <= 0.3 <= hi
    assert 0.82 <= hits / trials <= 1.0  # 95 % nominal; 60 trials leave room for the binomial spread


def test_two_level_bootstrap_is_wider_for_means_and_lower_for_maxima():
    rng = np.random.default_rng(5)
    table = {"m": pack_rows(_rows(rng, 25, 6, 0.3))}
    one = bootstrap_id(table, 0.5, 400, seed=0)["m"]
    two = bootstrap_id(table, 0.5, 400, seed=0, level="two_level")["m"]
    assert np.std(two["mean_of_mean"]) > np.std(one["mean_of_mean"])
    assert np.mean(two["mean_of_max"]) < np.mean(one["mean_of_max"])  # resamples repeat images: fewer distinct
    with pytest.raises(ValueError, match="bootstrap level"):
        bootstrap_id(table, 0.5, 10, level="images")


def test_percentile_interval_of_undefined_replicates():
    assert percentile_interval(np.array([np.nan] * 6 + [0.1] * 4)) is None  # mostly undefined: no interval
    assert percentile_interval(np.array([np.nan] + [0.5] * 9)) == [0.5, 0.5]


def test_bootstrap_means_pairs_tables_of_the_same_prompts():
    rng = np.random.default_rng(0)
    a = rng.normal(0.3, 0.05, (20, 2))
    reps = bootstrap_means({"a": a, "b": a + 0.1}, 200, seed=0)
    np.testing.assert_allclose(reps["b"] - reps["a"], 0.1)
    lo, hi = percentile_interval(reps["a"])
    assert lo < a.mean() < hi
    two = bootstrap_means({"a": a}, 200, seed=0, level="two_level")["a"]
    assert two.shape == (200,)


# ---------------------------------------------------------------------------------------------------------- FID/KID
def test_frechet_distance_equals_torchmetrics_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    y = torch.randn(200, 16, generator=g, dtype=torch.float64) * 1.3 + 0.3
    ref = _compute_fid(x.mean(0), torch.cov(x.T), y.mean(0), torch.cov(y.T))
    assert frechet_distance(x, y) == pytest.approx(float(ref), rel=1e-9)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(x, torch.full((5, 16), float("nan")))
    with pytest.raises(ValueError, match="sizes differ"):
        frechet_distance(x, y[:, :8])


def test_fid_of_one_distribution_is_mostly_bias_at_small_n():
    """FID of two samples of ONE distribution falls with N (the issue's measurement, on 64-d features here)."""
    g = torch.Generator().manual_seed(1)
    small = frechet_distance(torch.randn(40, 64, generator=g), torch.randn(40, 64, generator=g))
    large = frechet_distance(torch.randn(2000, 64, generator=g), torch.randn(2000, 64, generator=g))
    assert small > 10 * large > 0
    assert fid_sample_warning(100, 100, 2048) and "singular" in fid_sample_warning(100, 100, 2048)
    assert fid_sample_warning(3000, 5000, 2048) and "singular" not in fid_sample_warning(3000, 5000, 2048)
    assert fid_sample_warning(4096, 5000, 2048) is None


def test_mmd_matches_the_unbiased_estimator_by_hand():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    k = lambda a, b: (float(a @ b) / 3 + 1) ** 3  # noqa: E731 - the kernel, written out
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy)


def test_kid_is_near_zero_for_one_distribution_and_far_for_two():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g)
    same = kernel_inception_distance(x, y, n_subsets=50, subset_size=100, seed=0)
    lo, hi = same["kid_interval95"]
    assert lo < 0 < hi and abs(same["kid_mean"]) < 2 * same["kid_std"]
    far = kernel_inception_distance(x, y + 0.5, n_subsets=50, subset_size=100, seed=0)
    assert far["kid_interval95"][0] > 0 and far["kid_mean"] > 10 * same["kid_std"]
    again = kernel_inception_distance(x, y, n_subsets=50, subset_size=100, seed=0)
    assert again == same  # seeded
    assert same["subset_size"] == 100 and same["subsets"] == 50


def test_kid_subset_size_is_capped_so_subsets_differ():
    assert kid_subset_size(10_000, 10_000, 1000) == 1000
    assert kid_subset_size(40, 100, 1000) == 20
    assert kid_subset_size(3, 3, 0) == 2
