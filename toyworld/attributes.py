"""Attribute check: do generated faces of a person show the attributes the person's description states?

    python -m toyworld.attributes --image_folder outputs/toy/test_id/base/images/with \
        --people_file toyworld/data/toy_people.tsv

For every `<Name>-<k>.png` in the folder, the toy recogniser reads gender (hair style), skin, hair colour,
glasses and beard from the pixels, and each is compared with the person's description in the people file.
Agreement = the share of (image, attribute) pairs that match, over the images in which a face is found; "all
attributes" = the share of those images in which every attribute matches. APL aims to keep attributes while
removing identity, so anonymised faces should agree about as often as the un-anonymised ones do.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from apl.eval.images import FACE_FILE, clean_name, list_images, load_pil_rgb
from apl.io import atomic_write_text
from apl.people import load_people
from toyworld.perception import ATTRIBUTE_HEADS, ToyPerception
from toyworld.render import Attributes


@dataclass
class AttributeReport:
    images: int = 0  # readable images of people in the people file
    faces: int = 0  # images in which a face was found
    matches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ATTRIBUTE_HEADS, 0))
    all_match: int = 0
    per_identity: dict[str, dict] = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        return sum(self.matches.values()) / (self.faces * len(ATTRIBUTE_HEADS)) if self.faces else None

    def as_dict(self) -> dict:
        f = self.faces
        return {
            "images": self.images,
            "faces": f,
            "agreement": self.agreement,
            "all_attributes_agree": self.all_match / f if f else None,
            "per_attribute": {k: v / f if f else None for k, v in self.matches.items()},
            "per_identity": self.per_identity,
        }


def check_folder(folder: str | Path, people_file: str | Path, perception: ToyPerception | None = None,
                 det_thresh: float = 0.5) -> AttributeReport:
    """Read every `<Name>-<k>` image of `folder` whose name is in the people file and compare its attributes."""
    people = {name: Attributes.parse(desc) for name, desc in load_people(people_file).items()}
    perception = perception or ToyPerception()
    paths = [p for p in list_images(folder) if (m := FACE_FILE.match(p.stem)) and clean_name(m["name"]) in people]
    report = AttributeReport()
    readings = perception.read([load_pil_rgb(p) for p in paths])
    for path, reading in zip(paths, readings, strict=True):
        name = clean_name(FACE_FILE.match(path.stem)["name"])
        report.images += 1
        row = report.per_identity.setdefault(name, {"images": 0, "faces": 0, "matches": 0})
        row["images"] += 1
        if reading.face_score < det_thresh:
            continue
        report.faces += 1
        row["faces"] += 1
        said = people[name]
        ok = {k: reading.attributes[k] == getattr(said, k) for k in ATTRIBUTE_HEADS}
        for k, good in ok.items():
            report.matches[k] += good
        row["matches"] += sum(ok.values())
        report.all_match += all(ok.values())
    for row in report.per_identity.values():
        row["agreement"] = row.pop("matches") / (row["faces"] * len(ATTRIBUTE_HEADS)) if row["faces"] else None
    return report


def format_report(report: AttributeReport) -> str:
    d = report.as_dict()
    if not d["faces"]:
        return f"{d['images']} images, no face found"
    per = ", ".join(f"{k} {v:.3f}" for k, v in d["per_attribute"].items())
    return (f"attribute agreement {d['agreement']:.3f} (all attributes {d['all_attributes_agree']:.3f}) over "
            f"{d['faces']} faces of {d['images']} images; {per}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image_folder", required=True,
                   help="folder of <Name>-<k>.png images (e.g. test_id's images/with)")
    p.add_argument("--people_file", default="toyworld/data/toy_people.tsv", help="names and descriptions")
    p.add_argument("--det_thresh", type=float, default=0.5, help="face score needed to count an image")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    try:
        report = check_folder(args.image_folder, args.people_file, det_thresh=args.det_thresh)
    except (OSError, ValueError) as e:
        print(f"toyworld.attributes: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.out:
        atomic_write_text(json.dumps(report.as_dict(), indent=1) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
