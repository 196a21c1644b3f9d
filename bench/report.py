"""Reading the benchmark results: error statistics, throughput ratios, the issue's targets, the Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from apl.runtime import UsageError


def error_stats(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """max |x - ref|, that over max |ref|, relative L2 error and cosine similarity (fp64; None where ref is 0)."""
    x, ref = x.detach().double().flatten(), ref.detach().double().flatten()
    diff = x - ref
    ref_max, ref_norm = float(ref.abs().max()), float(ref.norm())
    return {
        "max_abs": float(diff.abs().max()),
        "max_abs_over_max_ref": float(diff.abs().max()) / ref_max if ref_max > 0 else None,
        "rel_l2": float(diff.norm()) / ref_norm if ref_norm > 0 else None,
        "cosine": float(torch.nn.functional.cosine_similarity(x, ref, dim=0)),
        "ref_max_abs": ref_max,
    }


def _val(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def our_variants(res: dict) -> list[str]:
    """Our training rows: 'ours' (eager or compiled), 'ours_graph' (CUDA graph), in that order."""
    return sorted((n for n in res.get("train", {}) if n.startswith("ours")), key=lambda n: (n != "ours", n))


def compute_ratios(res: dict) -> dict:
    """Throughput ratios per batch: each of our variants / diffusers_bf16 and / original_style; sampling, decode."""
    train = res.get("train", {})
    orig = _val(train, "original_style", "1", "samples_per_s")
    out: dict = {"train": {}}
    names = our_variants(res)
    for b in sorted(set().union(*(train[n] for n in [*names, "diffusers_bf16"] if n in train)), key=int):
        diff = _val(train, "diffusers_bf16", b, "samples_per_s")
        row = {"diffusers_bf16/original_style": _ratio(diff, orig)}
        for name in names:
            ours = _val(train, name, b, "samples_per_s")
            row.update({f"{name}/diffusers_bf16": _ratio(ours, diff), f"{name}/original_style": _ratio(ours, orig)})
        out["train"][b] = row
    out["sampling"] = {"ours/diffusers_bf16": _ratio(_val(res, "sampling", "ours", "images_per_s"),
                                                     _val(res, "sampling", "diffusers_bf16", "images_per_s"))}
    out["decode"] = {"ours/diffusers_bf16": _ratio(_val(res, "decode", "ours", "images_per_s"),
                                                   _val(res, "decode", "diffusers_bf16", "images_per_s"))}
    return out


def _best(res: dict, batch: str, key: str | None = None, ratio: str | None = None, lower: bool = False) -> tuple:
    """(value, variant) of our best variant at `batch`: the record's `key`, or the ratio '<variant>/<ratio>'."""
    found = []
    for name in our_variants(res):
        if ratio is None:
            v = _val(res, "train", name, batch, key)
        else:
            v = _val(res, "ratios", "train", batch, f"{name}/{ratio}")
        if v is not None:
            found.append((v, name))
    if not found:
        return None, None
    return min(found) if lower else max(found)


def check_targets(res: dict) -> dict:
    """The issue's targets (full size on CUDA only): our best variant's value, the goal, whether it is met."""
    meta = res.get("meta", {})
    if meta.get("size") != "full" or meta.get("device_type") != "cuda":
        return {"note": "targets apply to --size full (SD v1.5) on a CUDA GPU"}
    train, ratios = res.get("train", {}), res.get("ratios", {})
    big = str(max((int(b) for n in our_variants(res) for b in train[n]), default=0))
    rows = [
        (f"train samples/s at batch {big}", *_best(res, big, "samples_per_s"), ">=", 200.0),
        (f"train vs diffusers_bf16 at batch {big}", *_best(res, big, ratio="diffusers_bf16"), ">=", 2.0),
        (f"train vs original_style at batch {big}", *_best(res, big, ratio="original_style"), ">=", 35.0),
        ("batch-1 step ms", *_best(res, "1", "step_ms", lower=True), "<=", 25.0),
        ("batch-1 peak GiB", *_best(res, "1", "peak_gib", lower=True), "<=", 6.0),
        ("sampling images/s", _val(res, "sampling", "ours", "images_per_s"), "ours", ">=", 5.0),
        ("sampling vs diffusers_bf16", _val(ratios, "sampling", "ours/diffusers_bf16"), "ours", ">=", 1.6),
    ]
    out = {}
    for name, value, by, op, goal in rows:
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out[name] = {"value": value, "goal": f"{op} {goal:g}", "met": met, "by": by if value is not None else None}
    return out


def _fmt(v, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def describe_record(rec: dict) -> str:
    """One progress line for a training, sampling or decode record."""
    peak = f"peak {_fmt(rec['peak_gib'], '.2f')} GiB"
    if "samples_per_s" in rec:
        return (f"{rec['samples_per_s']:.3g} samples/s, {rec['step_ms']:.1f} ms/step, {peak} "
                f"(warm-up {rec['warmup_s']:.1f} s)")
    if "ms_per_batch" in rec:
        return f"{rec['images_per_s']:.3g} images/s, {rec['ms_per_batch']:.1f} ms/batch, {peak}"
    return (f"{rec['images_per_s']:.3g} images/s, {rec['s_per_batch']:.2f} s/batch, {peak}, "
            f"warm-up {rec['warmup_s']:.1f} s")


def markdown_table(res: dict) -> str:
    """The results as a Markdown table, then numerics, targets and errors."""
    m, ratios = res["meta"], res.get("ratios", {})
    lines = [
        f"APL benchmark: {m.get('size')} size on {m.get('device_name')} ({m.get('device')}); {m.get('precision')}"
        f"{', compile=' + str(m.get('compile_mode')) if m.get('compile') else ''}"
        f"{', grad ckpt' if m.get('grad_ckpt') else ''}{', CUDA graph' if m.get('cuda_graph') else ''}"
        f"{', channels-last' if m.get('channels_last') else ''}"
        f"; torch {m.get('torch')}, diffusers {m.get('diffusers')}",
        *([f"(baselines {', '.join(m['baselines_from']['copied'])} from {m['baselines_from']['path']})"]
          if m.get("baselines_from") else []),
        "",
        "| workload | batch | throughput | ms / step | peak GiB | x diffusers_bf16 | x original_style |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    train = res.get("train", {})
    for name in ("original_style", "diffusers_bf16", *our_variants(res)):
        for b, rec in sorted(train.get(name, {}).items(), key=lambda kv: int(kv[0])):
            r = _val(ratios, "train", b) or {}
            vs_d = r.get(f"{name}/diffusers_bf16") if name.startswith("ours") else None
            vs_o = r.get(f"{name}/original_style") if name != "original_style" else None
            lines.append(f"| train {name} | {b} | {rec['samples_per_s']:.3g} samples/s | {rec['step_ms']:.1f} | "
                         f"{_fmt(rec['peak_gib'], '.2f')} | {_fmt(vs_d, '.2f')} | {_fmt(vs_o, '.1f')} |")
    for group, unit in (("sampling", "images/s"), ("decode", "images/s")):
        for name, rec in res.get(group, {}).items():
            ms = rec["s_per_batch"] * 1000 if "s_per_batch" in rec else rec["ms_per_batch"]
            vs = _val(ratios, group, "ours/diffusers_bf16") if name == "ours" else None
            what = f"{group} {name}" + (f" (DDIM {rec['steps']}, CFG {rec['scale']:g})" if group == "sampling" else "")
            lines.append(f"| {what} | {rec['batch']} | {rec['images_per_s']:.3g} {unit} | {ms:.1f} / batch | "
                         f"{_fmt(rec['peak_gib'], '.2f')} | {_fmt(vs, '.2f')} | n/a |")
    num = res.get("numerics") or {}
    if num:
        lines.append("")
        f32 = num["fp32_ours_vs_diffusers"]
        # 'text' / 'pooled': the text encoders' features (SDXL: pooled is text_encoder_2's); '_prefix': with it
        others = ", ".join(f"{part} {s['max_abs']:.2e}" for part, s in f32.items() if part != "unet")
        lines.append(f"- fp32, ours vs diffusers/transformers: UNet max abs {f32['unet']['max_abs']:.2e} "
                     f"(rel L2 {_fmt(f32['unet']['rel_l2'], '.2e')}); text features max abs: {others}")
        for key, d in num.items():
            if key.endswith("_vs_fp32") and not key.startswith("fp32"):
                for part, s in d.items():
                    lines.append(f"- {key.replace('_vs_', ' vs ')} {part}: rel L2 {_fmt(s['rel_l2'], '.2e')}, max "
                                 f"abs {s['max_abs']:.2e} ({_fmt(s['max_abs_over_max_ref'], '.2e')} of max |ref|), "
                                 f"cosine {s['cosine']:.5f}")
    targets = res.get("targets") or {}
    if "note" not in targets and targets:
        lines.append("")
        for name, t in targets.items():
            mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            by = f" by {t['by']}" if t.get("by") else ""
            lines.append(f"- target {name} {t['goal']}: {_fmt(t['value'], '.3g')}{by} ({mark})")
    for name, msg in (res.get("errors") or {}).items():
        lines.append(f"- ERROR in {name}: {msg}")
    return "\n".join(lines)


def reuse_baselines(res: dict, path: str, skipped: set[str]) -> list[str]:
    """Copy the skipped baseline workloads from an earlier results file of the same size and device."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--baselines_from {path}: cannot read it as results JSON ({e})") from None
    for key in ("size", "device_name", "precision", "image_size"):
        if _val(old, "meta", key) != res["meta"][key]:
            raise UsageError(f"--baselines_from {path}: its {key} is {_val(old, 'meta', key)!r}, this run's is "
                             f"{res['meta'][key]!r}; baselines must come from the same setup")
    copied = []
    places = {"original_style": [("train", "original_style")], "diffusers_bf16": [("train", "diffusers_bf16")],
              "sampling_diffusers": [("sampling", "diffusers_bf16"), ("decode", "diffusers_bf16")]}
    for name, where in places.items():
        if name not in skipped:
            continue
        for group, key in where:
            if _val(old, group, key) is not None:
                res[group][key] = old[group][key]
                copied.append(f"{group}/{key}")
    return copied
