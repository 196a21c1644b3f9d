"""Train the toy recogniser (toyworld/perception.py) on rendered pictures of random people and scenes.

    python -m toyworld.make_perception       # ~10 min on 2 CPU cores -> toyworld/assets/perception.safetensors
    python -m toyworld.make_perception --ids 60 --steps 20 --out /tmp/p.safetensors   # smoke run

None of the named cast is in its training set: identities are random people, so recognising a named person later is
recognition of a face it has never seen. The identity head is trained with a CosFace loss (Wang et al. 2018); the
ID threshold is then calibrated on held-out people as the similarity that two *different* people with the *same
description* exceed 1 % of the time, so that "recognised" means the signature, not just the description, matches.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from toyworld.colour_codec import tent_upsample
from toyworld.perception import ATTRIBUTE_HEADS, CLASS_HEADS, MULTI_HEADS, WEIGHTS, PerceptionNet, save_perception
from toyworld.render import (
    BACKGROUNDS,
    PLAIN,
    POP_STYLE,
    Person,
    Scene,
    head_box,
    random_attributes,
    random_person,
    random_scene,
    render_person,
    render_scene,
)

ALL_BACKGROUNDS = [*BACKGROUNDS, PLAIN, POP_STYLE]


@dataclass
class Batch:
    images: np.ndarray  # (N, 64, 64, 3) uint8
    labels: dict[str, np.ndarray]


FAMILY = 4  # identities come in families that share one description and differ in their signatures


def training_person(ident: int) -> Person:
    """Training identity `ident`: its family's attributes, its own signature."""
    attributes = random_attributes(random.Random(f"perception/family/{ident // FAMILY}"))
    return random_person(random.Random(f"perception/id/{ident}"), attributes)


def _person_rows(args: tuple[int, int, int]) -> list[tuple[np.ndarray, dict]]:
    """`per_id` pictures of each of identities [start, stop) (seeded by the identity number)."""
    start, stop, per_id = args
    rows = []
    for ident in range(start, stop):
        rng = random.Random(f"perception/pictures/{ident}")
        person = training_person(ident)
        for _ in range(per_id):
            image, look = render_person(person, rng, rng.choice(ALL_BACKGROUNDS), closeup=rng.random() < 0.4)
            rows.append((np.asarray(image), _labels_person(person, look, ident)))
    return rows


def _labels_person(person, look, ident: int) -> dict:
    a = person.attributes
    labels = {k: CLASS_HEADS[k].index(getattr(a, k)) for k in ATTRIBUTE_HEADS}
    labels.update(
        face=1.0,
        box=np.asarray(head_box(person, look), dtype=np.float32) / 64.0,
        identity=ident,
        shirt=CLASS_HEADS["shirt"].index(look.shirt),
        background=CLASS_HEADS["background"].index(look.background),
        shapes=np.zeros(len(MULTI_HEADS["shapes"]), np.float32),
        colours=np.zeros(len(MULTI_HEADS["colours"]), np.float32),
    )
    return labels


def _scene_rows(args: tuple[int, int]) -> list[tuple[np.ndarray, dict]]:
    """Scenes [start, stop); one in five has no shapes at all (an empty place)."""
    start, stop = args
    rows = []
    for i in range(start, stop):
        rng = random.Random(f"perception/scene/{i}")
        scene = random_scene(rng, rng.choice(ALL_BACKGROUNDS))
        if rng.random() < 0.2:
            scene = Scene((), scene.background)
        shapes = np.zeros(len(MULTI_HEADS["shapes"]), np.float32)
        colours = np.zeros(len(MULTI_HEADS["colours"]), np.float32)
        for s in scene.shapes:
            shapes[MULTI_HEADS["shapes"].index(s.kind)] = 1
            colours[MULTI_HEADS["colours"].index(s.colour)] = 1
        labels = {k: -1 for k in (*ATTRIBUTE_HEADS, "shirt")}
        labels.update(
            face=0.0,
            box=np.zeros(4, np.float32),
            identity=-1,
            background=CLASS_HEADS["background"].index(scene.background),
            shapes=shapes,
            colours=colours,
        )
        rows.append((np.asarray(render_scene(scene, rng)), labels))
    return rows


def _stack(rows: list[tuple[np.ndarray, dict]]) -> Batch:
    images = np.stack([r[0] for r in rows])
    keys = rows[0][1].keys()
    return Batch(images, {k: np.stack([np.asarray(r[1][k]) for r in rows]) for k in keys})


def render_set(n_ids: int, per_id: int, n_scenes: int, workers: int = 2) -> Batch:
    """Pictures of n_ids random people (per_id each) and n_scenes scenes, rendered in `workers` processes."""
    person_jobs = [(s, min(s + 50, n_ids), per_id) for s in range(0, n_ids, 50)]
    scene_jobs = [(s, min(s + 200, n_scenes)) for s in range(0, n_scenes, 200)]
    rows: list = []
    with Pool(workers) as pool:
        for part in tqdm(pool.imap(_person_rows, person_jobs), total=len(person_jobs), desc="render people"):
            rows += part
        for part in tqdm(pool.imap(_scene_rows, scene_jobs), total=len(scene_jobs), desc="render scenes"):
            rows += part
    return _stack(rows)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Pictures (B, 3, 64, 64) in [0, 1] as the recogniser will meet them: most through the toy VAE's colour codec
    (what the toy model's pictures look like), some with noise in its latent (a generator's imperfect latents),
    some blurred, some as rendered (reference photos); then light, colour and noise changes."""
    b = x.shape[0]
    out = x.clone()
    kind = torch.randint(0, 20, (b,), generator=g)
    codec = (kind < 15).nonzero()[:, 0]
    if len(codec):
        z = F.avg_pool2d(out[codec] * 2 - 1, 8)  # the 8x8 block means the toy VAE keeps
        n = len(codec)
        noisy = (kind[codec] >= 5).float().view(-1, 1, 1, 1)  # what a generator gets wrong: noise, saturation
        grey = z.mean(dim=1, keepdim=True)
        saturation = 1 + noisy * (torch.rand((n, 1, 1, 1), generator=g) * 0.8 - 0.2)
        offset = noisy * 0.08 * (torch.rand((n, 3, 1, 1), generator=g) * 2 - 1)
        z = grey + saturation * (z - grey) + offset
        z = z + noisy * torch.randn(z.shape, generator=g) * 0.25 * torch.rand((n, 1, 1, 1), generator=g)
        out[codec] = ((tent_upsample(z) + 1) / 2).clamp(0, 1)
    blur = (kind >= 18).nonzero()[:, 0]
    if len(blur):
        out[blur] = _blur(out[blur], 0.8)
    gain = 1 + 0.1 * (torch.rand((b, 1, 1, 1), generator=g) * 2 - 1)
    tint = 1 + 0.05 * (torch.rand((b, 3, 1, 1), generator=g) * 2 - 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + 0.15 * (torch.rand((b, 1, 1, 1), generator=g) * 2 - 1)
    out = ((out - mean) * contrast + mean) * gain * tint
    out = out + torch.randn(out.shape, generator=g) * 0.02 * torch.rand((b, 1, 1, 1), generator=g)
    return out.clamp(0, 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def losses(net: PerceptionNet, proxies: torch.Tensor, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict:
    """Every head's loss for one batch (identity: CosFace, s = 16, m = 0.25, over the training identities)."""
    out = net(x)
    loss = {"face": F.binary_cross_entropy_with_logits(out["face"], y["face"])}
    faces = y["face"] > 0.5
    if faces.any():
        loss["box"] = 4 * F.l1_loss(out["box"][faces], y["box"][faces])
        emb = F.normalize(out["embed"][faces], dim=-1)
        ident = y["identity"][faces]
        cos = emb @ F.normalize(proxies, dim=-1).T
        onehot = F.one_hot(ident, proxies.shape[0]).float()
        loss["identity"] = 0.5 * F.cross_entropy(24.0 * (cos - 0.2 * onehot), ident)
        loss["contrast"] = 2.0 * supcon(emb, ident)
    for k in CLASS_HEADS:
        ok = y[k] >= 0
        if ok.any():
            loss[k] = 0.5 * F.cross_entropy(out[k][ok], y[k][ok])
    for k in MULTI_HEADS:
        loss[k] = 0.5 * F.binary_cross_entropy_with_logits(out[k], y[k])
    return loss


def supcon(emb: torch.Tensor, ident: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) within the batch, whose negatives include the other members
    of each family (same description): it is what teaches the signature rather than the description."""
    logits = emb @ emb.T / temperature
    self_mask = torch.eye(len(emb), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, -1e9)
    pos = (ident[:, None] == ident[None, :]) & ~self_mask
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    has = pos.any(dim=1)
    return -(log_prob.masked_fill(~pos, 0).sum(1)[has] / pos.sum(1)[has]).mean()


def family_batch(rng: np.random.Generator, n_ids: int, per_id: int, n_people_rows: int, n_rows: int,
                 batch: int) -> np.ndarray:
    """Row indices of a batch: whole families, three pictures of each member, and a quarter scenes."""
    n_scene = batch // 4
    n_fam = max(1, (batch - n_scene) // (3 * FAMILY))
    fams = rng.choice(n_ids // FAMILY, n_fam, replace=False)
    rows = []
    for f in fams:
        for ident in range(f * FAMILY, (f + 1) * FAMILY):
            rows += list(ident * per_id + rng.choice(per_id, min(3, per_id), replace=False))
    rows += list(rng.integers(n_people_rows, n_rows, n_scene)) if n_rows > n_people_rows else []
    return np.asarray(rows)


def _tensors(batch: Batch, idx: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = torch.from_numpy(batch.images[idx]).permute(0, 3, 1, 2).float() / 255.0
    y = {}
    for k, v in batch.labels.items():
        t = torch.from_numpy(v[idx])
        y[k] = t.float() if k in ("face", "box", *MULTI_HEADS) else t.long()
    return x, y


@torch.no_grad()
def embed_all(net: PerceptionNet, images: np.ndarray, g: torch.Generator | None = None) -> dict[str, np.ndarray]:
    net.eval()
    outs: dict[str, list] = {}
    for i in range(0, len(images), 256):
        x = torch.from_numpy(images[i : i + 256]).permute(0, 3, 1, 2).float() / 255.0
        if g is not None:
            x = augment(x, g)
        r = net(x)
        r["embed"] = F.normalize(r["embed"], dim=-1)
        for k, v in r.items():
            outs.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def calibrate(net: PerceptionNet, n_pairs: int, per_id: int, seed: int) -> dict:
    """Similarities on held-out people: genuine pairs, and impostors that share the whole description."""
    rows = []
    for i in range(n_pairs):
        rng = random.Random(f"perception/calibrate/{seed}/{i}")
        a = random_person(rng)
        b = random_person(rng, attributes=a.attributes)  # same description, another signature
        for j, person in enumerate((a, b)):
            for _ in range(per_id):
                image, look = render_person(person, rng, rng.choice(ALL_BACKGROUNDS), closeup=rng.random() < 0.4)
                rows.append((np.asarray(image), _labels_person(person, look, 2 * i + j)))
    val = _stack(rows)
    r = embed_all(net, val.images, torch.Generator().manual_seed(seed))
    emb, ident = r["embed"], val.labels["identity"]
    sims = emb @ emb.T
    same = ident[:, None] == ident[None, :]
    pair = (ident[:, None] // 2) == (ident[None, :] // 2)
    upper = np.triu(np.ones_like(same), 1).astype(bool)
    genuine = sims[same & upper]
    twin = sims[pair & ~same & upper]  # same description, different person
    other = sims[~pair & upper]
    threshold = float(np.quantile(twin, 0.99))
    detected = float((1 / (1 + np.exp(-r["face"])) >= 0.5).mean())
    attr_acc = {k: float((r[k].argmax(-1) == val.labels[k]).mean()) for k in ATTRIBUTE_HEADS}
    return {
        "id_threshold": round(threshold, 4),
        "genuine_accept_at_threshold": round(float((genuine >= threshold).mean()), 4),
        "same_description_accept": round(float((twin >= threshold).mean()), 4),
        "other_people_accept": round(float((other >= threshold).mean()), 4),
        "genuine_mean": round(float(genuine.mean()), 4),
        "same_description_mean": round(float(twin.mean()), 4),
        "other_mean": round(float(other.mean()), 4),
        "faces_detected": round(detected, 4),
        "attribute_accuracy": {k: round(v, 4) for k, v in attr_acc.items()},
        "calibration_people": 2 * n_pairs,
    }


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = render_set(args.ids, args.per_id, args.scenes, workers=args.workers)
    n = len(data.images)
    print(f"{n} training pictures ({args.ids} people x {args.per_id}, {args.scenes} scenes) in "
          f"{time.perf_counter() - t0:.0f} s")
    net = PerceptionNet()
    proxies = torch.nn.Parameter(torch.randn(args.ids, 64) * 0.1)
    opt = torch.optim.AdamW([*net.parameters(), proxies], lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    bar = tqdm(range(args.steps), desc="train recogniser")
    net.train()
    for _ in bar:
        x, y = _tensors(data, family_batch(rng, args.ids, args.per_id, args.ids * args.per_id, n, args.batch_size))
        loss = losses(net, proxies, augment(x, g), y)
        total = sum(loss.values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{total.item():.3f}", contrast=f"{loss['contrast'].item():.3f}")
    info = calibrate(net, args.calibration_pairs, 4, args.seed)
    info.update(
        seed=args.seed,
        steps=args.steps,
        training_people=args.ids,
        pictures_per_person=args.per_id,
        scenes=args.scenes,
        seconds=round(time.perf_counter() - t0, 1),
        command="python -m toyworld.make_perception " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                   if k != "out"),
    )
    save_perception(net, Path(args.out), info)
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ids", type=int, default=3000, help="random training identities")
    p.add_argument("--per_id", type=int, default=6, help="pictures per identity")
    p.add_argument("--scenes", type=int, default=5000, help="scene pictures (no person)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=96)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--calibration_pairs", type=int, default=300, help="held-out pairs of people sharing a description")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes that render pictures")
    p.add_argument("--out", default=str(WEIGHTS), help="where to write the weights (.safetensors)")
    return p


def main(argv: list[str] | None = None) -> int:
    info = train(build_parser().parse_args(argv))
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
