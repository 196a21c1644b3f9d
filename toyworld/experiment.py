"""The toy-world experiment: the paper's claims, measured with intervals on a population of 100 toy people.

    python -m toyworld.experiment --outdir outputs/toy          # tables in outputs/toy/results.{md,json}
    python -m toyworld.experiment --outdir outputs/toy --docs docs   # also write the README's pictures

The prefix is trained on the *train* group's 50 names only (toy_people_train.tsv) and tested on the *held-out*
group's 50 (toy_people_heldout.tsv), which it never saw; also on the train group, on test templates held out from
training, on a restyled model (plug-and-play) and on a personalised model that learned a new person after the
prefix was trained. Every number comes from the project's own scripts, run as a user runs them (subprocesses, logs
in <outdir>/logs):
    toyworld.references      reference photos of the named people (ground truth for test_id.py --gt_folder)
    dataset_generation.py    the face set of the train group, drawn by the toy model
    train.py                 the prefix, with --seeds training seeds; also --id_target empty, --reference name and
                             --init normal (one seed each)
    toyworld.make_model      the restyled model (UNet fine-tuned on pop-art backgrounds)
    toyworld.personalise     the personalised model (UNet fine-tuned DreamBooth-style on a new person)
    test_id.py               ID accuracy with the toy recogniser, 95 % bootstrap intervals over identities
    toyworld.attributes      do the faces keep the described attributes? (intervals over identities here)
    test_fid_clip_score.py   general prompts held out from training, with vs without each prefix: same-seed pixel
                             MAE (intervals over prompts), FID and KID on the toy recogniser's features
Baselines: random untrained prefixes (the same uniform [0, 1) start, --seeds seeds), the plain word `alz`, the
description drawn directly (APL's target). Steps whose outputs exist are not run again (delete a folder to redo).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apl.eval.stats import percentile_interval
from apl.io import atomic_write_text
from toyworld.attributes import check_folder
from toyworld.make_model import CHECKPOINT, CONFIG
from toyworld.perception import ToyPerception
from toyworld.world import GROUP_TSV, PROMPTS_EVAL_TXT, PROMPTS_TXT, TEMPLATES_HELDOUT_TXT, TEMPLATES_TXT

ROOT = Path(__file__).resolve().parents[1]
BACKEND = "toyworld.perception:ToyFaceBackend"
FID_FEATURE = "toyworld.perception:toy_fid_features"


class Runner:
    """Runs the project's scripts one after another, logging each to <outdir>/logs/<step>.log."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.logs = outdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}

    def run(self, step: str, args: list[str], done: Path) -> None:
        if done.exists():
            print(f"[{step}] done before ({done})")
            return
        cmd = [sys.executable, *args]
        print(f"[{step}] {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        with open(self.logs / f"{step}.log", "w", encoding="utf-8") as log:
            log.write(" ".join(cmd) + "\n\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())
        self.seconds[step] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            tail = (self.logs / f"{step}.log").read_text(encoding="utf-8").splitlines()[-15:]
            raise SystemExit(f"[{step}] failed (exit {proc.returncode}); log {self.logs / f'{step}.log'}:\n"
                             + "\n".join(tail))


def _env() -> dict:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def model_args(ckpt: Path) -> list[str]:
    return ["--config_path", str(CONFIG), "--ckpt_path", str(ckpt)]


def _untrained_prefix(ckpt: Path, path: Path, num_vectors: int, **em_kwargs) -> None:
    """Save an EmbeddingManager's starting vectors for `alz` on the model `ckpt` as a prefix file (step 0)."""
    from ldm.checkpoint import load_model
    from ldm.modules.embedding_manager import EmbeddingManager

    model = load_model(CONFIG, ckpt)
    EmbeddingManager(model.cond_stage_model, ["alz"], num_vectors, **em_kwargs).save(path, step=0,
                                                                                    base_model=ckpt.name)


def random_prefix(ckpt: Path, path: Path, seed: int, num_vectors: int = 10) -> None:
    """The untrained prefix: the same seeded uniform [0, 1) start train.py uses (step 0 of the trained run)."""
    _untrained_prefix(ckpt, path, num_vectors, generator=torch.Generator().manual_seed(seed))


def plain_word_prefix(ckpt: Path, path: Path) -> None:
    """A one-vector "prefix" equal to the token embedding of `alz` itself: the same as writing the plain word `alz`.

    How far one ordinary extra word moves a general image: the scale against which the trained prefix is judged."""
    _untrained_prefix(ckpt, path, 1, initializer_words=["alz"])


def description_prompts(path: Path, people_file: Path, template: str = "A close-up portrait of ") -> dict[str, str]:
    """{name: test_id's prompt with the name replaced by the person's description}, also written to `path`."""
    from apl.people import compose_identity_prompts, load_people

    prompts = {name: compose_identity_prompts(template, name, "", desc)[1]
               for name, desc in load_people(people_file).items()}
    atomic_write_text("".join(p + "\n" for p in prompts.values()), path)
    return prompts


def name_images(samples: Path, names: list[str], per_name: int, dest: Path) -> None:
    """sample.py's <index>.png (prompt j, image k -> index j * per_name + k) -> <Name>-<k>.png, as test_id reads."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for j, name in enumerate(names):
        for k in range(per_name):
            shutil.copyfile(samples / f"{j * per_name + k:05d}.png", dest / f"{name}-{k}.png")


TRAIN_TSV, HELD_TSV = GROUP_TSV["train"], GROUP_TSV["held-out"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def attribute_stats(folder: Path, people_file: Path, perception: ToyPerception, n_boot: int, seed: int) -> dict:
    """Attribute agreement of a folder's faces, with a 95 % bootstrap interval over identities."""
    rep = check_folder(folder, people_file, perception).as_dict()
    rows = [r for r in rep["per_identity"].values() if r["faces"]]
    out = {"attribute_agreement": rep["agreement"], "attribute_agreement_ci95": None,
           "all_attributes_agree": rep["all_attributes_agree"], "per_attribute": rep["per_attribute"]}
    if rows and n_boot:
        faces = np.asarray([r["faces"] for r in rows], dtype=np.float64)
        matches = np.asarray([r["agreement"] * r["faces"] for r in rows])
        idx = np.random.default_rng(seed).integers(0, len(rows), (n_boot, len(rows)))
        out["attribute_agreement_ci95"] = percentile_interval(matches[idx].sum(1) / faces[idx].sum(1))
    return out


def id_row(run_dir: Path, mode: str, people_file: Path, perception: ToyPerception, n_boot: int,
           template_set: str | None = None, images: Path | None = None) -> dict:
    """One table row: test_id's figures (with its intervals) and the attribute check of the same images."""
    summary = read_json(run_dir / "summary.json")
    entry = summary["template_sets"][template_set]["modes"][mode] if template_set else summary["modes"][mode]
    if images is None:
        images = (run_dir / "template_sets" / template_set / "images" / mode) if template_set else \
            (run_dir / "images" / mode)
    ci = entry.get("ci95") or {}
    row = {k: entry.get(k) for k in ("id_accuracy", "mean_of_mean", "mean_of_max", "no_face_rate", "mean_sim_faces",
                                      "n_identities", "n_images", "images_per_identity")}
    row |= {f"{k}_ci95": ci.get(k) for k in ("id_accuracy", "mean_of_mean", "no_face_rate")}
    return row | attribute_stats(images, people_file, perception, n_boot, 0)


def ratio(run_dir: Path, template_set: str | None = None) -> dict:
    """ID accuracy with / without the prefix (paired over identities) of a --mode both run."""
    s = read_json(run_dir / "summary.json")
    comp = s["template_sets"][template_set]["with_vs_without"] if template_set else s["with_vs_without"]
    return {"id_accuracy_ratio": comp["id_accuracy_ratio"],
            "id_accuracy_ratio_ci95": (comp.get("ci95") or {}).get("id_accuracy_ratio")}


def quality_row(run_dir: Path) -> dict:
    s = read_json(run_dir / "summary.json")
    paired = s["paired"]
    return {"pixel_mae": paired["pixel_mae_mean"], "pixel_mae_ci95": (paired.get("ci95") or {}).get("pixel_mae_mean"),
            "fid_without_vs_with": s["fid"].get("without_vs_with"),
            "kid_without_vs_with": (s.get("kid") or {}).get("without_vs_with"), "prompts": s.get("n_prompts")}


def spread(values: list[float | None]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None, "sd": float(v.std(ddof=1)) if v.size > 1 else None,
            "values": [None if x is None else float(x) for x in values]}


def experiment(args: argparse.Namespace) -> dict:
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    out = Path(args.outdir).resolve()
    r = Runner(out)
    ckpt = Path(args.ckpt).resolve()
    gen = ["--steps", str(args.steps), "--scale", str(args.scale), "--negative_prompt", ""]
    seeds = args.seeds
    s0 = seeds[0]

    refs = out / "references"
    r.run("references", ["-m", "toyworld.references", "--outdir", str(refs), "--n", str(args.references)],
          refs / "Pablo Ortega-0.png")
    faces = out / "faces"
    r.run("dataset_generation", ["dataset_generation.py", *model_args(ckpt), "--people_file", str(TRAIN_TSV),
                                 "--templates_file", str(TEMPLATES_TXT), "--n_samples", str(args.faces_per_name),
                                 "--batch_size", "16", "--outdir", str(faces), *gen],
          faces / ".dataset_generation.tsv")
    train_common = [*model_args(ckpt), "--face_dir", str(faces), "--people_file", str(TRAIN_TSV), "--templates_file",
                    str(TEMPLATES_TXT), "--prompts_file", str(PROMPTS_TXT), "--image_size", "64", "--ddim_steps",
                    str(args.steps), "--start_guidance", str(args.scale), "--iterations", str(args.iterations),
                    "--batch_size", str(args.batch_size), "--lr", str(args.lr), "--cache_dir", str(out / "cache"),
                    "--log_every", "10", "--no-progress"]
    final = f"APL-{args.iterations}.pt"
    prefixes: dict[str, Path] = {}
    variants = {f"seed{s}": ["--seed", str(s)] for s in seeds}
    variants |= {"empty": ["--seed", str(s0), "--id_target", "empty"],
                 "name_ref": ["--seed", str(s0), "--reference", "name"],
                 "init_normal": ["--seed", str(s0), "--init", "normal"]}
    for key, extra in variants.items():
        d = out / "apl" / key
        every = args.save_every if key == f"seed{s0}" else args.iterations
        r.run(f"train_{key}", ["train.py", *train_common, *extra, "--save_every", str(every), "--outdir", str(d)],
              d / "embeddings" / final)
        prefixes[key] = d / "embeddings" / final
    steps = list(range(args.save_every, args.iterations, args.save_every))
    for k in steps:
        prefixes[f"step{k}"] = out / "apl" / f"seed{s0}" / "embeddings" / f"APL-{k}.pt"
    for s in seeds:
        prefixes[f"random{s}"] = out / "baselines" / f"alz-random-seed{s}.pt"
        if not prefixes[f"random{s}"].exists():
            random_prefix(ckpt, prefixes[f"random{s}"], s)
    prefixes["plain"] = out / "baselines" / "alz-plain-word.pt"
    if not prefixes["plain"].exists():
        plain_word_prefix(ckpt, prefixes["plain"])

    # The restyled model (plug-and-play) and the personalised model (a new person learned after the prefix).
    style_ckpt = Path(args.style_ckpt).resolve() if args.style_ckpt else out / "toy-sd-pop.safetensors"
    r.run("make_style_model", ["-m", "toyworld.make_model", "--finetune_from", str(ckpt), "--style", "pop",
                               "--unet_steps", str(args.style_steps), "--named", "30", "--anonymous", "3000",
                               "--scenes", "1500", "--out", str(style_ckpt)], style_ckpt)
    pers = out / "personalised"
    pers_ckpt = pers / "toy-sd-personalised.safetensors"
    r.run("personalise", ["-m", "toyworld.personalise", "--ckpt", str(ckpt), "--outdir", str(pers),
                          "--unet_steps", str(args.personalise_steps)], pers_ckpt.with_suffix(".json"))

    boot = ["--bootstrap", str(args.bootstrap)]
    id_common = ["--face_backend", BACKEND, "--gt_folder", str(refs), "--n_samples", str(args.id_samples),
                 "--batch_size", "16", *boot, *gen]
    held = ["--people_file", str(HELD_TSV)]
    id_runs: dict[str, tuple[Path, Path, str, list[str]]] = {
        f"heldout_seed{s0}": (ckpt, prefixes[f"seed{s0}"], "both",
                              [*held, "--prompt_templates_file", str(TEMPLATES_HELDOUT_TXT)]),
        f"train_seed{s0}": (ckpt, prefixes[f"seed{s0}"], "both", ["--people_file", str(TRAIN_TSV)]),
        "style": (style_ckpt, prefixes[f"seed{s0}"], "both", held),
    }
    for key in [f"seed{s}" for s in seeds[1:]] + [f"random{s}" for s in seeds] + \
            ["empty", "name_ref", "init_normal", "plain"] + [f"step{k}" for k in steps]:
        id_runs[f"heldout_{key}"] = (ckpt, prefixes[key], "with", held)
    for key, (model_file, prefix, mode, extra) in id_runs.items():
        d = out / "test_id" / key
        r.run(f"test_id_{key}", ["test_id.py", *model_args(model_file), "--embedding", str(prefix), "--mode", mode,
                                 *id_common, *extra, "--outdir", str(d)], d / "summary.json")
    d = out / "test_id" / "personalised"
    r.run("test_id_personalised", ["test_id.py", *model_args(pers_ckpt), "--embedding", str(prefixes[f"seed{s0}"]),
                                   "--mode", "both", "--face_backend", BACKEND, "--gt_folder",
                                   str(pers / "references"),
                                   "--people_file", str(pers / "person.tsv"), "--n_samples",
                                   str(args.personal_samples), "--batch_size", "16", *boot, "--bootstrap_level",
                                   "two_level", *gen, "--outdir", str(d)], d / "summary.json")
    # APL's target, drawn directly: test_id's prompt with the name replaced by the description (the neutral prompt
    # train.py pulls `alz <name>` towards). Its attribute agreement is the most a perfect prefix could keep.
    desc = out / "description"
    prompts = description_prompts(desc / "prompts.txt", HELD_TSV)
    r.run("description_samples", ["sample.py", *model_args(ckpt), "--from_file", str(desc / "prompts.txt"),
                                  "--n_samples", str(args.id_samples), "--batch_size", "16", "--seed", "2238", *gen,
                                  "--outdir", str(desc / "samples")], desc / "samples" / "grid.png")
    name_images(desc / "samples", list(prompts), args.id_samples, desc / "images")
    d = out / "test_id" / "description"
    r.run("test_id_description", ["test_id.py", *model_args(ckpt), "--image_folder", str(desc / "images"),
                                  *id_common, *held, "--outdir", str(d)], d / "summary.json")

    q_common = ["--skip_clip", "--fid_feature", FID_FEATURE, "--mode", "both", "--n_samples",
                str(args.quality_samples), "--batch_size", "16", *boot, *gen]
    qruns = {key: (p, PROMPTS_EVAL_TXT) for key, p in prefixes.items()}
    qruns["trained_train_prompts"] = (prefixes[f"seed{s0}"], PROMPTS_TXT)
    for key, (prefix, prompt_file) in qruns.items():
        d = out / "quality" / key
        r.run(f"quality_{key}", ["test_fid_clip_score.py", *model_args(ckpt), "--embedding", str(prefix),
                                 "--prompts_file", str(prompt_file), *q_common, "--outdir", str(d)],
              d / "summary.json")

    results = collect(args, out, steps)
    results["seconds"] = r.seconds
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_text(json.dumps(results, indent=1) + "\n", out / "results.json")
    atomic_write_text(markdown(results), out / "results.md")
    if args.docs:
        write_docs(results, out, Path(args.docs))
    return results


def collect(args: argparse.Namespace, out: Path, steps: list[int]) -> dict:
    """Every row of the tables from the runs' summary files."""
    perception = ToyPerception()
    tid, q = out / "test_id", out / "quality"
    s0, n_boot = args.seeds[0], args.bootstrap
    held_set = TEMPLATES_HELDOUT_TXT.stem

    def row(run: str, mode: str = "with", people: Path = HELD_TSV, quality: str | None = None, **kw) -> dict:
        x = id_row(tid / run, mode, people, perception, n_boot, **kw)
        return x | (quality_row(q / quality) if quality else {})

    heldout = {
        "no prefix": row(f"heldout_seed{s0}", "without"),
        f"trained prefix (seed {s0})": row(f"heldout_seed{s0}", quality=f"seed{s0}")
        | ratio(tid / f"heldout_seed{s0}"),
    }
    for s in args.seeds[1:]:
        heldout[f"trained prefix (seed {s})"] = row(f"heldout_seed{s}", quality=f"seed{s}")
    for s in args.seeds:
        heldout[f"random prefix, untrained (seed {s})"] = row(f"heldout_random{s}", quality=f"random{s}")
    heldout |= {
        "the plain word alz": row("heldout_plain", quality="plain"),
        "trained with --id_target empty": row("heldout_empty", quality="empty"),
        "trained with --reference name": row("heldout_name_ref", quality="name_ref"),
        "trained from --init normal": row("heldout_init_normal", quality="init_normal"),
        "the description drawn directly (APL's target)": row("description", "images", images=out / "description"
                                                             / "images"),
    }
    other = {
        "held-out group, held-out templates: no prefix": row(f"heldout_seed{s0}", "without", template_set=held_set),
        "held-out group, held-out templates: trained prefix": row(f"heldout_seed{s0}", template_set=held_set)
        | ratio(tid / f"heldout_seed{s0}", held_set),
        "train group: no prefix": row(f"train_seed{s0}", "without", TRAIN_TSV),
        "train group: trained prefix": row(f"train_seed{s0}", "with", TRAIN_TSV) | ratio(tid / f"train_seed{s0}"),
        "restyled model, held-out group: no prefix": row("style", "without"),
        "restyled model, held-out group: trained prefix": row("style") | ratio(tid / "style"),
    }
    pers = out / "personalised"
    person = pers / "person.tsv"
    other |= {
        "personalised model, new person: no prefix": row("personalised", "without", person),
        "personalised model, new person: trained prefix": row("personalised", "with", person)
        | ratio(tid / "personalised"),
    }
    trained_keys = [f"trained prefix (seed {s})" for s in args.seeds]
    random_keys = [f"random prefix, untrained (seed {s})" for s in args.seeds]
    seeds = {
        "trained": {k: spread([heldout[t][k] for t in trained_keys]) for k in ("id_accuracy", "attribute_agreement",
                                                                                "pixel_mae")},
        "random": {k: spread([heldout[t][k] for t in random_keys]) for k in ("id_accuracy", "attribute_agreement",
                                                                              "pixel_mae")},
    }
    curve = [{"step": 0, **_curve_point(tid / f"heldout_random{s0}", q / f"random{s0}")}]
    curve += [{"step": k, **_curve_point(tid / f"heldout_step{k}", q / f"step{k}")} for k in steps]
    curve += [{"step": args.iterations, **_curve_point(tid / f"heldout_seed{s0}", q / f"seed{s0}")}]
    res = {
        "settings": vars(args),
        "heldout": heldout,
        "other": other,
        "seeds": seeds,
        "curve": curve,
        "trained_on_training_captions": quality_row(q / "trained_train_prompts"),
        "personalise_record": read_json(pers / "toy-sd-personalised.json"),
        "threshold": read_json(tid / f"heldout_seed{s0}" / "summary.json")["threshold"],
    }
    res["targets"] = targets(res, s0)
    return res


def _curve_point(run_dir: Path, quality_dir: Path) -> dict:
    s = read_json(run_dir / "summary.json")["modes"]["with"]
    qr = quality_row(quality_dir)
    return {"id_accuracy": s["id_accuracy"], "id_accuracy_ci95": (s.get("ci95") or {}).get("id_accuracy"),
            "no_face_rate": s["no_face_rate"], "general_pixel_mae": qr["pixel_mae"],
            "general_pixel_mae_ci95": qr["pixel_mae_ci95"]}


def _hi(ci: list | None, default: float) -> float:
    return ci[1] if ci else default


def targets(res: dict, s0: int) -> list[dict]:
    """The issue's targets, each judged on intervals: (what, measured, met)."""
    h, o = res["heldout"], res["other"]
    t = h[f"trained prefix (seed {s0})"]
    randoms = [v for k, v in h.items() if k.startswith("random prefix")]
    desc = h["the description drawn directly (APL's target)"]
    plain = h["the plain word alz"]
    out = []

    def add(what: str, measured: str, met: bool) -> None:
        out.append({"target": what, "measured": measured, "met": bool(met)})

    def fmt_ci(ci):
        return "–" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    for label, row in (("held-out group", t), ("restyled model, held-out group",
                                                o["restyled model, held-out group: trained prefix"])):
        rc = row.get("id_accuracy_ratio_ci95")
        add(f"{label}: ID accuracy with the prefix <= 1/5 of without (upper end of the paired ratio's interval)",
            f"ratio {row['id_accuracy_ratio']:.3f}, 95 % CI {fmt_ci(rc)} %", _hi(rc, 1.0) <= 0.2)
    below = all(_hi(t["id_accuracy_ci95"], 1) < (rr["id_accuracy_ci95"] or [0, 0])[0]
                and t["pixel_mae"] <= rr["pixel_mae"] for rr in randoms)
    add("held-out group: ID accuracy below every random prefix's interval, at equal or smaller general change",
        f"trained {100 * t['id_accuracy']:.1f} % {fmt_ci(t['id_accuracy_ci95'])}, MAE {t['pixel_mae']:.4f}; random "
        + "; ".join(f"{100 * rr['id_accuracy']:.1f} % {fmt_ci(rr['id_accuracy_ci95'])}, MAE {rr['pixel_mae']:.4f}"
                    for rr in randoms), below)
    for label, row in (("held-out group", t), ("restyled model, held-out group",
                                                o["restyled model, held-out group: trained prefix"])):
        a, ci = row["attribute_agreement"], row["attribute_agreement_ci95"]
        add(f"{label}: attribute agreement >= 80 % and within 5 points of the description drawn directly",
            f"{100 * a:.1f} % {fmt_ci(ci)} vs {100 * desc['attribute_agreement']:.1f} %",
            a >= 0.8 and desc["attribute_agreement"] - a <= 0.05)
    p = o["personalised model, new person: trained prefix"]
    rc = p.get("id_accuracy_ratio_ci95")
    add("personalised identity: ID accuracy >= 3x lower with the prefix (upper end of the ratio's interval <= 1/3)",
        f"ratio {p['id_accuracy_ratio']:.3f}, 95 % CI {fmt_ci(rc)} %", _hi(rc, 1.0) <= 1 / 3)
    add("general prompts: pixel MAE <= 1.5x that of the plain word alz",
        f"{_ci(t['pixel_mae'], t['pixel_mae_ci95'], pct=False, digits=4)} vs "
        f"{plain['pixel_mae']:.4f} (x{t['pixel_mae'] / plain['pixel_mae']:.2f})",
        t["pixel_mae"] <= 1.5 * plain["pixel_mae"])
    for label in ("held-out group", "train group"):
        key = f"{label}: no prefix" if label == "train group" else "no prefix"
        row = (o if label == "train group" else h)[key]
        add(f"{label}: the toy model draws its people (no-prefix ID accuracy >= 85 %)",
            f"{100 * row['id_accuracy']:.1f} % {fmt_ci(row['id_accuracy_ci95'])}", row["id_accuracy"] >= 0.85)
    pn = o["personalised model, new person: no prefix"]
    add("personalised model draws the new person (no-prefix ID accuracy >= 80 %)",
        f"{100 * pn['id_accuracy']:.1f} % {fmt_ci(pn['id_accuracy_ci95'])}", pn["id_accuracy"] >= 0.8)
    return out


def _f(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _ci(x: float | None, ci: list | None, pct: bool = True, digits: int = 3) -> str:
    if x is None:
        return "–"
    if pct:
        return f"{100 * x:.1f} %" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
    return f"{x:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _table(rows: dict) -> list[str]:
    lines = ["| model, prompt and prefix | ID accuracy [95 % CI] | with / without | mean-of-mean sim | no face | "
             "attribute agreement [95 % CI] | general pixel MAE [95 % CI] | identities x images |",
             "|---|---|---|---|---|---|---|---|"]
    for k, v in rows.items():
        rat = _ci(v["id_accuracy_ratio"], v.get("id_accuracy_ratio_ci95"), pct=False, digits=2) \
            if v.get("id_accuracy_ratio") is not None else ""
        per = v.get("images_per_identity") or {}
        n = f"{v.get('n_identities')} x {per.get('max', '?')}"
        mae = _ci(v.get("pixel_mae"), v.get("pixel_mae_ci95"), pct=False, digits=4) if "pixel_mae" in v else ""
        lines.append(f"| {k} | {_ci(v['id_accuracy'], v['id_accuracy_ci95'])} | {rat} | {_f(v['mean_of_mean'])} | "
                     f"{_f(v['no_face_rate'], True)} % | "
                     f"{_ci(v['attribute_agreement'], v['attribute_agreement_ci95'])} | "
                     f"{mae} | {n} |")
    return lines


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"Held-out group (50 people the prefix never saw), prompt 'A close-up portrait of <name>', "
             f"{s['id_samples']} images per person; prefix trained {s['iterations']} steps on the train group.", ""]
    lines += _table(res["heldout"])
    lines += ["", f"Other groups, prompts and models (prefix: seed {s['seeds'][0]})", ""]
    lines += _table(res["other"])
    lines += ["", f"Over prefix training seeds {s['seeds']} (held-out group): mean and sd", "",
              "| prefix | ID accuracy | attribute agreement | general pixel MAE |", "|---|---|---|---|"]
    for k, v in res["seeds"].items():
        cells = []
        for fig in ("id_accuracy", "attribute_agreement", "pixel_mae"):
            m, sd = v[fig]["mean"], v[fig]["sd"]
            pct = fig != "pixel_mae"
            cells.append("–" if m is None else (f"{100 * m:.1f} ± {100 * (sd or 0):.1f} %" if pct else
                                                f"{m:.4f} ± {sd or 0:.4f}"))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| training steps | ID accuracy (held-out) [95 % CI] | no face | general pixel MAE [95 % CI] |",
              "|---|---|---|---|"]
    for p in res["curve"]:
        lines.append(f"| {p['step']} | {_ci(p['id_accuracy'], p['id_accuracy_ci95'])} | "
                     f"{_f(p['no_face_rate'], True)} % | "
                     f"{_ci(p['general_pixel_mae'], p['general_pixel_mae_ci95'], pct=False, digits=4)} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def write_docs(res: dict, out: Path, docs: Path) -> None:
    """The README's pictures: the with/without grid (held-out people) and the trade-off plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toyworld.grid import make_overview

    docs.mkdir(parents=True, exist_ok=True)
    s0 = res["settings"]["seeds"][0]
    run = out / "test_id" / f"heldout_seed{s0}"
    names = sorted(p.stem.rsplit("-", 1)[0] for p in (run / "images" / "with").glob("*-0.png"))[:12]
    grid = make_overview(run, per_side=3, names=names)
    grid.quantize(256).save(docs / "toy_grid.png", optimize=True)

    h = res["heldout"]
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)

    def point(row: dict, label: str, style: str, **kw) -> None:
        x, y = row.get("pixel_mae", 0.0) or 0.0, 100 * row["id_accuracy"]
        xe = [[x - row["pixel_mae_ci95"][0]], [row["pixel_mae_ci95"][1] - x]] if row.get("pixel_mae_ci95") else None
        yci = row.get("id_accuracy_ci95")
        ye = [[y - 100 * yci[0]], [100 * yci[1] - y]] if yci else None
        ax.errorbar([x], [y], xerr=xe, yerr=ye, fmt=style, capsize=2, label=label, **kw)

    curve = res["curve"]
    ax.plot([p["general_pixel_mae"] for p in curve], [100 * p["id_accuracy"] for p in curve], "-", color="C0",
            alpha=0.5, lw=1)
    for p in curve[1:-1]:
        ax.annotate(str(p["step"]), (p["general_pixel_mae"], 100 * p["id_accuracy"]), fontsize=7, color="C0",
                    xytext=(3, 3), textcoords="offset points")
    point(h["no prefix"], "no prefix", "ks")
    for i, s in enumerate(res["settings"]["seeds"]):
        point(h[f"trained prefix (seed {s})"], f"trained prefix (3 seeds; line: seed {s0} over steps)"
              if i == 0 else None, "o", color="C0")
        point(h[f"random prefix, untrained (seed {s})"], "random prefix (3 seeds)" if i == 0 else None, "x",
              color="C3")
    point(h["the plain word alz"], "the plain word alz", "^", color="grey")
    point(h["trained with --id_target empty"], "--id_target empty", "D", color="C2")
    point(h["trained with --reference name"], "--reference name", "v", color="C4")
    point(h["trained from --init normal"], "--init normal", "P", color="C1")
    ax.set_xlabel("general prompts: pixel MAE with vs without the prefix (same seeds)")
    ax.set_ylabel("held-out people: ID accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("The trade-off: anonymisation of unseen people vs change to other prompts (95 % CIs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(docs / "toy_tradeoff.png")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--outdir", default="outputs/toy", help="where every run goes")
    p.add_argument("--ckpt", default=str(CHECKPOINT), help="the toy model")
    p.add_argument("--style_ckpt", default=None, help="the restyled model (made by the experiment if not given)")
    p.add_argument("--references", type=int, default=8, help="reference photos per person")
    p.add_argument("--faces_per_name", type=int, default=16, help="face-set images per train-group person")
    p.add_argument("--iterations", type=int, default=600, help="prefix training steps")
    p.add_argument("--save_every", type=int, default=150, help="also evaluate seed 1's prefix every N steps")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-2, help="Adam learning rate of the prefix")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44],
                   help="prefix training seeds (and the random prefixes' seeds); the first is the main one")
    p.add_argument("--id_samples", type=int, default=4, help="test_id images per person and mode")
    p.add_argument("--personal_samples", type=int, default=32, help="test_id images of the personalised person")
    p.add_argument("--quality_samples", type=int, default=1, help="images per general prompt and mode")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps everywhere")
    p.add_argument("--scale", type=float, default=7.0, help="guidance scale everywhere")
    p.add_argument("--style_steps", type=int, default=800, help="UNet steps of the restyled model's fine-tune")
    p.add_argument("--personalise_steps", type=int, default=600, help="UNet steps of the personalisation")
    p.add_argument("--docs", default=None, help="also write toy_grid.png and toy_tradeoff.png into this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    res = experiment(build_parser().parse_args(argv))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
