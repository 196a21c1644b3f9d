"""Face-set generation for training: N images per name with random prompt prefixes/templates, resumable.

Image k of a name is `<outdir>/<Name>-<k>.png` (the face-set naming train.py reads). Its prompt and seed depend
only on (seed, name, k), so a rerun makes exactly the images that are still missing, whatever the batch size.
"""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apl.eval.faces import FaceBackend
from apl.eval.generation import Job, check_name, generate, image_seed, load_model_and_prefix, shipped
from apl.eval.id_metrics import ground_truth_from_groups, save_ground_truth
from apl.eval.images import LoadReport
from apl.eval.run_id import backend_from_args, gt_names_path
from apl.io import atomic_write_text
from apl.people import PREFIXES, load_people, load_templates
from apl.runtime import UsageError

logger = logging.getLogger(__name__)

# Artefacts SD v1 tends to draw in portraits; guidance pushes away from them (the original used such a prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, lowres, low quality, jpeg artifacts, deformed, disfigured, distorted face, bad anatomy, "
    "extra limbs, extra fingers, mutated hands, cropped, out of frame, watermark, text, signature, cartoon, drawing"
)
MANIFEST = ".dataset_generation.tsv"  # hidden, so the face-folder scanner does not count it as a skipped file


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
        Job(identity_prompt(name, k, seed, templates), image_seed(seed, name, k), outdir / f"{name}-{k}.png")
        for name in names
        for k in range(n_per_name)
    ]


def is_done(path: Path) -> bool:
    """An image counts as made when a non-empty file is there (images are written atomically)."""
    return path.is_file() and path.stat().st_size > 0


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
    gt_npy = args.gt_npy
    backend = None
    if gt_npy:
        # Load the face models first: a missing pack must fail before hours of generation, not after.
        backend = backend_from_args(args)
    outdir = Path(args.outdir)
    jobs = plan_dataset(names, args.n_samples, outdir, args.seed, templates)
    todo = [j for j in jobs if not is_done(j.path)]
    print(
        f"{len(names)} identities x {args.n_samples} images: {len(jobs) - len(todo)} already in {outdir}, "
        f"{len(todo)} to generate"
    )
    made = 0
    if todo:
        gen = load_model_and_prefix(args.config_path, args.ckpt_path, args.device, args.precision, seed=args.seed)
        made = generate(
            gen,
            todo,
            batch_size=args.batch_size,
            steps=args.steps,
            scale=args.scale,
            negative_prompt=args.negative_prompt,
            desc="dataset_generation",
        )
    manifest = "".join(f"{j.path.name}\t{j.seed}\t{j.prompt}\n" for j in jobs)
    atomic_write_text("file\tseed\tprompt\n" + manifest, outdir / MANIFEST)
    summary: dict = {
        "outdir": str(outdir),
        "identities": len(names),
        "images": len(jobs),
        "generated": made,
        "skipped_existing": len(jobs) - len(todo),
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
                f"no face was detected in any of the {report.loaded} images in {outdir}; "
                "ground truth not written (check --det_thresh and the images)"
            )
        names_file = gt_names_path(gt_npy, args.gt_names)
        save_ground_truth(gt, gt_npy, names_file)
        summary["ground_truth"].update(npy=gt_npy, names=names_file)
    return summary


def format_summary(summary: dict) -> str:
    """A few lines for the terminal."""
    lines = [
        f"{summary['generated']} images generated, {summary['skipped_existing']} already there "
        f"({summary['identities']} identities, {summary['images']} images in {summary['outdir']})"
    ]
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
