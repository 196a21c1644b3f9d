"""The toy-world experiment: run APL's real scripts on the toy model and measure what the prefix does.

    python -m toyworld.experiment --outdir outputs/toy          # ~12 min on 2 CPU cores; tables in outputs/toy/
    python -m toyworld.experiment --outdir outputs/toy --docs docs   # also write the README's pictures

Every number comes from the project's own scripts, run as a user runs them (subprocesses, logs in <outdir>/logs):
    toyworld.references      reference photos of the named people (ground truth for test_id.py --gt_folder)
    dataset_generation.py    the face set, drawn by the toy model
    train.py                 the prefix (self-generated general samples from toy_prompts.txt); also --id_target empty
    test_id.py               ID accuracy with the toy recogniser, with and without each prefix, on both models
    toyworld.attributes      do the faces keep the described attributes?
    test_fid_clip_score.py   general prompts (held out from training) with and without each prefix: FID on the toy
                             recogniser's features and the same-seed pixel difference
    toyworld.make_model      the restyled second model (UNet fine-tuned on pop-art backgrounds) for the transfer test
Steps whose outputs exist are not run again (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from apl.io import atomic_write_text
from toyworld.attributes import check_folder
from toyworld.make_model import CHECKPOINT, CONFIG
from toyworld.perception import ToyPerception
from toyworld.world import PEOPLE_TSV, PROMPTS_EVAL_TXT, PROMPTS_TXT, TEMPLATES_TXT

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


def description_prompts(path: Path, template: str = "A close-up portrait of ") -> dict[str, str]:
    """{name: test_id's prompt with the name replaced by the person's description}, also written to `path`."""
    from apl.people import compose_identity_prompts, load_people

    prompts = {name: compose_identity_prompts(template, name, "", desc)[1]
               for name, desc in load_people(PEOPLE_TSV).items()}
    atomic_write_text("".join(p + "\n" for p in prompts.values()), path)
    return prompts


def name_images(samples: Path, names: list[str], per_name: int, dest: Path) -> None:
    """sample.py's <index>.png (prompt j, image k -> index j * per_name + k) -> <Name>-<k>.png, as test_id reads."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for j, name in enumerate(names):
        for k in range(per_name):
            shutil.copyfile(samples / f"{j * per_name + k:05d}.png", dest / f"{name}-{k}.png")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def id_row(run_dir: Path, mode: str, perception: ToyPerception, images: Path | None = None) -> dict:
    s = read_json(run_dir / "summary.json")["modes"][mode]
    attrs = check_folder(images or run_dir / "images" / mode, PEOPLE_TSV, perception).as_dict()
    return {
        "id_accuracy": s["id_accuracy"],
        "id_accuracy_all_images": s["id_accuracy_all_images"],
        "mean_of_mean": s["mean_of_mean"],
        "mean_of_max": s["mean_of_max"],
        "no_face_rate": s["no_face_rate"],
        "images": s["n_images"],
        "attribute_agreement": attrs["agreement"],
        "all_attributes_agree": attrs["all_attributes_agree"],
        "per_attribute": attrs["per_attribute"],
    }


def quality_row(run_dir: Path) -> dict:
    s = read_json(run_dir / "summary.json")
    return {"fid_without_vs_with": s["fid"].get("without_vs_with"), **s["paired"]}


def experiment(args: argparse.Namespace) -> dict:
    torch.set_num_threads(2)
    out = Path(args.outdir).resolve()
    r = Runner(out)
    ckpt = Path(args.ckpt).resolve()
    gen = ["--steps", str(args.steps), "--scale", str(args.scale), "--negative_prompt", ""]
    people = ["--people_file", str(PEOPLE_TSV)]

    refs = out / "references"
    r.run("references", ["-m", "toyworld.references", "--outdir", str(refs), "--n", str(args.references)],
          refs / "Pablo Ortega-0.png")
    faces = out / "faces"
    r.run("dataset_generation", ["dataset_generation.py", *model_args(ckpt), *people, "--templates_file",
                                 str(TEMPLATES_TXT), "--n_samples", str(args.faces_per_name), "--batch_size", "16",
                                 "--outdir", str(faces), *gen], faces / ".dataset_generation.tsv")
    train_common = [*model_args(ckpt), "--face_dir", str(faces), *people, "--templates_file", str(TEMPLATES_TXT),
                    "--prompts_file", str(PROMPTS_TXT), "--image_size", "64", "--ddim_steps", str(args.steps),
                    "--start_guidance", str(args.scale), "--iterations", str(args.iterations), "--batch_size",
                    str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed), "--cache_dir",
                    str(out / "cache"), "--log_every", "10"]
    final = f"APL-{args.iterations}.pt"
    r.run("train", ["train.py", *train_common, "--save_every", str(args.save_every), "--outdir", str(out / "apl")],
          out / "apl" / "embeddings" / final)
    r.run("train_empty", ["train.py", *train_common, "--save_every", str(args.iterations), "--id_target", "empty",
                          "--outdir", str(out / "apl_empty")], out / "apl_empty" / "embeddings" / final)
    rand = out / "random" / "alz-random.pt"
    if not rand.exists():
        random_prefix(ckpt, rand, args.seed)
    plain = out / "random" / "alz-plain-word.pt"
    if not plain.exists():
        plain_word_prefix(ckpt, plain)

    # Model 2: the same model fine-tuned on a restyled world (UNet only), for the transfer test.
    style_ckpt = Path(args.style_ckpt).resolve() if args.style_ckpt else out / "toy-sd-pop.safetensors"
    r.run("make_style_model", ["-m", "toyworld.make_model", "--finetune_from", str(ckpt), "--style", "pop",
                               "--unet_steps", str(args.style_steps), "--named", "120", "--anonymous", "3000",
                               "--scenes", "1500", "--out", str(style_ckpt)], style_ckpt)

    tid = out / "test_id"
    id_common = ["--face_backend", BACKEND, "--gt_folder", str(refs), *people, "--n_samples",
                 str(args.id_samples), "--batch_size", "16", *gen]
    trained = out / "apl" / "embeddings" / final
    runs = {
        "base": (ckpt, trained, "both"),
        "random": (ckpt, rand, "with"),
        "empty": (ckpt, out / "apl_empty" / "embeddings" / final, "with"),
        "style": (style_ckpt, trained, "both"),
    }
    for step in range(args.save_every, args.iterations, args.save_every):
        runs[f"step{step}"] = (ckpt, out / "apl" / "embeddings" / f"APL-{step}.pt", "with")
    for key, (model_file, prefix, mode) in runs.items():
        d = out / "test_id" / key
        r.run(f"test_id_{key}", ["test_id.py", *model_args(model_file), "--embedding", str(prefix), "--mode", mode,
                                 *id_common, "--outdir", str(d)], d / "summary.json")
    # APL's target, drawn directly: test_id's prompt with the name replaced by the description (the neutral prompt
    # train.py pulls `alz <name>` towards). Its attribute agreement is the most a perfect prefix could keep.
    desc = out / "description"
    prompts = description_prompts(desc / "prompts.txt")
    r.run("description_samples", ["sample.py", *model_args(ckpt), "--from_file", str(desc / "prompts.txt"),
                                  "--n_samples", str(args.id_samples), "--batch_size", "16", "--seed", "2238", *gen,
                                  "--outdir", str(desc / "samples")], desc / "samples" / "grid.png")
    name_images(desc / "samples", list(prompts), args.id_samples, desc / "images")
    d = tid / "description"
    r.run("test_id_description", ["test_id.py", *model_args(ckpt), "--image_folder", str(desc / "images"),
                                  *id_common, "--outdir", str(d)], d / "summary.json")
    q_common = ["--skip_clip", "--fid_feature", FID_FEATURE, "--mode", "both", "--n_samples",
                str(args.quality_samples), "--batch_size", "16", *gen]
    qruns = {
        "trained": (trained, PROMPTS_EVAL_TXT),
        "random": (rand, PROMPTS_EVAL_TXT),
        "empty": (out / "apl_empty" / "embeddings" / final, PROMPTS_EVAL_TXT),
        "plain_word": (plain, PROMPTS_EVAL_TXT),
        "trained_train_prompts": (trained, PROMPTS_TXT),
    }
    for step in range(args.save_every, args.iterations, args.save_every):  # the curve's general-prompt distance
        qruns[f"step{step}"] = (out / "apl" / "embeddings" / f"APL-{step}.pt", PROMPTS_EVAL_TXT)
    for key, (prefix, prompts) in qruns.items():
        d = out / "quality" / key
        r.run(f"quality_{key}", ["test_fid_clip_score.py", *model_args(ckpt), "--embedding", str(prefix),
                                 "--prompts_file", str(prompts), *q_common, "--outdir", str(d)], d / "summary.json")

    perception = ToyPerception()
    results = {
        "settings": vars(args),
        "identity": {
            "toy model, no prefix": id_row(tid / "base", "without", perception),
            "toy model, trained prefix": id_row(tid / "base", "with", perception),
            "toy model, random prefix (untrained)": id_row(tid / "random", "with", perception),
            "toy model, prefix trained with --id_target empty": id_row(tid / "empty", "with", perception),
            "toy model, the description instead of the name (APL's target)": id_row(tid / "description", "images",
                                                                                   perception, desc / "images"),
            "restyled model, no prefix": id_row(tid / "style", "without", perception),
            "restyled model, trained prefix (from the toy model)": id_row(tid / "style", "with", perception),
        },
        "quality": {
            "trained prefix": quality_row(out / "quality" / "trained"),
            "random prefix (untrained)": quality_row(out / "quality" / "random"),
            "prefix trained with --id_target empty": quality_row(out / "quality" / "empty"),
            "the plain word alz (no learned vectors)": quality_row(out / "quality" / "plain_word"),
            "trained prefix, training captions": quality_row(out / "quality" / "trained_train_prompts"),
        },
        "curve": [{"step": 0, **_curve_point(tid / "random", out / "quality" / "random")}]
        + [{"step": s, **_curve_point(tid / f"step{s}", out / "quality" / f"step{s}")}
           for s in range(args.save_every, args.iterations, args.save_every)]
        + [{"step": args.iterations, **_curve_point(tid / "base", out / "quality" / "trained")}],
        "threshold": read_json(tid / "base" / "summary.json")["threshold"],
        "seconds": r.seconds,
    }
    atomic_write_text(json.dumps(results, indent=1) + "\n", out / "results.json")
    atomic_write_text(markdown(results), out / "results.md")
    if args.docs:
        write_docs(results, out, Path(args.docs))
    return results


def _curve_point(run_dir: Path, quality_dir: Path) -> dict:
    s = read_json(run_dir / "summary.json")["modes"]["with"]
    return {"id_accuracy": s["id_accuracy"], "mean_of_mean": s["mean_of_mean"], "no_face_rate": s["no_face_rate"],
            "general_pixel_mae": read_json(quality_dir / "summary.json")["paired"]["pixel_mae_mean"]}


def _f(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f} %" if pct else f"{x:.3f}"


def markdown(res: dict) -> str:
    lines = [
        "| model and prefix | ID accuracy | mean of mean sim | mean of max sim | no face | attribute agreement "
        "| all attributes |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, v in res["identity"].items():
        lines.append(f"| {k} | {_f(v['id_accuracy'], True)} | {_f(v['mean_of_mean'])} | {_f(v['mean_of_max'])} | "
                     f"{_f(v['no_face_rate'], True)} | {_f(v['attribute_agreement'], True)} | "
                     f"{_f(v['all_attributes_agree'], True)} |")
    lines += ["", "| general prompts, with vs without the prefix (same seeds) | FID (toy features) | "
              "pixel MAE mean | median | 90th pct |", "|---|---|---|---|---|"]
    for k, v in res["quality"].items():
        lines.append(f"| {k} | {_f(v['fid_without_vs_with'])} | {_f(v['pixel_mae_mean'])} | "
                     f"{_f(v['pixel_mae_median'])} | {_f(v['pixel_mae_p90'])} |")
    lines += ["", "| training steps | ID accuracy | mean of mean sim | no face | general prompts: pixel MAE |",
              "|---|---|---|---|---|"]
    for p in res["curve"]:
        lines.append(f"| {p['step']} | {_f(p['id_accuracy'], True)} | {_f(p['mean_of_mean'])} | "
                     f"{_f(p['no_face_rate'], True)} | {_f(p['general_pixel_mae'])} |")
    return "\n".join(lines) + "\n"


def write_docs(res: dict, out: Path, docs: Path) -> None:
    """The README's pictures: the with/without grid and the ID-accuracy-vs-steps curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toyworld.grid import make_overview

    docs.mkdir(parents=True, exist_ok=True)
    # 3 of the 8 images per side and a 256-colour palette keep the README's picture small.
    grid = make_overview(out / "test_id" / "base", per_side=3)
    grid.quantize(256).save(docs / "toy_grid.png", optimize=True)
    steps = [p["step"] for p in res["curve"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
    ax.plot(steps, [100 * p["id_accuracy"] for p in res["curve"]], "o-", label="with the prefix")
    base = res["identity"]["toy model, no prefix"]["id_accuracy"]
    ax.axhline(100 * base, color="grey", ls="--", label="without the prefix")
    ax.set_title("named people: ID accuracy (%)", fontsize=9)
    ax.set_ylim(0, 100)
    bx.plot(steps, [p["general_pixel_mae"] for p in res["curve"]], "o-", color="C1", label="trained prefix")
    plain = res["quality"]["the plain word alz (no learned vectors)"]["pixel_mae_mean"]
    bx.axhline(plain, color="grey", ls=":", label="the plain word alz")
    bx.set_title("general prompts: pixel MAE, with vs without", fontsize=9)
    bx.set_ylim(0, None)
    for a in (ax, bx):
        a.set_xlabel("prefix training steps (step 0 = the random start)")
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(docs / "toy_curve.png")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--outdir", default="outputs/toy", help="where every run goes")
    p.add_argument("--ckpt", default=str(CHECKPOINT), help="the toy model")
    p.add_argument("--style_ckpt", default=None, help="the restyled model (made by the experiment if not given)")
    p.add_argument("--references", type=int, default=8, help="reference photos per person")
    p.add_argument("--faces_per_name", type=int, default=24, help="face-set images per person")
    p.add_argument("--iterations", type=int, default=600, help="prefix training steps")
    p.add_argument("--save_every", type=int, default=100, help="also evaluate the prefix every N steps (the curve)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-2, help="Adam learning rate of the prefix")
    p.add_argument("--id_samples", type=int, default=8, help="test_id images per person and mode")
    p.add_argument("--quality_samples", type=int, default=2, help="images per general prompt and mode")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps everywhere")
    p.add_argument("--scale", type=float, default=7.0, help="guidance scale everywhere")
    p.add_argument("--style_steps", type=int, default=800, help="UNet steps of the restyled model's fine-tune")
    p.add_argument("--seed", type=int, default=42, help="prefix training seed (and the random prefix's)")
    p.add_argument("--docs", default=None, help="also write toy_grid.png and toy_curve.png into this folder")
    return p


def main(argv: list[str] | None = None) -> int:
    res = experiment(build_parser().parse_args(argv))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
