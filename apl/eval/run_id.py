"""test_id.py's work: generate (or read) images per identity, score faces against ground truth, write reports.

Images live in `<outdir>/images/<mode>/<Name>-<k>.png` (mode 'with' or 'without' the prefix). Image k of a name
has the same seed in both modes, image_seed('test_id', --seed, name, k), so the side-by-side grids compare the
prefix's effect on the same start noise; the 'test_id' domain keeps it apart from the face set's seeds. Extra
template sets (--prompt_templates_file) put theirs in `<outdir>/template_sets/<set>/images/<mode>/`, image k with
the same seed again, so a set differs from the default only by its prompts.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apl.eval.checks import (
    Alert,
    ImageStats,
    comparison_alerts,
    few_identities_alert,
    mode_alerts,
    pixel_digest,
    prefix_effect_alert,
)
from apl.eval.defaults import DEFAULT_TEMPLATE
from apl.eval.faces import FaceBackend
from apl.eval.generation import (
    check_name,
    check_prompt_room,
    generate,
    load_model_and_prefix,
    modes_for,
    require_embedding,
    shipped,
    used_checkpoint,
)
from apl.eval.id_images import (  # noqa: F401 - collect_folder: toyworld.grid
    MODES,
    SETS_DIR,
    ImageSets,
    collect_folder,
    plan_images,
    stale_images,
    write_grids,
)
from apl.eval.id_inputs import backend_from_args, backend_threshold, gt_names_path, load_gt  # noqa: F401
from apl.eval.id_metrics import (
    IdentityResult,
    IdentityTable,
    embed_images,
    reference_images,
    summarize,
    write_identity_csv,
    write_summary_json,
)
from apl.eval.id_report import format_summary, markdown_report
from apl.eval.images import (
    ImageReadError,
    LoadReport,
    load_image_rgb,
)
from apl.eval.stats import ID_FIGURES, bootstrap_id, intervals, pack_rows, paired_differences
from apl.eval.templates import DEFAULT_SET, TemplateSet, check_template, load_template_sets  # noqa: F401
from apl.io import atomic_write_text
from apl.people import load_people
from apl.runtime import UsageError

__all__ = ["DEFAULT_TEMPLATE", "collect_folder", "format_summary", "markdown_report", "plan_images", "run_test_id"]

logger = logging.getLogger(__name__)

# Flags that only shape generated images: with --image_folder they do nothing (warned about, not recorded).
GENERATION_FLAGS = ("ckpt_path", "config_path", "precision", "embedding", "mode", "placeholder", "n_samples",
                    "batch_size", "steps", "scale", "seed", "negative_prompt", "prompt_template",
                    "prompt_templates_file")


def resolve_identity_names(args: argparse.Namespace, fallback: list[str]) -> list[str]:
    """--names, else the people file's names, else `fallback` (the ground truth's or the folder's names)."""
    if args.names:
        return list(dict.fromkeys(check_name(n) for n in args.names))
    if args.people_file:
        return [check_name(n) for n in load_people(shipped(args.people_file))]
    return list(fallback)


@dataclass
class ModeScore:
    """One mode of one template set, scored."""

    results: list[IdentityResult]
    report: LoadReport
    stats: ImageStats


def score_set(
    images: dict[str, list[Path]], gt: dict[str, np.ndarray], backend: FaceBackend
) -> tuple[list[IdentityResult], LoadReport]:
    """Embed the largest face of every image; no face counts as similarity 0, unreadable images are left out."""
    scored = score_mode(images, gt, backend)
    return scored.results, scored.report


def score_mode(images: dict[str, list[Path]], gt: dict[str, np.ndarray], backend: FaceBackend) -> ModeScore:
    """score_set plus what else the images show (flat colour, copies), from the same single read of each file."""
    table = IdentityTable(gt)
    report = LoadReport()
    stats = ImageStats()
    seen: set[str] = set()
    for name, paths in images.items():
        for _, emb in embed_images(paths, backend, report, on_image=lambda image: stats.add(image, seen)):
            table.add(name, emb)
    return ModeScore(table.results(), report, stats)


def _ignored_flags(args: argparse.Namespace, image_folder: bool) -> list[str]:
    """Flags given on the command line that this run does not use."""
    given = getattr(args, "given_flags", None) or frozenset()
    ignored = [f for f in GENERATION_FLAGS if f in given] if image_folder else []
    if not image_folder and args.mode == "without":
        ignored += [f for f in ("embedding", "placeholder") if f in given]
    if not getattr(args, "bootstrap", 0):
        ignored += [f for f in ("bootstrap_level", "bootstrap_seed") if f in given]
    return [f"--{f}" for f in ignored]


def _settings(args: argparse.Namespace, backend: FaceBackend, threshold: float, generated: bool,
              modes: list[str], sets: list[TemplateSet], placeholder: str | None) -> dict:
    """What this run used, and nothing it did not (an --image_folder run generated nothing)."""
    out: dict = {"face_backend": backend.name, "id_threshold": threshold,
                 "id_threshold_given": args.id_threshold is not None}
    for key in ("det_thresh", "det_size"):  # only backends that have them (dlib has neither)
        if getattr(backend, key, None) is not None:
            out[key] = getattr(backend, key)
    if backend.name == "insightface":
        out["insightface_pack"] = str(getattr(backend, "pack_dir", args.insightface_pack))
    if not generated:
        return out | {"image_folder": args.image_folder}
    out |= {"config_path": args.config_path, "ckpt_path": used_checkpoint(args.config_path, args.ckpt_path),
            "precision": args.precision, "mode": args.mode, "prompt_template": args.prompt_template,
            "prompt_templates_file": [s.source for s in sets if s.source], "n_samples": args.n_samples,
            "steps": args.steps, "scale": args.scale, "seed": args.seed, "negative_prompt": args.negative_prompt}
    if "with" in modes:
        out |= {"embedding": args.embedding, "placeholder": placeholder}
    return out


def _mode_entry(scored: ModeScore, threshold: float, replicates: dict | None) -> dict:
    s = summarize(scored.results, threshold)
    if replicates is not None:
        s["ci95"] = intervals(replicates)
    return s | {
        "unreadable": len(scored.report.unreadable),
        "unreadable_files": scored.report.unreadable,
        "blank_images": scored.stats.blank,
        "duplicate_images": scored.stats.duplicates,
    }


def _comparison(a: dict, b: dict, reps_a: dict | None, reps_b: dict | None) -> dict:
    """Figures of a - b (and the ratio of ID accuracies), with paired-bootstrap intervals when given."""
    out: dict = {}
    for k in ID_FIGURES:
        out[f"{k}_diff"] = None if a.get(k) is None or b.get(k) is None else a[k] - b[k]
    acc_a, acc_b = a.get("id_accuracy"), b.get("id_accuracy")
    out["id_accuracy_ratio"] = acc_a / acc_b if acc_a is not None and acc_b else None
    if reps_a is not None and reps_b is not None:
        diffs = {f"{k}_diff": v for k, v in paired_differences(reps_a, reps_b).items()}
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(reps_b["id_accuracy"] > 0, reps_a["id_accuracy"] / reps_b["id_accuracy"], np.nan)
        out["ci95"] = intervals(diffs | {"id_accuracy_ratio": ratio})
    return out


def _reference_digests(folder: str) -> set[str]:
    """Pixel digests of the reference photos (to notice when the scored images are the references themselves)."""
    digests = set()
    for paths in reference_images(Path(folder)).values():
        for path in paths:
            try:
                digests.add(pixel_digest(load_image_rgb(path)))
            except ImageReadError:
                continue
    return digests


SetImages = dict[str, dict[str, dict[str, list[Path]]]]  # template set -> mode -> name -> image paths


def _folder_images(args: argparse.Namespace, gt: dict, template_sets: list[TemplateSet]) -> tuple[SetImages, list[str],
                                                                                                 list[str]]:
    """The images of --image_folder (and of its template_sets/ subfolders), the names without ground truth, and the
    files not named <Name>-<k>; template_sets gains one (template-less) set per subfolder."""
    folders = {DEFAULT_SET: Path(args.image_folder)}
    extra = Path(args.image_folder) / SETS_DIR
    if extra.is_dir():  # a previous run's --outdir with template sets: score them too
        for sub in sorted(p for p in extra.iterdir() if p.is_dir() and not p.name.startswith(".")):
            folders[sub.name] = sub
            template_sets.append(TemplateSet(sub.name, [], str(sub)))
    names: list[str] = []
    unrecognised: list[str] = []
    set_images: SetImages = {}
    for set_name, folder in folders.items():
        found = collect_folder(folder)
        unrecognised += found.unrecognised
        if set_name == DEFAULT_SET:
            names = resolve_identity_names(args, list(dict.fromkeys(n for s in found.sets.values() for n in s)))
        set_images[set_name] = {m: {n: s[n] for n in names if n in s and n in gt} for m, s in found.sets.items()}
    return set_images, [n for n in names if n not in gt], unrecognised


def _generated_images(args: argparse.Namespace, gt: dict, template_sets: list[TemplateSet], outdir: Path
                      ) -> tuple[SetImages, list[str], dict, str | None]:
    """Generate every set's images; returns them, the names without ground truth, stale files per set and the
    placeholder used."""
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
    modes = modes_for(args.mode)
    gen = load_model_and_prefix(
        args.config_path,
        args.ckpt_path,
        args.device,
        args.precision,
        embedding=args.embedding if args.mode != "without" else None,
        placeholder=args.placeholder,
        seed=args.seed,
    )
    plans, stale = {}, {}
    for ts in template_sets:
        folder = outdir if ts.name == DEFAULT_SET else outdir / SETS_DIR / ts.name
        plans[ts.name] = plan_images(scored, modes, args.n_samples, args.seed, ts.templates, gen.placeholder, folder)
        with_prompts = sorted({j.prompt for jobs in plans[ts.name].get("with", {}).values() for j in jobs})
        check_prompt_room(gen, with_prompts,
                          "--prompt_template" if ts.source is None else f"--prompt_templates_file {ts.source}")
        stale_here = stale_images(plans[ts.name], folder)
        for mode, files in stale_here.items():
            print(
                f"warning: {len(files)} images in {folder / 'images' / mode} are not part of this run (e.g. "
                f"{Path(files[0]).name}; left by an earlier run with more --n_samples or other names). They are "
                f"not scored now, but --image_folder {folder} would score them: move them away or use a new "
                "--outdir."
            )
        if stale_here:
            stale[ts.name] = stale_here
    for mode in modes:  # all sets of a mode in one stream of batches
        jobs = [j for per_name in plans.values() for name_jobs in per_name[mode].values() for j in name_jobs]
        generate(gen, jobs, batch_size=args.batch_size, steps=args.steps, scale=args.scale,
                 negative_prompt=args.negative_prompt, desc=f"test_id {mode}")
    set_images = {s: {m: {n: [j.path for j in jobs] for n, jobs in per_name.items()} for m, per_name in p.items()}
                  for s, p in plans.items()}
    return set_images, missing_gt, stale, gen.placeholder


def _score_all(set_images: SetImages, gt: dict, backend: FaceBackend, where: str) -> dict[str, dict[str, ModeScore]]:
    """Score every set and mode; a set whose images are all one flat colour is refused."""
    scores: dict[str, dict[str, ModeScore]] = {}
    for set_name, sets in set_images.items():
        scores[set_name] = {}
        for mode, images in sets.items():
            scored = score_mode(images, gt, backend)
            if scored.stats.n and scored.stats.blank == scored.stats.n:
                label = f"{set_name}/{mode}" if set_name != DEFAULT_SET else mode
                raise ValueError(
                    f"every one of the {scored.stats.n} images of '{label}' is one flat colour (e.g. black): the "
                    "model or the prefix produces no picture (NaN or exploding values in the checkpoint or the "
                    "prefix?). Scored, they would read as perfect anonymisation, so nothing is reported; look at the "
                    f"images in {where}"
                )
            scores[set_name][mode] = scored
    if not any(sc.results for per_mode in scores.values() for sc in per_mode.values()):
        raise ValueError("no readable images of identities with ground truth were found; nothing to score")
    return scores


def _bootstrap(scores: dict[str, dict[str, ModeScore]], threshold: float, args: argparse.Namespace
               ) -> tuple[dict, dict]:
    """Replicates per (set, mode) and the identity order of each table. One call for every table: tables of the same
    identities share their resampled rows, so differences between modes and between template sets are paired."""
    tables, table_names = {}, {}
    for set_name, per_mode in scores.items():
        for mode, sc in per_mode.items():
            if sc.results:
                tables[(set_name, mode)] = pack_rows([r.sims for r in sc.results])
                table_names[(set_name, mode)] = [r.name for r in sc.results]
    n_boot = getattr(args, "bootstrap", 0) or 0
    if not n_boot:
        return {}, table_names
    reps = bootstrap_id({f"{k[0]}/{k[1]}": v for k, v in tables.items()}, threshold, n_boot,
                        seed=getattr(args, "bootstrap_seed", 0), level=getattr(args, "bootstrap_level", "identities"))
    return {k: reps[f"{k[0]}/{k[1]}"] for k in tables}, table_names


def _set_entry(ts: TemplateSet, per_mode: dict[str, ModeScore], threshold: float, replicates: dict,
               table_names: dict, ref_digests: set[str], alerts: list[Alert], default: dict | None) -> dict:
    """One template set's block of summary.json (its modes, with-vs-without and vs-default), adding its alerts."""
    modes_out = {}
    for mode, sc in per_mode.items():
        if not sc.results:
            modes_out[mode] = {"n_images": 0, "unreadable": len(sc.report.unreadable), "note": "nothing to score"}
            continue
        modes_out[mode] = _mode_entry(sc, threshold, replicates.get((ts.name, mode)))
        alerts += mode_alerts(mode, modes_out[mode], sc.stats, ts.name)
        same_as_refs = ref_digests & set(sc.stats.digests or [])
        if same_as_refs:
            alerts.append(Alert("scored_references", f"{len(same_as_refs)} scored images are pixel-identical to "
                                "reference photos of --gt_folder: their similarity is 1 by construction.",
                                mode, ts.name))
    entry: dict = {"templates": ts.templates, "source": ts.source, "modes": modes_out}
    if ts.name == DEFAULT_SET and ts.training_form:
        entry["note"] = ("this prompt has the form train.py trains on (a prefix phrase + the name), so it measures "
                         "the prefix on its training prompts; add --prompt_templates_file with held-out templates for "
                         "prompts it has not seen")
    same_ids = table_names.get((ts.name, "with")) == table_names.get((ts.name, "without"))
    alerts += comparison_alerts(modes_out, ts.name, same_identities=same_ids)
    if "with" in per_mode and "without" in per_mode:
        effect = prefix_effect_alert(per_mode["with"].stats.digests or [], per_mode["without"].stats.digests or [],
                                     ts.name)
        alerts += [effect] if effect else []
        if same_ids and modes_out["with"].get("n_images") and modes_out["without"].get("n_images"):
            entry["with_vs_without"] = _comparison(modes_out["with"], modes_out["without"],
                                                   replicates.get((ts.name, "with")),
                                                   replicates.get((ts.name, "without")))
    if default is not None:  # paired with the default set where both scored the same identities
        entry["vs_default"] = {
            mode: _comparison(modes_out[mode], default["modes"][mode], replicates.get((ts.name, mode)),
                              replicates.get((DEFAULT_SET, mode)))
            for mode in modes_out
            if modes_out[mode].get("n_images") and default["modes"].get(mode, {}).get("n_images")
            and table_names.get((ts.name, mode)) == table_names.get((DEFAULT_SET, mode))
        }
    return entry


def run_test_id(args: argparse.Namespace) -> dict:
    """Generate or read the images, score them, write CSV/JSON/markdown/grids into --outdir; returns the summary."""
    image_folder = args.image_folder is not None
    # Scored images come with no record of their prompts: an --image_folder set's templates are unknown ([]).
    template_sets = [TemplateSet(DEFAULT_SET, [], args.image_folder)] if image_folder else \
        load_template_sets(args.prompt_template, getattr(args, "prompt_templates_file", None))
    if not image_folder:
        require_embedding(args.mode, args.embedding)
    outdir = Path(args.outdir)
    alerts: list[Alert] = []
    ignored = _ignored_flags(args, image_folder)
    if ignored:
        why = "--image_folder scores existing images; " if image_folder else ""
        print(f"warning: {', '.join(ignored)} ignored ({why}not used by this run, not recorded in summary.json)")
    # Face models and ground truth first: a missing pack or bad .npy must fail before any image is generated.
    backend = backend_from_args(args)
    threshold = args.id_threshold if args.id_threshold is not None else backend_threshold(backend)
    gt, gt_info = load_gt(args, backend, alerts)
    if not gt:
        if gt_info.get("source") == "folder":
            found = f"{gt_info.get('loaded', 0)} readable reference images, {gt_info.get('no_face', 0)} without a face"
            raise UsageError(
                f"--gt_folder {gt_info.get('folder')}: no identity has a ground-truth embedding ({found}, for the "
                f"{backend.name} face backend); use photos in which the face is visible, or another --face_backend"
            )
        raise UsageError(f"no identity has a ground-truth embedding ({gt_info})")
    if image_folder:
        set_images, missing_gt, unrecognised = _folder_images(args, gt, template_sets)
        stale, placeholder = {}, None
    else:
        set_images, missing_gt, stale, placeholder = _generated_images(args, gt, template_sets, outdir)
        unrecognised = []

    scores = _score_all(set_images, gt, backend, args.image_folder if image_folder else str(outdir))
    replicates, table_names = _bootstrap(scores, threshold, args)
    ref_digests = _reference_digests(args.gt_folder) if args.gt_folder else set()
    set_entries: dict[str, dict] = {}
    for ts in template_sets:
        set_entries[ts.name] = _set_entry(ts, scores.get(ts.name, {}), threshold, replicates, table_names,
                                          ref_digests, alerts, set_entries.get(DEFAULT_SET))
    few = few_identities_alert(max((len(n) for n in table_names.values()), default=0))
    alerts += [few] if few else []
    default = set_entries[DEFAULT_SET]
    notes = [f"template set 'default': {default['note']}"] if default.get("note") and len(template_sets) == 1 else []
    notes.append("id_accuracy_all_images counts a no-face image as 'not recognised' and so flatters a prefix that "
                 "erases faces; read id_accuracy (detected faces) with no_face_rate")
    n_boot = getattr(args, "bootstrap", 0) or 0
    summary: dict = {
        "script": "test_id.py",
        "threshold": threshold,
        "modes": default["modes"],  # the --prompt_template set, as before template sets existed
        "with_vs_without": default.get("with_vs_without"),
        "template_sets": set_entries,
        "bootstrap": {"resamples": n_boot, "level": getattr(args, "bootstrap_level", "identities"),
                      "seed": getattr(args, "bootstrap_seed", 0), "unit": "identities",
                      "interval": "95 % percentile"} if n_boot else {"resamples": 0},
        "warnings": [a.as_dict() for a in alerts],
        "notes": notes,
        "names_without_ground_truth": missing_gt,
        "unrecognised_files": unrecognised,
        "stale_files": stale.get(DEFAULT_SET, {}),
        "stale_files_template_sets": {k: v for k, v in stale.items() if k != DEFAULT_SET},
        "ground_truth": gt_info,
        "settings": _settings(args, backend, threshold, not image_folder, modes_for(args.mode), template_sets,
                              placeholder),
    }
    if ignored:
        summary["ignored_flags"] = ignored
    _write_reports(summary, scores, set_images, template_sets, outdir)
    return summary


def _write_reports(summary: dict, scores: dict[str, dict[str, ModeScore]], set_images: SetImages,
                   template_sets: list[TemplateSet], outdir: Path) -> None:
    """identity_<mode>.csv per set, the default set's grids, summary.json and report.md."""
    results: dict[str, list[IdentityResult]] = {}
    for ts in template_sets:
        folder = outdir if ts.name == DEFAULT_SET else outdir / SETS_DIR / ts.name
        for mode, sc in scores.get(ts.name, {}).items():
            if sc.results:
                write_identity_csv(sc.results, folder / f"identity_{mode}.csv")
                if ts.name == DEFAULT_SET:
                    results[mode] = sc.results
    scored_names = list(dict.fromkeys(r.name for res in results.values() for r in res))
    grids = write_grids(set_images.get(DEFAULT_SET, {}), scored_names, outdir / "grids")
    write_summary_json(summary, outdir / "summary.json")
    atomic_write_text(markdown_report(summary, results, grids, outdir), outdir / "report.md")
