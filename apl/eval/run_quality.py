"""test_fid_clip_score.py's work: images for a prompt file with/without the prefix, CLIP score and FID.

The CLIP score of every image is taken against its prompt *without* the placeholder (what the user asked for), so
the 'with' and 'without' numbers are comparable. FID compares each set with real photos (--fid_ref) and the two
generated sets with each other.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apl.eval.defaults import DEFAULT_PROMPTS
from apl.eval.generation import (
    Job,
    generate,
    image_seed,
    load_model_and_prefix,
    modes_for,
    require_embedding,
    shipped,
    with_prefix,
)
from apl.eval.id_metrics import write_summary_json
from apl.eval.images import LoadReport
from apl.eval.quality import (
    ClipScorer,
    build_fid,
    clip_score_summary,
    fid_antialias_default,
    fid_between,
    load_image_folder,
    strip_placeholder,
)
from apl.io import atomic_write_text
from apl.people import load_indexed_prompts, load_prompts
from apl.plugins import call_with_accepted, load_plugin
from apl.runtime import UsageError, pick_device


def prompt_pair(line: str, placeholder: str) -> tuple[str, str]:
    """(prompt with the prefix, prompt without it) for one line of the prompts file, which may already hold it."""
    clean = strip_placeholder(line, placeholder)
    return with_prefix(line, placeholder), clean


def plan_quality(
    prompts: list[str], modes: list[str], n: int, seed: int, placeholder: str | None, outdir: Path
) -> dict[str, list[tuple[Job, int, int, str]]]:
    """Per mode: (job, prompt index, sample index, clean prompt); image k of prompt i has one seed in both modes,
    image_seed('quality', seed, str(i), k)."""
    plans: dict[str, list[tuple[Job, int, int, str]]] = {}
    for mode in modes:
        rows = []
        for i, line in enumerate(prompts):
            with_p, clean = prompt_pair(line, placeholder or "alz")
            prompt = with_p if mode == "with" else clean
            for k in range(n):
                path = outdir / "images" / mode / f"{i:05d}-{k}.png"
                rows.append((Job(prompt, image_seed("quality", seed, str(i), k), path), i, k, clean))
        plans[mode] = rows
    return plans


def _load_reference(folder: str) -> tuple[list[Image.Image], LoadReport]:
    if not Path(folder).is_dir():
        raise UsageError(f"--fid_ref {folder} does not exist or is not a folder of real images")
    report = LoadReport()
    images = load_image_folder(folder, report)
    if len(images) < 2:
        raise ValueError(f"--fid_ref {folder} has {len(images)} readable images ({len(report.unreadable)} "
                         "unreadable); FID needs at least 2 (thousands for a meaningful number)")
    return images, report


def run_quality(args: argparse.Namespace, fid_feature: str | torch.nn.Module = "inception") -> dict:
    """Generate, score and write `clip_scores.csv` + `summary.json` into --outdir; returns the summary.

    `fid_feature` is "inception" (the standard FID, weights from --inception_weights) or a feature module.
    """
    prompts_file = shipped(args.prompts_file or DEFAULT_PROMPTS)
    prompts = load_prompts(prompts_file)  # raises for a file without captions
    empty = sum(1 for caption in load_indexed_prompts(prompts_file).values() if not caption)
    modes = modes_for(args.mode)
    require_embedding(args.mode, args.embedding)
    device = str(pick_device(args.device))
    outdir = Path(args.outdir)
    summary: dict = {"script": "test_fid_clip_score.py", "prompts_file": prompts_file, "n_prompts": len(prompts),
                     "empty_prompts": empty, "settings": _settings(args), "clip": {}, "fid": {}, "notes": []}
    if empty:
        summary["notes"].append(f"{empty} empty prompt line(s) in {prompts_file} skipped")

    # Everything that can be missing is loaded before the first image is generated.
    scorer = None if args.skip_clip else ClipScorer(args.clip_model, args.clip_pretrained, device=device)
    want_fid = not args.skip_fid and (args.fid_ref is not None or len(modes) == 2)
    if not args.skip_fid and not want_fid:
        summary["notes"].append("FID skipped: give --fid_ref DIR or --mode both")
    if want_fid and len(prompts) * args.n_samples < 2:
        raise UsageError(f"FID needs at least 2 generated images per set; {len(prompts)} prompt(s) x --n_samples "
                         f"{args.n_samples} gives fewer (raise --n_samples or pass --skip_fid)")
    antialias = getattr(args, "fid_antialias", None)
    antialias = fid_antialias_default() if antialias is None else bool(antialias)
    if fid_feature == "inception" and getattr(args, "fid_feature", "inception") != "inception":
        fid_feature = call_with_accepted(load_plugin(args.fid_feature, "--fid_feature"), device=device)
        if not isinstance(fid_feature, torch.nn.Module):
            raise UsageError(f"--fid_feature {args.fid_feature}: the factory must return a torch.nn.Module")
    fid = build_fid(fid_feature, args.inception_weights, device=device, antialias=antialias) if want_fid else None
    summary["fid_feature"] = getattr(args, "fid_feature", "inception") if want_fid else None
    summary["fid_antialias"] = antialias if want_fid else None  # FIDs with different resizing are not comparable
    ref: list[Image.Image] = []
    if want_fid and args.fid_ref:
        ref, ref_report = _load_reference(args.fid_ref)
        summary["fid_ref"] = {"folder": args.fid_ref, "images": len(ref), "unreadable": len(ref_report.unreadable),
                              "unreadable_files": ref_report.unreadable}

    gen = load_model_and_prefix(args.config_path, args.ckpt_path, args.device, args.precision,
                                embedding=args.embedding if "with" in modes else None,
                                placeholder=args.placeholder, seed=args.seed)
    plans = plan_quality(prompts, modes, args.n_samples, args.seed, gen.placeholder, outdir)
    images: dict[str, list[Image.Image]] = {}
    for mode, rows in plans.items():
        made: dict[Path, Image.Image] = {}
        generate(gen, [r[0] for r in rows], batch_size=args.batch_size, steps=args.steps, scale=args.scale,
                 negative_prompt=args.negative_prompt, desc=f"{mode} prefix",
                 on_image=lambda job, im, made=made: made.__setitem__(job.path, im))
        images[mode] = [made[r[0].path] for r in rows]

    cosines: dict[str, list[float]] = {}
    if scorer is not None:
        for mode, rows in plans.items():
            cos = scorer.score(images[mode], [r[3] for r in rows], batch_size=args.batch_size)
            cosines[mode] = cos.tolist()
            summary["clip"][mode] = clip_score_summary(cos)
        summary["clip"]["model"] = f"{args.clip_model} / {args.clip_pretrained}"
    if fid is not None:
        if ref:
            for mode in modes:
                summary["fid"][f"ref_vs_{mode}"] = fid_between(fid, ref, images[mode], batch_size=args.batch_size)
        if len(modes) == 2:
            summary["fid"]["without_vs_with"] = fid_between(fid, images["without"], images["with"],
                                                            batch_size=args.batch_size)

    pair_mae: list[float] = []
    if len(modes) == 2:  # image k of prompt i has the same seed in both modes: how much did the prefix change it?
        pair_mae = [pixel_mae(a, b) for a, b in zip(images["with"], images["without"], strict=True)]
        summary["paired"] = paired_summary(pair_mae)
    _write_csv(plans, cosines, pair_mae, outdir / "clip_scores.csv", outdir)
    write_summary_json(summary, outdir / "summary.json")
    return summary


def pixel_mae(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two same-size RGB images, in [0, 1] (0 = identical pixels)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB"), dtype=np.float32)
    if x.shape != y.shape:
        raise ValueError(f"paired images differ in size: {x.shape} vs {y.shape}")
    return float(np.abs(x - y).mean() / 255.0)


def paired_summary(values: list[float]) -> dict:
    """Mean, median and 90th percentile of the per-pair pixel differences."""
    v = np.asarray(values, dtype=np.float64)
    return {
        "pixel_mae_mean": float(v.mean()),
        "pixel_mae_median": float(np.median(v)),
        "pixel_mae_p90": float(np.quantile(v, 0.9)),
        "n": int(v.size),
    }


def _write_csv(plans: dict, cosines: dict[str, list[float]], pair_mae: list[float], path: Path, outdir: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["mode", "prompt_index", "sample", "seed", "file", "prompt", "clip_text", "clip_cosine", "pair_pixel_mae"]
    )
    for mode, rows in plans.items():
        for j, (job, i, k, clean) in enumerate(rows):
            cos = f"{cosines[mode][j]:.6f}" if mode in cosines else ""
            mae = f"{pair_mae[j]:.6f}" if pair_mae else ""
            w.writerow([mode, i, k, job.seed, job.path.relative_to(outdir).as_posix(), job.prompt, clean, cos, mae])
    atomic_write_text(buf.getvalue(), path)


def _settings(args: argparse.Namespace) -> dict:
    keys = ("ckpt_path", "config_path", "embedding", "mode", "n_samples", "steps", "scale", "seed",
            "negative_prompt", "clip_model", "clip_pretrained", "fid_ref", "fid_feature", "fid_antialias")
    return {k: getattr(args, k, None) for k in keys}


def format_summary(summary: dict) -> str:
    """CLIP score and FID lines for the terminal."""
    lines = [f"{summary['n_prompts']} prompts from {summary['prompts_file']}"]
    for mode in ("with", "without"):
        c = summary["clip"].get(mode)
        if c:
            lines.append(f"CLIP score {mode:<7} prefix: {c['clip_score']:.3f} (cosine {c['clip_cosine_mean']:.4f}, "
                         f"n={c['n']})")
    for key, value in summary["fid"].items():
        lines.append(f"FID {key}: {value:.4f}")
    paired = summary.get("paired")
    if paired:
        lines.append(f"with vs without, same seed: mean absolute pixel difference {paired['pixel_mae_mean']:.4f} "
                     f"(median {paired['pixel_mae_median']:.4f}, n={paired['n']})")
    if summary["fid"] and summary.get("fid_feature", "inception") == "inception":
        lines.append(f"FID resize to 299x299 with antialias={summary.get('fid_antialias')}")
    elif summary["fid"]:
        lines.append(f"FID features: {summary['fid_feature']}")
    ref = summary.get("fid_ref")
    if ref and ref["unreadable"]:
        lines.append(f"{ref['unreadable']} unreadable reference images skipped")
    lines += summary["notes"]
    return "\n".join(lines)
