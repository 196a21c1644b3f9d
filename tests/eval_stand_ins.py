"""Tiny stand-ins for the evaluation weights that cannot be downloaded here (shared by the eval tests).

- `write_tiny_insightface_pack`: an SCRFD-shaped detector and an ArcFace-shaped recogniser built with onnx.helper,
  routed by insightface's own FaceAnalysis exactly as det_10g.onnx / w600k_r50.onnx would be.
- `tiny_clip_config` / `register_tiny_clip`: a random open_clip model small enough for a unit test.
- `TinyFeatures`: a fixed random feature extractor for FrechetInceptionDistance.
"""

from __future__ import annotations

import json
from pathlib import Path

import insightface
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

INSIGHTFACE_IMAGES = Path(insightface.__file__).parent / "data" / "images"
TOM_HANKS = INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png"  # 112x112 aligned face crop
GROUP_PHOTO = INSIGHTFACE_IMAGES / "t1.jpg"  # 1280x886, six people

# ArcFace's 5-point template for a 112x112 crop (eyes, nose tip, mouth corners); public constant of the method.
_ARCFACE_TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

_OPSET = [helper.make_opsetid("", 13)]
_IR_VERSION = 8  # old enough for any onnxruntime >= 1.10


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=_OPSET)
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def tiny_scrfd(path: Path, det_size: int = 256) -> None:
    """SCRFD-signature detector: 9 outputs (scores/boxes/5 keypoints at strides 8, 16, 32; 2 anchors).

    Only the first stride-32 anchor (centre 0,0) can fire. Its score is sigmoid(10 * (mean pixel + 0.9)) on the
    detector's normalised input, so any ordinary photo gives ~1.0 while a black image gives 0.27 (< 0.5: no face).
    Its box covers the whole det_size x det_size input and its keypoints sit on the ArcFace template scaled to
    that box, so the recogniser sees the (letterboxed) photo aligned like a face crop.
    """
    strides = (8, 16, 32)
    nodes, inits = [], []
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    inits.append(numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape_n1"))
    inits.append(numpy_helper.from_array(np.array([[0, 0]], dtype=np.int64), "first_anchor"))
    const("zero", np.array(0.0))
    const("gain", np.array(10.0))
    const("offset", np.array(0.9))
    # Global image brightness -> confidence of the single candidate.
    nodes += [
        helper.make_node("GlobalAveragePool", ["input.1"], ["gap"], name="gap"),
        helper.make_node("ReduceMean", ["gap"], ["gmean"], axes=[1, 2, 3], keepdims=0, name="gmean"),
        helper.make_node("Add", ["gmean", "offset"], ["gshift"], name="gshift"),
        helper.make_node("Mul", ["gshift", "gain"], ["glogit"], name="glogit"),
        helper.make_node("Sigmoid", ["glogit"], ["gscore"], name="gscore"),
        helper.make_node("Reshape", ["gscore", "shape_1"], ["gscore1"], name="gscore1"),
    ]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "shape_1"))

    kps = _ARCFACE_TEMPLATE_112 * (det_size / 112.0)  # det-image pixels, relative to anchor (0, 0)
    box = np.array([[0.0, 0.0, det_size, det_size]], dtype=np.float32)
    outputs = {"score": [], "bbox": [], "kps": []}
    for s in strides:
        # (N, 1) zeros with N = (H/s) * (W/s) * 2 anchors, in insightface's (row, col, anchor) order.
        nodes += [
            helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]),
            helper.make_node("ReduceMean", [f"pool{s}"], [f"chan{s}"], axes=[1], keepdims=1),
            helper.make_node("Mul", [f"chan{s}", "zero"], [f"z{s}"]),
            helper.make_node("Concat", [f"z{s}", f"z{s}"], [f"za{s}"], axis=1),
            helper.make_node("Transpose", [f"za{s}"], [f"zt{s}"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"zt{s}", "shape_n1"], [f"zeros{s}"]),
        ]
        if s == 32:
            nodes.append(helper.make_node("ScatterND", [f"zeros{s}", "first_anchor", "gscore1"], [f"score_{s}"]))
        else:
            nodes.append(helper.make_node("Identity", [f"zeros{s}"], [f"score_{s}"]))
        # Boxes and keypoints are predicted in stride units; the same offsets for every anchor.
        nodes.append(helper.make_node("Add", [f"zeros{s}", const(f"box{s}", box / s)], [f"bbox_{s}"]))
        nodes.append(helper.make_node("Add", [f"zeros{s}", const(f"kps{s}", kps.reshape(1, 10) / s)], [f"kps_{s}"]))
        outputs["score"].append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [f"n{s}", 1]))
        outputs["bbox"].append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [f"n{s}", 4]))
        outputs["kps"].append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [f"n{s}", 10]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd", [inp], outputs["score"] + outputs["bbox"] + outputs["kps"], initializer=inits
    )
    _save(graph, path)


def tiny_arcface(path: Path, dim: int = 512, seed: int = 0) -> None:
    """ArcFace-signature recogniser: (1, 3, 112, 112) -> (1, dim), a fixed random projection of 8x8-pooled pixels."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((3 * 14 * 14, dim)) / np.sqrt(3 * 14 * 14)).astype(np.float32)
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, dim])
    # Node names avoid the Sub/Mul prefixes that insightface reads as "mxnet model with built-in normalisation".
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
        helper.make_node("MatMul", ["flat", "proj_w"], ["fc1"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface", [inp], [out], initializer=[numpy_helper.from_array(weight, "proj_w")]
    )
    _save(graph, path)


def write_tiny_insightface_pack(root: Path, pack: str = "tiny_pack", det_size: int = 256) -> Path:
    """Write root/models/<pack>/{det_tiny,w_tiny}.onnx and return the pack folder."""
    folder = Path(root) / "models" / pack
    folder.mkdir(parents=True, exist_ok=True)
    tiny_scrfd(folder / "det_tiny.onnx", det_size=det_size)
    tiny_arcface(folder / "w_tiny.onnx")
    return folder


TINY_CLIP_NAME = "apl-tiny-clip"


def tiny_clip_config() -> dict:
    """An open_clip model config with the real vocabulary but one-layer, 32-wide towers."""
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


def register_tiny_clip(folder: Path) -> str:
    """Register the tiny config with open_clip under TINY_CLIP_NAME and return that name."""
    import open_clip

    path = Path(folder) / f"{TINY_CLIP_NAME}.json"
    path.write_text(json.dumps(tiny_clip_config()))
    open_clip.add_model_config(path)
    return TINY_CLIP_NAME


def save_tiny_clip_weights(folder: Path, seed: int = 0) -> Path:
    """Random tiny CLIP weights saved as a state-dict file, like a downloaded open_clip_pytorch_model.bin."""
    import open_clip

    name = register_tiny_clip(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    path = Path(folder) / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


class TinyFeatures(torch.nn.Module):
    """Fixed random features of 4x4-pooled images, for FID on uint8 (N, 3, H, W) batches."""

    num_features = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, self.num_features, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # (N, 48)
        return pooled @ self.proj  # (N, 8)


class MeanColourBackend:
    """A plug-in face backend for script tests: every non-flat image has one 'face', embedded as its mean colour
    and colour spread (6-d). It has no default ID threshold, so the scripts must be given --id_threshold."""

    name = "mean-colour"
    embedding_dim = 6

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def embed(self, image_rgb: np.ndarray) -> np.ndarray | None:
        pixels = image_rgb.reshape(-1, 3).astype(np.float64)
        if np.ptp(pixels) <= 2:
            return None
        v = np.concatenate([pixels.mean(0), pixels.std(0)]) + 1.0
        return self.fix(v / np.linalg.norm(v))

    def fix(self, v: np.ndarray) -> np.ndarray:
        return v

    def faces(self, image_rgb: np.ndarray) -> list:
        emb = self.embed(image_rgb)
        return [] if emb is None else [emb]


class NanFaceBackend(MeanColourBackend):
    """A broken recogniser: finds faces but returns NaN embeddings."""

    def fix(self, v: np.ndarray) -> np.ndarray:
        return np.full_like(v, np.nan)


class WrongSizeFaceBackend(MeanColourBackend):
    """A broken recogniser: announces 6-d embeddings and returns 5-d ones."""

    def fix(self, v: np.ndarray) -> np.ndarray:
        return v[:5]
