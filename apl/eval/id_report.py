"""test_id.py's reports for people: the console table and report.md, both with intervals, n and the warnings."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from apl.eval.checks import warning_line
from apl.eval.id_metrics import IdentityResult
from apl.eval.stats import format_interval

# How a mode key reads in tables ('images' is a flat --image_folder, whose images are neither with nor without).
MODE_LABELS = {"with": "with prefix", "without": "without prefix", "images": "folder"}


def mode_label(mode: str) -> str:
    """'with' -> 'with prefix'; a flat folder's 'images' -> 'folder'."""
    return MODE_LABELS.get(mode, mode)


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(s: dict, key: str, digits: int = 4) -> str:
    ci = format_interval((s.get("ci95") or {}).get(key), digits)
    return f"{_f(s.get(key), digits)} {ci}".strip()


def images_per_identity(s: dict) -> str:
    """'4' or '3-4': the n that mean of max is taken over."""
    per = s.get("images_per_identity") or {}
    lo, hi = per.get("min"), per.get("max")
    return "?" if lo is None else str(lo) if lo == hi else f"{lo}-{hi}"


def bootstrap_words(boot: dict) -> str:
    """'1000 resamples of the identities, each with all its images, seed 0' (or the two-level variant)."""
    inner = "and of the images within each" if boot.get("level") == "two_level" else "each with all its images"
    return f"{boot['resamples']} resamples of the {boot['unit']}, {inner}, seed {boot['seed']}"


def _sets(summary: dict) -> dict[str, dict]:
    """Template sets in report order; a summary without them is one unnamed set."""
    return summary.get("template_sets") or {"default": {"modes": summary["modes"]}}


def _comparison_line(name: str, comp: dict | None, digits: int = 4) -> str | None:
    if not comp:
        return None
    ci = comp.get("ci95") or {}
    parts = [f"ID accuracy with - without {_f(comp.get('id_accuracy_diff'), digits)} "
             f"{format_interval(ci.get('id_accuracy_diff'), digits)}".rstrip(),
             f"with / without {_f(comp.get('id_accuracy_ratio'), digits)} "
             f"{format_interval(ci.get('id_accuracy_ratio'), digits)}".rstrip(),
             f"no-face rate with - without {_f(comp.get('no_face_rate_diff'), digits)} "
             f"{format_interval(ci.get('no_face_rate_diff'), digits)}".rstrip()]
    return f"{name}: " + "; ".join(parts)


def format_summary(summary: dict) -> str:
    """The overall numbers per template set and mode, with 95 % intervals, for the terminal."""
    thr = summary["threshold"]
    boot = summary.get("bootstrap") or {}
    lines = []
    for set_name, entry in _sets(summary).items():
        templates = entry.get("templates")
        if templates is not None and len(_sets(summary)) > 1:
            shown = (templates[0] if len(templates) == 1 else f"{len(templates)} templates" if templates
                     else f"images of {entry.get('source')}")
            lines.append(f"template set {set_name!r} ({shown}):")
        lines.append(f"{'mode':<15} {'mean_of_mean':>22} {'mean_of_max':>22} {'id_acc@' + str(thr):>22} "
                     f"{'no_face':>22} {'mean_sim_faces':>22} {'n/id':>5} {'ids':>4} {'images':>6}")
        for mode, s in entry["modes"].items():
            if not s.get("n_images"):
                lines.append(f"{mode_label(mode):<15} (no readable images)")
                continue
            cells = [_cell(s, k, 3) for k in ("mean_of_mean", "mean_of_max", "id_accuracy", "no_face_rate",
                                                "mean_sim_faces")]
            lines.append(f"{mode_label(mode):<15} " + " ".join(f"{c:>22}" for c in cells)
                         + f" {images_per_identity(s):>5} {s['n_identities']:>4} {s['n_images']:>6}")
            if s.get("unreadable"):
                lines.append(f"{'':<15} {s['unreadable']} unreadable images skipped")
        comp = _comparison_line("  paired over identities", entry.get("with_vs_without"), 3)
        if comp:
            lines.append(comp)
    if boot.get("resamples"):
        lines.append(f"[lo, hi]: 95 % bootstrap interval ({bootstrap_words(boot)}); n/id: images per identity "
                     "(mean_of_max grows with it); no face = similarity 0 in mean_of_mean / mean_of_max")
    else:
        lines.append("no intervals (--bootstrap 0); n/id: images per identity (mean_of_max grows with it)")
    missing = summary.get("names_without_ground_truth") or []
    if missing:
        lines.append(f"identities without ground truth (not scored, {len(missing)}): {', '.join(missing[:10])}"
                     + (" ..." if len(missing) > 10 else ""))
    stale = summary.get("stale_files") or {}
    if stale:
        lines.append(f"images from earlier runs left in --outdir (not scored): {sum(map(len, stale.values()))}")
    if summary.get("unrecognised_files"):
        lines.append(f"files not named <Name>-<k>.<ext> (ignored): {len(summary['unrecognised_files'])}")
    lines += [f"note: {n}" for n in summary.get("notes") or []]
    lines += [warning_line(w) for w in summary.get("warnings") or []]
    return "\n".join(lines)


def markdown_report(
    summary: dict, results: dict[str, list[IdentityResult]], grids: dict[str, Path], outdir: Path
) -> str:
    """The report: warnings first, the overall numbers per template set and mode, then one row per identity."""
    thr = summary["threshold"]
    boot = summary.get("bootstrap") or {}
    lines = ["# Identity similarity (test_id.py)", ""]
    warnings = summary.get("warnings") or []
    if warnings:
        lines += ["## Warnings: read these before the numbers", ""]
        lines += [f"- **{w['code']}**{' (' + w['where'] + ')' if w.get('where') else ''}: {w['message']}"
                  for w in warnings]
        lines.append("")
    lines.append(
        f"Face backend: {summary['settings']['face_backend']}; ID threshold {thr}. A no-face image counts as "
        "similarity 0 in mean of mean and mean of max, so erased faces look anonymous there: read them with the "
        "no-face rate, ID accuracy (detected faces) and the mean similarity over detected faces. Lower is more "
        "anonymous. Mean of max grows with n, the images per identity."
    )
    if boot.get("resamples"):
        lines.append(f"[lo, hi]: 95 % bootstrap interval ({bootstrap_words(boot)}).")
    if summary.get("notes"):
        lines += [""] + [f"Note: {n}." for n in summary["notes"]]
    for set_name, entry in _sets(summary).items():
        templates = entry.get("templates")
        if templates is not None and len(_sets(summary)) > 1:
            lines += ["", f"## Template set `{set_name}`", ""]
            lines += [f"- `{t}`" for t in templates] or [f"- images of `{entry.get('source')}`"]
            if entry.get("note"):
                lines.append(f"- {entry['note']}")
        lines += [
            "",
            f"| mode | mean of mean | mean of max | n | ID accuracy (≥ {thr}, detected faces) | no-face rate | "
            "mean sim. (detected faces) | identities | images |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for m, s in entry["modes"].items():
            if not s.get("n_images"):
                lines.append(f"| {mode_label(m)} | – | – | – | – | – | – | 0 | 0 |")
                continue
            lines.append(
                f"| {mode_label(m)} | {_cell(s, 'mean_of_mean')} | {_cell(s, 'mean_of_max')} | "
                f"{images_per_identity(s)} | {_cell(s, 'id_accuracy')} | {_cell(s, 'no_face_rate')} | "
                f"{_cell(s, 'mean_sim_faces')} | {s['n_identities']} | {s['n_images']} |"
            )
        comp = _comparison_line("Paired over identities", entry.get("with_vs_without"))
        if comp:
            lines += ["", comp + "."]
    modes = list(results)
    by_mode = {m: {r.name: r for r in results[m]} for m in modes}
    names = list(dict.fromkeys(r.name for m in modes for r in results[m]))
    head = " | ".join(f"{mode_label(m)}: mean | max | no face" for m in modes)
    lines += ["", "## Per identity" + (" (template set `default`)" if len(_sets(summary)) > 1 else ""), "",
              f"| name | {head} | grid |", "|---|" + "---|" * (3 * len(modes)) + "---|"]
    for name in names:
        cells = []
        for m in modes:
            r = by_mode[m].get(name)
            cells += [_f(r.mean), _f(r.max), f"{r.no_face}/{r.n_images}"] if r else ["–", "–", "–"]
        grid = grids.get(name)
        link = f"![{name}]({urllib.parse.quote(grid.relative_to(outdir).as_posix())})" if grid else ""
        lines.append(f"| {name} | {' | '.join(cells)} | {link} |")
    missing = summary.get("names_without_ground_truth") or []
    if missing:
        lines += ["", f"Names without ground truth (not scored, {len(missing)}): {', '.join(missing)}"]
    return "\n".join(lines) + "\n"
