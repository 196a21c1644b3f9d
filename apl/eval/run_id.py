"""test_id.py's work: generate (or read) images per identity, score faces against ground truth, write reports.

Images live in `<outdir>/images/<mode>/<Name>-<k>.png` (mode 'with' or 'without' the prefix). Image k of a name
has the same seed in both modes, image_seed('test_id', --seed, name, k), so the side-by-side grids compare the
prefix's effect on the same start noise; the 'test_id' domain keeps it apart from the face set's seeds.
"""

from __future__ import annotations

import argparse
import logging
import string
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from apl.eval.faces import FaceBackend, make_backend
from apl.eval.generation import (
    Job,
    check_name,
    generate,
    image_seed,
    load_model_and_prefix,
    modes_for,
    require_embedding,
    shipped,
    with_prefix,
)
from apl.eval.id_metrics import (
    IdentityResult,
    IdentityTable,
    default_id_threshold,
    embed_images,
    ground_truth_from_folder,
    load_ground_truth,
    summarize,
    write_identity_csv,
    write_summary_json,
)
from apl.eval.images import FACE_FILE, ImageReadError, LoadReport, clean_name, list_images, load_pil_rgb
from apl.io import atomic_save, atomic_write_text
from apl.people import load_people
from apl.runtime import UsageError
from ldm.sampling import make_grid

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "A close-up portrait of {name}"  # the original APL's identity prompt
MODES = ("with", "without")
GRID_THUMB = 256  # longest side of an image in the per-identity grids


def gt_names_path(gt_npy: str, gt_names: str | None) -> str:
    """The names file that goes with a ground-truth .npy: the explicit one, else <stem>_names.txt beside it."""
    if gt_names:
        return gt_names
    stem = gt_npy[: -len(".npy")] if gt_npy.endswith(".npy") else gt_npy
    return f"{stem}_names.txt"


def backend_from_args(args: argparse.Namespace) -> FaceBackend:
    """The face backend named by --face_backend and its flags (loaded now, so missing models fail early)."""
    if args.face_backend == "insightface":
        return make_backend(
            "insightface",
            pack=args.insightface_pack,
            root=args.insightface_root,
            det_thresh=args.det_thresh,
            det_size=args.det_size,
            device=args.device,  # 'auto' picks onnxruntime's CUDA provider when it has one
        )
    if args.face_backend == "dlib":
        return make_backend("dlib", device="cpu" if args.device == "auto" else args.device)
    return make_backend(args.face_backend, det_thresh=args.det_thresh, device=args.device)  # a plug-in


def backend_threshold(backend: FaceBackend) -> float:
    """The backend's own default ID threshold (plug-ins may set `default_id_threshold`), else the built-in one."""
    own = getattr(backend, "default_id_threshold", None)
    return float(own) if own is not None else default_id_threshold(backend.name)


@dataclass
class ImageSets:
    """Images to score: mode -> identity -> image paths, plus what could not be assigned to an identity."""

    sets: dict[str, dict[str, list[Path]]] = field(default_factory=dict)
    unrecognised: list[str] = field(default_factory=list)  # files not named <Name>-<k>.<ext>


def _group_by_name(paths: list[Path], out: ImageSets) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in paths:
        match = FACE_FILE.match(path.stem)
        if match is None:
            out.unrecognised.append(str(path))
            continue
        groups.setdefault(clean_name(match.group("name")), []).append(path)
    for name in groups:  # numeric order of k, not string order (…-10 after …-9)
        groups[name].sort(key=lambda p: int(FACE_FILE.match(p.stem).group("k")))
    return groups


def collect_folder(folder: str | Path) -> ImageSets:
    """Images of an existing folder: `with/` and `without/` subfolders (test_id's layout) or one flat set."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--image_folder {folder} does not exist or is not a folder")
    out = ImageSets()
    root = folder / "images" if (folder / "images").is_dir() else folder  # a previous run's --outdir works too
    subsets = [m for m in MODES if (root / m).is_dir()]
    if subsets:
        for mode in subsets:
            out.sets[mode] = _group_by_name(list_images(root / mode), out)
    else:
        out.sets["images"] = _group_by_name(list_images(root), out)
    if not any(out.sets.values()):
        raise UsageError(f"--image_folder {folder} has no images named <Name>-<k>.png (or with/, without/ folders)")
    return out


def check_template(template: str) -> None:
    """--prompt_template must fill in {name} and nothing else; say so before any model is loaded."""
    braces = "write literal braces as {{ and }}"
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise UsageError(f"--prompt_template {template!r} is not a valid template ({err}); {braces}") from err
    extra = list(dict.fromkeys(f for f in fields if f != "name"))
    if extra:
        shown = ", ".join("{" + f + "}" for f in extra)
        raise UsageError(
            f"--prompt_template {template!r} uses {shown}, but only {{name}} is filled in (with each person's "
            f"name); remove the other fields or {braces}"
        )
    if "name" not in fields:
        raise UsageError(f"--prompt_template {template!r} must contain {{name}}")


# Which backend makes embeddings of a size, for the error message when --gt_npy came from another one.
_BACKEND_OF_DIM = {512: "insightface", 128: "dlib"}


def check_gt_dim(gt: dict[str, np.ndarray], backend: FaceBackend, source: str) -> None:
    """Ground truth must have the backend's embedding size (a 128-d dlib .npy cannot score ArcFace faces)."""
    want = getattr(backend, "embedding_dim", None)
    dims = sorted({int(np.asarray(v).size) for v in gt.values()})
    if want is None or dims == [want]:
        return
    guess = ", ".join(f"{d}-d is {_BACKEND_OF_DIM[d]}" for d in dims if d in _BACKEND_OF_DIM)
    raise UsageError(
        f"{source} holds {'/'.join(map(str, dims))}-d embeddings but the {backend.name} face backend makes {want}-d "
        f"ones{f' ({guess})' if guess else ''}: ground truth and scoring must use the same --face_backend. Pass "
        "the matching --face_backend, or recompute the ground truth with this one (dataset_generation.py --gt_npy, "
        "or --gt_folder)."
    )


def load_gt(args: argparse.Namespace, backend: FaceBackend) -> tuple[dict[str, np.ndarray], dict]:
    """Ground truth from --gt_npy/--gt_names or --gt_folder, and a description for the summary."""
    if bool(args.gt_npy) == bool(args.gt_folder):
        raise UsageError(
            "give the ground truth with exactly one of --gt_npy FILE.npy (+ --gt_names) or "
            "--gt_folder DIR (reference photos)"
        )
    if args.gt_npy:
        names = gt_names_path(args.gt_npy, args.gt_names)
        gt = load_ground_truth(args.gt_npy, names)
        check_gt_dim(gt, backend, f"--gt_npy {args.gt_npy}")
        dims = {v.shape[0] for v in gt.values()}
        return gt, {"source": "npy", "npy": args.gt_npy, "names": names, "dim": sorted(dims)}
    report = LoadReport()
    gt = ground_truth_from_folder(args.gt_folder, backend, report)
    return gt, {"source": "folder", "folder": args.gt_folder, **report.as_dict()}


def resolve_identity_names(args: argparse.Namespace, fallback: list[str]) -> list[str]:
    """--names, else the people file's names, else `fallback` (the ground truth's or the folder's names)."""
    if args.names:
        return list(dict.fromkeys(check_name(n) for n in args.names))
    if args.people_file:
        return [check_name(n) for n in load_people(shipped(args.people_file))]
    return list(fallback)


def plan_images(
    names: list[str], modes: list[str], n: int, seed: int, template: str, placeholder: str | None, outdir: Path
) -> dict[str, dict[str, list[Job]]]:
    """Jobs per mode and name; image k of a name gets the same seed with and without the prefix."""
    plans: dict[str, dict[str, list[Job]]] = {}
    for mode in modes:
        plans[mode] = {}
        for name in names:
            prompt = template.format(name=name)
            if mode == "with":
                prompt = with_prefix(prompt, placeholder)
            folder = outdir / "images" / mode
            plans[mode][name] = [
                Job(prompt, image_seed("test_id", seed, name, k), folder / f"{name}-{k}.png") for k in range(n)
            ]
    return plans


def stale_images(plans: dict[str, dict[str, list[Job]]], outdir: Path) -> dict[str, list[str]]:
    """Per mode, `<Name>-<k>` images already in the mode's folder that this run does not make (left by an earlier
    run with a larger --n_samples or other names). They are not scored, and not deleted: they are the user's."""
    stale: dict[str, list[str]] = {}
    for mode, per_name in plans.items():
        folder = outdir / "images" / mode
        if not folder.is_dir():
            continue
        planned = {job.path for jobs in per_name.values() for job in jobs}
        found = [str(p) for p in list_images(folder) if FACE_FILE.match(p.stem) and p not in planned]
        if found:
            stale[mode] = found
    return stale


def score_set(
    images: dict[str, list[Path]], gt: dict[str, np.ndarray], backend: FaceBackend
) -> tuple[list[IdentityResult], LoadReport]:
    """Embed the largest face of every image; no face counts as similarity 0, unreadable images are left out."""
    table = IdentityTable(gt)
    report = LoadReport()
    for name, paths in images.items():
        for _, emb in embed_images(paths, backend, report):
            table.add(name, emb)
    return table.results(), report


def _thumb(path: Path, size: int) -> Image.Image:
    """The image for a grid cell (grey when unreadable, so rows stay aligned)."""
    try:
        image = load_pil_rgb(path)
    except ImageReadError:
        return Image.new("RGB", (size, size), (128, 128, 128))
    image.thumbnail((size, size))
    return image.resize((size, size)) if image.size != (size, size) else image


def write_grids(sets: dict[str, dict[str, list[Path]]], names: list[str], folder: Path) -> dict[str, Path]:
    """One picture per identity: a row of its images per mode ('with' above 'without')."""
    out: dict[str, Path] = {}
    for name in names:
        rows = [sets[m].get(name, []) for m in sets]
        n = max((len(r) for r in rows), default=0)
        if n == 0:
            continue
        cells = []
        for row in rows:
            cells += [_thumb(p, GRID_THUMB) for p in row]
            cells += [Image.new("RGB", (GRID_THUMB, GRID_THUMB), "white")] * (n - len(row))
        path = folder / f"{name}.png"
        grid = make_grid(cells, nrow=n)
        atomic_save(lambda tmp, grid=grid: grid.save(tmp, format="PNG"), path)
        out[name] = path
    return out


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def markdown_report(
    summary: dict, results: dict[str, list[IdentityResult]], grids: dict[str, Path], outdir: Path
) -> str:
    """The side-by-side report: overall numbers per mode, then one row per identity with its grid."""
    modes = list(results)
    thr = summary["threshold"]
    lines = ["# Identity similarity (test_id.py)", ""]
    lines.append(
        f"Face backend: {summary['settings']['face_backend']}; ID threshold {thr}; "
        "a no-face image counts as similarity 0 in the mean and max. Lower is more anonymous."
    )
    lines += [
        "",
        f"| mode | mean of mean | mean of max | ID accuracy (≥ {thr}) | no-face rate | identities | images |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        s = summary["modes"][m]
        lines.append(
            f"| {m} | {_f(s['mean_of_mean'])} | {_f(s['mean_of_max'])} | {_f(s['id_accuracy'])} | "
            f"{_f(s['no_face_rate'])} | {s['n_identities']} | {s['n_images']} |"
        )
    by_mode = {m: {r.name: r for r in results[m]} for m in modes}
    names = list(dict.fromkeys(r.name for m in modes for r in results[m]))
    head = " | ".join(f"{m} mean | {m} max | {m} no face" for m in modes)
    lines += [
        "",
        "## Per identity",
        "",
        f"| name | {head} | images ({' / '.join(modes)}) |",
        "|---|" + "---|" * (3 * len(modes)) + "---|",
    ]
    for name in names:
        cells = []
        for m in modes:
            r = by_mode[m].get(name)
            cells += [_f(r.mean), _f(r.max), f"{r.no_face}/{r.n_images}"] if r else ["–", "–", "–"]
        grid = grids.get(name)
        link = f"![{name}]({urllib.parse.quote(grid.relative_to(outdir).as_posix())})" if grid else ""
        lines.append(f"| {name} | {' | '.join(cells)} | {link} |")
    if summary["names_without_ground_truth"]:
        lines += ["", f"Names without ground truth (not scored): {', '.join(summary['names_without_ground_truth'])}"]
    return "\n".join(lines) + "\n"


def run_test_id(args: argparse.Namespace) -> dict:
    """Generate or read the images, score them, write CSV/JSON/markdown/grids into --outdir; returns the summary."""
    check_template(args.prompt_template)
    if args.image_folder is None:
        require_embedding(args.mode, args.embedding)
    outdir = Path(args.outdir)
    # Face models and ground truth first: a missing pack or bad .npy must fail before any image is generated.
    backend = backend_from_args(args)
    threshold = args.id_threshold if args.id_threshold is not None else backend_threshold(backend)
    gt, gt_info = load_gt(args, backend)
    if not gt:
        raise ValueError(f"no identity has a ground-truth embedding ({gt_info})")

    if args.image_folder is not None:
        found = collect_folder(args.image_folder)
        in_folder = list(dict.fromkeys(n for s in found.sets.values() for n in s))
        names = resolve_identity_names(args, in_folder)
        missing_gt = [n for n in names if n not in gt]
        sets = {m: {n: s[n] for n in names if n in s and n in gt} for m, s in found.sets.items()}
        unrecognised = found.unrecognised
        stale: dict[str, list[str]] = {}
    else:
        names = resolve_identity_names(args, list(gt))
        missing_gt = [n for n in names if n not in gt]
        scored = [n for n in names if n in gt]
        if not scored:
            raise ValueError(f"none of the {len(names)} identities has ground truth (known: {sorted(gt)[:10]})")
        if missing_gt:
            print(
                f"warning: {len(missing_gt)} identities have no ground truth and are skipped: "
                f"{', '.join(missing_gt[:10])}{' ...' if len(missing_gt) > 10 else ''}"
            )
        gen = load_model_and_prefix(
            args.config_path,
            args.ckpt_path,
            args.device,
            args.precision,
            embedding=args.embedding if args.mode != "without" else None,
            placeholder=args.placeholder,
            seed=args.seed,
        )
        plans = plan_images(
            scored, modes_for(args.mode), args.n_samples, args.seed, args.prompt_template, gen.placeholder, outdir
        )
        stale = stale_images(plans, outdir)
        for mode, files in stale.items():
            print(
                f"warning: {len(files)} images in {outdir / 'images' / mode} are not part of this run (e.g. "
                f"{Path(files[0]).name}; left by an earlier run with more --n_samples or other names). They are "
                f"not scored now, but --image_folder {outdir} would score them: move them away or use a new --outdir."
            )
        for mode, per_name in plans.items():
            jobs = [j for name_jobs in per_name.values() for j in name_jobs]
            generate(
                gen,
                jobs,
                batch_size=args.batch_size,
                steps=args.steps,
                scale=args.scale,
                negative_prompt=args.negative_prompt,
                desc=f"test_id {mode}",
            )
        sets = {m: {n: [j.path for j in jobs] for n, jobs in per_name.items()} for m, per_name in plans.items()}
        unrecognised = []

    results: dict[str, list[IdentityResult]] = {}
    summary: dict = {
        "script": "test_id.py",
        "threshold": threshold,
        "modes": {},
        "names_without_ground_truth": missing_gt,
        "unrecognised_files": unrecognised,
        "stale_files": stale,
        "ground_truth": gt_info,
        "settings": _settings(args, backend.name),
    }
    for mode, images in sets.items():
        res, report = score_set(images, gt, backend)
        if not res:
            summary["modes"][mode] = {"n_images": 0, "unreadable": len(report.unreadable), "note": "nothing to score"}
            continue
        results[mode] = res
        summary["modes"][mode] = summarize(res, threshold) | {
            "unreadable": len(report.unreadable),
            "unreadable_files": report.unreadable,
        }
        write_identity_csv(res, outdir / f"identity_{mode}.csv")
    if not results:
        raise ValueError("no readable images of identities with ground truth were found; nothing to score")
    scored_names = list(dict.fromkeys(r.name for res in results.values() for r in res))
    grids = write_grids(sets, scored_names, outdir / "grids")
    write_summary_json(summary, outdir / "summary.json")
    atomic_write_text(markdown_report(summary, results, grids, outdir), outdir / "report.md")
    return summary


def _settings(args: argparse.Namespace, backend: str) -> dict:
    keys = (
        "ckpt_path",
        "config_path",
        "embedding",
        "mode",
        "prompt_template",
        "n_samples",
        "steps",
        "scale",
        "seed",
        "negative_prompt",
        "image_folder",
        "det_thresh",
        "det_size",
        "insightface_pack",
    )
    return {k: getattr(args, k, None) for k in keys} | {"face_backend": backend}


def format_summary(summary: dict) -> str:
    """The overall numbers as a small table for the terminal."""
    thr = summary["threshold"]
    lines = [
        f"{'mode':<9} {'mean_of_mean':>12} {'mean_of_max':>12} {'id_acc@' + str(thr):>12} {'no_face':>8} "
        f"{'ids':>5} {'images':>7}"
    ]
    for mode, s in summary["modes"].items():
        if not s.get("n_images"):
            lines.append(f"{mode:<9} (no readable images)")
            continue
        lines.append(
            f"{mode:<9} {_f(s['mean_of_mean']):>12} {_f(s['mean_of_max']):>12} {_f(s['id_accuracy']):>12} "
            f"{s['no_face_rate']:>8.3f} {s['n_identities']:>5} {s['n_images']:>7}"
        )
        if s.get("unreadable"):
            lines.append(f"{'':<9} {s['unreadable']} unreadable images skipped")
    if summary["names_without_ground_truth"]:
        lines.append(f"identities without ground truth (not scored): {len(summary['names_without_ground_truth'])}")
    stale = summary.get("stale_files") or {}
    if stale:
        lines.append(f"images from earlier runs left in --outdir (not scored): {sum(map(len, stale.values()))}")
    if summary["unrecognised_files"]:
        lines.append(f"files not named <Name>-<k>.<ext> (ignored): {len(summary['unrecognised_files'])}")
    return "\n".join(lines)
