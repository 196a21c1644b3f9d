"""Make images with an SD v1.x checkpoint (optionally with a learned APL prefix): DDIM + classifier-free guidance.

    python sample.py --ckpt_path models/Stable-diffusion/v1-5-pruned-emaonly.ckpt \
        --prompt "alz A close-up portrait of Tom Hanks" --embedding embeddings/APL-1000.pt --n_samples 4
    python sample.py --config_path configs/tiny/tiny-sd.yaml   # random tiny model, seconds on a CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from apl.eval.quality import has_placeholder
from apl.people import load_prompts
from apl.runtime import (
    DEFAULT_CKPT,
    SD_CONFIG,
    UsageError,
    load_model_for_cli,
    number_in,
    pick_device,
    pick_dtype,
)
from args.clip_args import positive_int, positive_multiple_of_8
from ldm.checkpoint import CheckpointError
from ldm.sampling import make_grid, save_image, txt2img
from ldm.util import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sample.py",  # the same name in messages when main() is called from Python
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--prompt", action="append", help="prompt (repeat the flag for several)")
    p.add_argument(
        "--from_file",
        help="text file with one prompt per line, or '<index> <caption>' lines like the shipped prompts.txt (the "
        "index is dropped); blank lines and '#' comments are skipped",
    )
    p.add_argument("--n_samples", type=positive_int, default=4, help="images per prompt")
    p.add_argument("--batch_size", type=positive_int, default=4, help="images per DDIM batch")
    p.add_argument("--steps", type=number_in(1, 500, int), default=50, help="DDIM steps (1..500)")
    p.add_argument(
        "--scale", type=number_in(0, 100), default=7.5, help="classifier-free guidance scale (1 = no guidance)"
    )
    p.add_argument("--eta", type=number_in(0, 1), default=0.0, help="DDIM eta (0 = deterministic, 1 = DDPM-like)")
    p.add_argument("--negative_prompt", default="", help="unconditional / negative prompt for guidance")
    p.add_argument(
        "--seed", type=number_in(0, 2**62, int), default=42, help="image i of prompt j uses seed + j * n_samples + i"
    )
    p.add_argument(
        "--H",
        type=positive_multiple_of_8,
        default=None,
        help="image height, a multiple of 8 (default: the config's, 512 for SD v1)",
    )
    p.add_argument(
        "--W", type=positive_multiple_of_8, default=None, help="image width, a multiple of 8 (default: the config's)"
    )
    p.add_argument("--config_path", default=str(SD_CONFIG), help="CompVis model config")
    p.add_argument(
        "--ckpt_path",
        default=DEFAULT_CKPT,
        help="SD v1.x .ckpt/.safetensors; the default path is not used with the tiny config",
    )
    p.add_argument("--embedding", default=None, help="learned prefix file (.pt/.safetensors) for prompts with 'alz'")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="weight precision")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--outdir", default="outputs/samples", help="folder for the images and grid.png")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompts = args.prompt or []
        if args.from_file:
            prompts += load_prompts(args.from_file)  # '<index> <caption>' lines lose their index
        if not prompts:
            prompts = ["a photograph of an astronaut riding a horse"]
        device = pick_device(args.device)
        model = load_model_for_cli(args.config_path, args.ckpt_path, device, pick_dtype(args.precision, device))
        em = None
        if args.embedding:
            from ldm.modules.prefix import load_prefix

            em = load_prefix(model, args.embedding).to(device)  # SD v1: one manager; SDXL: one per text encoder
            words = list(em.string_to_token_dict)
            if not any(has_placeholder(p, w) for p in prompts for w in words):
                raise UsageError(
                    f"--embedding {args.embedding} is given but no prompt contains its placeholder "
                    f"{' or '.join(map(repr, words))}, so the prefix would change nothing; write it in front, e.g. "
                    f"--prompt '{words[0]} {prompts[0]}'"
                )
        size = model.image_size * 8
        all_prompts = [p for p in prompts for _ in range(args.n_samples)]
        seeds = [args.seed + i for i in range(len(all_prompts))]
        out = Path(args.outdir)

        def save(start, imgs):
            for k, im in enumerate(imgs):
                save_image(im, out / f"{start + k:05d}.png")

        images = txt2img(
            model,
            all_prompts,
            seeds,
            batch_size=args.batch_size,
            steps=args.steps,
            scale=args.scale,
            eta=args.eta,
            negative_prompt=args.negative_prompt,
            height=args.H or size,
            width=args.W or size,
            embedding_manager=em,
            on_batch=save,
        )
        save_image(make_grid(images, nrow=args.n_samples), out / "grid.png")
        (out / "prompts.txt").write_text(
            "\n".join(f"{i:05d}\t{s}\t{p}" for i, (p, s) in enumerate(zip(all_prompts, seeds, strict=False))) + "\n"
        )
        print(f"wrote {len(images)} images and grid.png to {out}")
        return 0
    except (UsageError, CheckpointError, ConfigError, OSError, ValueError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"sample.py: error: out of memory at --batch_size {args.batch_size}; lower it", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
