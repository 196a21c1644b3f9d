"""Benchmark: our APL training step and DDIM sampler against diffusers / transformers on the same weights.

Measured in one process, each workload with only its own models on the device (so peak memory is its own):
  original_style   diffusers fp32, batch 1: VAE encode, 2 text encodes, 3 UNet passes, MSE, Adam (the original;
                   SD v1 only)
  diffusers_bf16   diffusers bf16 + SDPA, cached latents, one no-grad + one grad UNet pass (per batch size)
  ours             our training step as train.py runs it (apl.step.StaticStep + Adam), bf16; optionally
                   torch.compile, gradient checkpointing, or a CUDA graph (--cuda_graph: rows 'ours_graph')
  sampling_*       DDIM + classifier-free guidance: diffusers' scheduler loop vs ldm.sampling.txt2img_latents
  decode           VAE decode of the sampled latents, timed on its own
  numerics         our bf16 vs fp32 outputs (the bf16 tolerance) and our fp32 vs diffusers fp32 (unchanged fp32 path)
Random weights (seeded), identical on both sides. Prints a Markdown table and writes JSON (after every measurement).

SD v1 (--size tiny / full: SD v1.5 at 512 px) or SDXL (--size tiny-sdxl / full-sdxl: SDXL base at 1024 px, with
diffusers' SDXL UNet (added_cond_kwargs text_embeds + time_ids), CLIPTextModel + CLIPTextModelWithProjection, the
prefix in both encoders, and the size conditioning on both sides).

  python bench/bench.py --size tiny --device cpu            # CI smoke run, well under a minute
  python bench/bench.py --size full --batches 1,8,32 --compile
  python bench/bench.py --size full-sdxl --batches 1,4      # SDXL rows
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/bench.py`
    sys.path.insert(0, str(ROOT))

from apl.runtime import UsageError, pick_device  # noqa: E402
from bench.report import markdown_table, reuse_baselines  # noqa: E402
from bench.workloads import COMPILE_DYNAMIC, PRECISIONS, Workloads  # noqa: E402
from ldm.util import load_config  # noqa: E402

SIZES = {
    # config, image side (px), batches, iters, warm-up, DDIM steps, sampling batch, sampling iterations; numerics
    # image side (px; default the image side)
    "tiny": dict(config="configs/tiny/tiny-sd.yaml", image=64, batches="1,2", iters=2, warmup=1, steps=2,
                 sample_batch=2, sample_iters=1),
    "full": dict(config="configs/stable-diffusion/v1-inference.yaml", image=512, batches="1,8,32", iters=10,
                 warmup=3, steps=50, sample_batch=8, sample_iters=2),
    "tiny-sdxl": dict(config="configs/tiny/tiny-sdxl.yaml", image=64, batches="1,2", iters=2, warmup=1, steps=2,
                      sample_batch=2, sample_iters=1),
    # SDXL base at its native 1024 px: fewer timed steps (each is ~4x SD v1's work per sample); numerics at 512 px,
    # where two fp32 UNets and an fp32 backward fit beside each other with room to spare.
    "full-sdxl": dict(config="configs/sdxl/sd_xl_base.yaml", image=1024, batches="1,4", iters=5, warmup=2,
                      steps=50, sample_batch=2, sample_iters=1, numerics_image=512),
}
SECTIONS = ("numerics", "original_style", "diffusers_bf16", "ours", "sampling_diffusers", "sampling_ours", "decode")
ALIASES = {
    "sampling": ("sampling_diffusers", "sampling_ours"),
    "baselines": ("original_style", "diffusers_bf16", "sampling_diffusers"),
    "train": ("original_style", "diffusers_bf16", "ours"),
}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None  # no git on this machine (e.g. a copied working tree): the commit is simply unknown
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def describe_env(args: argparse.Namespace, device: torch.device, family: str) -> dict:
    import diffusers
    import transformers

    cuda = device.type == "cuda"
    return {
        "size": args.size, "config": SIZES[args.size]["config"], "family": family,
        "device": str(device), "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "precision": args.precision, "compile": args.compile, "compile_mode": args.compile_mode,
        "compile_dynamic": args.compile_dynamic,
        "grad_ckpt": args.grad_ckpt, "channels_last": args.channels_last, "cuda_graph": args.cuda_graph,
        "batches": args.batches,
        "iters": args.iters, "warmup": args.warmup,
        "steps": args.steps, "scale": args.scale, "sample_batch": args.sample_batch,
        "sample_iters": args.sample_iters, "image_size": args.image_size,
        "numerics_image_size": args.numerics_image_size, "num_vectors": args.num_vectors,
        "seed": args.seed, "skip": sorted(args.skip), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda if cuda else None, "cpu_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "git_commit": _git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": args.argv,
    }


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated batch sizes like 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be positive integers")
    return values


def _skip_set(text: str) -> set[str]:
    out: set[str] = set()
    for name in (x for x in text.replace(" ", "").split(",") if x):
        if name in ALIASES:
            out.update(ALIASES[name])
        elif name in SECTIONS:
            out.add(name)
        else:
            raise argparse.ArgumentTypeError(
                f"--skip {name!r}: unknown workload; choose from {', '.join(SECTIONS + tuple(ALIASES))}"
            )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--size", choices=list(SIZES), default="tiny",
                   help="tiny / tiny-sdxl: CI smoke shapes; full: SD v1.5 (512 px); full-sdxl: SDXL base (1024 px)")
    p.add_argument("--device", default="auto", help="auto (cuda:0 if present), cpu, cuda, cuda:N")
    p.add_argument("--batches", type=_int_list, default=None, help="training batch sizes (default: per --size)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps for sampling (default: 50 full, 2 tiny)")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale for sampling")
    p.add_argument("--iters", type=int, default=None, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (compilation happens here)")
    p.add_argument("--sample_batch", type=int, default=None, help="images per sampling call (default 8 full)")
    p.add_argument("--sample_iters", type=int, default=None, help="timed sampling calls (after one warm-up call)")
    p.add_argument("--image_size", type=int, default=None, help="image side in px (latents are 1/8)")
    p.add_argument("--numerics_image_size", type=int, default=None,
                   help="image side of the numerics checks (default: per --size, at most --image_size)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16", help="frozen-weight dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile our UNet (training and sampling)")
    p.add_argument("--compile_mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode with --compile")
    p.add_argument("--compile_dynamic", default="auto", choices=sorted(COMPILE_DYNAMIC),
                   help="batch-size handling with --compile: auto (static, then one symbolic-batch graph), static "
                        "(one graph per batch size: longest compile), dynamic")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in our UNet")
    p.add_argument("--channels_last", action="store_true",
                   help="our UNet in channels-last memory (train.py --channels_last), training and sampling")
    p.add_argument("--cuda_graph", action="store_true",
                   help="our training step captured in a CUDA graph (train.py --cuda_graph); rows 'ours_graph'")
    p.add_argument("--num_vectors", type=int, default=10, help="learned prefix vectors")
    p.add_argument("--skip", type=_skip_set, default=set(),
                   help=f"comma-separated workloads to leave out: {', '.join(SECTIONS + tuple(ALIASES))}")
    p.add_argument("--baselines_from", default=None,
                   help="results JSON of an earlier run (same size and GPU) whose skipped baselines to reuse")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch during the run (default: torch's own; 1 avoids oversubscription "
                        "on a busy CI machine)")
    p.add_argument("--out", default="bench/results.json", help="JSON results (written atomically)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    preset = SIZES[args.size]
    for name, key in (("iters", "iters"), ("warmup", "warmup"), ("steps", "steps"), ("image_size", "image"),
                      ("sample_batch", "sample_batch"), ("sample_iters", "sample_iters")):
        if getattr(args, name) is None:
            setattr(args, name, preset[key])
    if args.batches is None:
        args.batches = _int_list(preset["batches"])
    if args.numerics_image_size is None:
        args.numerics_image_size = min(args.image_size, preset.get("numerics_image", args.image_size))
    for name in ("image_size", "numerics_image_size"):
        if getattr(args, name) % 8 or getattr(args, name) < 8:
            p.error(f"--{name} {getattr(args, name)}: must be a positive multiple of 8")
    if args.cuda_graph and args.compile:
        p.error("--cuda_graph and --compile exclude each other (--compile_mode reduce-overhead has CUDA graphs)")
    if args.iters < 1 or args.warmup < 0 or args.sample_iters < 1 or args.sample_batch < 1 or args.steps < 1:
        p.error("--iters, --sample_iters, --sample_batch and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict (also written to --out)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test process: leave it as it was


def _run(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda_graph needs a CUDA GPU; this run is on {device}")
    if device.type == "cuda":  # as our scripts run (apl.runtime.load_model_for_cli); diffusers gets it too
        torch.backends.cudnn.benchmark = True
    bench = Workloads(args, load_config(ROOT / SIZES[args.size]["config"]), device)
    res = bench.results
    res["meta"] = describe_env(args, bench.device, bench.family)
    if args.baselines_from:
        res["meta"]["baselines_from"] = {"path": args.baselines_from,
                                         "copied": reuse_baselines(res, args.baselines_from, args.skip)}
    print(f"APL bench: {args.size} ({bench.family}) on {res['meta']['device_name']} ({bench.device}), "
          f"{args.precision}, batches {args.batches}, {args.iters} iters after {args.warmup} warm-up", flush=True)
    t0 = time.perf_counter()
    try:
        bench.run("numerics", bench.numerics)
        bench.run("original_style", bench.original_style)
        bench.run("diffusers_bf16", bench.diffusers_bf16)
        bench.run("ours", bench.ours)
        bench.run("sampling_diffusers", bench.sampling_diffusers)
        bench.run("sampling_ours", bench.sampling_ours)
    except KeyboardInterrupt:  # Ctrl-C or run_gpu.sh's time limit: still show what was measured
        res["errors"]["interrupted"] = f"stopped after {time.perf_counter() - t0:.0f} s; later workloads missing"
        raise
    finally:
        res["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
        bench.save()
        print()
        print(markdown_table(res))
        print(f"\nresults: {args.out}", flush=True)
    return res


if __name__ == "__main__":
    try:
        results = main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)  # the table and JSON of what was measured are already out
    sys.exit(1 if results["errors"] else 0)
