"""Face detection + recognition embeddings behind one interface, with InsightFace and dlib backends."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from apl.eval.images import ImageReadError, load_image_rgb
from apl.plugins import PluginError, call_with_accepted, is_plugin_spec, load_plugin

__all__ = [
    "DlibBackend",
    "Face",
    "FaceBackend",
    "FaceBackendUnavailable",
    "ImageReadError",
    "InsightFaceBackend",
    "InsightFacePackMissing",
    "load_image_rgb",
    "make_backend",
]

logger = logging.getLogger(__name__)

BACKENDS = ("insightface", "dlib")


class FaceBackendUnavailable(RuntimeError):
    """A face backend whose package or model files are not installed here."""


class InsightFacePackMissing(FaceBackendUnavailable, FileNotFoundError):
    """The InsightFace model pack (e.g. buffalo_l) is not on disk."""


@dataclass
class Face:
    """One detected face."""

    bbox: np.ndarray  # (4,) float32 x1, y1, x2, y2 in image pixels
    det_score: float  # detector confidence
    embedding: np.ndarray  # (D,) float32, L2-normalised (D = 512 for ArcFace, 128 for dlib)

    @property
    def area(self) -> float:
        """Box area in pixels (used to pick the largest face)."""
        return float(max(self.bbox[2] - self.bbox[0], 0.0) * max(self.bbox[3] - self.bbox[1], 0.0))


class FaceBackend(Protocol):
    """Anything that finds faces in an RGB image and embeds them."""

    name: str
    embedding_dim: int  # D of the embeddings it makes (512 for ArcFace, 128 for dlib)

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        """All faces in an HxWx3 uint8 RGB image, largest first."""
        ...

    def embed(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """The largest face's normalised embedding, or None when no face is found."""
        ...


def _check_image(image_rgb: np.ndarray) -> np.ndarray:
    """Validate an HxWx3 uint8 array and return it C-contiguous."""
    if not isinstance(image_rgb, np.ndarray) or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        shape = getattr(image_rgb, "shape", type(image_rgb).__name__)
        raise ValueError(f"Expected an HxWx3 RGB image array, got {shape}. Use load_image_rgb(path) to read files.")
    if image_rgb.dtype != np.uint8:
        raise ValueError(f"Expected a uint8 image (0..255), got dtype {image_rgb.dtype}.")
    return np.ascontiguousarray(image_rgb)


def _normalise(vec: np.ndarray) -> np.ndarray:
    """L2-normalise a 1-D embedding; a zero vector means the recogniser failed."""
    vec = np.asarray(vec, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("The face recogniser returned a zero or non-finite embedding; the model file may be broken.")
    return vec / norm


def _largest_first(faces: list[Face]) -> list[Face]:
    """Sort by box area, then detector score, both descending (stable, so ties keep detector order)."""
    return sorted(faces, key=lambda f: (-f.area, -f.det_score))


def default_insightface_root() -> Path:
    """$INSIGHTFACE_HOME if set, else ~/.insightface (where insightface itself keeps its packs)."""
    return Path(os.environ.get("INSIGHTFACE_HOME", "~/.insightface")).expanduser()


def resolve_insightface_pack(pack: str = "buffalo_l", root: str | Path | None = None) -> Path:
    """The folder holding a pack's ONNX files; raises InsightFacePackMissing with download instructions."""
    root_dir = Path(root).expanduser() if root is not None else default_insightface_root()
    direct = Path(pack).expanduser()
    # A pack given as a path is used as is; a bare name is looked up where insightface keeps its packs.
    candidate = direct if direct.is_dir() else root_dir / "models" / pack
    if candidate.is_dir() and any(candidate.glob("*.onnx")):
        return candidate.resolve()
    where = f"folder {candidate} has no .onnx files" if candidate.is_dir() else f"{candidate} does not exist"
    raise InsightFacePackMissing(
        f"InsightFace model pack '{pack}' not found ({where}). This machine cannot download it. "
        f"Download buffalo_l.zip from the InsightFace model zoo (github.com/deepinsight/insightface, "
        f"python-package README, 'Model Zoo') on a machine with internet and unzip it so that the .onnx files "
        f"(det_10g.onnx, w600k_r50.onnx, ...) lie in {root_dir / 'models' / 'buffalo_l'}/. "
        f"Or point elsewhere: --insightface_root DIR (or $INSIGHTFACE_HOME) for DIR/models/<pack>/, "
        f"or --insightface_pack /path/to/pack_folder. Alternatively use --face_backend dlib."
    )


def _onnx_providers(device: str) -> tuple[list, int]:
    """ONNX Runtime providers and insightface ctx_id for a device name ('cpu', 'cuda[:N]' or 'auto')."""
    import onnxruntime

    if device == "auto":
        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        device = "cuda" if has_cuda else "cpu"
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], index
        logger.warning(
            "device=%s requested but onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); "
            "running face analysis on CPU.",
            device,
        )
    elif device != "cpu":
        raise ValueError(f"Unknown device '{device}' for the face backend; use 'cpu', 'cuda', 'cuda:N' or 'auto'.")
    # ctx_id < 0 makes insightface pin every session to the CPU provider.
    return ["CPUExecutionProvider"], -1


class InsightFaceBackend:
    """SCRFD detection + ArcFace recognition from an InsightFace pack (the original APL used buffalo_l)."""

    name = "insightface"

    def __init__(
        self,
        pack: str = "buffalo_l",
        root: str | None = None,
        det_thresh: float = 0.5,
        det_size: int = 256,
        device: str = "cpu",
    ) -> None:
        """Load the pack now, so a missing pack fails before any image is generated."""
        if not 0.0 < det_thresh < 1.0:
            raise ValueError(f"det_thresh must be in (0, 1), got {det_thresh}.")
        if det_size <= 0 or det_size % 32 != 0:
            raise ValueError(f"det_size must be a positive multiple of 32 (SCRFD strides), got {det_size}.")
        self.pack_dir = resolve_insightface_pack(pack, root)
        try:
            from insightface.app import FaceAnalysis
        except ImportError as err:
            raise FaceBackendUnavailable(
                f"The insightface package cannot be imported ({err}). Install it: pip install insightface onnxruntime"
            ) from err
        providers, ctx_id = _onnx_providers(device)
        try:
            # Passing the folder itself (not a name) keeps insightface from trying to download anything.
            self.app = FaceAnalysis(
                name=str(self.pack_dir),
                root=str(self.pack_dir.parent),
                providers=providers,
                allowed_modules=["detection", "recognition"],
            )
        except AssertionError as err:  # insightface asserts that a detector was found
            raise InsightFacePackMissing(
                f"InsightFace pack folder {self.pack_dir} has no face detector ONNX file (SCRFD, e.g. det_10g.onnx). "
                "Re-download the complete buffalo_l pack."
            ) from err
        if "recognition" not in self.app.models:
            raise InsightFacePackMissing(
                f"InsightFace pack folder {self.pack_dir} has no recognition ONNX file (ArcFace, e.g. "
                "w600k_r50.onnx). Re-download the complete buffalo_l pack."
            )
        self.app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=(det_size, det_size))
        out_dim = self.app.models["recognition"].output_shape[-1]  # (1, 512) for w600k_r50; may be symbolic
        self.embedding_dim = out_dim if isinstance(out_dim, int) and out_dim > 0 else 512
        self.det_thresh = det_thresh
        self.det_size = det_size

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        """All faces above det_thresh, largest first."""
        image = _check_image(image_rgb)
        # insightface follows OpenCV and expects BGR; it swaps back to RGB before its networks.
        found = self.app.get(np.ascontiguousarray(image[:, :, ::-1]))
        faces = []
        for f in found:
            if f.embedding is None:
                raise RuntimeError("InsightFace detected a face but produced no embedding; check the pack's files.")
            faces.append(
                Face(
                    bbox=np.asarray(f.bbox, dtype=np.float32),
                    det_score=float(f.det_score),
                    embedding=_normalise(f.embedding),
                )
            )
        return _largest_first(faces)

    def embed(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """The largest face's normalised 512-d ArcFace embedding, or None."""
        faces = self.faces(image_rgb)
        return faces[0].embedding if faces else None


def _face_recognition_models_dir() -> Path:
    """The models/ folder of the face_recognition_models package, found without importing it."""
    # Importing the package pulls in pkg_resources (gone from new setuptools); its data files are all we need.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceBackendUnavailable(
            "The dlib face backend needs the face_recognition_models package (the dlib model files). "
            "Install it: pip install face_recognition_models dlib-bin"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class DlibBackend:
    """dlib HOG face detector + ResNet face descriptor (128-d), from the face_recognition_models files."""

    name = "dlib"
    embedding_dim = 128

    def __init__(
        self,
        upsample: int = 1,
        landmarks: int = 5,
        num_jitters: int = 1,
        models_dir: str | None = None,
        device: str = "cpu",
    ) -> None:
        """Load the detector, landmark predictor and descriptor network."""
        try:
            import dlib
        except ImportError as err:
            raise FaceBackendUnavailable(
                f"The dlib face backend needs dlib ({err}). Install it: pip install dlib-bin face_recognition_models"
            ) from err
        if landmarks not in (5, 68):
            raise ValueError(f"landmarks must be 5 or 68, got {landmarks}.")
        if device.startswith("cuda") and not getattr(dlib, "DLIB_USE_CUDA", False):
            logger.warning("This dlib build has no CUDA support; the dlib face backend runs on CPU.")
        folder = Path(models_dir) if models_dir is not None else _face_recognition_models_dir()
        predictor = f"shape_predictor_{landmarks}_face_landmarks.dat"
        recogniser = "dlib_face_recognition_resnet_model_v1.dat"
        for fname in (predictor, recogniser):
            if not (folder / fname).is_file():
                raise FaceBackendUnavailable(
                    f"dlib model file {folder / fname} is missing. Reinstall face_recognition_models "
                    "(pip install --force-reinstall face_recognition_models) or pass models_dir."
                )
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(folder / predictor))
        self.recogniser = dlib.face_recognition_model_v1(str(folder / recogniser))
        self.upsample = upsample  # >0 lets the HOG detector find faces smaller than ~80 px
        self.num_jitters = num_jitters

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        """All faces the HOG detector finds, largest first."""
        image = _check_image(image_rgb)
        rects, scores, _ = self.detector.run(image, self.upsample, 0.0)
        faces = []
        for rect, score in zip(rects, scores, strict=True):
            shape = self.predictor(image, rect)
            desc = np.asarray(self.recogniser.compute_face_descriptor(image, shape, self.num_jitters))
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float32)
            faces.append(Face(bbox=box, det_score=float(score), embedding=_normalise(desc)))
        return _largest_first(faces)

    def embed(self, image_rgb: np.ndarray) -> np.ndarray | None:
        """The largest face's normalised 128-d dlib descriptor, or None."""
        faces = self.faces(image_rgb)
        return faces[0].embedding if faces else None


def make_backend(name: str, **kw) -> FaceBackend:
    """Build a face backend by name ('insightface' or 'dlib'); keyword arguments set to None are dropped.

    A plug-in backend is named 'package.module:Class' (see apl.plugins): it is built with the keyword arguments its
    signature accepts (e.g. det_thresh, device) and must provide `name`, `embedding_dim`, `faces` and `embed`; it may
    set `default_id_threshold` for its own embedding space."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if is_plugin_spec(name):
        backend = call_with_accepted(load_plugin(name, "--face_backend"), **kw)
        missing = [a for a in ("name", "embedding_dim", "faces", "embed") if not hasattr(backend, a)]
        if missing:
            raise PluginError(f"--face_backend {name!r} is not a face backend: it lacks {', '.join(missing)}")
        return backend
    classes = {"insightface": InsightFaceBackend, "dlib": DlibBackend}
    if name not in classes:
        raise ValueError(
            f"Unknown face backend '{name}'; choose one of {', '.join(BACKENDS)}, or name a plug-in as "
            "'package.module:Class'."
        )
    try:
        return classes[name](**kw)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        accepted = ", ".join(inspect.signature(classes[name]).parameters)
        raise TypeError(f"{err}. The {name} backend takes: {accepted}.") from err
