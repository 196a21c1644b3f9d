"""test_id.py and test_fid_clip_score.py end to end on the tiny model, with tiny face / CLIP / FID stand-ins."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_stand_ins import GROUP_PHOTO, TOM_HANKS, TinyFeatures, save_tiny_clip_weights, write_tiny_insightface_pack
from PIL import Image

import test_fid_clip_score
import test_id
from apl.dataset_gen import plan_dataset
from apl.eval import run_quality
from apl.eval.faces import make_backend
from apl.eval.generation import image_seed, with_prefix
from apl.eval.id_metrics import cosine, save_ground_truth
from apl.eval.images import load_image_rgb
from apl.eval.quality import INCEPTION_FILE, ClipScorer, build_fid, fid_between, load_image_folder
from apl.eval.run_id import plan_images
from apl.runtime import TINY_CONFIG
from ldm.modules.embedding_manager import EmbeddingManager

TINY = ["--config_path", str(TINY_CONFIG), "--steps", "1"]


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    write_tiny_insightface_pack(root, pack="tiny_pack")
    return root


@pytest.fixture(scope="module")
def backend(pack_root):
    return make_backend("insightface", pack="tiny_pack", root=str(pack_root))


@pytest.fixture(scope="module")
def face_flags(pack_root):
    return ["--insightface_pack", "tiny_pack", "--insightface_root", str(pack_root)]


@pytest.fixture(scope="module")
def embedding(tmp_path_factory, tiny_model):
    """A random 'alz' prefix for the tiny text encoder (only the token id and width must match the script's model)."""
    path = tmp_path_factory.mktemp("emb") / "alz.pt"
    gen = torch.Generator().manual_seed(3)
    em = EmbeddingManager(tiny_model.cond_stage_model, ["alz"], num_vectors_per_token=4, generator=gen)
    with torch.no_grad():
        em.string_to_param_dict["alz"].mul_(5.0)  # large enough to visibly change the tiny model's images
    em.save(path)
    return path


@pytest.fixture(scope="module")
def gt_files(tmp_path_factory, backend):
    """Ground truth for two people from the photos shipped with insightface."""
    folder = tmp_path_factory.mktemp("gt")
    gt = {name: backend.embed(load_image_rgb(photo)) for name, photo in (("Tom Hanks", TOM_HANKS),
                                                                          ("Ada Lovelace", GROUP_PHOTO))}
    save_ground_truth(gt, folder / "gt.npy", folder / "gt_names.txt")
    return folder / "gt.npy", gt


def _run(main, argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------------------------------------------------ test_id
def test_test_id_generates_both_modes_and_writes_reports(tmp_path, capsys, backend, face_flags, embedding, gt_files):
    gt_npy, gt = gt_files
    out = tmp_path / "id"
    argv = [*TINY, "--embedding", embedding, "--gt_npy", gt_npy, "--names", "Tom Hanks", "Ada Lovelace", "Nobody",
            "--n_samples", 2, "--batch_size", 3, "--outdir", out, *face_flags, "--steps", 2]  # 1 step: prefix ~moot
    rc, stdout, err = _run(test_id.main, argv, capsys)
    assert rc == 0, err
    assert "mean_of_mean" in stdout and "without ground truth" in stdout
    for name in ("summary.json", "identity_with.csv", "identity_without.csv", "report.md",
                 "grids/Tom Hanks.png", "grids/Ada Lovelace.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["names_without_ground_truth"] == ["Nobody"]
    assert summary["threshold"] == 0.32  # InsightFace's documented default

    # Recompute every number from the saved images with the same backend.
    for mode in ("with", "without"):
        means, maxes = [], []
        for name in ("Tom Hanks", "Ada Lovelace"):
            sims = [cosine(backend.embed(load_image_rgb(out / "images" / mode / f"{name}-{k}.png")), gt[name])
                    for k in range(2)]
            means.append(np.mean(sims))
            maxes.append(np.max(sims))
        s = summary["modes"][mode]
        assert s["mean_of_mean"] == pytest.approx(np.mean(means), abs=1e-5)
        assert s["mean_of_max"] == pytest.approx(np.mean(maxes), abs=1e-5)
        assert (s["n_images"], s["n_identities"], s["no_face_rate"]) == (4, 2, 0.0)
        rows = list(csv.DictReader((out / f"identity_{mode}.csv").open()))
        assert [r["name"] for r in rows] == ["Tom Hanks", "Ada Lovelace"]
        assert float(rows[0]["mean"]) == pytest.approx(means[0], abs=1e-5)

    # The prefix changes the images, and the seeds pair image k of a name across the two modes.
    with_img = np.asarray(Image.open(out / "images/with/Tom Hanks-0.png"), dtype=int)
    without_img = np.asarray(Image.open(out / "images/without/Tom Hanks-0.png"), dtype=int)
    assert np.abs(with_img - without_img).mean() > 1.0
    report = (out / "report.md").read_text()
    assert "| with prefix |" in report and "| without prefix |" in report and "grids/Tom%20Hanks.png" in report
    assert Image.open(out / "grids/Tom Hanks.png").size[1] > Image.open(out / "grids/Tom Hanks.png").size[0] / 2


def test_test_id_scores_an_image_folder_and_counts_bad_images(tmp_path, capsys, face_flags):
    ref = tmp_path / "ref"
    ref.mkdir()
    Image.open(TOM_HANKS).convert("RGB").save(ref / "Tom Hanks-0.png")
    Image.new("RGB", (64, 64)).save(ref / "Empty Person-0.png")  # no face: this person gets no ground truth
    images = tmp_path / "images"
    images.mkdir()
    Image.open(TOM_HANKS).convert("RGB").save(images / "Tom Hanks-0.png")  # the reference itself: similarity 1
    Image.new("RGB", (64, 64)).save(images / "Tom Hanks-1.png")  # no face: counts as 0
    (images / "Tom Hanks-2.png").write_bytes(b"\x89PNG broken")  # unreadable: counted, not scored
    Image.new("RGB", (64, 64), "white").save(images / "Empty Person-0.png")  # no ground truth
    Image.new("RGB", (64, 64), "white").save(images / "notes.png")  # not <Name>-<k>
    out = tmp_path / "out"
    argv = ["--image_folder", images, "--gt_folder", ref, "--outdir", out, *face_flags]
    rc, stdout, err = _run(test_id.main, argv, capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    s = summary["modes"]["images"]
    assert s["mean_of_mean"] == pytest.approx(0.5, abs=1e-5) and s["mean_of_max"] == pytest.approx(1.0, abs=1e-5)
    assert (s["n_images"], s["no_face_rate"], s["unreadable"]) == (2, 0.5, 1)
    assert s["id_accuracy"] == 1.0 and s["id_accuracy_all_images"] == 0.5
    assert summary["names_without_ground_truth"] == ["Empty Person"]
    assert summary["ground_truth"]["empty_identities"] == ["Empty Person"]
    assert [p.endswith("notes.png") for p in summary["unrecognised_files"]] == [True]
    assert "1 unreadable images skipped" in stdout
    # A second run re-scores a previous run's --outdir layout (images/with, images/without) as is.
    (out / "prev" / "images" / "without").mkdir(parents=True)
    Image.open(TOM_HANKS).convert("RGB").save(out / "prev" / "images" / "without" / "Tom Hanks-0.png")
    rc, _, err = _run(test_id.main, ["--image_folder", out / "prev", "--gt_folder", ref, "--outdir", out / "o2",
                                     *face_flags], capsys)
    assert rc == 0, err
    assert list(json.loads((out / "o2" / "summary.json").read_text())["modes"]) == ["without"]


def test_test_id_missing_pack_fails_before_generation(tmp_path, capsys, monkeypatch, gt_files, embedding):
    monkeypatch.delenv("INSIGHTFACE_HOME", raising=False)
    out = tmp_path / "id"
    argv = [*TINY, "--embedding", embedding, "--gt_npy", gt_files[0], "--outdir", out,
            "--insightface_root", tmp_path / "nothing"]
    rc, _, err = _run(test_id.main, argv, capsys)
    assert rc == 2 and err.startswith("test_id.py: error: InsightFace model pack 'buffalo_l' not found")
    for needle in ("buffalo_l.zip", "--insightface_root", "$INSIGHTFACE_HOME", "--face_backend dlib"):
        assert needle in err
    assert "Traceback" not in err and not out.exists()


def test_test_id_bad_inputs(tmp_path, capsys, face_flags, gt_files, embedding):
    gt_npy, _ = gt_files
    bad_names = tmp_path / "names.txt"
    bad_names.write_text("only one\n")
    empty_npy = tmp_path / "empty.npy"
    empty_npy.write_bytes(b"")
    (tmp_path / "empty_names.txt").write_text("Tom Hanks\n")
    cases = [
        (["--gt_npy", gt_npy, "--mode", "both"], "needs --embedding"),
        (["--embedding", embedding], "exactly one of --gt_npy"),
        (["--embedding", embedding, "--gt_npy", gt_npy, "--gt_names", bad_names], "has 2 embeddings but"),
        (["--embedding", embedding, "--gt_npy", tmp_path / "none.npy"], "does not exist"),
        (["--embedding", embedding, "--gt_npy", gt_npy, "--names", "Nobody"], "none of the 1 identities"),
        (["--embedding", embedding, "--gt_npy", gt_npy, "--prompt_template", "a face"], "must contain {name}"),
        (["--embedding", embedding, "--gt_npy", gt_npy, "--prompt_template", "portrait of {name}, {style}"],
         "uses {style}, but only {name} is filled in"),
        (["--embedding", embedding, "--gt_npy", gt_npy, "--prompt_template", "{name} {"], "literal braces"),
        (["--embedding", embedding, "--gt_npy", empty_npy], "is empty (0 bytes)"),
        (["--embedding", tmp_path / "none.pt", "--gt_npy", gt_npy], "--embedding"),
        (["--image_folder", tmp_path / "none", "--gt_npy", gt_npy], "--image_folder"),
    ]
    for extra, needle in cases:
        rc, _, err = _run(test_id.main, [*TINY, "--outdir", tmp_path / "o", *face_flags, *extra], capsys)
        assert rc == 2 and needle in err and err.startswith("test_id.py: error:"), (extra, err)
        assert not (tmp_path / "o" / "images").exists()


def test_test_id_refuses_ground_truth_of_another_backend_before_generating(tmp_path, capsys, face_flags, backend,
                                                                           embedding):
    rng = np.random.default_rng(0)
    save_ground_truth({"Tom Hanks": rng.standard_normal(128)}, tmp_path / "dlib.npy", tmp_path / "dlib_names.txt")
    out = tmp_path / "id"
    argv = [*TINY, "--embedding", embedding, "--gt_npy", tmp_path / "dlib.npy", "--outdir", out, *face_flags]
    rc, _, err = _run(test_id.main, argv, capsys)
    assert rc == 2 and err.startswith("test_id.py: error: --gt_npy") and "Traceback" not in err, err
    assert "128-d" in err and "512-d" in err and "128-d is dlib" in err and "--face_backend" in err
    assert not out.exists()  # refused before the SD model was loaded or any image made
    assert backend.embedding_dim == 512  # asked from the pack's recogniser


def test_test_id_template_sets_are_scored_and_reported_per_set(tmp_path, capsys, face_flags, embedding, gt_files):
    gt_npy, _ = gt_files
    held = tmp_path / "held_out.txt"
    held.write_text("# prompts train.py never uses\n{name} at the beach\nA painting of {name}\n")
    out = tmp_path / "id"
    argv = [*TINY, "--embedding", embedding, "--gt_npy", gt_npy, "--names", "Tom Hanks", "Ada Lovelace",
            "--n_samples", 2, "--outdir", out, *face_flags, "--prompt_templates_file", held, "--bootstrap", 200]
    rc, stdout, err = _run(test_id.main, argv, capsys)
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert list(s["template_sets"]) == ["default", "held_out"]
    sets = s["template_sets"]
    assert sets["held_out"]["templates"] == ["{name} at the beach", "A painting of {name}"]
    assert sets["default"]["modes"] == s["modes"] and "train.py" in sets["default"]["note"]
    for mode in ("with", "without"):
        for k in range(2):
            assert (out / "template_sets" / "held_out" / "images" / mode / f"Ada Lovelace-{k}.png").is_file()
        entry = sets["held_out"]["modes"][mode]
        assert entry["n_images"] == 4 and set(entry["ci95"]) >= {"mean_of_mean", "mean_of_max", "id_accuracy",
                                                                 "no_face_rate", "mean_sim_faces"}
        assert "ci95" in sets["held_out"]["vs_default"][mode]
    assert (out / "template_sets" / "held_out" / "identity_with.csv").is_file()
    assert "ci95" in sets["held_out"]["with_vs_without"] and s["with_vs_without"] is not None
    assert "template set 'held_out' (2 templates):" in stdout and "n/id" in stdout
    report = (out / "report.md").read_text()
    assert "## Template set `held_out`" in report and "- `{name} at the beach`" in report
    # The same seeds in every set: only the prompt differs, so image k of a set differs from the default's.
    a = np.asarray(Image.open(out / "images" / "without" / "Ada Lovelace-1.png"), dtype=int)
    b = np.asarray(Image.open(out / "template_sets" / "held_out" / "images" / "without" / "Ada Lovelace-1.png"),
                   dtype=int)
    assert a.shape == b.shape and np.abs(a - b).mean() > 0
    # Rescoring the outdir finds the sets again and gives the same numbers.
    again = tmp_path / "again"
    rc, _, err = _run(test_id.main, ["--image_folder", out, "--gt_npy", gt_npy, "--outdir", again, *face_flags,
                                     "--bootstrap", 200], capsys)
    assert rc == 0, err
    s2 = json.loads((again / "summary.json").read_text())
    for name in ("default", "held_out"):
        for mode in ("with", "without"):
            assert s2["template_sets"][name]["modes"][mode]["mean_of_mean"] == pytest.approx(
                sets[name]["modes"][mode]["mean_of_mean"])
            assert s2["template_sets"][name]["modes"][mode]["ci95"] == sets[name]["modes"][mode]["ci95"]


def test_test_id_bootstrap_flags(tmp_path, capsys, face_flags):
    """--bootstrap N resamples, --bootstrap_seed makes the intervals repeatable, --bootstrap_level two_level."""
    ref, images = tmp_path / "ref", tmp_path / "images"
    ref.mkdir()
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ref / f"P{i}-0.png")
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"P{i}-{k}.png")

    def ci(*extra):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        rc, _, err = _run(test_id.main, ["--image_folder", images, "--gt_folder", ref, "--outdir", out, *face_flags,
                                         *extra], capsys)
        assert rc == 0, err
        s = json.loads((out / "summary.json").read_text())
        return s["modes"]["images"]["ci95"]["mean_of_mean"], s["bootstrap"]

    a, boot = ci("--bootstrap", 300, "--bootstrap_seed", 5)
    assert boot == {"resamples": 300, "level": "identities", "seed": 5, "unit": "identities",
                    "interval": "95 % percentile"}
    assert ci("--bootstrap", 300, "--bootstrap_seed", 5)[0] == a
    assert ci("--bootstrap", 300, "--bootstrap_seed", 6)[0] != a
    two, boot = ci("--bootstrap", 300, "--bootstrap_seed", 5, "--bootstrap_level", "two_level")
    assert boot["level"] == "two_level" and two != a


def test_test_id_scores_only_its_own_images_and_warns_about_stale_ones(tmp_path, capsys, face_flags, gt_files):
    gt_npy, _ = gt_files
    out = tmp_path / "id"
    folder = out / "images" / "without"
    folder.mkdir(parents=True)
    for k in (1, 5):  # an earlier run with --n_samples 6
        Image.open(TOM_HANKS).convert("RGB").save(folder / f"Tom Hanks-{k}.png")
    argv = [*TINY, "--mode", "without", "--gt_npy", gt_npy, "--names", "Tom Hanks", "--n_samples", 1,
            "--outdir", out, *face_flags]
    rc, stdout, err = _run(test_id.main, argv, capsys)
    assert rc == 0, err
    assert "warning: 2 images in" in stdout and "not part of this run" in stdout and "--image_folder" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["modes"]["without"]["n_images"] == 1
    assert sorted(Path(p).name for p in summary["stale_files"]["without"]) == ["Tom Hanks-1.png", "Tom Hanks-5.png"]
    assert "images from earlier runs left in --outdir (not scored): 2" in stdout
    assert (folder / "Tom Hanks-5.png").is_file()  # the user's files are never deleted
    rows = list(csv.DictReader((out / "identity_without.csv").open()))
    assert rows[0]["n_images"] == "1"


# ------------------------------------------------------------------------------------------------ test_fid_clip_score
@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    return save_tiny_clip_weights(tmp_path_factory.mktemp("clip"))  # also registers the tiny config with open_clip


@pytest.fixture()
def tiny_fid(monkeypatch):
    """FID on TinyFeatures instead of the 2048-d Inception network (whose weights cannot be downloaded here);
    returns the list of `antialias` values the script asked for."""
    real = run_quality.build_fid
    asked: list = []

    def fake(feature, weights, device="cpu", antialias=None):
        asked.append(antialias)
        return real(TinyFeatures(), None, device)

    monkeypatch.setattr(run_quality, "build_fid", fake)
    return asked


def test_fid_clip_score_end_to_end(tmp_path, capsys, embedding, clip_weights, tiny_fid):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A man riding a wave.\n\nalz A woman holding an umbrella.\nTwo people on a bench.\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, color in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (64, 64), color).save(ref / f"{i}.png")
    Image.open(GROUP_PHOTO).save(ref / "people.jpg")
    (ref / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "q"
    argv = [*TINY, "--embedding", embedding, "--prompts_file", prompts, "--n_samples", 1, "--batch_size", 2,
            "--outdir", out, "--clip_model", "apl-tiny-clip", "--clip_pretrained", clip_weights, "--fid_ref", ref]
    rc, stdout, err = _run(test_fid_clip_score.main, argv, capsys)
    assert rc == 0, err
    assert "CLIP score with" in stdout and "FID without_vs_with" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 3 and summary["fid_ref"]["images"] == 4 and summary["fid_ref"]["unreadable"] == 1
    rows = list(csv.DictReader((out / "clip_scores.csv").open()))
    assert len(rows) == 6
    # Prompts: the prefix in front once (never twice), the CLIP text always without it, seeds paired across modes.
    by = {(r["mode"], int(r["prompt_index"]), int(r["sample"])): r for r in rows}
    assert by[("with", 1, 0)]["prompt"] == "alz A woman holding an umbrella."
    assert by[("without", 1, 0)]["prompt"] == by[("with", 1, 0)]["clip_text"] == "A woman holding an umbrella."
    assert by[("with", 0, 0)]["prompt"] == "alz A man riding a wave."
    assert by[("with", 2, 0)]["seed"] == str(image_seed("quality", 2238, "2", 0))
    assert all(by[("with", i, 0)]["seed"] == by[("without", i, 0)]["seed"] for i in range(3))

    # Recompute CLIP cosines and FIDs from the saved (lossless) images.
    scorer = ClipScorer("apl-tiny-clip", str(clip_weights))
    images = {m: [Image.open(out / by[(m, i, 0)]["file"]).convert("RGB") for i in range(3)]
              for m in ("with", "without")}
    for mode in ("with", "without"):
        texts = [by[(mode, i, 0)]["clip_text"] for i in range(3)]
        cos = scorer.score(images[mode], texts)
        stored = [float(by[(mode, i, 0)]["clip_cosine"]) for i in range(3)]
        np.testing.assert_allclose(stored, cos, atol=1e-5)
        assert summary["clip"][mode]["clip_cosine_mean"] == pytest.approx(float(np.mean(cos)), abs=1e-5)
    fid = build_fid(TinyFeatures())
    assert summary["fid"]["without_vs_with"] == pytest.approx(fid_between(fid, images["without"], images["with"]),
                                                              rel=1e-4, abs=1e-6)
    assert summary["fid"]["ref_vs_with"] == pytest.approx(fid_between(fid, load_image_folder(ref), images["with"]),
                                                          rel=1e-4)
    assert summary["fid"]["ref_vs_with"] > summary["fid"]["without_vs_with"]
    assert summary["fid_antialias"] is True and tiny_fid == [True]  # torchmetrics' default, recorded
    # The paired distance: |with - without| of the same seed, per pixel in [0, 1], recomputed from the PNGs.
    mae = [np.abs(np.asarray(images["with"][i], np.float32) - np.asarray(images["without"][i], np.float32)).mean()
           / 255 for i in range(3)]
    assert [float(by[("with", i, 0)]["pair_pixel_mae"]) for i in range(3)] == pytest.approx(mae, abs=1e-6)
    assert summary["paired"]["n"] == 3 and summary["paired"]["pixel_mae_mean"] == pytest.approx(np.mean(mae))
    assert summary["paired"]["pixel_mae_mean"] > 0  # the strong random prefix does move the tiny model's images
    assert "mean absolute pixel difference" in stdout
    # Independent seeds for the with/without comparison, and the same-model floor beside it; KID with its spread.
    indep = [Image.open(p).convert("RGB") for p in sorted((out / "images" / "without_independent").glob("*.png"))]
    assert len(indep) == 3 and not any(np.array_equal(np.asarray(a), np.asarray(b))
                                       for a, b in zip(indep, images["without"], strict=True))
    assert summary["fid"]["without_independent_vs_with"] == pytest.approx(
        fid_between(fid, indep, images["with"]), rel=1e-4, abs=1e-6)
    assert set(summary["fid"]) == set(summary["kid"]) == set(summary["fid_n"]) == {
        "ref_vs_with", "ref_vs_without", "without_vs_with", "without_independent_vs_with",
        "without_vs_without_independent"}
    kid = summary["kid"]["without_independent_vs_with"]
    assert kid["subset_size"] == 2 and kid["subsets"] == 100 and kid["kid_interval95"][0] <= kid["kid_mean"]
    assert summary["fid_n"]["ref_vs_with"] == [4, 3] and summary["fid_feature_dim"] == 8
    assert "fid_small_n" in {w["code"] for w in summary["warnings"]} and "WARNING [fid_small_n]" in stdout
    # 95 % bootstrap intervals over prompts, around the point values.
    for mode in ("with", "without"):
        lo, hi = summary["clip"][mode]["ci95"]["clip_score"]
        assert lo <= summary["clip"][mode]["clip_score"] <= hi
    lo, hi = summary["paired"]["ci95"]["pixel_mae_mean"]
    assert lo <= summary["paired"]["pixel_mae_mean"] <= hi
    assert summary["bootstrap"] == {"resamples": 1000, "level": "identities", "seed": 0, "unit": "prompts",
                                    "interval": "95 % percentile"}
    assert summary["clip"]["with_minus_without"]["ci95"] is not None
    assert summary["settings"]["independent_set"] is True and summary["settings"]["embedding"] == str(embedding)


def test_fid_feature_plugin_is_used(tmp_path, capsys, embedding):
    """--fid_feature package.module:factory: FID on the plug-in's features (no Inception weights needed)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("A man.\nA woman.\nA dog.\n")
    out = tmp_path / "q"
    argv = [*TINY, "--embedding", embedding, "--prompts_file", prompts, "--n_samples", 1, "--skip_clip",
            "--no-independent_set", "--kid_subsets", 7, "--kid_subset_size", 1000, "--bootstrap", 0,
            "--fid_feature", "eval_stand_ins:TinyFeatures", "--outdir", out]
    rc, stdout, err = _run(test_fid_clip_score.main, argv, capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fid_feature"] == "eval_stand_ins:TinyFeatures" and "FID features: eval_stand_ins" in stdout
    # --no-independent_set: only the same-seed comparison; KID over 7 subsets of (capped) 1 of 3 -> 2 images.
    assert list(summary["fid"]) == ["without_vs_with"] and not (out / "images" / "without_independent").exists()
    assert summary["kid"]["without_vs_with"]["subsets"] == 7 and summary["kid"]["without_vs_with"]["subset_size"] == 2
    assert summary["bootstrap"] == {"resamples": 0} and "ci95" not in summary["paired"]
    assert "pass --independent_set" in stdout
    rows = list(csv.DictReader((out / "clip_scores.csv").open()))
    images = {m: [Image.open(out / r["file"]).convert("RGB") for r in rows if r["mode"] == m] for m in ("with",
                                                                                                     "without")}
    expected = fid_between(build_fid(TinyFeatures()), images["without"], images["with"])
    assert summary["fid"]["without_vs_with"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    rc, _, err = _run(test_fid_clip_score.main, [*argv[:-1], tmp_path / "q2", "--fid_feature", "nope_mod:f"], capsys)
    assert rc == 2 and "--fid_feature 'nope_mod:f': cannot import nope_mod" in err


def test_fid_clip_refuses_a_set_of_flat_images(tmp_path, capsys, monkeypatch, embedding):
    """Images that are all one colour (what NaN latents decode to) give no CLIP score or FID, whatever made them."""
    real = run_quality.generate

    def black_with(gen, jobs, **kw):
        done = real(gen, jobs, **kw)
        if "with" in kw.get("desc", ""):
            for job in jobs:
                kw["on_image"](job, Image.new("RGB", (64, 64)))
        return done

    monkeypatch.setattr(run_quality, "generate", black_with)
    prompts = tmp_path / "p.txt"
    prompts.write_text("A man.\nA woman.\n")
    out = tmp_path / "q"
    rc, _, err = _run(test_fid_clip_score.main, [*TINY, "--embedding", embedding, "--prompts_file", prompts,
                                                 "--skip_clip", "--skip_fid", "--outdir", out], capsys)
    assert rc == 2 and "every one of the 8 images of 'with' is one flat colour" in err and "Traceback" not in err
    assert not (out / "summary.json").exists()


def test_fid_antialias_flag_is_passed_on_and_recorded(tmp_path, capsys, tiny_fid):
    prompts = tmp_path / "p.txt"
    prompts.write_text("A man.\nA woman.\n")
    out = tmp_path / "q"
    argv = [*TINY, "--mode", "without", "--prompts_file", prompts, "--outdir", out, "--skip_clip",
            "--fid_ref", tmp_path / "ref", "--no-fid_antialias"]
    (tmp_path / "ref").mkdir()
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (32, 32), color).save(tmp_path / "ref" / f"{i}.png")
    rc, stdout, err = _run(test_fid_clip_score.main, argv, capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert tiny_fid == [False] and summary["fid_antialias"] is False and summary["settings"]["fid_antialias"] is False
    assert "antialias=False" in stdout
    assert test_fid_clip_score.build_parser().parse_args([]).fid_antialias is None  # unset: torchmetrics' default


def test_fid_clip_missing_weights_fail_before_generation(tmp_path, capsys, monkeypatch, clip_weights):
    monkeypatch.delenv("APL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = tmp_path / "p.txt"
    prompts.write_text("A man.\nA woman.\n")
    out = tmp_path / "q"
    base = [*TINY, "--mode", "without", "--prompts_file", prompts, "--outdir", out]
    # CLIP weights that are not on this machine.
    rc, _, err = _run(test_fid_clip_score.main, [*base, "--clip_model", "ViT-B-32", "--clip_pretrained",
                                                 "laion2b_s34b_b79k", "--skip_fid"], capsys)
    assert rc == 2 and err.startswith("test_fid_clip_score.py: error: CLIP-score weights for ViT-B-32")
    assert "--clip_pretrained /path/to/file" in err and "Traceback" not in err
    # Inception weights for FID against real photos.
    ref = tmp_path / "ref"
    ref.mkdir()
    rc, _, err = _run(test_fid_clip_score.main, [*base, "--skip_clip", "--fid_ref", ref], capsys)
    assert rc == 2 and INCEPTION_FILE in err and "--inception_weights" in err and "$APL_INCEPTION_WEIGHTS" in err
    assert not out.exists()


def test_fid_clip_bad_inputs(tmp_path, capsys, clip_weights, tiny_fid, embedding):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    indexed_empty = tmp_path / "indexed.txt"
    indexed_empty.write_text("1 \n2\n")
    one = tmp_path / "one.txt"
    one.write_text("A man.\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "bad.png").write_bytes(b"x")
    clip = ["--clip_model", "apl-tiny-clip", "--clip_pretrained", clip_weights]
    cases = [
        (["--prompts_file", empty, "--mode", "without"], "has no captions"),
        (["--prompts_file", indexed_empty, "--mode", "without"], "only empty captions"),
        (["--prompts_file", tmp_path / "none.txt", "--mode", "without"], "cannot be read"),
        (["--prompts_file", one, "--mode", "with"], "needs --embedding"),
        (["--prompts_file", one, "--mode", "both", "--embedding", embedding, "--n_samples", "1", *clip],
         "at least 2 generated images"),
        (["--prompts_file", one, "--mode", "with", "--embedding", tmp_path / "x.pt"], "--embedding"),
        (["--prompts_file", one, "--mode", "without", "--fid_ref", ref, "--n_samples", "2", *clip],
         "0 readable images (1 unreadable)"),
        (["--prompts_file", one, "--mode", "without", "--fid_ref", tmp_path / "none", "--n_samples", "2", *clip],
         "--fid_ref"),
        (["--prompts_file", one, "--mode", "without", "--clip_model", "no-such-model"], "Unknown open_clip model"),
    ]
    for extra, needle in cases:
        out = tmp_path / "q"
        rc, _, err = _run(test_fid_clip_score.main, [*TINY, "--outdir", out, *extra], capsys)
        assert rc == 2 and needle in err and err.startswith("test_fid_clip_score.py: error:"), (extra, err)
        assert not out.exists()


def test_seed_and_prefix_helpers():
    assert with_prefix("A photo of Tom", "alz") == "alz A photo of Tom"
    assert with_prefix("alz A photo of Tom", "alz") == "alz A photo of Tom"
    assert with_prefix("A photo of Alz, smiling", "alz") == "A photo of Alz, smiling"
    assert with_prefix("waltz at night", "alz") == "alz waltz at night"
    # Spaced punctuation (COCO captions) is not mistaken for an existing placeholder.
    assert with_prefix("A man riding a horse .", "alz") == "alz A man riding a horse ."
    assert with_prefix("Two people , one dog", "alz") == "alz Two people , one dog"
    assert with_prefix("A horse ridden by ALZ .", "alz") == "A horse ridden by ALZ ."
    assert image_seed("test_id", 2238, "Tom Hanks", 0) != image_seed("test_id", 2238, "Emma Watson", 0)


def test_image_seeds_are_hashed_per_domain():
    import hashlib

    expected = int.from_bytes(hashlib.sha256(b"test_id/2238/Tom Hanks/1").digest()[:8], "big") >> 1
    assert image_seed("test_id", 2238, "Tom Hanks", 1) == expected < 2**63
    # Seed s+1 shares no start code with seed s (base + offset + k reused 3 of 4).
    for domain in ("test_id", "dataset", "quality"):
        a = {image_seed(domain, 2238, "Tom Hanks", k) for k in range(4)}
        b = {image_seed(domain, 2239, "Tom Hanks", k) for k in range(4)}
        assert len(a) == 4 and not a & b, domain
    # test_id's image k of a person never starts from the noise of the face-set image k (same default --seed).
    names = ["Tom Hanks", "Ada Lovelace"]
    test_seeds = {j.seed for jobs in plan_images(names, ["without"], 4, 2238, "A portrait of {name}", None,
                                                 Path("o"))["without"].values() for j in jobs}
    face_seeds = {j.seed for j in plan_dataset(names, 100, Path("f"), 2238, [])}
    assert len(test_seeds) == 8 and not test_seeds & face_seeds
    quality = {r[0].seed for r in run_quality.plan_quality(["A man.", "A woman."], ["without"], 4, 2238, None,
                                                           Path("q"))["without"]}
    assert len(quality) == 8 and not quality & (test_seeds | face_seeds)
    assert not quality & {r[0].seed for r in run_quality.plan_quality(["A man.", "A woman."], ["without"], 4, 2239,
                                                                      None, Path("q"))["without"]}
    with pytest.raises(ValueError, match="seed domain"):
        image_seed("train", 1, "x", 0)


def test_parsers_document_every_flag():
    for module in (test_id, test_fid_clip_score):
        parser = module.build_parser()
        for action in parser._actions:
            assert action.help, (module.__name__, action.option_strings)
        text = parser.format_help()  # renders: a stray '%' in a help string would break --help
        assert "--bootstrap" in text and "95 % bootstrap" in text
    args = test_id.build_parser().parse_args([])
    assert (args.n_samples, args.seed, args.steps, args.scale, args.prompt_template) == (
        4, 2238, 20, 7.0, "A close-up portrait of {name}")
    args = test_fid_clip_score.build_parser().parse_args([])
    assert (args.clip_model, args.clip_pretrained, args.prompts_file) == (
        "ViT-g-14", "laion2b_s34b_b88k", "prompts_person.txt")
