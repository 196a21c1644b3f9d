"""Bad inputs to the evaluation scripts, run as a user runs them, one case per row of a table.

Each error case must end with exit code 2, exactly one line on stderr that starts with '<script>: error:' and holds
the expected words, and no traceback. Each warning case must finish (exit 0) and flag the result in the console, in
summary.json["warnings"] (by code) and in report.md. The classes follow issue 17: 1 numbers, 6 mismatched companions,
8 cut prompts, 9 flattering metrics, 10 what a new user trips over, plus 'other' cases found on the way.

Flag errors return before torch is imported, so they run as subprocesses (`python test_id.py ...`, ~0.1 s each); of
the cases that load models, one or two per class run as subprocesses too and the rest call the script's main() in
this process (the same code path, without paying 3-5 s of imports per case). They use the tiny random model, the toy
world's recogniser (toyworld.perception:ToyFaceBackend) and toy reference photos, a few images each.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apl.eval.gt_files import save_ground_truth
from apl.runtime import TINY_CONFIG
from ldm.modules.embedding_manager import EmbeddingManager
from toyworld.perception import ToyFaceBackend
from toyworld.render import random_scene, render_scene
from toyworld.world import load_named_people, reference_photos

ROOT = Path(__file__).resolve().parents[1]
TOY = "toyworld.perception:ToyFaceBackend"
TINY = ["--config_path", str(TINY_CONFIG), "--steps", "1", "--n_samples", "1", "--bootstrap", "50"]
NAMES = list(load_named_people())[:3]


def run(script: str, argv: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """python <script> <argv> from the repository root, as a user runs it (tests/ on the path for stand-ins)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"  # library deprecation notices are not our messages
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, script, *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_here(script: str, argv: list) -> subprocess.CompletedProcess:
    """The script's main(argv) in this process, with what it prints and its exit code, like run()."""
    main = importlib.import_module(script[: -len(".py")]).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own exit
            rc = e.code
    return subprocess.CompletedProcess([script, *argv], rc, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, script: str, needles: tuple[str, ...]) -> str:
    """Exit 2, one stderr line '<script>: error: ...' holding every needle, no traceback; returns the line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:], proc.stdout[-1000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """Every file the cases need, made once: ground truth pairs, broken .npy files, image folders, prefixes."""
    d = tmp_path_factory.mktemp("bad_inputs")
    people = load_named_people()
    backend = ToyFaceBackend()
    refs, photos = d / "refs", {}
    for name, k, image in reference_photos({n: people[n] for n in NAMES}, 2, seed=0):
        _save(image, refs / f"{name}-{k}.png")
        photos[(name, k)] = image
    gt = {}
    for name in NAMES:
        embs = [backend.embed(np.asarray(photos[(name, k)])) for k in range(2)]
        mean = np.mean(embs, axis=0)
        gt[name] = mean / np.linalg.norm(mean)
    save_ground_truth(gt, d / "gt.npy", d / "gt_names.txt", backend="toy")
    # Class 6: a names file of three other people, linked to its own .npy (same row count as gt.npy).
    other = {f"Other Person {i}": np.roll(v, 1) for i, v in enumerate(gt.values())}
    save_ground_truth(other, d / "other.npy", d / "other_names.txt", backend="toy")
    lines = (d / "gt_names.txt").read_text().splitlines()
    (d / "edited_names.txt").write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")  # rows swapped
    shutil.copy(d / "gt.npy", d / "old.npy")
    (d / "old_names.txt").write_text("\n".join(NAMES) + "\n")  # written before names files were linked
    save_ground_truth(gt, d / "dlib.npy", d / "dlib_names.txt", backend="dlib")
    # Class 1: broken ground-truth arrays (names file without header, so the array itself is what is judged).
    rows = np.stack(list(gt.values())).astype(np.float32)
    for key, array in {"nan": rows.copy(), "inf": rows.copy(), "zero": rows.copy(), "int": rows.astype(np.int64),
                       "bool": rows > 0}.items():
        if key == "nan":
            array[1, 3] = np.nan
        if key == "inf":
            array[2, 0] = np.inf
        if key == "zero":
            array[0] = 0
        np.save(d / f"{key}.npy", array)
        (d / f"{key}_names.txt").write_text("\n".join(NAMES) + "\n")
    np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "obj_names.txt").write_text("x\n")
    (d / "trunc.npy").write_bytes((d / "gt.npy").read_bytes()[:60])
    (d / "trunc_names.txt").write_text("\n".join(NAMES) + "\n")
    (d / "dupe_names.txt").write_text(f"{NAMES[0]}\n{NAMES[0]}\n{NAMES[1]}\n")
    (d / "latin1_names.txt").write_bytes("José\nMüller\nZoë\n".encode("latin-1"))
    # Class 9: image folders. Faces erased by the 'prefix' (toy scenes without a person) against reference photos.
    rng = random.Random(0)
    for name in NAMES:
        for k in range(2):
            _save(render_scene(random_scene(rng), rng), d / "erased" / "with" / f"{name}-{k}.png")
            _save(photos[(name, k)], d / "erased" / "without" / f"{name}-{k}.png")
            _save(photos[(name, k)], d / "same" / "with" / f"{name}-{k}.png")
            _save(photos[(name, k)], d / "same" / "without" / f"{name}-{k}.png")
            _save(Image.new("RGB", (64, 64)), d / "black" / "with" / f"{name}-{k}.png")
            _save(photos[(name, k)], d / "black" / "without" / f"{name}-{k}.png")
            _save(render_scene(random_scene(rng), rng), d / "noface" / f"{name}-{k}.png")
            _save(photos[(name, k)], d / "flat" / f"{name}-{k}.png")
    _save(photos[(NAMES[0], 0)], d / "flat" / "Nobody Known-0.png")  # a name without ground truth
    # Prefixes for the tiny model: an ordinary random one, NaN and huge ones.
    for key, scale in {"alz": 5.0, "nan": float("nan"), "huge": 1e30}.items():
        em = EmbeddingManager(tiny_model.cond_stage_model, ["alz"], num_vectors_per_token=4,
                              generator=torch.Generator().manual_seed(3))
        vectors = em.string_to_param_dict["alz"].detach() * scale
        # Written raw: APL itself refuses to write a broken prefix, but such files exist (other tools, damage).
        torch.save({"string_to_token": {"alz": torch.tensor(41128)}, "string_to_param": {"alz": vectors}},
                   d / f"{key}.pt")  # fmt: skip
    (d / "long.txt").write_text(" ".join(["word"] * 75) + "\n")  # 75 tokens: no room for 4 prefix vectors
    (d / "no_name.txt").write_text("# held-out templates\n{name} at the beach\nA painting of someone\n")
    (d / "held_out.txt").write_text("{name} at the beach\nA painting of {name} in a studio\n")
    return {"dir": d, "refs": refs}


@dataclass
class Case:
    """One bad input: the script, its flags ({name} fields filled from the world), and what must come out."""

    id: str
    cls: str  # issue 17 class: '1', '6', '8', '9', '10' or 'other'
    script: str
    argv: list
    needles: tuple[str, ...] = ()  # words the one error line must hold
    sub: bool = False  # run as a subprocess (always for flag errors, which cost no imports)

    def args(self, w: dict[str, Path]) -> list[str]:
        return fill(self.argv, w)


def fill(argv: list, w: dict[str, Path]) -> list[str]:
    """{d} and {refs} in flags -> the world's folders (other braces, e.g. {name} in templates, stay)."""
    return [str(a).replace("{d}", str(w["dir"])).replace("{refs}", str(w["refs"])) for a in argv]


ID = "test_id.py"
Q = "test_fid_clip_score.py"
DG = "dataset_generation.py"
GT = ["--gt_npy", "{d}/gt.npy", "--face_backend", TOY]
GEN = [*TINY, "--names", NAMES[0], "--outdir", "{d}/out_gen", *GT]
TINY_DG = ["--config_path", str(TINY_CONFIG), "--steps", "1", "--n_samples", "1"]

ERRORS = [
    # 1: numbers out of range or not finite, refused while parsing (before any model is loaded).
    Case("scale_nan", "1", ID, ["--scale", "nan"], ("--scale", "finite", "nan")),
    Case("scale_huge", "1", ID, ["--scale", "1e30"], ("--scale", "[0, 100]")),
    Case("steps_zero", "1", ID, ["--steps", "0"], ("--steps", "from 1 to 1000")),
    Case("steps_too_many", "1", ID, ["--steps", "5000"], ("--steps", "5000")),
    Case("n_samples_negative", "1", ID, ["--n_samples", "-3"], ("--n_samples",)),
    Case("batch_size_zero", "1", ID, ["--batch_size", "0"], ("--batch_size",)),
    Case("seed_negative", "1", ID, ["--seed", "-1"], ("--seed",)),
    Case("seed_too_big", "1", ID, ["--seed", str(2**64)], ("--seed",)),
    Case("seed_float", "1", ID, ["--seed", "1e3"], ("--seed", "'1e3'")),
    Case("id_threshold_out_of_range", "1", ID, ["--id_threshold", "2"], ("--id_threshold", "[-1, 1]")),
    Case("id_threshold_nan", "1", ID, ["--id_threshold", "nan"], ("--id_threshold",)),
    Case("det_thresh_one", "1", ID, ["--det_thresh", "1"], ("--det_thresh", "(0, 1)")),
    Case("det_thresh_inf", "1", ID, ["--det_thresh", "inf"], ("--det_thresh",)),
    Case("det_size_not_32", "1", ID, ["--det_size", "100"], ("--det_size", "multiple of 32", "96 or 128")),
    Case("bootstrap_negative", "1", ID, ["--bootstrap", "-1"], ("--bootstrap",)),
    Case("q_scale_inf", "1", Q, ["--scale", "inf"], ("--scale",)),
    Case("q_kid_subsets_zero", "1", Q, ["--kid_subsets", "0"], ("--kid_subsets",)),
    Case("q_n_samples_float", "1", Q, ["--n_samples", "1.5"], ("--n_samples", "'1.5'")),
    Case("dg_scale_negative", "1", DG, ["--scale", "-1"], ("--scale",)),
    Case("dg_det_size", "1", DG, ["--det_size", "33"], ("--det_size",)),
    # 1: non-finite or unusable numbers in files and from models.
    Case("gt_nan_row", "1", ID, ["--gt_npy", "{d}/nan.npy", "--face_backend", TOY, "--image_folder", "{d}/flat",
                                 "--outdir", "{d}/o1"], ("row 1", repr(NAMES[1]), "NaN")),
    Case("gt_inf_row", "1", ID, ["--gt_npy", "{d}/inf.npy", "--face_backend", TOY, "--image_folder", "{d}/flat",
                                 "--outdir", "{d}/o1"], ("row 2", "NaN or inf")),
    Case("gt_zero_row", "1", ID, ["--gt_npy", "{d}/zero.npy", "--face_backend", TOY, "--image_folder", "{d}/flat",
                                  "--outdir", "{d}/o1"], ("row 0", "all zeros")),
    Case("gt_int_dtype", "1", ID, ["--gt_npy", "{d}/int.npy", "--face_backend", TOY, "--image_folder", "{d}/flat",
                                   "--outdir", "{d}/o1"], ("int64", "floating-point")),
    Case("gt_bool_dtype", "1", ID, ["--gt_npy", "{d}/bool.npy", "--face_backend", TOY, "--image_folder", "{d}/flat",
                                    "--outdir", "{d}/o1"], ("bool",)),
    Case("gt_pickled_objects", "1", ID, ["--gt_npy", "{d}/obj.npy", "--face_backend", TOY, "--image_folder",
                                         "{d}/flat", "--outdir", "{d}/o1"], ("obj.npy", "plain numeric")),
    Case("gt_truncated", "1", ID, ["--gt_npy", "{d}/trunc.npy", "--face_backend", TOY, "--image_folder",
                                   "{d}/flat", "--outdir", "{d}/o1"], ("trunc.npy",)),
    Case("backend_nan_embedding", "1", ID, ["--gt_folder", "{refs}", "--face_backend",
                                            "eval_stand_ins:NanFaceBackend", "--id_threshold", "0.5",
                                            "--image_folder", "{d}/flat", "--outdir", "{d}/o1"],
         ("NaN or inf", ".png")),
    Case("backend_wrong_size", "1", ID, ["--gt_folder", "{refs}", "--face_backend",
                                         "eval_stand_ins:WrongSizeFaceBackend", "--id_threshold", "0.5",
                                         "--image_folder", "{d}/flat", "--outdir", "{d}/o1"], ("5-d", "6-d")),
    # A NaN or huge prefix would draw black images ("0.0 similarity"): refused when the file is read, naming it.
    Case("prefix_nan", "1", ID, [*GEN, "--embedding", "{d}/nan.pt"], ("nan.pt", "NaN or infinite")),
    Case("prefix_huge", "1", ID, [*GEN, "--embedding", "{d}/huge.pt"], ("huge.pt", "far outside any text embedding")),
    # 6: companions that do not belong together.
    Case("gt_names_of_other_npy", "6", ID, ["--gt_npy", "{d}/gt.npy", "--gt_names", "{d}/other_names.txt",
                                            "--face_backend", TOY, "--image_folder", "{d}/flat"],
         ("belongs to another embeddings file", "gt.npy", "other_names.txt")),
    Case("gt_names_edited", "6", ID, ["--gt_npy", "{d}/gt.npy", "--gt_names", "{d}/edited_names.txt",
                                      "--face_backend", TOY, "--image_folder", "{d}/flat"], ("was edited",)),
    Case("gt_of_other_backend", "6", ID, ["--gt_npy", "{d}/dlib.npy", "--face_backend", TOY, "--image_folder",
                                          "{d}/flat"], ("made with the dlib face backend", "--face_backend dlib")),
    Case("gt_duplicate_names", "6", ID, ["--gt_npy", "{d}/gt.npy", "--gt_names", "{d}/dupe_names.txt",
                                         "--face_backend", TOY, "--image_folder", "{d}/flat"], ()),
    Case("gt_names_with_gt_folder", "6", ID, ["--gt_folder", "{refs}", "--gt_names", "{d}/gt_names.txt",
                                              "--face_backend", TOY, "--image_folder", "{d}/flat"],
         ("--gt_names", "remove --gt_names")),
    Case("dg_gt_names_without_npy", "6", DG, [*TINY_DG, "--names", "X", "--gt_names", "{d}/n.txt",
                                              "--outdir", "{d}/dg"], ("--gt_names", "--gt_npy")),
    # 8: prompts the prefix would cut.
    Case("long_template", "8", ID, [*GEN, "--embedding", "{d}/alz.pt", "--prompt_template",
                                    "{name} " + "word " * 70], ("tokens", "Shorten")),
    Case("long_caption", "8", Q, [*TINY, "--embedding", "{d}/alz.pt", "--prompts_file", "{d}/long.txt",
                                  "--skip_clip", "--skip_fid", "--outdir", "{d}/q8"], ("long.txt", "tokens")),
    # 9: results a reader would misread.
    Case("all_images_black", "9", ID, [*GT, "--image_folder", "{d}/black", "--outdir", "{d}/o9"],
         ("flat colour", "'with'")),
    Case("q_prefix_black", "9", Q, [*TINY, "--embedding", "{d}/nan.pt", "--prompts_file", "{d}/held_out.txt",
                                    "--skip_clip", "--skip_fid", "--outdir", "{d}/q9"], ()),
    # 10: flags that a backend would ignore, and the advice about them.
    Case("dlib_det_thresh", "10", ID, ["--face_backend", "dlib", "--det_thresh", "0.3", "--gt_folder", "{refs}",
                                       "--image_folder", "{d}/flat"], ("--det_thresh 0.3", "dlib", "remove")),
    Case("dlib_det_size", "10", ID, ["--face_backend", "dlib", "--det_size", "320", "--gt_folder", "{refs}",
                                     "--image_folder", "{d}/flat"], ("--det_size 320",)),
    Case("plugin_det_size", "10", ID, [*GT, "--det_size", "320", "--image_folder", "{d}/flat"],
         ("--det_size 320", "no det_size setting")),
    Case("plugin_without_threshold", "10", ID, ["--gt_folder", "{refs}", "--face_backend",
                                                "eval_stand_ins:MeanColourBackend", "--image_folder", "{d}/flat"],
         ("--id_threshold",)),
    # Other cases met on the way.
    Case("template_without_name", "other", ID, [*GT, "--embedding", "{d}/alz.pt", "--prompt_templates_file",
                                                "{d}/no_name.txt"], ("no_name.txt:3", "{name}")),
    Case("templates_file_missing", "other", ID, [*GT, "--embedding", "{d}/alz.pt", "--prompt_templates_file",
                                                 "{d}/none.txt"], ("none.txt",)),
    Case("template_other_field", "other", ID, [*GT, "--embedding", "{d}/alz.pt", "--prompt_template",
                                               "{name} {age}"], ("{age}",)),
    Case("image_folder_missing", "other", ID, [*GT, "--image_folder", "{d}/nowhere"], ("--image_folder",)),
    Case("gt_npy_missing", "other", ID, ["--gt_npy", "{d}/none.npy", "--face_backend", TOY, "--image_folder",
                                         "{d}/flat"], ("none.npy",)),
    Case("unknown_backend", "other", ID, ["--face_backend", "nope"], ("--face_backend", "nope")),
    Case("q_unknown_device", "other", Q, ["--device", "foo"], ("--device", "'foo'")),  # was a RuntimeError traceback
    Case("names_not_utf8", "other", ID, ["--gt_npy", "{d}/gt.npy", "--gt_names", "{d}/latin1_names.txt",
                                         "--face_backend", TOY, "--image_folder", "{d}/flat"],
         ("latin1_names.txt", "not UTF-8")),
]


SUBPROCESS = {"gt_nan_row", "gt_names_of_other_npy", "long_template", "all_images_black", "dlib_det_thresh"}
# ^ one per class, as a user runs them; the warnings of class 9 run as a subprocess below


@pytest.mark.parametrize("case", ERRORS, ids=lambda c: c.id)
def test_bad_input_is_one_clear_error(case, world):
    as_user = case.id in SUBPROCESS or len(case.argv) <= 2  # two-item argv: a flag error, refused before imports
    proc = (run if as_user else run_here)(case.script, case.args(world))
    line = assert_one_line_error(proc, case.script, case.needles)
    if os.environ.get("APL_SHOW_ERRORS"):
        print(f"\n[{case.cls}] {case.id}: {line}")


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _codes(summary: dict) -> set[str]:
    return {w["code"] for w in summary.get("warnings", [])}


def test_faces_erased_by_the_prefix_are_flagged_everywhere(world):
    d = world["dir"]
    out = d / "o_erased"
    proc = run(ID, [*fill(GT, world), "--image_folder", d / "erased", "--outdir", out, "--bootstrap", "50"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = _summary(out)
    assert {"no_face_gap", "no_faces"} <= _codes(s)
    with_, without = s["modes"]["with"], s["modes"]["without"]
    assert with_["no_face_rate"] == 1.0 and with_["mean_of_mean"] == 0.0  # the flattering headline...
    assert with_["id_accuracy"] is None and with_["mean_sim_faces"] is None  # ...and what it really is
    assert without["no_face_rate"] == 0.0 and without["mean_sim_faces"] > 0.5
    assert "WARNING [no_face_gap with]" in proc.stdout and "WARNING [no_faces with]" in proc.stdout
    report = (out / "report.md").read_text()
    assert report.index("## Warnings") < report.index("| mode |") and "**no_face_gap**" in report


def test_prefix_that_changes_nothing_and_unlinked_ground_truth_are_flagged(world):
    d = world["dir"]
    out = d / "o_same"
    proc = run_here(ID, ["--gt_npy", d / "old.npy", "--face_backend", TOY, "--image_folder", d / "same",
                         "--outdir", out, "--bootstrap", "0"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = _summary(out)
    assert {"prefix_no_effect", "gt_unlinked", "few_identities"} <= _codes(s)
    assert s["ground_truth"]["linked"] is False
    assert "WARNING [gt_unlinked]" in proc.stdout and "ci95" not in s["modes"]["with"]


def test_image_folder_run_records_only_what_it_used(world):
    """Class 10: no checkpoint/steps/pack in an --image_folder summary; no 'images images' header; names without
    ground truth listed in summary.json and report.md; flags that do nothing are named once."""
    d = world["dir"]
    out = d / "o_flat"
    proc = run_here(ID, [*fill(GT, world), "--image_folder", d / "flat", "--outdir", out, "--steps", "30",
                         "--ckpt_path", "x.ckpt", "--bootstrap", "20"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = _summary(out)
    assert set(s["settings"]) == {"face_backend", "id_threshold", "id_threshold_given", "det_thresh", "image_folder"}
    assert s["ignored_flags"] == ["--ckpt_path", "--steps"] and "--ckpt_path, --steps ignored" in proc.stdout
    assert s["names_without_ground_truth"] == ["Nobody Known"]
    report = (out / "report.md").read_text()
    assert "images images" not in report and "| folder |" in report
    assert "Names without ground truth (not scored, 1): Nobody Known" in report
    assert "Nobody Known" in proc.stdout


def test_dataset_generation_names_the_flags_it_ignores_and_links_its_ground_truth(world):
    d = world["dir"]
    out = d / "dg_ok"
    proc = run_here(DG, [*TINY_DG, "--names", NAMES[0], "--outdir", out, "--det_thresh", "0.4",
                         "--negative_prompt", ""])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--det_thresh ignored: faces are only detected with --gt_npy" in proc.stdout


def test_quality_names_the_flags_it_ignores(world):
    d = world["dir"]
    (d / "one.txt").write_text("A dog on a beach.\n")
    out = d / "q_ignored"
    proc = run_here(Q, [*TINY, "--mode", "without", "--prompts_file", d / "one.txt", "--skip_clip", "--skip_fid",
                        "--clip_model", "ViT-B-32", "--kid_subsets", "5", "--embedding", d / "alz.pt",
                        "--outdir", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = _summary(out)
    assert s["ignored_flags"] == ["--clip_model", "--kid_subsets", "--embedding"]
    assert "--clip_model, --kid_subsets, --embedding ignored" in proc.stdout
    assert "clip_model" not in s["settings"] and "embedding" not in s["settings"]
