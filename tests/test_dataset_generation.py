"""dataset_generation.py: reproducible prompts and seeds, resuming, ground truth, and its error messages."""

from __future__ import annotations

import hashlib
import io
import json
import random

import numpy as np
import pytest
from eval_stand_ins import TOM_HANKS, write_tiny_insightface_pack
from PIL import Image

import dataset_generation
from apl.dataset_gen import MANIFEST, SETTINGS_LINE, ground_truth_from_images, identity_prompt, plan_dataset
from apl.datasets import scan_face_folder
from apl.eval.faces import make_backend
from apl.eval.generation import image_seed
from apl.eval.id_metrics import load_ground_truth
from apl.eval.images import LoadReport, load_image_rgb
from apl.images import SkipReport
from apl.people import PREFIXES
from apl.runtime import TINY_CONFIG

TEMPLATES = ["smiling in a park", "wearing a hat"]


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    write_tiny_insightface_pack(root, pack="tiny_pack")
    return root


def _tiny_args(outdir, *extra):
    return ["--config_path", str(TINY_CONFIG), "--steps", "1", "--outdir", str(outdir), *extra]


def test_prompts_are_reproducible_and_half_prefixed_half_templated():
    prompts = [identity_prompt("Tom Hanks", k, 7, TEMPLATES) for k in range(400)]
    assert prompts == [identity_prompt("Tom Hanks", k, 7, TEMPLATES) for k in range(400)]  # same (name, k): same
    assert prompts != [identity_prompt("Tom Hanks", k, 8, TEMPLATES) for k in range(400)]  # the seed matters
    with_pre = sum(not p.startswith("Tom Hanks") for p in prompts)
    with_post = sum(p.endswith(tuple(TEMPLATES)) for p in prompts)
    # Each is a coin flip per image: 400 flips land within 200 +- 50 (5 standard deviations).
    assert 150 < with_pre < 250 and 150 < with_post < 250
    for p in prompts:
        pre, _, rest = p.partition("Tom Hanks")
        assert pre in PREFIXES and rest in ("", *(" " + t for t in TEMPLATES))
    assert identity_prompt("Tom Hanks", 3, 7, []) in [p + "Tom Hanks" for p in PREFIXES]


def test_plan_names_files_for_the_face_set(tmp_path):
    jobs = plan_dataset(["Tom Hanks", "Jean-Claude Van Damme"], 3, tmp_path, 5, TEMPLATES)
    assert [j.path.name for j in jobs][:4] == ["Tom Hanks-0.png", "Tom Hanks-1.png", "Tom Hanks-2.png",
                                               "Jean-Claude Van Damme-0.png"]
    assert jobs[4].seed == image_seed("dataset", 5, "Jean-Claude Van Damme", 1)
    assert len({j.seed for j in jobs}) == 6
    assert not {j.seed for j in jobs} & {j.seed for j in plan_dataset(["Tom Hanks"], 3, tmp_path, 6, TEMPLATES)}


def test_generate_resume_and_ground_truth(tmp_path, pack_root, capsys):
    people = tmp_path / "people.tsv"
    people.write_text("# two people\nAda Lovelace\tA female person, dark hair.\nJean-Claude Van Damme\tA man.\n")
    out, gt = tmp_path / "faces", tmp_path / "gt.npy"
    face_flags = ["--insightface_pack", "tiny_pack", "--insightface_root", str(pack_root)]
    rc = dataset_generation.main(_tiny_args(out, "--people_file", str(people), "--n_samples", "2", "--batch_size",
                                            "2", "--gt_npy", str(gt), *face_flags))
    assert rc == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == sorted(f"{n}-{k}.png" for n in ("Ada Lovelace", "Jean-Claude Van Damme") for k in range(2))
    # train.py's scanner takes the folder as is: every image, the right person, nothing skipped.
    report = SkipReport()
    samples = scan_face_folder(out, {"Ada Lovelace": "x", "Jean-Claude Van Damme": "y"}, report)
    assert len(samples) == 4 and report.count == 0
    assert {s.name for s in samples} == {"Ada Lovelace", "Jean-Claude Van Damme"}
    manifest = (out / MANIFEST).read_text().splitlines()
    assert manifest[0].startswith(SETTINGS_LINE) and manifest[1] == "file\tseed\tprompt" and len(manifest) == 6
    settings = json.loads(manifest[0][len(SETTINGS_LINE):])
    assert (settings["seed"], settings["steps"], settings["scale"]) == (2238, 1, 7.0)
    assert "blurry" in settings["negative_prompt"] and settings["config"] == "tiny-sd.yaml"
    row = manifest[2].split("\t")
    assert row[:2] == ["Ada Lovelace-0.png", str(image_seed("dataset", 2238, "Ada Lovelace", 0))]

    # Ground truth = normalised mean of each person's face embeddings, in the group format test_id.py reads; the
    # names file is linked to this .npy by its digest and says which backend made it.
    header = (tmp_path / "gt_names.txt").read_text().splitlines()[0]
    assert header.startswith("# apl-ground-truth v1 npy_sha256=") and header.endswith("backend=insightface")
    assert f"npy_sha256={hashlib.sha256(gt.read_bytes()).hexdigest()}" in header
    loaded = load_ground_truth(gt, tmp_path / "gt_names.txt")
    assert list(loaded) == ["Ada Lovelace", "Jean-Claude Van Damme"]
    backend = make_backend("insightface", pack="tiny_pack", root=str(pack_root))
    embs = [backend.embed(load_image_rgb(out / f"Ada Lovelace-{k}.png")) for k in range(2)]
    mean = np.mean(embs, axis=0)
    np.testing.assert_allclose(loaded["Ada Lovelace"], mean / np.linalg.norm(mean), atol=1e-5)

    # Resume: finished images are kept byte for byte; a deleted one comes back identical, whatever the batch size.
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "Ada Lovelace-1.png").unlink()
    capsys.readouterr()
    rc = dataset_generation.main(_tiny_args(out, "--people_file", str(people), "--n_samples", "3",
                                            "--batch_size", "1"))
    assert rc == 0
    assert "3 images generated, 3 already there" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == 6
    redone = before.pop("Ada Lovelace-1.png")
    for name, data in before.items():
        assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == stamps[name], name
    # Same seed and prompt; batch 1 instead of 2 only changes float rounding (a few pixels by 1 level).
    old = np.asarray(Image.open(io.BytesIO(redone)), dtype=int)
    new = np.asarray(Image.open(out / "Ada Lovelace-1.png"), dtype=int)
    assert np.abs(old - new).max() <= 2 and (old != new).mean() < 0.01
    assert (out / "Ada Lovelace-2.png").is_file()


def test_rerun_with_other_settings_is_refused_not_mixed(tmp_path, capsys):
    out = tmp_path / "faces"
    base = ["--names", "Tom Hanks", "--n_samples", "1"]
    assert dataset_generation.main(_tiny_args(out, *base)) == 0
    manifest = (out / MANIFEST).read_text()
    before = (out / "Tom Hanks-0.png").read_bytes()
    capsys.readouterr()
    for extra, needle in [
        (["--seed", "7"], "seed: 2238 -> 7"),
        (["--steps", "2"], "steps: 1 -> 2"),
        (["--negative_prompt", ""], "negative_prompt: 'blurry"),
        (["--scale", "3"], "scale: 7.0 -> 3.0"),
        (["--templates_file", ""], "templates_sha256"),
    ]:
        rc = dataset_generation.main(_tiny_args(out, *base, "--n_samples", "2", *extra))  # later flags win
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("dataset_generation.py: error: --outdir") and needle in err, (extra, err)
        assert "new --outdir" in err and "Traceback" not in err
        assert not (out / "Tom Hanks-1.png").exists()  # nothing generated into the old set
        assert (out / MANIFEST).read_text() == manifest and (out / "Tom Hanks-0.png").read_bytes() == before
    # The same settings resume; once the old images are gone, new settings start a new set there.
    assert dataset_generation.main(_tiny_args(out, *base, "--n_samples", "2")) == 0
    assert (out / "Tom Hanks-1.png").is_file()
    for png in out.glob("*.png"):
        png.unlink()
    assert dataset_generation.main(_tiny_args(out, *base, "--seed", "7")) == 0
    assert json.loads((out / MANIFEST).read_text().splitlines()[0][len(SETTINGS_LINE):])["seed"] == 7


def test_images_without_or_with_an_old_manifest_are_refused(tmp_path, capsys):
    out = tmp_path / "faces"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "Tom Hanks-0.png")
    rc = dataset_generation.main(_tiny_args(out, "--names", "Tom Hanks", "--n_samples", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "but no .dataset_generation.tsv" in err and "new --outdir" in err, err
    # A manifest of the earlier layout (no settings; seeds were base + offset + k) is another seed scheme.
    (out / MANIFEST).write_text("file\tseed\tprompt\nTom Hanks-0.png\t123\tTom Hanks\n")
    rc = dataset_generation.main(_tiny_args(out, "--names", "Tom Hanks", "--n_samples", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "settings: not recorded" in err, err
    assert not (out / "Tom Hanks-1.png").exists()


def test_ground_truth_counts_faceless_and_unreadable_images(tmp_path, pack_root):
    backend = make_backend("insightface", pack="tiny_pack", root=str(pack_root))
    face = tmp_path / "face.png"
    Image.open(TOM_HANKS).convert("RGB").save(face)
    black = tmp_path / "black.png"
    Image.new("RGB", (64, 64)).save(black)  # the tiny detector finds no face in a black image
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    report = LoadReport()
    gt = ground_truth_from_images({"A": [face, black, broken], "B": [black]}, backend, report)
    assert list(gt) == ["A"]
    np.testing.assert_allclose(gt["A"], backend.embed(load_image_rgb(face)), atol=1e-6)
    assert (report.loaded, len(report.no_face), len(report.unreadable)) == (3, 2, 1)
    assert report.empty_identities == ["B"]


def test_missing_pack_fails_before_generation(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("INSIGHTFACE_HOME", raising=False)
    out = tmp_path / "faces"
    rc = dataset_generation.main(_tiny_args(out, "--names", "Tom Hanks", "--n_samples", "1", "--gt_npy",
                                            str(tmp_path / "gt.npy"), "--insightface_root", str(tmp_path / "none")))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("dataset_generation.py: error: InsightFace model pack 'buffalo_l' not found")
    assert "--insightface_root" in err and "Traceback" not in err
    assert not out.exists()  # nothing was generated


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--names", "a/b"], "cannot be a file name"),
        (["--people_file", "missing.tsv"], "people file missing.tsv cannot be read"),
        (["--names", "X", "--templates_file", "nope.txt"], "templates file nope.txt cannot be read"),
        (["--names", "X", "--config_path", "nope.yaml"], "--config_path nope.yaml does not exist"),
    ],
)
def test_bad_input_messages(tmp_path, capsys, argv, needle):
    out = tmp_path / "faces"
    rc = dataset_generation.main(["--steps", "2", "--outdir", str(out), "--config_path", str(TINY_CONFIG), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.startswith("dataset_generation.py: error:"), err
    assert not list(out.glob("*.png")) if out.exists() else True


def test_help_has_every_flag_documented():
    parser = dataset_generation.build_parser()
    args = parser.parse_args([])
    assert (args.n_samples, args.steps, args.scale, args.people_file) == (100, 20, 7.0, "people.tsv")
    assert "blurry" in args.negative_prompt
    for action in parser._actions:
        assert action.help, action.option_strings
    assert not hasattr(args, "clip_model") and not hasattr(args, "embedding")


def test_random_module_state_is_not_used():
    # identity_prompt must not depend on (or disturb) the global random state.
    random.seed(1)
    a = identity_prompt("X", 0, 0, TEMPLATES)
    random.seed(2)
    assert identity_prompt("X", 0, 0, TEMPLATES) == a
