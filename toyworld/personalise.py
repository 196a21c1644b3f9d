"""Personalise the toy model DreamBooth-style: teach it one new person, after the prefix was trained.

    python -m toyworld.personalise --ckpt toyworld/assets/toy-sd.safetensors --outdir outputs/toy/personalised

The new person is not in the cast (a new name, a new face: attributes and signature drawn from --seed, with a
visible signature no cast member has). Only the UNet is fine-tuned, on pictures of the person captioned with
their name (as dataset_generation words a named prompt) mixed with pictures from the original training
distribution (DreamBooth's prior preservation: the cast, anonymous people and scenes keep being drawn as before).
The text encoder stays as it is, so a prefix trained on the original model applies to the personalised one
unchanged -- the paper's test of a prefix against identities a model learns *after* the prefix was made.

Writes into --outdir: toy-sd-personalised.safetensors (+ .json record with the measured no-prefix ID accuracy),
person.tsv (name + description, a --people_file), person.json (hidden labels) and references/ (reference
photos, a --gt_folder).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apl.io import atomic_write_text
from apl.latent_cache import file_digest
from ldm.checkpoint import load_model
from ldm.sampling import save_image, txt2img
from toyworld.make_model import CHECKPOINT, CONFIG, encode_moments, save_and_reload, train_diffusion
from toyworld.perception import ToyFaceBackend
from toyworld.render import BACKGROUNDS, PLAIN, Person, random_attributes, random_signature, render_person
from toyworld.world import _visible, load_named_people, named_caption, training_sample

NAME = "Rhea Sundqvist"  # not in the cast; its words appear in no training caption of the original model
GENDER = "female"


def new_person(seed: int, gender: str = GENDER) -> Person:
    """A person no cast member looks like (their visible signature is new), of the given gender."""
    rng = random.Random(f"toy-personalise/{seed}")
    taken = {_visible(p.signature) for p in load_named_people().values()}
    attrs = replace(random_attributes(rng), gender=gender)
    attrs = replace(attrs, beard=attrs.beard and gender == "male")
    sig = random_signature(rng)
    while _visible(sig) in taken:
        sig = random_signature(rng)
    return Person(attrs, sig)


def subject_pictures(name: str, person: Person, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n pictures of the person captioned with their name, worded as the cast's named pictures are."""
    images, captions = [], []
    for i in range(n):
        rng = random.Random(f"toy-personalise-train/{seed}/{i}")
        caption, background, shirt, closeup = named_caption(name, rng)
        image, _ = render_person(person, rng, background, shirt, closeup)
        images.append(np.asarray(image))
        captions.append(caption)
    return np.stack(images), captions


def prior_pictures(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """n pictures from the original model's training distribution (cast, anonymous people, scenes)."""
    people = load_named_people()
    n_named = max(1, n // (3 * len(people)))  # about a third cast, the rest anonymous people and scenes
    n_anon = (n - n_named * len(people)) * 2 // 3
    total = n_named * len(people) + n_anon + (n - n_named * len(people) - n_anon)
    rows = [training_sample(i, people, n_named, n_anon, seed, None) for i in range(total)]
    return np.stack([np.asarray(s.image) for s in rows]), [s.caption for s in rows]


def write_references(person: Person, name: str, folder: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(f"toy-personalise-reference/{seed}")
    for k in range(n):
        image, _ = render_person(person, rng, background=rng.choice([*BACKGROUNDS, PLAIN]), closeup=True)
        save_image(image, folder / f"{name}-{k}.png")


def id_accuracy(model, name: str, references: Path, n: int, steps: int, scale: float) -> dict:
    """No-prefix ID accuracy of `name` on `model` (the toy recogniser, its calibrated threshold), measured here so
    that the record says whether the fine-tune worked; test_id.py measures the same with intervals."""
    backend = ToyFaceBackend()
    refs = [backend.embed(np.asarray(Image.open(p).convert("RGB"))) for p in sorted(references.glob("*.png"))]
    gt = np.mean([r for r in refs if r is not None], axis=0)
    gt /= np.linalg.norm(gt)
    images = txt2img(model, [f"A close-up portrait of {name}"] * n, list(range(n)), batch_size=16, progress=False,
                     steps=steps, scale=scale, height=64, width=64, negative_prompt="")
    embs = [backend.embed(np.asarray(im)) for im in images]
    sims = [float(e @ gt) for e in embs if e is not None]
    hits = sum(s >= backend.default_id_threshold for s in sims)
    return {"images": n, "faces": len(sims), "id_accuracy": hits / len(sims) if sims else None,
            "threshold": backend.default_id_threshold}


def personalise(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    if args.name in load_named_people():
        raise SystemExit(f"personalise: error: {args.name!r} is in the toy cast; pick a new name (--name)")
    person = new_person(args.seed, args.gender)
    atomic_write_text(f"# The personalised person (not in the cast).\n{args.name}\t{person.attributes.describe()}\n",
                      out / "person.tsv")
    atomic_write_text(json.dumps({args.name: person.to_dict()}, indent=1) + "\n", out / "person.json")
    write_references(person, args.name, out / "references", args.references)

    images_s, caps_s = subject_pictures(args.name, person, args.subject_pictures, args.seed)
    images_p, caps_p = prior_pictures(args.prior_pictures, args.seed + 1)
    images = np.concatenate([images_s, images_p])
    captions = caps_s + caps_p
    model = load_model(args.config, args.ckpt)
    model.requires_grad_(False)
    before = id_accuracy(model, args.name, out / "references", args.check_images, args.steps, args.scale)
    stats = train_diffusion(model, encode_moments(model, images), captions, args.unet_steps, args.batch_size,
                            args.lr, args.seed, train_text=False)
    path = out / "toy-sd-personalised.safetensors"
    reloaded = save_and_reload(model, args.config, path)
    after = id_accuracy(reloaded, args.name, out / "references", args.check_images, args.steps, args.scale)
    record = {
        "name": args.name,
        "description": person.attributes.describe(),
        "finetuned_from": {"file": Path(args.ckpt).name, "sha256": file_digest(Path(args.ckpt))},
        "pictures": {"subject": len(caps_s), "prior": len(caps_p)},
        **stats,
        "no_prefix_id_accuracy_before": before,
        "no_prefix_id_accuracy_after": after,
        "file": path.name,
        "sha256": file_digest(path),
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python -m toyworld.personalise " + " ".join(sys.argv[1:]),
        "settings": vars(args),
    }
    atomic_write_text(json.dumps(record, indent=1) + "\n", path.with_suffix(".json"))
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=str(CHECKPOINT), help="the model to personalise")
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--outdir", required=True)
    p.add_argument("--name", default=NAME, help="the new person's name (must not be in the cast)")
    p.add_argument("--gender", default=GENDER, choices=("female", "male"))
    p.add_argument("--seed", type=int, default=0, help="draws the new person and the pictures")
    p.add_argument("--subject_pictures", type=int, default=400, help="pictures of the new person")
    p.add_argument("--prior_pictures", type=int, default=2400, help="prior-preservation pictures")
    p.add_argument("--unet_steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--references", type=int, default=8, help="reference photos of the new person")
    p.add_argument("--check_images", type=int, default=32, help="images for the before/after ID accuracy")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the check")
    p.add_argument("--scale", type=float, default=7.0, help="guidance scale of the check")
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str] | None = None) -> int:
    record = personalise(build_parser().parse_args(argv))
    print(json.dumps({k: v for k, v in record.items() if k != "settings"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
