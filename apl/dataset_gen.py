"""Face-set generation for training: N images per name with random prompt prefixes/templates, resumable.

Image k of a name is `<outdir>/<Name>-<k>.png` (the face-set naming train.py reads). Its prompt and seed depend
only on (seed, name, k) (the seed is image_seed('dataset', seed, name, k), never one that test_id.py uses), so a
rerun makes exactly the images that are still missing, whatever the batch size. The settings that shape the images
are stored in the outdir's manifest; a rerun with other settings is refused rather than mixing two face sets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apl.eval.checks import is_blank
from apl.eval.faces import FaceBackend
from apl.eval.generation import Job, check_name, generate, image_seed, load_model_and_prefix, shipped
from apl.eval.id_inputs import backend_from_args, gt_names_path
from apl.eval.id_metrics import ground_truth_from_groups, save_ground_truth
from apl.eval.images import LoadReport
from apl.io import atomic_write_text
from apl.people import PREFIXES, load_people, load_templates
from apl.runtime import UsageError

logger = logging.getLogger(__name__)

MANIFEST = ".dataset_generation.tsv"  # hidden, so the face-folder scanner does not count it as a skipped file
SETTINGS_LINE = "# settings\t"  # the manifest's first line: this tag, then the generation settings as JSON
MANIFEST_HEADER = "file\tseed\tprompt"
SEED_SCHEME = "sha256(dataset/seed/name/k)"  # recorded so that sets made with another seed derivation are refused


def identity_prompt(name: str, k: int, seed: int, templates: Sequence[str]) -> str:
    """Prompt of image k: a prefix ('A photo of ', ...) with probability 0.5 and a template with probability 0.5."""
    # Seeding with a string is stable across processes (it is hashed with SHA-512, not hash()).
    rng = random.Random(f"{seed}/{name}/{k}")
    pre = rng.choice([p for p in PREFIXES if p]) if rng.random() < 0.5 else ""
    post = rng.choice(list(templates)) if templates and rng.random() < 0.5 else ""
    return f"{pre}{name}" + (f" {post.strip()}" if post.strip() else "")


def plan_dataset(
    names: Sequence[str], n_per_name: int, outdir: str | Path, seed: int, templates: Sequence[str]
) -> list[Job]:
    """Every image of the face set (made or not), name by name."""
    outdir = Path(outdir)
    return [
        Job(
            identity_prompt(name, k, seed, templates), image_seed("dataset", seed, name, k), outdir / f"{name}-{k}.png"
        )
        for name in names
        for k in range(n_per_name)
    ]


def is_done(path: Path) -> bool:
    """An image counts as made when a non-empty file is there (images are written atomically)."""
    return path.is_file() and path.stat().st_size > 0


def _checkpoint_id(ckpt_path: str | None) -> str | None:
    """The checkpoint by file name and size (a moved or copied file is still the same checkpoint)."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    return f"{path.name} ({path.stat().st_size} bytes)" if path.is_file() else str(ckpt_path)


def generation_settings(args: argparse.Namespace, templates: Sequence[str]) -> dict:
    """Everything besides (name, k) that decides an image: a resumed run must use the same values."""
    settings = {
        "seed_scheme": SEED_SCHEME,
        "seed": args.seed,
        "steps": args.steps,
        "scale": args.scale,
        "negative_prompt": args.negative_prompt,
        "checkpoint": _checkpoint_id(args.ckpt_path),
        "config": Path(args.config_path).name,
        "templates_sha256": hashlib.sha256("\n".join(templates).encode("utf-8")).hexdigest()[:16],
    }
    return json.loads(json.dumps(settings))  # the values exactly as they read back from the manifest


def read_manifest(path: Path) -> tuple[dict | None, dict[str, str]]:
    """(settings, {file name: 'seed<TAB>prompt'}) of a manifest; settings None for one written before they were."""
    lines = path.read_text(encoding="utf-8").splitlines()
    settings = None
    if lines and lines[0].startswith(SETTINGS_LINE):
        try:
            settings = json.loads(lines.pop(0)[len(SETTINGS_LINE) :])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: the settings line is not valid JSON ({err}); use a new --outdir") from err
    rows = dict(line.split("\t", 1) for line in lines[1:] if "\t" in line)
    return settings, rows


def settings_changes(old: dict | None, new: dict) -> list[str]:
    """What differs between the settings of a manifest and of this run, one 'key: old -> new' per setting."""
    if old is None:
        return ["settings: not recorded (an earlier version of dataset_generation.py, with other image seeds)"]
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]


def check_resume(outdir: Path, settings: dict, jobs: Sequence[Job]) -> dict[str, str]:
    """Refuse to add images to a face set made with other settings; returns the manifest rows to keep."""
    made = [j.path.name for j in jobs if is_done(j.path)]
    manifest = outdir / MANIFEST
    if not manifest.is_file():
        if made:
            raise UsageError(
                f"--outdir {outdir} already has {len(made)} of the planned images (e.g. {made[0]!r}) but no "
                f"{MANIFEST}, so the settings that made them are unknown and new images could not be matched to them. "
                "Use a new --outdir (or move those images away)."
            )
        return {}
    old, rows = read_manifest(manifest)
    changes = settings_changes(old, settings)
    if not changes:
        return rows
    if made or any(is_done(outdir / name) for name in rows):
        raise UsageError(
            f"--outdir {outdir} holds images made with other settings ({'; '.join(changes)}); generating there now "
            "would mix two face sets and record wrong seeds. Use a new --outdir, or rerun with the earlier settings "
            f"(see {manifest}) to finish that set."
        )
    return {}  # the old set is gone: start a new manifest


def write_manifest(outdir: Path, settings: dict, rows: dict[str, str]) -> None:
    """The manifest: settings line, header, one 'file<TAB>seed<TAB>prompt' row per planned image (atomic write)."""
    body = "".join(f"{name}\t{row}\n" for name, row in rows.items())
    text = f"{SETTINGS_LINE}{json.dumps(settings, ensure_ascii=False)}\n{MANIFEST_HEADER}\n{body}"
    atomic_write_text(text, outdir / MANIFEST)


def ground_truth_from_images(
    images: dict[str, list[Path]], backend: FaceBackend, report: LoadReport
) -> dict[str, np.ndarray]:
    """Per name, the re-normalised mean embedding of the faces detected in its images; faceless names left out."""
    return ground_truth_from_groups(images, backend, report)


def resolve_names(names: Sequence[str] | None, people_file: str | None) -> list[str]:
    """--names (checked, duplicates dropped) or the names of the people file."""
    if names:
        return list(dict.fromkeys(check_name(n) for n in names))
    if not people_file:
        raise UsageError("no identities: pass --names 'Name' ... or --people_file people.tsv")
    return [check_name(n) for n in load_people(shipped(people_file))]


def run_dataset_generation(args: argparse.Namespace) -> dict:
    """Generate the missing face-set images, optionally compute ground truth; returns a summary."""
    names = resolve_names(args.names, args.people_file)
    templates = load_templates(shipped(args.templates_file)) if args.templates_file else []
    outdir = Path(args.outdir)
    jobs = plan_dataset(names, args.n_samples, outdir, args.seed, templates)
    settings = generation_settings(args, templates)
    rows = check_resume(outdir, settings, jobs)  # before anything is loaded or written
    rows.update({j.path.name: f"{j.seed}\t{j.prompt}" for j in jobs})
    gt_npy = args.gt_npy
    backend = None
    if args.gt_names and not gt_npy:
        raise UsageError(f"--gt_names {args.gt_names} names the rows of --gt_npy; pass --gt_npy FILE.npy too, or "
                         "remove --gt_names")
    given = getattr(args, "given_flags", None) or frozenset()
    unused = [f"--{f}" for f in FACE_FLAGS if f in given] if not gt_npy else []
    if unused:
        print(f"warning: {', '.join(unused)} ignored: faces are only detected with --gt_npy (ground truth)")
    if gt_npy:
        # Load the face models first: a missing pack must fail before hours of generation, not after.
        backend = backend_from_args(args)
    todo = [j for j in jobs if not is_done(j.path)]
    print(
        f"{len(names)} identities x {args.n_samples} images: {len(jobs) - len(todo)} already in {outdir}, "
        f"{len(todo)} to generate"
    )
    made = 0
    blank: list[str] = []
    if todo:
        gen = load_model_and_prefix(args.config_path, args.ckpt_path, args.device, args.precision, seed=args.seed)
        write_manifest(outdir, settings, rows)  # first, so an interrupted run's images have their settings
        made = generate(
            gen,
            todo,
            batch_size=args.batch_size,
            steps=args.steps,
            scale=args.scale,
            negative_prompt=args.negative_prompt,
            desc="dataset_generation",
            on_image=lambda job, image: blank.append(job.path.name) if is_blank(np.asarray(image)) else None,
        )
    write_manifest(outdir, settings, rows)
    if made and len(blank) == made:
        raise ValueError(
            f"all {made} images generated are one flat colour (e.g. black): the checkpoint or its settings produce "
            f"no picture (NaN weights? --precision?). The face set in {outdir} is unusable for training: delete "
            "those images, check the model with sample.py, and run again"
        )
    summary: dict = {
        "outdir": str(outdir),
        "identities": len(names),
        "images": len(jobs),
        "generated": made,
        "skipped_existing": len(jobs) - len(todo),
        "blank_images": blank,
    }
    if backend is not None:
        by_name: dict[str, list[Path]] = {}
        for j in jobs:
            by_name.setdefault(j.path.name.rsplit("-", 1)[0], []).append(j.path)
        report = LoadReport()
        gt = ground_truth_from_images(by_name, backend, report)
        summary["ground_truth"] = {
            "identities": len(gt),
            "images_read": report.loaded,
            "images_without_face": len(report.no_face),
            "unreadable_images": len(report.unreadable),
            "identities_without_face": list(report.empty_identities),
        }
        if not gt:
            raise ValueError(
                f"no face was detected in any of the {report.loaded} images in {outdir}; ground truth not written "
                f"({detector_advice(backend)})"
            )
        names_file = gt_names_path(gt_npy, args.gt_names)
        save_ground_truth(gt, gt_npy, names_file, backend=backend.name)
        summary["ground_truth"].update(npy=gt_npy, names=names_file)
    return summary


# Face-backend flags: without --gt_npy no face is detected, so they would do nothing.
FACE_FLAGS = ("face_backend", "insightface_pack", "insightface_root", "det_thresh", "det_size")


def detector_advice(backend: FaceBackend) -> str:
    """What to try when a backend finds no faces, in terms of the settings that backend really has."""
    if backend.name == "insightface":
        return (f"check the images; a lower --det_thresh (now {getattr(backend, 'det_thresh', '?')}) or another "
                f"--det_size (now {getattr(backend, 'det_size', '?')}) may find more faces")
    if backend.name == "dlib":
        return ("check the images: dlib's HOG detector finds frontal faces of about 80 px and larger, and has no "
                "threshold to lower; --face_backend insightface finds more")
    return f"check the images and the settings of the {backend.name} face backend"


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    lines = [
        f"{summary['generated']} images generated, {summary['skipped_existing']} already there "
        f"({summary['identities']} identities, {summary['images']} images in {summary['outdir']})"
    ]
    if summary.get("blank_images"):
        blank = summary["blank_images"]
        lines.append(f"WARNING [blank_images]: {len(blank)} of the images generated now are one flat colour (e.g. "
                     f"{blank[0]}); they give no face and no training signal")
    gt = summary.get("ground_truth")
    if gt:
        lines.append(f"ground truth of {gt['identities']} identities written to {gt['npy']} + {gt['names']}")
        lines.append(
            f"images without a detectable face: {gt['images_without_face']} of {gt['images_read']}"
            + (f"; unreadable: {gt['unreadable_images']}" if gt["unreadable_images"] else "")
        )
        if gt["identities_without_face"]:
            lines.append(f"no face in any image (no ground truth): {', '.join(gt['identities_without_face'])}")
    return "\n".join(lines)
