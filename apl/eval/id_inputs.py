"""test_id.py's inputs besides images: the face backend its flags name, and the ground truth it scores against."""

from __future__ import annotations

import argparse
import inspect

import numpy as np

from apl.eval.checks import Alert
from apl.eval.defaults import DEFAULT_DET_SIZE, DEFAULT_DET_THRESH
from apl.eval.faces import FaceBackend, make_backend
from apl.eval.gt_files import read_ground_truth
from apl.eval.id_metrics import default_id_threshold, ground_truth_from_folder
from apl.eval.images import LoadReport
from apl.plugins import is_plugin_spec, load_plugin
from apl.runtime import UsageError


def gt_names_path(gt_npy: str, gt_names: str | None) -> str:
    """The names file that goes with a ground-truth .npy: the explicit one, else <stem>_names.txt beside it."""
    if gt_names:
        return gt_names
    stem = gt_npy[: -len(".npy")] if gt_npy.endswith(".npy") else gt_npy
    return f"{stem}_names.txt"


def _accepts(factory: object, param: str) -> bool:
    """Whether a plug-in factory takes keyword `param` (or any keyword)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    return param in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def backend_from_args(args: argparse.Namespace) -> FaceBackend:
    """The face backend named by --face_backend and its flags (loaded now, so missing models fail early).

    --det_thresh / --det_size given to a backend that has no such setting are refused: silently ignoring them
    would let a user believe they changed what counts as a face."""
    name = args.face_backend
    det_thresh, det_size = getattr(args, "det_thresh", None), getattr(args, "det_size", None)
    given = {"--det_thresh": det_thresh, "--det_size": det_size}
    if name == "insightface":
        return make_backend(
            "insightface",
            pack=args.insightface_pack,
            root=args.insightface_root,
            det_thresh=DEFAULT_DET_THRESH if det_thresh is None else det_thresh,
            det_size=DEFAULT_DET_SIZE if det_size is None else det_size,
            device=args.device,  # 'auto' picks onnxruntime's CUDA provider when it has one
        )
    if name == "dlib":
        for flag, value in given.items():
            if value is not None:
                raise UsageError(
                    f"{flag} {value} has no effect with --face_backend dlib (its HOG detector has no confidence "
                    f"threshold or input size): remove {flag}, or use --face_backend insightface"
                )
        return make_backend("dlib", device="cpu" if args.device == "auto" else args.device)
    if is_plugin_spec(name):
        factory = load_plugin(name, "--face_backend")
        for flag, value in given.items():
            if value is not None and not _accepts(factory, flag[2:]):
                raise UsageError(f"{flag} {value}: the plug-in face backend {name} has no {flag[2:]} setting, so it "
                                 f"would be ignored; remove {flag}")
    return make_backend(name, det_thresh=det_thresh, det_size=det_size, device=args.device)


def backend_threshold(backend: FaceBackend) -> float:
    """The backend's own default ID threshold (plug-ins may set `default_id_threshold`), else the built-in one."""
    own = getattr(backend, "default_id_threshold", None)
    return float(own) if own is not None else default_id_threshold(backend.name)


def load_gt(args: argparse.Namespace, backend: FaceBackend, alerts: list[Alert]) -> tuple[dict[str, np.ndarray], dict]:
    """Ground truth from --gt_npy/--gt_names or --gt_folder, and a description for the summary."""
    if bool(args.gt_npy) == bool(args.gt_folder):
        raise UsageError(
            "give the ground truth with exactly one of --gt_npy FILE.npy (+ --gt_names) or "
            "--gt_folder DIR (reference photos)"
        )
    if args.gt_folder and args.gt_names:
        raise UsageError(f"--gt_names {args.gt_names} names the rows of a --gt_npy file; with --gt_folder the names "
                         "come from the photos' file names, so remove --gt_names")
    if args.gt_npy:
        names = gt_names_path(args.gt_npy, args.gt_names)
        gt, link = read_ground_truth(args.gt_npy, names)
        if link.backend and link.backend != backend.name:
            raise UsageError(
                f"--gt_npy {args.gt_npy} was made with the {link.backend} face backend (its names file says so) but "
                f"this run scores with {backend.name}: the embeddings do not compare. Pass --face_backend "
                f"{link.backend}, or recompute the ground truth with this backend (dataset_generation.py --gt_npy)."
            )
        check_gt_dim(gt, backend, f"--gt_npy {args.gt_npy}")
        if not link.linked:
            alerts.append(Alert("gt_unlinked", f"{names} has no '# apl-ground-truth' header (written before names "
                                f"files were linked to their .npy), so nothing shows that its line i names row i of "
                                f"{args.gt_npy}. Rerun dataset_generation.py --gt_npy {args.gt_npy} on the same "
                                "--outdir to write a linked pair."))
        dims = {v.shape[0] for v in gt.values()}
        return gt, {"source": "npy", "npy": args.gt_npy, "names": names, "dim": sorted(dims), "linked": link.linked,
                    "npy_sha256": link.npy_sha256, "backend": link.backend}
    report = LoadReport()
    gt = ground_truth_from_folder(args.gt_folder, backend, report)
    return gt, {"source": "folder", "folder": args.gt_folder, **report.as_dict()}


# Which backend makes embeddings of a size, for the error message when --gt_npy came from another one.
_BACKEND_OF_DIM = {512: "insightface", 128: "dlib"}


def check_gt_dim(gt: dict[str, np.ndarray], backend: FaceBackend, source: str) -> None:
    """Ground truth must have the backend's embedding size (a 128-d dlib .npy cannot score ArcFace faces)."""
    want = getattr(backend, "embedding_dim", None)
    dims = sorted({int(np.asarray(v).size) for v in gt.values()})
    if want is None or dims == [want]:
        return
    guess = ", ".join(f"{d}-d is {_BACKEND_OF_DIM[d]}" for d in dims if d in _BACKEND_OF_DIM)
    raise UsageError(
        f"{source} holds {'/'.join(map(str, dims))}-d embeddings but the {backend.name} face backend makes {want}-d "
        f"ones{f' ({guess})' if guess else ''}: ground truth and scoring must use the same --face_backend. Pass "
        "the matching --face_backend, or recompute the ground truth with this one (dataset_generation.py --gt_npy, "
        "or --gt_folder)."
    )
