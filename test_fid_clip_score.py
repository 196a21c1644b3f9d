"""Image quality with and without the prefix: CLIP score (open_clip) and FID (torchmetrics) over a prompt file.

    python test_fid_clip_score.py --ckpt_path models/Stable-diffusion/v1-5-pruned-emaonly.ckpt \
        --embedding embeddings/APL-v1.1-9999.pt --prompts_file prompts_person.txt --fid_ref data/coco_people \
        --clip_pretrained /models/open_clip_pytorch_model.bin \
        --inception_weights /models/pt_inception-2015-12-05-6726825d.pth

The CLIP score is the cosine of each image and its prompt without the placeholder; FID compares each generated
set with --fid_ref and the two generated sets with each other. Writes clip_scores.csv and summary.json.
"""

from __future__ import annotations

import argparse
import sys

from apl.eval.generation import CLI_ERRORS
from apl.eval.run_quality import DEFAULT_PROMPTS, format_summary, run_quality
from args.clip_args import build_parser as shared_parser


def build_parser() -> argparse.ArgumentParser:
    p = shared_parser(__doc__.split("\n")[0], groups=("model", "prefix", "generation", "quality"))
    p.set_defaults(outdir="outputs/fid_clip", prompts_file=DEFAULT_PROMPTS)
    g = p.add_argument_group("what to compute")
    g.add_argument("--skip_clip", action="store_true", help="Do not compute the CLIP score (no CLIP weights needed).")
    g.add_argument("--skip_fid", action="store_true", help="Do not compute FID (no Inception weights needed).")
    g.add_argument(
        "--fid_antialias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="How FID resizes images to Inception's 299x299: antialiased bilinear (--fid_antialias) or the "
        "TF1-style bilinear of the original FID code (--no-fid_antialias); unset keeps torchmetrics' "
        "default (antialias on). Only FIDs made the same way compare; summary.json records it.",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_quality(args)
    except CLI_ERRORS as e:
        print(f"test_fid_clip_score.py: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"reports in {args.outdir}: clip_scores.csv, summary.json, images/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
