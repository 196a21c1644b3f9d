"""Flags shared by the evaluation scripts (test_id.py, test_fid_clip_score.py, dataset_generation.py).

Every number is range-checked when the flags are parsed: a bad value is one `<script>: error: argument --flag: ...`
line and exit code 2, before any model is loaded. This module imports nothing heavy, so --help and flag errors are
instant.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence

from apl.eval.defaults import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    DEFAULT_DET_SIZE,
    DEFAULT_DET_THRESH,
    DEFAULT_ID_THRESHOLDS,
    INCEPTION_ENV,
    INCEPTION_FILE,
)
from apl.plugins import is_plugin_spec

# Flag groups a script can ask for; build_parser() without `groups` adds the first six (the original set).
GROUPS = ("model", "prefix", "generation", "quality", "identity", "id_metric", "people", "ground_truth", "stats")
DEFAULT_GROUPS = ("model", "prefix", "generation", "quality", "identity", "id_metric")

MAX_SEED = 2**63 - 1  # image seeds are hashed from it; torch seeds take 64 bits
MAX_STEPS = 1000  # DDIM picks --steps of SD's 1000 timesteps


class EvalArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (what was wrong and where to look), not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print `<prog>: error: <message>` and exit 2, as argparse does, without the usage block before it."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_in(lo: int, hi: int, what: str = "an integer") -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} from {lo} to {hi}, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {what} from {lo} to {hi}, got {text}")
        return value

    parse.__name__ = "int"
    return parse


def float_in(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in the interval lo..hi (ends open or closed); NaN and inf are refused."""
    shown = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {shown}, got {text!r}") from None
        above = value > lo if open_lo else value >= lo
        below = value < hi if open_hi else value <= hi
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"expected a finite number in {shown}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_multiple_of_8(text: str) -> int:
    """argparse type for image sizes: SD's VAE works on 8x8 pixel blocks, so sizes are positive multiples of 8."""
    value = positive_int(text)
    if value % 8:
        raise argparse.ArgumentTypeError(
            f"expected a positive multiple of 8 (the latent is 1/8 of the image), got {text}; "
            f"e.g. {max(8, value // 8 * 8)} or {value // 8 * 8 + 8}"
        )
    return value


def det_size(text: str) -> int:
    """argparse type for --det_size: SCRFD's strides (8, 16, 32) need a multiple of 32, from 32 to 4096."""
    value = int_in(32, 4096, "a size in pixels")(text)
    if value % 32:
        lower = max(32, value // 32 * 32)
        raise argparse.ArgumentTypeError(
            f"expected a multiple of 32 (the detector's largest stride), got {text}; e.g. {lower} or {lower + 32}"
        )
    return value


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def device_name(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda, cuda:N or mps (whether it exists is checked when used)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def _face_backend(text: str) -> str:
    """argparse type: a built-in face backend or a plug-in 'package.module:Class' (imported later, when used)."""
    if text in ("insightface", "dlib") or is_plugin_spec(text):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice {text!r}: choose insightface or dlib, or name a plug-in as 'package.module:Class'"
    )


def _fid_feature(text: str) -> str:
    """argparse type: 'inception' or a plug-in 'package.module:factory' returning a feature nn.Module."""
    if text == "inception" or is_plugin_spec(text):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice {text!r}: use inception, or name a plug-in as 'package.module:factory'"
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--ckpt_path",
        default="models/Stable-diffusion/v1-5-pruned-emaonly.ckpt",
        help="Stable Diffusion v1.x checkpoint (.ckpt or .safetensors) used to generate the images.",
    )
    g.add_argument(
        "--config_path",
        default="configs/stable-diffusion/v1-inference.yaml",
        help="Model config in the CompVis format (target/params); configs/tiny/tiny-sd.yaml without a checkpoint "
        "gives a random-weight tiny model for trying the script out.",
    )
    g.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="Weights/compute dtype.")
    g.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="Torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'.",
    )


def _add_prefix(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("APL prefix")
    g.add_argument(
        "--embedding",
        default=None,
        help="Learned APL prefix file (.pt or .safetensors), e.g. embeddings/APL-v1.1-9999.pt. "
        "Required unless --mode without.",
    )
    g.add_argument(
        "--mode",
        choices=("with", "without", "both"),
        default="both",
        help="Generate with the APL prefix ('alz ...'), without it, or both for a side-by-side comparison.",
    )
    g.add_argument(
        "--placeholder",
        default=None,
        help="Placeholder word put in front of the prompts for 'with' images; if unset, the embedding file's own "
        "placeholder (alz for APL files).",
    )


def _add_generation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--outdir", default="outputs/eval", help="Folder for generated images, tables and summaries.")
    g.add_argument("--n_samples", type=int_in(1, 100_000), default=4, help="Images generated per prompt / identity.")
    g.add_argument("--batch_size", type=int_in(1, 1024), default=4, help="Images per sampling batch.")
    g.add_argument("--steps", type=int_in(1, MAX_STEPS), default=20, help=f"DDIM sampling steps (1 to {MAX_STEPS}).")
    g.add_argument("--scale", type=float_in(0.0, 100.0), default=7.0,
                   help="Classifier-free guidance scale (0 to 100; 1 = no guidance).")
    g.add_argument(
        "--seed",
        type=int_in(0, MAX_SEED),
        default=2238,
        help="Base random seed (the original APL evaluation used 2238). Image k of an identity or prompt gets the "
        "seed sha256('<domain>/<seed>/<identity or prompt index>/<k>') (63 bits; domain test_id, dataset or quality), "
        "so results do not depend on --batch_size, --seed 1 and 2 share no image, and test_id.py never reuses the "
        "start noise of dataset_generation.py's face set.",
    )
    g.add_argument(
        "--negative_prompt",
        default="",
        help="Unconditional (negative) prompt for classifier-free guidance; it never carries the prefix.",
    )


def _add_quality(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CLIP score and FID")
    g.add_argument("--prompts_file", default=None, help="Text file with one prompt per line.")
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
        "--fid_feature",
        type=_fid_feature,
        default="inception",
        help="FID features: inception (the standard 2048-d pool features; needs --inception_weights) or a plug-in "
        "'package.module:factory' that returns an nn.Module mapping uint8 images (B, 3, H, W) to features (B, D), "
        "e.g. toyworld.perception:toy_fid_features.",
    )
    g.add_argument(
        "--inception_weights",
        default=None,
        help=f"Path to the FID Inception weights {INCEPTION_FILE}; if unset, ${INCEPTION_ENV} is used.",
    )


def _add_identity(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("face identity")
    g.add_argument(
        "--face_backend",
        type=_face_backend,
        default="insightface",
        help="Face detector + recogniser: insightface (ArcFace, as in the original), dlib, or a plug-in named "
        "'package.module:Class' (e.g. toyworld.perception:ToyFaceBackend, the toy world's recogniser).",
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
    g.add_argument(
        "--det_thresh",
        type=float_in(0.0, 1.0, open_lo=True, open_hi=True),
        default=None,
        help=f"Face detection confidence threshold, in (0, 1); if unset, {DEFAULT_DET_THRESH}. Used by insightface "
        "and by plug-ins that take det_thresh; the dlib backend has no such setting and refuses it.",
    )
    g.add_argument(
        "--det_size",
        type=det_size,
        default=None,
        help=f"InsightFace detector input size in pixels (square; a multiple of 32); if unset, {DEFAULT_DET_SIZE}. "
        "Only insightface (and plug-ins that take det_size) use it; the dlib backend refuses it.",
    )


def _add_id_metric(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("identity metric")
    defaults = ", ".join(f"{k} {v}" for k, v in DEFAULT_ID_THRESHOLDS.items())
    g.add_argument(
        "--id_threshold",
        type=float_in(-1.0, 1.0),
        default=None,
        help=f"Cosine similarity (in [-1, 1]) at or above which a face counts as the person; if unset, per backend: "
        f"{defaults} (a plug-in backend may bring its own).",
    )


def _add_people(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("identities")
    g.add_argument(
        "--names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="Identity names, each quoted (e.g. --names 'Tom Hanks' 'Emma Watson'); overrides --people_file.",
    )
    g.add_argument(
        "--people_file",
        default=None,
        help="People file ('Name<TAB>attribute description' lines, like people.tsv); its names are the identities.",
    )


def _add_ground_truth(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ground truth (one of --gt_npy or --gt_folder)")
    g.add_argument(
        "--gt_npy",
        default=None,
        help="Ground-truth identity embeddings: an (N, D) .npy whose row i belongs to line i of --gt_names "
        "(dataset_generation.py --gt_npy writes this pair). Must come from the same --face_backend.",
    )
    g.add_argument(
        "--gt_names",
        default=None,
        help="Text file naming the rows of --gt_npy, one name per line; if unset, <gt_npy without .npy>_names.txt.",
    )
    g.add_argument(
        "--gt_folder",
        default=None,
        help="Folder of reference photos (<Name>-<k>.jpg files or <Name>/ subfolders); each person's ground truth "
        "is the mean embedding of the faces found in them.",
    )


def _add_stats(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("confidence intervals")
    g.add_argument(
        "--bootstrap",
        type=int_in(0, 100_000),
        default=DEFAULT_BOOTSTRAP,
        help="Resamples for the 95 %% bootstrap interval of every figure (percentile method); 0 disables them.",
    )
    g.add_argument(
        "--bootstrap_level",
        choices=("identities", "two_level"),
        default="identities",
        help="What is resampled: 'identities' (test_id: people; test_fid_clip_score: prompts) with replacement, "
        "each keeping all its images, which already carries the image-to-image spread and leaves 'mean of max' "
        "unbiased; or 'two_level', which also resamples the images within each one (wider for means; it lowers "
        "maxima, since a resample repeats images).",
    )
    g.add_argument(
        "--bootstrap_seed",
        type=int_in(0, 2**32 - 1),
        default=0,
        help="Seed of the bootstrap's resampling: the same inputs and seed give the same intervals.",
    )


_ADDERS = {
    "model": _add_model,
    "prefix": _add_prefix,
    "generation": _add_generation,
    "quality": _add_quality,
    "identity": _add_identity,
    "id_metric": _add_id_metric,
    "people": _add_people,
    "ground_truth": _add_ground_truth,
    "stats": _add_stats,
}


def build_parser(description: str | None = None, groups: Sequence[str] = DEFAULT_GROUPS) -> argparse.ArgumentParser:
    """An ArgumentParser with the shared evaluation flags of `groups`; scripts add their own flags to it."""
    unknown = [g for g in groups if g not in _ADDERS]
    if unknown:
        raise ValueError(f"Unknown flag groups {unknown}; choose from {', '.join(GROUPS)}.")
    p = EvalArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name in GROUPS:  # a fixed order, so --help reads the same in every script
        if name in groups:
            _ADDERS[name](p)
    return p


_NOT_GIVEN = object()


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> frozenset[str]:
    """The destinations of the flags that `argv` sets explicitly (to say which flags a run ignores)."""
    # argparse fills in a default only where the namespace lacks the attribute, so a namespace pre-filled with a
    # marker keeps the marker exactly for the flags that were not given.
    ns = argparse.Namespace(**{a.dest: _NOT_GIVEN for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)
    return frozenset(k for k, v in vars(ns).items() if v is not _NOT_GIVEN)


def parse_eval_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, plus `given_flags`: the set of flags set on the command line."""
    args = parser.parse_args(argv)
    args.given_flags = given_flags(parser, argv)
    return args
