"""One picture of a test_id.py run: a row per person, its images without the prefix, then with it.

    python -m toyworld.grid outputs/demo/test_id --out outputs/demo/grid.png

Reads `<run>/images/without/<Name>-<k>.png` and `<run>/images/with/<Name>-<k>.png` and labels each row with the
name and, when `<run>/identity_<mode>.csv` exists, the per-person mean similarity of each half.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from apl.eval.images import load_pil_rgb
from apl.eval.run_id import collect_folder
from ldm.sampling import save_image

CELL = 96
LABEL = 150
GAP = 12


def _means(run: Path, mode: str) -> dict[str, str]:
    path = run / f"identity_{mode}.csv"
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return {row["name"]: row["mean"] for row in csv.DictReader(f) if row.get("mean")}


def make_overview(run: str | Path, per_side: int = 4, names: list[str] | None = None) -> Image.Image:
    """The grid image: rows of per_side images without and per_side with the prefix, per person."""
    run = Path(run)
    found = collect_folder(run).sets  # test_id's own reading of a run: mode -> name -> images in k order
    without, with_ = found.get("without", {}), found.get("with", {})
    names = names or sorted(set(without) & set(with_))
    if not names:
        raise ValueError(f"{run} has no person with images in both without/ and with/")
    sim = {"without": _means(run, "without"), "with": _means(run, "with")}
    width = LABEL + 2 * per_side * CELL + GAP
    head = 22
    grid = Image.new("RGB", (width, head + len(names) * CELL), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((LABEL, 4), "without the prefix", fill="black")
    draw.text((LABEL + per_side * CELL + GAP, 4), "with the prefix (alz ...)", fill="black")
    for r, name in enumerate(names):
        y = head + r * CELL
        label = name
        if name in sim["without"] and name in sim["with"]:
            label += f"\nsim {float(sim['without'][name]):.2f} -> {float(sim['with'][name]):.2f}"
        draw.multiline_text((4, y + CELL // 2 - 12), label, fill="black")
        for x0, images in ((LABEL, without), (LABEL + per_side * CELL + GAP, with_)):
            for c, path in enumerate(images.get(name, [])[:per_side]):
                grid.paste(load_pil_rgb(path).resize((CELL, CELL), Image.Resampling.NEAREST), (x0 + c * CELL, y))
    return grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a test_id.py --outdir made with --mode both")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--per_side", type=int, default=4, help="images per person on each side")
    args = p.parse_args(argv)
    try:
        grid = make_overview(args.run, args.per_side)
    except (OSError, ValueError) as e:
        print(f"toyworld.grid: error: {e}", file=sys.stderr)
        return 2
    save_image(grid, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
