"""Identity metrics on hand-made embeddings, ground-truth files, output tables and the shared eval flags."""

from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from apl.eval.id_metrics import (
    DEFAULT_ID_THRESHOLD,
    DEFAULT_ID_THRESHOLDS,
    IdentityTable,
    cosine,
    default_id_threshold,
    ground_truth_from_folder,
    identity_scores,
    load_ground_truth,
    save_ground_truth,
    summarize,
    write_identity_csv,
    write_summary_json,
)
from apl.eval.images import LoadReport, identity_from_stem, list_images
from args.clip_args import build_parser

E1 = np.array([1.0, 0.0, 0.0])
E2 = np.array([0.0, 1.0, 0.0])
DIAG = np.array([1.0, 1.0, 0.0])  # cos to E1 = 1/sqrt(2)
R2 = 1.0 / math.sqrt(2.0)


def test_cosine_shapes_and_values():
    assert cosine(E1, 3 * E1) == pytest.approx(1.0)
    assert cosine(E1, DIAG) == pytest.approx(R2)
    np.testing.assert_allclose(cosine(np.stack([E1, E2, -E1]), E1), [1.0, 0.0, -1.0])
    assert cosine(np.stack([E1, E2]), np.stack([E1, DIAG, E2])).shape == (2, 3)
    with pytest.raises(ValueError, match="sizes differ"):
        cosine(E1, np.ones(4))
    with pytest.raises(ValueError, match="zero"):
        cosine(E1, np.zeros(3))


def test_identity_scores_hand_computed():
    r = identity_scores([E1, None, DIAG, -E1], gt=E1, name="A")
    assert r.name == "A" and r.n_images == 4 and r.no_face == 1
    assert r.sims[1] is None
    np.testing.assert_allclose([r.sims[0], r.sims[2], r.sims[3]], [1.0, R2, -1.0])
    assert r.mean == pytest.approx((1.0 + 0.0 + R2 - 1.0) / 4)
    assert r.max == pytest.approx(1.0)
    # No face counts as 0, so it wins the max over negative similarities; all-None gives 0/0.
    assert identity_scores([-E1, None], gt=E1).max == pytest.approx(0.0)
    empty = identity_scores([None, None], gt=E1)
    assert (empty.mean, empty.max, empty.no_face) == (0.0, 0.0, 2)
    with pytest.raises(ValueError, match="no images"):
        identity_scores([], gt=E1, name="Z")


def test_summarize_hand_computed():
    a = identity_scores([E1, None, DIAG, -E1], gt=E1, name="A")  # sims 1, -, 0.707, -1
    b = identity_scores([0.2 * E1 + math.sqrt(0.96) * E2, None], gt=E1, name="B")  # sims 0.2, -
    s = summarize([a, b], threshold=0.5)
    assert s["mean_of_mean"] == pytest.approx(((1 + R2 - 1) / 4 + 0.2 / 2) / 2)
    assert s["mean_of_max"] == pytest.approx((1.0 + 0.2) / 2)
    assert s["id_accuracy"] == pytest.approx(2 / 4)  # 1.0 and 0.707 of the four detected faces
    assert s["id_accuracy_all_images"] == pytest.approx(2 / 6)
    assert s["no_face_rate"] == pytest.approx(2 / 6)
    assert (s["n_identities"], s["n_images"], s["n_faces"], s["threshold"]) == (2, 6, 4, 0.5)
    assert summarize([identity_scores([None], gt=E1)], 0.3)["id_accuracy"] is None
    with pytest.raises(ValueError):
        summarize([], 0.3)


def test_default_thresholds():
    assert DEFAULT_ID_THRESHOLD == DEFAULT_ID_THRESHOLDS["insightface"]
    assert 0.28 <= default_id_threshold("insightface") <= 0.4
    assert 0.8 < default_id_threshold("dlib") < 0.95
    with pytest.raises(ValueError, match="facenet"):
        default_id_threshold("facenet")


def test_ground_truth_round_trip_and_errors(tmp_path):
    gt = {"Ada Lovelace": np.array([3.0, 4.0, 0.0]), "Alan Turing": np.array([0.0, 0.0, 2.0])}
    save_ground_truth(gt, tmp_path / "gt.npy", tmp_path / "gt.txt")
    loaded = load_ground_truth(tmp_path / "gt.npy", tmp_path / "gt.txt")
    assert list(loaded) == ["Ada Lovelace", "Alan Turing"]
    np.testing.assert_allclose(loaded["Ada Lovelace"], [0.6, 0.8, 0.0], atol=1e-6)  # re-normalised
    np.testing.assert_allclose(loaded["Alan Turing"], [0.0, 0.0, 1.0])

    np.save(tmp_path / "three.npy", np.eye(3))
    (tmp_path / "two.txt").write_text("A\nB\n\n")
    with pytest.raises(ValueError, match=r"3 embeddings but .*two.txt has 2 names"):
        load_ground_truth(tmp_path / "three.npy", tmp_path / "two.txt")
    (tmp_path / "dup.txt").write_text("A\nB\nA\n")
    with pytest.raises(ValueError, match=r"more than once: \['A'\]"):
        load_ground_truth(tmp_path / "three.npy", tmp_path / "dup.txt")
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_ground_truth(tmp_path / "nope.npy", tmp_path / "two.txt")
    # Object arrays would need unpickling: refused.
    with open(tmp_path / "obj.npy", "wb") as f:
        np.lib.format.write_array(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        load_ground_truth(tmp_path / "obj.npy", tmp_path / "two.txt")


class ColourBackend:
    """Deterministic stand-in: the 'face embedding' is the image's mean colour; a black image has no face."""

    name = "colour"

    def embed(self, image_rgb):
        mean = image_rgb.reshape(-1, 3).mean(0)
        return None if mean.max() < 1 else (mean / np.linalg.norm(mean)).astype(np.float32)


def _img(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), rgb).save(path)


def test_ground_truth_from_folder(tmp_path):
    _img(tmp_path / "Ada Lovelace-0.png", (255, 0, 0))
    _img(tmp_path / "Ada Lovelace-1.jpg", (0, 0, 255))
    (tmp_path / "Ada Lovelace-2.png").write_bytes(b"not an image")
    _img(tmp_path / "Mary-Jane Watson-7.png", (0, 255, 0))  # name is the text before the LAST '-'
    _img(tmp_path / "Alan Turing" / "a.png", (10, 200, 10))
    _img(tmp_path / "Alan Turing" / "b.png", (0, 0, 0))  # no face
    _img(tmp_path / "Carol-0.png", (0, 0, 0))  # no face anywhere -> no ground truth
    (tmp_path / "notes.txt").write_text("ignored")

    report = LoadReport()
    gt = ground_truth_from_folder(tmp_path, ColourBackend(), report)
    assert sorted(gt) == ["Ada Lovelace", "Alan Turing", "Mary-Jane Watson"]
    np.testing.assert_allclose(gt["Ada Lovelace"], [R2, 0, R2], atol=1e-2)  # mean of red and blue, re-normalised
    assert abs(np.linalg.norm(gt["Alan Turing"]) - 1) < 1e-6
    assert report.loaded == 6
    assert [p.endswith("Ada Lovelace-2.png") for p in report.unreadable] == [True]
    assert sorted(p.rsplit("/", 1)[-1] for p in report.no_face) == ["Carol-0.png", "b.png"]
    assert report.empty_identities == ["Carol"]
    assert report.as_dict()["no_face"] == 2


def test_ground_truth_folder_names_whole_stems_and_skips_hidden_files(tmp_path):
    _img(tmp_path / "Jean-Paul Sartre.png", (255, 0, 0))  # no -<k>: the whole stem is the name
    _img(tmp_path / "Jean-Paul Sartre-2.png", (250, 5, 0))
    _img(tmp_path / "Zoe\u0301  Saldana-0.png", (0, 255, 0))  # decomposed é, double space
    _img(tmp_path / "._Jean-Paul Sartre.png", (0, 0, 255))  # macOS AppleDouble
    _img(tmp_path / ".thumbs" / "x.png", (0, 0, 255))
    report = LoadReport()
    gt = ground_truth_from_folder(tmp_path, ColourBackend(), report)
    assert sorted(gt) == ["Jean-Paul Sartre", "Zo\u00e9 Saldana"]
    assert report.loaded == 3 and not report.unreadable
    assert identity_from_stem("Jean-Paul Sartre") == "Jean-Paul Sartre"
    assert identity_from_stem("Jean-Paul Sartre-10") == "Jean-Paul Sartre"
    assert identity_from_stem("Mary-Jane-") == "Mary-Jane-"


def test_list_images_skips_hidden_and_appledouble_files(tmp_path):
    for name in ("a.png", "._a.png", ".hidden.jpg", "sub/b.png", "sub/._b.png", ".cache/c.png"):
        _img(tmp_path / name, (10, 20, 30))
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)] == ["a.png",
                                                                                                    "sub/b.png"]


def test_empty_or_truncated_ground_truth_npy_is_a_clear_error(tmp_path):
    (tmp_path / "names.txt").write_text("A\n")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.npy is empty \(0 bytes\).*dataset_generation.py --gt_npy"):
        load_ground_truth(tmp_path / "empty.npy", tmp_path / "names.txt")
    np.save(tmp_path / "full.npy", np.ones((1, 4), dtype=np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"cut.npy is not a complete"):
        load_ground_truth(tmp_path / "cut.npy", tmp_path / "names.txt")


def test_identity_table_and_outputs(tmp_path):
    table = IdentityTable(gt={"A": E1, "B": E2})
    for name, emb in [("A", E1), ("A", None), ("B", DIAG)]:
        table.add(name, emb)
    with pytest.raises(KeyError, match="No ground-truth embedding for 'C'"):
        table.add("C", E1)
    results = table.results()
    assert [r.name for r in results] == ["A", "B"]

    write_identity_csv(results, tmp_path / "out" / "ids.csv")
    rows = list(csv.DictReader(open(tmp_path / "out" / "ids.csv")))
    assert rows[0]["name"] == "A" and rows[0]["no_face"] == "1" and rows[0]["sims"] == "1.000000;"
    assert float(rows[1]["mean"]) == pytest.approx(R2, abs=1e-6)

    summary = summarize(results, 0.5) | {"nan_value": float("nan"), "np_value": np.float32(0.25)}
    write_summary_json(summary, tmp_path / "out" / "summary.json")
    back = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert back["nan_value"] is None and back["np_value"] == 0.25
    assert back["mean_of_max"] == pytest.approx((1 + R2) / 2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ids.csv", "summary.json"]  # no temp files


def test_eval_parser_defaults_and_help():
    parser = build_parser("demo")
    args = parser.parse_args([])
    assert (args.steps, args.scale, args.seed, args.n_samples) == (20, 7.0, 2238, 4)
    assert (args.clip_model, args.clip_pretrained) == ("ViT-g-14", "laion2b_s34b_b88k")
    # Unset detector flags mean "the backend's default" (0.5 / 256 for insightface): a backend without such settings
    # (dlib) can then refuse them when they are given instead of ignoring them.
    assert (args.face_backend, args.insightface_pack, args.det_thresh, args.det_size) == (
        "insightface",
        "buffalo_l",
        None,
        None,
    )
    assert args.mode == "both" and args.precision == "fp32" and args.id_threshold is None
    assert isinstance(parser.formatter_class("x"), argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        assert action.help, f"flag {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp8"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--det_thresh", "1.5"])
    assert parser.parse_args(["--mode", "with", "--face_backend", "dlib"]).face_backend == "dlib"
