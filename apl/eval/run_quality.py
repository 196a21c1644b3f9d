"""test_fid_clip_score.py's work: images for a prompt file with/without the prefix, CLIP score, FID and KID.

The CLIP score of every image is taken against its prompt *without* the placeholder (what the user asked for), so
the 'with' and 'without' numbers are comparable. FID and KID compare each set with real photos (--fid_ref) and the
with-prefix set with a without-prefix set drawn from independent seeds; the same-seed pair ('without_vs_with') is
kept beside it, and 'without_vs_without_independent' shows what the metrics read for two samples of one model at
this N. CLIP scores and the same-seed pixel difference get 95 % bootstrap intervals over prompts.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apl.eval.checks import Alert, ImageStats, warning_line
from apl.eval.defaults import DEFAULT_PROMPTS
from apl.eval.generation import (
    Job,
    check_prompt_room,
    generate,
    image_seed,
    load_model_and_prefix,
    modes_for,
    require_embedding,
    shipped,
    used_checkpoint,
    with_prefix,
)
from apl.eval.id_metrics import write_summary_json
from apl.eval.images import LoadReport
from apl.eval.quality import (
    ClipScorer,
    build_fid,
    clip_score_summary,
    extract_features,
    fid_antialias_default,
    load_image_folder,
    strip_placeholder,
)
from apl.eval.stats import (
    bootstrap_means,
    fid_sample_warning,
    format_interval,
    frechet_distance,
    kernel_inception_distance,
    percentile_interval,
)
from apl.io import atomic_write_text
from apl.people import load_indexed_prompts, load_prompts
from apl.plugins import call_with_accepted, load_plugin
from apl.runtime import UsageError, pick_device

INDEPENDENT = "without_independent"  # the without-prefix set drawn from other seeds


def prompt_pair(line: str, placeholder: str) -> tuple[str, str]:
    """(prompt with the prefix, prompt without it) for one line of the prompts file, which may already hold it."""
    clean = strip_placeholder(line, placeholder)
    return with_prefix(line, placeholder), clean


def plan_quality(
    prompts: list[str], modes: list[str], n: int, seed: int, placeholder: str | None, outdir: Path
) -> dict[str, list[tuple[Job, int, int, str]]]:
    """Per mode: (job, prompt index, sample index, clean prompt); image k of prompt i has one seed in both modes,
    image_seed('quality', seed, str(i), k). Mode 'without_independent' draws without the prefix from the seeds
    image_seed('quality', seed, 'independent/<i>', k), which no other mode uses."""
    plans: dict[str, list[tuple[Job, int, int, str]]] = {}
    for mode in modes:
        rows = []
        for i, line in enumerate(prompts):
            with_p, clean = prompt_pair(line, placeholder or "alz")
            prompt = with_p if mode == "with" else clean
            key = f"independent/{i}" if mode == INDEPENDENT else str(i)
            for k in range(n):
                path = outdir / "images" / mode / f"{i:05d}-{k}.png"
                rows.append((Job(prompt, image_seed("quality", seed, key, k), path), i, k, clean))
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


def _image_stats(images: list[Image.Image]) -> ImageStats:
    stats, seen = ImageStats(), set()
    for im in images:
        stats.add(np.asarray(im.convert("RGB")), seen)
    return stats


def _interval_block(reps: np.ndarray | None) -> list[float] | None:
    return None if reps is None else percentile_interval(reps)


def distances(feats: dict[str, torch.Tensor], pairs: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    """FID and KID (with its spread over subsets) for each (a, b) pair of feature sets, keyed 'a_vs_b'."""
    out: dict = {"fid": {}, "kid": {}, "n": {}, "warnings": []}
    dim = next(iter(feats.values())).shape[1]
    for a, b in pairs:
        key = f"{a}_vs_{b}"
        out["fid"][key] = frechet_distance(feats[a], feats[b])
        out["kid"][key] = kernel_inception_distance(
            feats[a], feats[b], n_subsets=getattr(args, "kid_subsets", 100),
            subset_size=getattr(args, "kid_subset_size", 1000), seed=getattr(args, "bootstrap_seed", 0))
        out["n"][key] = [int(feats[a].shape[0]), int(feats[b].shape[0])]
        warn = fid_sample_warning(feats[a].shape[0], feats[b].shape[0], dim)
        if warn and warn not in out["warnings"]:
            out["warnings"].append(warn)
    out["feature_dim"] = int(dim)
    return out


CLIP_FLAGS = ("clip_model", "clip_pretrained")
FID_FLAGS = ("fid_ref", "fid_feature", "inception_weights", "fid_antialias", "kid_subsets", "kid_subset_size",
             "independent_set")


def ignored_flags(args: argparse.Namespace, want_fid: bool) -> list[str]:
    """Flags given on the command line that this run does not use (named once, not recorded as settings)."""
    given = getattr(args, "given_flags", None) or frozenset()
    unused = [f for f in CLIP_FLAGS if args.skip_clip and f in given]
    unused += [f for f in FID_FLAGS if not want_fid and f in given]
    unused += [f for f in ("embedding", "placeholder") if args.mode == "without" and f in given]
    unused += [f for f in ("bootstrap_level", "bootstrap_seed") if not getattr(args, "bootstrap", 0) and f in given]
    return [f"--{f}" for f in unused]


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
    alerts: list[Alert] = []
    summary: dict = {"script": "test_fid_clip_score.py", "prompts_file": prompts_file, "n_prompts": len(prompts),
                     "empty_prompts": empty, "settings": {}, "clip": {}, "fid": {}, "kid": {}, "notes": []}
    if empty:
        summary["notes"].append(f"{empty} empty prompt line(s) in {prompts_file} skipped")

    # Everything that can be missing is loaded before the first image is generated.
    scorer = None if args.skip_clip else ClipScorer(args.clip_model, args.clip_pretrained, device=device)
    want_fid = not args.skip_fid and (args.fid_ref is not None or len(modes) == 2)
    if not args.skip_fid and not want_fid:
        summary["notes"].append("FID skipped: give --fid_ref DIR or --mode both")
    unused = ignored_flags(args, want_fid)
    if unused:
        print(f"warning: {', '.join(unused)} ignored (not used by this run, not recorded in summary.json)")
        summary["ignored_flags"] = unused
    if want_fid and len(prompts) * args.n_samples < 2:
        raise UsageError(f"FID needs at least 2 generated images per set; {len(prompts)} prompt(s) x --n_samples "
                         f"{args.n_samples} gives fewer (raise --n_samples or pass --skip_fid)")
    independent = want_fid and len(modes) == 2 and getattr(args, "independent_set", True)
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
    plans = plan_quality(prompts, modes + ([INDEPENDENT] if independent else []), args.n_samples, args.seed,
                         gen.placeholder, outdir)
    if "with" in plans:
        check_prompt_room(gen, sorted({r[0].prompt for r in plans["with"]}), f"--prompts_file {prompts_file}")
    summary["settings"] = _settings(args, modes, gen.placeholder, scorer is not None, want_fid, antialias,
                                    independent)
    images: dict[str, list[Image.Image]] = {}
    for mode, rows in plans.items():
        made: dict[Path, Image.Image] = {}
        generate(gen, [r[0] for r in rows], batch_size=args.batch_size, steps=args.steps, scale=args.scale,
                 negative_prompt=args.negative_prompt, desc=f"{mode} prefix",
                 on_image=lambda job, im, made=made: made.__setitem__(job.path, im))
        images[mode] = [made[r[0].path] for r in rows]
    summary["images"] = {}
    for mode, ims in images.items():
        stats = _image_stats(ims)
        summary["images"][mode] = {"n": stats.n, "blank": stats.blank, "duplicates": stats.duplicates}
        if stats.blank == stats.n:
            raise ValueError(f"every one of the {stats.n} images of '{mode}' is one flat colour (e.g. black): the "
                             "model or the prefix produces no picture (NaN or exploding values?); CLIP score and FID "
                             f"of them would mean nothing, so nothing is reported. The images are in "
                             f"{outdir / 'images' / mode}")
        if stats.blank:
            alerts.append(Alert("blank_images", f"{stats.blank} of {stats.n} images are one flat colour (e.g. black)",
                                mode))

    n_boot = getattr(args, "bootstrap", 0) or 0
    level = getattr(args, "bootstrap_level", "identities")
    shape = (len(prompts), args.n_samples)  # rows = prompts, columns = images of a prompt
    tables: dict[str, np.ndarray] = {}
    cosines: dict[str, list[float]] = {}
    if scorer is not None:
        for mode in modes:
            cos = scorer.score(images[mode], [r[3] for r in plans[mode]], batch_size=args.batch_size)
            if not np.isfinite(cos).all():
                raise ValueError(f"the CLIP model returned NaN or inf cosines for {int((~np.isfinite(cos)).sum())} "
                                 f"'{mode}' images; check --clip_pretrained (a damaged weights file?)")
            cosines[mode] = cos.tolist()
            summary["clip"][mode] = clip_score_summary(cos)
            tables[f"{mode}/clip_score"] = (100.0 * np.maximum(cos, 0.0)).reshape(shape)
            tables[f"{mode}/clip_cosine"] = cos.reshape(shape)
        summary["clip"]["model"] = f"{args.clip_model} / {args.clip_pretrained}"

    pair_mae: list[float] = []
    if len(modes) == 2:  # image k of prompt i has the same seed in both modes: how much did the prefix change it?
        pair_mae = [pixel_mae(a, b) for a, b in zip(images["with"], images["without"], strict=True)]
        summary["paired"] = paired_summary(pair_mae)
        tables["paired/pixel_mae"] = np.asarray(pair_mae).reshape(shape)
        if max(pair_mae) == 0.0:
            alerts.append(Alert("prefix_no_effect", f"all {len(pair_mae)} images with the prefix equal their "
                                "same-seed images without it: the prefix changed nothing", "with"))
    if n_boot and tables:
        reps = bootstrap_means(tables, n_boot, seed=getattr(args, "bootstrap_seed", 0), level=level)
        for mode in modes:
            if mode in summary["clip"]:
                summary["clip"][mode]["ci95"] = {"clip_score": _interval_block(reps[f"{mode}/clip_score"]),
                                                 "clip_cosine_mean": _interval_block(reps[f"{mode}/clip_cosine"])}
        if len(modes) == 2 and "with" in summary["clip"]:
            diff = reps["with/clip_score"] - reps["without/clip_score"]
            summary["clip"]["with_minus_without"] = {
                "clip_score": summary["clip"]["with"]["clip_score"] - summary["clip"]["without"]["clip_score"],
                "ci95": percentile_interval(diff)}
        if "paired" in summary:
            summary["paired"]["ci95"] = {"pixel_mae_mean": _interval_block(reps["paired/pixel_mae"])}
        summary["bootstrap"] = {"resamples": n_boot, "level": level, "seed": getattr(args, "bootstrap_seed", 0),
                                "unit": "prompts", "interval": "95 % percentile"}
    else:
        summary["bootstrap"] = {"resamples": 0}

    if fid is not None:
        feats = {m: extract_features(fid, images[m], batch_size=args.batch_size) for m in images}
        pairs: list[tuple[str, str]] = []
        if ref:
            feats["ref"] = extract_features(fid, ref, batch_size=args.batch_size)
            pairs += [("ref", m) for m in modes]
        if len(modes) == 2:
            pairs.append(("without", "with"))  # same seeds: shared start noise lowers it
            if independent:
                pairs += [(INDEPENDENT, "with"), ("without", INDEPENDENT)]
        dist = distances(feats, pairs, args)
        summary["fid"], summary["kid"], summary["fid_n"] = dist["fid"], dist["kid"], dist["n"]
        summary["fid_feature_dim"] = dist["feature_dim"]
        alerts += [Alert("fid_small_n", w) for w in dist["warnings"]]
        if len(modes) == 2:
            summary["notes"].append(
                "without_vs_with compares same-seed images (they share start noise, which lowers FID/KID); "
                + ("without_independent_vs_with compares independent samples, and without_vs_without_independent "
                   "is the floor for two samples of the model without the prefix" if independent else
                   "pass --independent_set for the independent-seed comparison"))
    summary["warnings"] = [a.as_dict() for a in alerts]
    _write_csv({m: plans[m] for m in modes}, cosines, pair_mae, outdir / "clip_scores.csv", outdir)
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


def _settings(args: argparse.Namespace, modes: list[str], placeholder: str | None, clip: bool, fid: bool,
              antialias: bool, independent: bool) -> dict:
    """The settings this run used (CLIP and FID settings only when they were computed)."""
    out = {"config_path": args.config_path, "ckpt_path": used_checkpoint(args.config_path, args.ckpt_path),
           "precision": args.precision, "mode": args.mode, "n_samples": args.n_samples, "steps": args.steps,
           "scale": args.scale, "seed": args.seed, "negative_prompt": args.negative_prompt}
    if "with" in modes:
        out |= {"embedding": args.embedding, "placeholder": placeholder}
    if clip:
        out |= {"clip_model": args.clip_model, "clip_pretrained": args.clip_pretrained}
    if fid:
        out |= {"fid_ref": args.fid_ref, "fid_feature": getattr(args, "fid_feature", "inception"),
                "fid_antialias": antialias, "independent_set": independent,
                "kid_subsets": getattr(args, "kid_subsets", None), "kid_subset_size": getattr(args, "kid_subset_size",
                                                                                              None)}
    return out


def _ci(block: dict | None, key: str, digits: int = 3) -> str:
    text = format_interval(((block or {}).get("ci95") or {}).get(key), digits)
    return f" {text}" if text else ""


def format_summary(summary: dict) -> str:
    """CLIP score, FID/KID and pixel-difference lines for the terminal, with intervals and n."""
    lines = [f"{summary['n_prompts']} prompts from {summary['prompts_file']}"]
    for mode in ("with", "without"):
        c = summary["clip"].get(mode)
        if c:
            lines.append(f"CLIP score {mode:<7} prefix: {c['clip_score']:.3f}{_ci(c, 'clip_score')} (cosine "
                         f"{c['clip_cosine_mean']:.4f}{_ci(c, 'clip_cosine_mean', 4)}, n={c['n']})")
    diff = summary["clip"].get("with_minus_without")
    if diff:
        lines.append(f"CLIP score with - without, paired over prompts: {diff['clip_score']:.3f} "
                     f"{format_interval(diff.get('ci95'), 3)}")
    for key, value in summary["fid"].items():
        kid = summary.get("kid", {}).get(key)
        n = summary.get("fid_n", {}).get(key)
        kid_text = (f"; KID {kid['kid_mean']:.5f} ± {kid['kid_std']:.5f} (subsets of {kid['subset_size']}, "
                    f"95 % of subsets in {format_interval(kid['kid_interval95'], 5)})") if kid else ""
        lines.append(f"FID {key}: {value:.4f}{f' (n={n[0]}/{n[1]})' if n else ''}{kid_text}")
    paired = summary.get("paired")
    if paired:
        lines.append(f"with vs without, same seed: mean absolute pixel difference {paired['pixel_mae_mean']:.4f}"
                     f"{_ci(paired, 'pixel_mae_mean', 4)} (median {paired['pixel_mae_median']:.4f}, n={paired['n']})")
    if summary["fid"] and summary.get("fid_feature", "inception") == "inception":
        lines.append(f"FID resize to 299x299 with antialias={summary.get('fid_antialias')}")
    elif summary["fid"]:
        lines.append(f"FID features: {summary['fid_feature']}")
    boot = summary.get("bootstrap") or {}
    if boot.get("resamples") and (summary["clip"] or paired):
        lines.append(f"[lo, hi]: 95 % bootstrap interval ({boot['resamples']} resamples of the prompts, level "
                     f"{boot['level']}, seed {boot['seed']})")
    ref = summary.get("fid_ref")
    if ref and ref["unreadable"]:
        lines.append(f"{ref['unreadable']} unreadable reference images skipped")
    lines += summary["notes"]
    lines += [warning_line(w) for w in summary.get("warnings") or []]
    return "\n".join(lines)
