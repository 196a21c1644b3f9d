"""Image quality with and without the prefix: CLIP score (open_clip), FID and KID over a prompt file.

    python test_fid_clip_score.py --ckpt_path models/Stable-diffusion/v1-5-pruned-emaonly.ckpt \
        --embedding embeddings/APL-v1.1-9999.pt --prompts_file prompts_person.txt --fid_ref data/coco_people \
        --clip_pretrained /models/open_clip_pytorch_model.bin \
        --inception_weights /models/pt_inception-2015-12-05-6726825d.pth

The CLIP score is the cosine of each image and its prompt without the placeholder; FID and KID compare each generated
set with --fid_ref, and the with-prefix set with a without-prefix set drawn from independent seeds (beside it, the
without-prefix set against that independent one: what FID/KID read for two samples of one model at this N). CLIP
score and the same-seed pixel difference get 95 % bootstrap intervals over prompts, KID its spread over subsets.
Writes clip_scores.csv and summary.json. Exit code 2: bad input (one line says what and what to do).
"""

from __future__ import annotations

import argparse
import sys

from apl.eval.defaults import DEFAULT_KID_SUBSET_SIZE, DEFAULT_KID_SUBSETS, DEFAULT_PROMPTS
from args.clip_args import build_parser as shared_parser
from args.clip_args import int_in, parse_eval_args


def build_parser() -> argparse.ArgumentParser:
    p = shared_parser(__doc__.split("\n")[0], groups=("model", "prefix", "generation", "quality", "stats"))
    p.set_defaults(outdir="outputs/fid_clip", prompts_file=DEFAULT_PROMPTS)
    g = p.add_argument_group("what to compute")
    g.add_argument("--skip_clip", action="store_true", help="Do not compute the CLIP score (no CLIP weights needed).")
    g.add_argument("--skip_fid", action="store_true", help="Do not compute FID or KID (no Inception weights needed).")
    g.add_argument(
        "--fid_antialias",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="How FID resizes images to Inception's 299x299: antialiased bilinear (--fid_antialias) or the "
        "TF1-style bilinear of the original FID code (--no-fid_antialias); unset keeps torchmetrics' "
        "default (antialias on). Only FIDs made the same way compare; summary.json records it.",
    )
    g.add_argument(
        "--independent_set",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="With --mode both and FID: also draw a without-prefix set from independent seeds, so that FID/KID "
        "between with and without compare two independent samples (the same-seed sets share their start noise, "
        "which lowers FID) and so that 'without vs without_independent' shows the finite-sample floor. Costs one "
        "more set of images.",
    )
    g.add_argument("--kid_subsets", type=int_in(1, 10_000), default=DEFAULT_KID_SUBSETS,
                   help="KID: number of random subsets its mean and spread are taken over.")
    g.add_argument("--kid_subset_size", type=int_in(0, 1_000_000), default=DEFAULT_KID_SUBSET_SIZE,
                   help="KID: images per subset, capped at half the smaller set (so subsets differ); 0 = that cap.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_eval_args(build_parser(), argv)
    from apl.eval.generation import CLI_ERRORS  # heavy (torch): only after the flags are known to be good
    from apl.eval.run_quality import format_summary, run_quality

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
