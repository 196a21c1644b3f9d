"""Generate the training face set: N images per person with random prompt prefixes/templates, resumable.

    python dataset_generation.py --ckpt_path models/Stable-diffusion/v1-5-pruned-emaonly.ckpt \
        --people_file people.tsv --n_samples 100 --outdir data/face --gt_npy data/face_gt.npy
    python dataset_generation.py --config_path configs/tiny/tiny-sd.yaml --names "Tom Hanks" --n_samples 2 --steps 2

Images are saved as <outdir>/<Person Name>-<k>.png, the naming train.py --face_dir reads; images already there
are skipped, so an interrupted run continues where it stopped. <outdir>/.dataset_generation.tsv records the settings
(seed, steps, scale, negative prompt, checkpoint, config, templates) and each image's seed and prompt; a rerun into
the same --outdir with other settings is refused instead of mixing two face sets. With --gt_npy, each person's
ground-truth face embedding (mean of the detected faces) is written for test_id.py --gt_npy; the names file's first
line records the .npy's sha256 and the face backend, so test_id.py refuses a names file of another .npy.
"""

from __future__ import annotations

import argparse
import sys

from apl.eval.defaults import DEFAULT_NEGATIVE_PROMPT
from args.clip_args import build_parser as shared_parser
from args.clip_args import parse_eval_args


def build_parser() -> argparse.ArgumentParser:
    p = shared_parser(__doc__.split("\n")[0], groups=("model", "generation", "identity", "people"))
    p.set_defaults(n_samples=100, outdir="data/face", people_file="people.tsv",
                   negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    g = p.add_argument_group("dataset")
    g.add_argument("--templates_file", default="templates.txt",
                   help="Scene/pose templates, one per line; each image gets one with probability 0.5 "
                        "(pass '' for none).")
    g.add_argument("--gt_npy", default=None,
                   help="Also write each person's ground-truth face embedding (mean over the faces detected in "
                        "their images) to this .npy, with the face backend flags above. Rerunning with the same "
                        "--outdir only recomputes it (all images are there).")
    g.add_argument("--gt_names", default=None,
                   help="Names file for --gt_npy (row i = line i after its '# apl-ground-truth' header); if unset, "
                        "<gt_npy without .npy>_names.txt.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_eval_args(build_parser(), argv)
    from apl.dataset_gen import format_summary, run_dataset_generation  # heavy (torch): after the flags are good
    from apl.eval.generation import CLI_ERRORS

    try:
        summary = run_dataset_generation(args)
    except CLI_ERRORS as e:
        print(f"dataset_generation.py: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
