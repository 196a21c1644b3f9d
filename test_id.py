"""Identity test: do faces generated for a person's name still look like that person, with and without the prefix?

    python test_id.py --ckpt_path models/Stable-diffusion/v1-5-pruned-emaonly.ckpt \
        --embedding embeddings/APL-v1.1-9999.pt --gt_npy data/face_gt.npy --outdir outputs/test_id
    python test_id.py --image_folder outputs/test_id --gt_folder data/reference_photos   # score existing images

For each identity, K images of "A close-up portrait of <name>" (and "alz A close-up ..." with the prefix); the
largest face's embedding is compared with the person's ground truth. Writes summary.json, identity_<mode>.csv,
report.md and grids/<name>.png (with-prefix row above the without-prefix row) into --outdir.
"""

from __future__ import annotations

import argparse
import sys

from apl.eval.generation import CLI_ERRORS
from apl.eval.run_id import DEFAULT_TEMPLATE, format_summary, run_test_id
from args.clip_args import build_parser as shared_parser


def build_parser() -> argparse.ArgumentParser:
    p = shared_parser(
        __doc__.split("\n")[0],
        groups=("model", "prefix", "generation", "identity", "id_metric", "people", "ground_truth"),
    )
    p.set_defaults(outdir="outputs/test_id")
    g = p.add_argument_group("identity test")
    g.add_argument("--prompt_template", default=DEFAULT_TEMPLATE,
                   help="Identity prompt; {name} is replaced by the person's name (the prefix goes in front).")
    g.add_argument("--image_folder", default=None,
                   help="Score existing images instead of generating: <Name>-<k>.png files, or with/ and without/ "
                        "subfolders of them (a previous --outdir works).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run_test_id(args)
    except CLI_ERRORS as e:
        print(f"test_id.py: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"reports in {args.outdir}: summary.json, identity_<mode>.csv, report.md, grids/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
