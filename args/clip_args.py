"""Flags shared by the evaluation scripts (test_id.py, test_fid_clip_score.py, dataset_generation.py)."""

from __future__ import annotations

import argparse

from apl.eval.id_metrics import DEFAULT_ID_THRESHOLDS
from apl.eval.quality import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, INCEPTION_ENV, INCEPTION_FILE


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text}")
    return value


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared evaluation flags; scripts add their own flags to it."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("model")
    g.add_argument(
        "--ckpt_path",
        default="models/Stable-diffusion/v1-5-pruned-emaonly.ckpt",
        help="Stable Diffusion v1.x checkpoint (.ckpt or .safetensors) used to generate the images.",
    )
    g.add_argument(
        "--config_path",
        default="configs/stable-diffusion/v1-inference.yaml",
        help="Model config in the CompVis format (target/params).",
    )
    g.add_argument(
        "--embedding",
        default=None,
        help="Learned APL prefix file (.pt or .safetensors), e.g. embeddings/APL-v1.1-9999.pt. "
        "Required unless --mode without.",
    )
    g.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="Weights/compute dtype.")
    g.add_argument(
        "--device", default="auto", help="Torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'."
    )

    g = p.add_argument_group("generation")
    g.add_argument("--prompts_file", default=None, help="Text file with one prompt (or identity name) per line.")
    g.add_argument("--outdir", default="outputs/eval", help="Folder for generated images, tables and summaries.")
    g.add_argument("--n_samples", type=_positive_int, default=4, help="Images generated per prompt / identity.")
    g.add_argument("--batch_size", type=_positive_int, default=4, help="Images per sampling batch.")
    g.add_argument("--steps", type=_positive_int, default=20, help="DDIM sampling steps.")
    g.add_argument("--scale", type=float, default=7.0, help="Classifier-free guidance scale.")
    g.add_argument("--seed", type=int, default=2238, help="Random seed (the original APL evaluation used 2238).")
    g.add_argument(
        "--mode",
        choices=("with", "without", "both"),
        default="both",
        help="Generate with the APL prefix ('alz ...'), without it, or both for a side-by-side comparison.",
    )

    g = p.add_argument_group("CLIP score and FID")
    g.add_argument(
        "--clip_model",
        default=DEFAULT_CLIP_MODEL,
        help="open_clip model name for the CLIP score (original: ViT-g-14).",
    )
    g.add_argument(
        "--clip_pretrained",
        default=DEFAULT_CLIP_PRETRAINED,
        help="open_clip pretrained tag whose weights are already in the local cache, or a path to the weights file.",
    )
    g.add_argument(
        "--fid_ref", default=None, help="Folder of real reference images for FID (e.g. COCO person photos)."
    )
    g.add_argument(
        "--inception_weights",
        default=None,
        help=f"Path to the FID Inception weights {INCEPTION_FILE}; if unset, ${INCEPTION_ENV} is used.",
    )

    g = p.add_argument_group("face identity")
    g.add_argument(
        "--face_backend",
        choices=("insightface", "dlib"),
        default="insightface",
        help="Face detector + recogniser: InsightFace (ArcFace, as in the original) or dlib.",
    )
    g.add_argument(
        "--insightface_pack",
        default="buffalo_l",
        help="InsightFace model pack: a name under <root>/models/, or a path to the pack folder of .onnx files.",
    )
    g.add_argument(
        "--insightface_root",
        default=None,
        help="Folder holding models/<pack>/; if unset, $INSIGHTFACE_HOME or ~/.insightface.",
    )
    g.add_argument("--det_thresh", type=_unit_float, default=0.5, help="Face detection confidence threshold.")
    g.add_argument(
        "--det_size",
        type=_positive_int,
        default=256,
        help="Face detector input size in pixels (square; multiple of 32).",
    )
    defaults = ", ".join(f"{k} {v}" for k, v in DEFAULT_ID_THRESHOLDS.items())
    g.add_argument(
        "--id_threshold",
        type=float,
        default=None,
        help=f"Cosine similarity at or above which a face counts as the person; if unset, per backend: {defaults}.",
    )
    return p


def resolve_device(name: str) -> str:
    """'auto' becomes 'cuda' when a GPU is visible, else 'cpu'; other names pass through."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
