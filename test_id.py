"""Identity test: do faces generated for a person's name still look like that person, with and without the prefix?

    python test_id.py --ckpt_path models/Stable-diffusion/v1-5-pruned-emaonly.ckpt \
        --embedding embeddings/APL-v1.1-9999.pt --gt_npy data/face_gt.npy --outdir outputs/test_id \
        --prompt_templates_file held_out_templates.txt
    python test_id.py --image_folder outputs/test_id --gt_folder data/reference_photos   # score existing images

For each identity, K images of "A close-up portrait of <name>" (and "alz A close-up ..." with the prefix); the
largest face's embedding is compared with the person's ground truth. Every figure comes with a 95 % bootstrap
interval over identities. Writes summary.json, identity_<mode>.csv, report.md and grids/<name>.png (with-prefix row
above the without-prefix row) into --outdir. Exit code 2: bad input (one line says what and what to do).
"""

from __future__ import annotations

import argparse
import sys

from apl.eval.defaults import DEFAULT_TEMPLATE
from args.clip_args import build_parser as shared_parser
from args.clip_args import parse_eval_args


def build_parser() -> argparse.ArgumentParser:
    p = shared_parser(
        __doc__.split("\n")[0],
        groups=("model", "prefix", "generation", "identity", "id_metric", "people", "ground_truth", "stats"),
    )
    p.set_defaults(outdir="outputs/test_id")
    g = p.add_argument_group("identity test")
    g.add_argument("--prompt_template", default=DEFAULT_TEMPLATE,
                   help="Identity prompt; {name} is replaced by the person's name (the prefix goes in front). The "
                        "default is the original's, and it is also one of train.py's prompts: add "
                        "--prompt_templates_file to test on prompts the prefix was not trained on.")
    g.add_argument("--prompt_templates_file", nargs="+", default=None, metavar="FILE",
                   help="Extra template sets, each a text file of templates with {name}, one per line ('#' comments); "
                        "a set is named by its file name (held_out.txt -> held_out). Image k of a person uses the "
                        "set's template k mod T with the same seed as image k of --prompt_template, so the sets "
                        "compare on the same start noise. Reported per set beside the --prompt_template set "
                        "('default'); images go to <outdir>/template_sets/<set>/images/.")
    g.add_argument("--image_folder", default=None,
                   help="Score existing images instead of generating: <Name>-<k>.png files, or with/ and without/ "
                        "subfolders of them (a previous --outdir works). Generation flags are then ignored (and "
                        "not recorded).")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_eval_args(build_parser(), argv)
    from apl.eval.generation import CLI_ERRORS  # heavy (torch): only after the flags are known to be good
    from apl.eval.run_id import format_summary, run_test_id

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
