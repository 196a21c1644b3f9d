"""Linked ground-truth files, the embedding and image checks, and the alerts that keep results from flattering."""

from __future__ import annotations

import numpy as np
import pytest

from apl.eval.checks import (
    FaceBackendError,
    ImageStats,
    checked_embedding,
    comparison_alerts,
    few_identities_alert,
    is_blank,
    mode_alerts,
    prefix_effect_alert,
    warning_line,
)
from apl.eval.gt_files import (
    HEADER_TAG,
    GroundTruthMismatch,
    file_sha256,
    load_ground_truth,
    read_ground_truth,
    save_ground_truth,
)

GT = {"Ada Lovelace": np.array([3.0, 4.0, 0.0]), "Tom Hanks": np.array([0.0, 0.0, 2.0])}


def test_saved_pair_is_linked_and_reads_back(tmp_path):
    save_ground_truth(GT, tmp_path / "gt.npy", tmp_path / "gt_names.txt", backend="toy")
    lines = (tmp_path / "gt_names.txt").read_text().splitlines()
    assert lines[0].startswith(HEADER_TAG) and f"npy_sha256={file_sha256(tmp_path / 'gt.npy')}" in lines[0]
    assert "backend=toy" in lines[0] and "rows=2 dim=3" in lines[0] and lines[1:] == list(GT)
    gt, link = read_ground_truth(tmp_path / "gt.npy", tmp_path / "gt_names.txt")
    assert link.linked and link.backend == "toy" and link.dim == 3
    np.testing.assert_allclose(gt["Ada Lovelace"], [0.6, 0.8, 0.0], atol=1e-7)
    assert list(load_ground_truth(tmp_path / "gt.npy", tmp_path / "gt_names.txt")) == list(GT)


def test_names_of_another_npy_or_edited_names_are_refused(tmp_path):
    save_ground_truth(GT, tmp_path / "a.npy", tmp_path / "a_names.txt")
    save_ground_truth({"X": np.ones(3), "Y": -np.ones(3)}, tmp_path / "b.npy", tmp_path / "b_names.txt")
    with pytest.raises(GroundTruthMismatch, match="belongs to another embeddings file") as err:
        read_ground_truth(tmp_path / "a.npy", tmp_path / "b_names.txt")
    assert "a.npy" in str(err.value) and "b_names.txt" in str(err.value)
    lines = (tmp_path / "a_names.txt").read_text().splitlines()
    (tmp_path / "swapped.txt").write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    with pytest.raises(GroundTruthMismatch, match="was edited"):
        read_ground_truth(tmp_path / "a.npy", tmp_path / "swapped.txt")
    (tmp_path / "damaged.txt").write_text(HEADER_TAG + " npy_sha256\n" + "\n".join(GT) + "\n")
    with pytest.raises(ValueError, match="damaged"):
        read_ground_truth(tmp_path / "a.npy", tmp_path / "damaged.txt")


def test_old_unlinked_pairs_still_load_marked_unlinked(tmp_path):
    np.save(tmp_path / "old.npy", np.stack(list(GT.values())).astype(np.float32))
    (tmp_path / "old_names.txt").write_text("# written by hand\nAda Lovelace\n\nTom Hanks\n")
    gt, link = read_ground_truth(tmp_path / "old.npy", tmp_path / "old_names.txt")
    assert not link.linked and list(gt) == list(GT)


@pytest.mark.parametrize(
    ("array", "needle"),
    [
        (np.array([[1.0, np.nan, 0.0], [0.0, 1.0, 0.0]]), "row 0 ('Ada Lovelace') holds NaN or inf"),
        (np.array([[1.0, 0.0, 0.0], [np.inf, 1.0, 0.0]]), "row 1 ('Tom Hanks') holds NaN or inf"),
        (np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), "row 1 ('Tom Hanks') is all zeros"),
        (np.array([[1, 0, 0], [0, 1, 0]]), "holds int64 values"),
        (np.zeros((2, 0)), "must hold an (N, D) array"),
    ],
)
def test_unusable_rows_are_refused_naming_row_and_person(tmp_path, array, needle):
    np.save(tmp_path / "x.npy", array)
    (tmp_path / "x_names.txt").write_text("Ada Lovelace\nTom Hanks\n")
    with pytest.raises(ValueError) as err:
        read_ground_truth(tmp_path / "x.npy", tmp_path / "x_names.txt")
    assert needle in str(err.value)


def test_save_refuses_non_finite_embeddings_and_comment_names(tmp_path):
    with pytest.raises(ValueError, match="NaN or inf"):
        save_ground_truth({"A": np.array([np.nan, 1.0])}, tmp_path / "a.npy", tmp_path / "a.txt")
    with pytest.raises(ValueError, match="start with '#'"):
        save_ground_truth({"#A": np.ones(2)}, tmp_path / "a.npy", tmp_path / "a.txt")
    assert not (tmp_path / "a.npy").exists()


class _Backend:
    name = "stub"
    embedding_dim = 3


def test_checked_embedding_refuses_what_is_not_an_embedding():
    assert checked_embedding(None, _Backend(), "x.png") is None
    np.testing.assert_array_equal(checked_embedding([1, 2, 3], _Backend(), "x.png"), [1.0, 2.0, 3.0])
    for bad, needle in ((np.array([1.0, np.nan, 0.0]), "NaN or inf for x.png"), (np.zeros(3), "all-zero"),
                        (np.ones(4), "4-d embedding for x.png but announces 3-d"), ("abc", "non-numeric")):
        with pytest.raises(FaceBackendError, match=needle):
            checked_embedding(bad, _Backend(), "x.png")


def test_image_stats_count_flat_and_repeated_images():
    stats, seen = ImageStats(), set()
    black = np.zeros((8, 8, 3), np.uint8)
    noise = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for image in (black, black, noise, noise.copy(), noise[::-1].copy()):
        stats.add(image, seen)
    assert (stats.n, stats.blank, stats.duplicates) == (5, 2, 1)
    assert is_blank(np.full((4, 4, 3), 200, np.uint8)) and not is_blank(noise)


def _mode(n_images: int, n_faces: int, no_face_rate: float, per=(4, 4)) -> dict:
    return {"n_images": n_images, "n_faces": n_faces, "no_face_rate": no_face_rate, "mean_of_mean": 0.0,
            "mean_of_max": 0.0, "n_identities": 20, "images_per_identity": {"min": per[0], "max": per[1]}}


def test_alerts_for_results_a_reader_would_misread():
    codes = lambda alerts: [a.code for a in alerts]  # noqa: E731
    assert codes(mode_alerts("with", _mode(8, 0, 1.0), None)) == ["no_faces"]
    stats = ImageStats(n=8, blank=2, duplicates=1)
    assert codes(mode_alerts("with", _mode(8, 6, 0.25, per=(3, 4)), stats)) == [
        "blank_images", "duplicate_images", "uneven_images"]
    gap = comparison_alerts({"with": _mode(10, 5, 0.5), "without": _mode(10, 10, 0.0)})
    assert codes(gap) == ["no_face_gap"] and "50.0 %" in gap[0].message and gap[0].mode == "with"
    assert comparison_alerts({"with": _mode(10, 9, 0.1), "without": _mode(10, 10, 0.05)}) == []  # gap 5 points
    assert codes(comparison_alerts({"with": _mode(10, 8, 0.2)})) == ["no_face_unknown_baseline"]
    assert codes(comparison_alerts({"with": _mode(4, 4, 0), "without": _mode(4, 4, 0)},
                                   same_identities=False)) == ["identities_differ"]
    assert prefix_effect_alert(["a", "b"], ["a", "b"]).code == "prefix_no_effect"
    assert prefix_effect_alert(["a", "b"], ["a", "c"]) is None
    assert few_identities_alert(4).code == "few_identities" and few_identities_alert(40) is None
    alert = gap[0]
    alert.template_set = "held_out"
    assert warning_line(alert.as_dict()).startswith("WARNING [no_face_gap held_out/with]: ")
