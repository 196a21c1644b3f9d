"""Reference photos of the toy world's named people: the 'real photos' that identity ground truth comes from.

    python -m toyworld.references --outdir outputs/toy/references --n 8

Writes `<Name>-<k>.png` (close-up renders on random backgrounds), the layout `test_id.py --gt_folder` reads. They
are drawn from the hidden signatures, not by the toy model, so ground truth does not depend on the model under test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.sampling import save_image
from toyworld.world import load_named_people, reference_photos


def write_references(outdir: str | Path, n: int = 8, seed: int = 0) -> int:
    outdir = Path(outdir)
    count = 0
    for name, k, image in reference_photos(load_named_people(), n, seed):
        save_image(image, outdir / f"{name}-{k}.png")
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--outdir", required=True, help="folder to write <Name>-<k>.png into")
    p.add_argument("--n", type=int, default=8, help="photos per person")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"{write_references(args.outdir, args.n, args.seed)} reference photos in {args.outdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
