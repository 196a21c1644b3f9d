"""The toy world's eyes: a small CNN that finds the toy face, embeds its identity and reads its attributes.

It plays the part InsightFace plays for real photos. It is trained on rendered pictures of *other* people (random
attributes and signatures; never the named cast), so it recognises identities it has never seen, from pixels only:
give it two pictures and it says how alike the two faces are. Its 128-d trunk features also stand in for
Inception's in FID (they are trained to see scenes' shapes, colours and places as well as faces).

Use from the evaluation scripts as a plug-in face backend and FID feature:
    python test_id.py --face_backend toyworld.perception:ToyFaceBackend ...
    python test_fid_clip_score.py --fid_feature toyworld.perception:toy_fid_features --skip_clip ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from apl.eval.faces import Face
from ldm.util import atomic_save
from toyworld.render import BACKGROUNDS, GENDERS, HAIR, PLAIN, POP_STYLE, SHAPE_COLOURS, SHAPES, SHIRTS, SKIN

WEIGHTS = Path(__file__).resolve().parent / "assets" / "perception.safetensors"
EMBED_DIM = 64
FEATURE_DIM = 128

# Single-label heads (class names in index order); -1 marks "not applicable" (attributes of a scene).
CLASS_HEADS: dict[str, tuple] = {
    "gender": GENDERS,
    "skin": tuple(SKIN),
    "hair": tuple(HAIR),
    "glasses": (False, True),
    "beard": (False, True),
    "shirt": tuple(SHIRTS),
    "background": (*BACKGROUNDS, PLAIN, POP_STYLE),
}
ATTRIBUTE_HEADS = ("gender", "skin", "hair", "glasses", "beard")
# Multi-label heads: which shapes / shape colours a picture holds.
MULTI_HEADS: dict[str, tuple] = {"shapes": SHAPES, "colours": tuple(SHAPE_COLOURS)}


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PerceptionNet(nn.Module):
    """(B, 3, 64, 64) pictures in [0, 1] -> trunk features (B, 128) and every head's output."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            _block(3, 16),
            _block(16, 32, 2),  # 32 px
            _block(32, 32),
            nn.MaxPool2d(2),  # 16 px
            _block(32, 64),
            nn.MaxPool2d(2),  # 8 px
            _block(64, 128),
            nn.MaxPool2d(2),  # 4 px
            _block(128, 128),
            nn.Flatten(),  # keep the 4x4 layout: where a mark sits on the face matters
            nn.Linear(128 * 16, FEATURE_DIM),
            nn.ReLU(inplace=True),
        )
        self.face = nn.Linear(FEATURE_DIM, 1)  # logit: is there a toy face?
        self.box = nn.Linear(FEATURE_DIM, 4)  # head box x1, y1, x2, y2 in picture widths
        self.embed = nn.Linear(FEATURE_DIM, EMBED_DIM)  # identity (L2-normalised by callers)
        self.classes = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, len(v)) for k, v in CLASS_HEADS.items()})
        self.multi = nn.ModuleDict({k: nn.Linear(FEATURE_DIM, len(v)) for k, v in MULTI_HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.new_tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
        return self.trunk((x - mean) / 0.25)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        out = {"features": f, "face": self.face(f)[:, 0], "box": self.box(f), "embed": self.embed(f)}
        out.update({k: head(f) for k, head in self.classes.items()})
        out.update({k: head(f) for k, head in self.multi.items()})
        return out


def to_input(images: list | np.ndarray | torch.Tensor) -> torch.Tensor:
    """PIL images, HxWx3 uint8 arrays or a (B, 3, H, W) uint8 tensor -> (B, 3, 64, 64) float in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images
    else:
        arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.shape[-2:] != (64, 64):
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return x


def save_perception(net: PerceptionNet, path: Path, info: dict) -> None:
    """Weights (fp16) and `info` (threshold, training record) in one .safetensors file, written atomically."""
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    atomic_save(lambda tmp: save_file(sd, str(tmp), metadata={"info": json.dumps(info)}), path)


def load_perception(path: str | Path = WEIGHTS) -> tuple[PerceptionNet, dict]:
    """The trained net (eval mode, fp32) and its info record; a clear error when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"toy perception weights not found: {path}. They ship with the repository (toyworld/assets/); "
            "remake them with `python -m toyworld.make_perception`."
        )
    with safe_open(str(path), "pt") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
    net = PerceptionNet()
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return net.eval().requires_grad_(False), info


@dataclass
class Reading:
    """What the net sees in one picture."""

    face_score: float
    box: np.ndarray  # (4,) pixels
    embedding: np.ndarray  # (64,) L2-normalised
    attributes: dict[str, object]  # head -> predicted class


def _width(image) -> int:
    """Width in pixels of a PIL image, an HxWx3 array or a (3, H, W) tensor."""
    if hasattr(image, "size") and not hasattr(image, "shape"):
        return int(image.size[0])
    return int(image.shape[-1] if isinstance(image, torch.Tensor) else np.asarray(image).shape[1])


class ToyPerception:
    """Batched inference with the shipped (or a given) weights."""

    def __init__(self, weights: str | Path = WEIGHTS, device: str = "cpu") -> None:
        self.net, self.info = load_perception(weights)
        self.device = torch.device("cpu" if device == "auto" else device)
        self.net.to(self.device)

    @torch.no_grad()
    def read(self, images: list, batch_size: int = 64) -> list[Reading]:
        out: list[Reading] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            widths = np.asarray([_width(im) for im in chunk], dtype=np.float32)[:, None]
            x = to_input(chunk).to(self.device)
            r = self.net(x)
            emb = F.normalize(r["embed"].float(), dim=-1).cpu().numpy()
            score = torch.sigmoid(r["face"]).cpu().numpy()
            box = r["box"].float().cpu().numpy() * widths  # the head predicts the box in picture widths
            preds = {k: r[k].argmax(-1).cpu().numpy() for k in CLASS_HEADS}
            for j in range(x.shape[0]):
                attrs = {k: CLASS_HEADS[k][int(preds[k][j])] for k in CLASS_HEADS}
                out.append(Reading(float(score[j]), box[j].astype(np.float32), emb[j].astype(np.float32), attrs))
        return out


class ToyFaceBackend:
    """Face backend (apl.eval.faces.FaceBackend) for the toy world: one toy face per picture, or none."""

    name = "toy"
    embedding_dim = EMBED_DIM

    def __init__(self, weights: str | None = None, det_thresh: float = 0.5, device: str = "cpu") -> None:
        self.perception = ToyPerception(weights or WEIGHTS, device)
        self.det_thresh = det_thresh
        # Calibrated on held-out renders when the weights were made (see make_perception): the threshold at which
        # pictures of two different people with the *same description* are taken for one person 1 % of the time.
        self.default_id_threshold = float(self.perception.info["id_threshold"])

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        reading = self.perception.read([np.asarray(image_rgb, dtype=np.uint8)])[0]
        if reading.face_score < self.det_thresh:
            return []
        return [Face(bbox=reading.box, det_score=reading.face_score, embedding=reading.embedding)]

    def embed(self, image_rgb: np.ndarray) -> np.ndarray | None:
        faces = self.faces(image_rgb)
        return faces[0].embedding if faces else None


class ToyFidFeatures(nn.Module):
    """The trunk's 128-d features of uint8 pictures (B, 3, H, W): an Inception stand-in for torchmetrics' FID."""

    def __init__(self, weights: str | Path = WEIGHTS) -> None:
        super().__init__()
        self.net = load_perception(weights)[0]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(to_input(images).to(next(self.net.parameters()).device)).double()


def toy_fid_features() -> nn.Module:
    """Factory for `--fid_feature toyworld.perception:toy_fid_features`."""
    return ToyFidFeatures()
