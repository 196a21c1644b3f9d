"""Image-quality metrics: CLIP score (open_clip) and FID (torchmetrics), both from local weights only."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apl.eval.defaults import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, INCEPTION_ENV, INCEPTION_FILE
from apl.eval.images import LoadReport, load_image_folder

__all__ = [
    "ClipScorer",
    "ClipWeightsMissing",
    "InceptionWeightsMissing",
    "build_fid",
    "clip_score_summary",
    "extract_features",
    "fid_antialias_default",
    "fid_between",
    "has_placeholder",
    "load_image_folder",
    "strip_placeholder",
]

logger = logging.getLogger(__name__)



class ClipWeightsMissing(FileNotFoundError):
    """CLIP-score weights that are neither a local file nor in the local open_clip / Hugging Face cache."""


class InceptionWeightsMissing(FileNotFoundError):
    """The FID Inception weights file was not given or does not exist."""


def _placeholder_word(placeholder: str) -> re.Pattern[str]:
    # Whole words only, any case (the SD tokenizer lowercases, so "Alz" is the same token).
    return re.compile(rf"(?<!\w){re.escape(placeholder)}(?!\w)", flags=re.IGNORECASE)


def has_placeholder(prompt: str, placeholder: str = "alz") -> bool:
    """True when the prompt holds the placeholder as a whole word, in any case ("waltz" does not hold "alz")."""
    return _placeholder_word(placeholder).search(prompt) is not None


def strip_placeholder(prompt: str, placeholder: str = "alz") -> str:
    """The prompt without the placeholder word, for scoring against what the user actually asked for."""
    text = _placeholder_word(placeholder).sub(" ", prompt)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)  # "of alz, smiling" -> "of, smiling" not "of , smiling"
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------------------------- CLIP
def _cached_hf_file(repo_id: str, filenames: Sequence[str], cache_dir: str | None) -> str | None:
    """A file of a Hugging Face repo that is already in the local cache (no network), else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for fname in filenames:
        hit = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _check_local_dir(model_name: str) -> None:
    """A 'local-dir:' model folder must hold open_clip_config.json and weights (open_clip would go on randomly)."""
    folder = Path(model_name[len("local-dir:") :]).expanduser()
    weights = [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext)]
    if not (folder / "open_clip_config.json").is_file() or not weights:
        raise ClipWeightsMissing(
            f"--clip_model {model_name}: the folder must contain open_clip_config.json and the weights "
            f"(open_clip_model.safetensors or open_clip_pytorch_model.bin), as in the model's Hugging Face repo."
        )


def resolve_clip_weights(model_name: str, pretrained: str, cache_dir: str | None = None) -> tuple[str | None, dict]:
    """A local weights file for (model, pretrained) plus the tag's image_* preprocessing arguments.

    `pretrained` is a path to a weights file, or an open_clip tag whose file is already in the local cache;
    anything else raises ClipWeightsMissing with what to download and where to put it. A 'local-dir:' model
    brings its own weights (returns None).
    """
    import open_clip

    if model_name.startswith("hf-hub:"):
        raise ValueError(
            f"--clip_model {model_name}: hf-hub models need a download. Put the repo's files in a folder and pass "
            "'local-dir:/path/to/folder', or use a built-in name (e.g. ViT-g-14) with --clip_pretrained FILE."
        )
    if model_name.startswith("local-dir:"):
        _check_local_dir(model_name)
        return None, {}
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"Unknown open_clip model '{model_name}'. Known models: {', '.join(open_clip.list_models())}")
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), {}
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ClipWeightsMissing(
            f"--clip_pretrained '{pretrained}' is neither an existing file nor a known open_clip tag for "
            f"{model_name} (tags: {', '.join(tags) or 'none'})."
        )
    # Preprocessing the tag was trained with; kept when we load its file by path.
    preprocess = {f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    found = None
    if hub:
        # open_clip's convention: "org/repo/" means the default file names, "org/repo/file.ext" one file.
        repo_id, fname = os.path.split(hub)
        default = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        names = [fname.rsplit(".", 1)[0] + ".safetensors", fname] if fname else default
        found = _cached_hf_file(repo_id, names, cache_dir)
        how = (
            f"get {' or '.join(names)} from the Hugging Face repo {repo_id} (e.g. `hf download {repo_id} "
            f"{names[0]}`, which puts it in the Hugging Face cache; copying that cache here also works)"
        )
    else:
        cached = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)
        found = str(cached) if cached.is_file() else None
        how = f"download {url} (open_clip looks for it in {cached.parent})"
    if found is None:
        raise ClipWeightsMissing(
            f"CLIP-score weights for {model_name} / {pretrained} are not on this machine and cannot be downloaded "
            f"here. On a machine with internet, {how}; then pass the file itself: --clip_pretrained /path/to/file. "
            f"A smaller model works too, e.g. --clip_model ViT-B-32 --clip_pretrained laion2b_s34b_b79k."
        )
    return found, preprocess


class ClipScorer:
    """Cosine similarity between open_clip image and text embeddings (the original APL used ViT-g-14/LAION-2B)."""

    def __init__(
        self,
        model_name: str = DEFAULT_CLIP_MODEL,
        pretrained: str = DEFAULT_CLIP_PRETRAINED,
        device: str = "cpu",
        cache_dir: str | None = None,
    ) -> None:
        """Load the model from local weights now, so missing weights fail before any image is generated."""
        import open_clip

        weights, preprocess_cfg = resolve_clip_weights(model_name, pretrained, cache_dir)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=weights,
            device=device,
            cache_dir=cache_dir,
            **preprocess_cfg,
        )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)
        self.model_name, self.pretrained = model_name, pretrained

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str], batch_size: int = 16) -> np.ndarray:
        """Raw cosine similarity for each (image, prompt) pair, shape (N,). See clip_score_summary for CLIPScore."""
        if len(images) != len(prompts):
            raise ValueError(f"Got {len(images)} images but {len(prompts)} prompts; CLIP score needs one per image.")
        out = []
        for i in range(0, len(images), batch_size):
            pix = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + batch_size]])
            tok = self.tokenizer(prompts[i : i + batch_size])
            img_f = self.model.encode_image(pix.to(self.device)).float()
            txt_f = self.model.encode_text(tok.to(self.device)).float()
            cos = torch.nn.functional.cosine_similarity(img_f, txt_f, dim=-1)
            out.append(cos.cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def clip_score_summary(cosines: np.ndarray) -> dict:
    """Mean raw cosine and the usual "CLIPScore" = mean of 100 * max(cos, 0) (torchmetrics' definition)."""
    cosines = np.asarray(cosines, dtype=np.float64)
    if cosines.size == 0:
        raise ValueError("No CLIP cosines to summarise.")
    clip = 100.0 * np.maximum(cosines, 0.0)
    return {
        "clip_cosine_mean": float(cosines.mean()),
        "clip_cosine_std": float(cosines.std()),
        "clip_score": float(clip.mean()),
        "clip_score_std": float(clip.std()),
        "n": int(cosines.size),
    }


# ----------------------------------------------------------------------------------------------------------------- FID
def _inception_missing(reason: str) -> InceptionWeightsMissing:
    return InceptionWeightsMissing(
        f"FID needs the Inception-v3 weights file {INCEPTION_FILE} ({reason}). It cannot be downloaded here. "
        f"On a machine with internet get it from the pytorch-fid release 'fid_weights' "
        f"(github.com/mseitzer/pytorch-fid/releases; torch-fidelity publishes the same file as "
        f"weights-inception-2015-12-05-6726825d.pth), copy it here and pass "
        f"--inception_weights /path/to/{INCEPTION_FILE} or set ${INCEPTION_ENV}."
    )


def fid_antialias_default() -> bool:
    """torchmetrics' own default for FrechetInceptionDistance(antialias=...) (True since torchmetrics 1.5)."""
    import inspect

    from torchmetrics.image.fid import FrechetInceptionDistance

    param = inspect.signature(FrechetInceptionDistance.__init__).parameters.get("antialias")
    if param is None:  # older torchmetrics: always the TF1-style resize of the original FID
        return False
    return bool(param.default)


def build_fid(
    feature: str | torch.nn.Module = "inception",
    weights_path: str | None = None,
    device: str = "cpu",
    antialias: bool | None = None,
):
    """A torchmetrics FrechetInceptionDistance on `device`: the standard 2048-d Inception features or a custom module.

    "inception" needs the local weights file (`weights_path` or $APL_INCEPTION_WEIGHTS); it is checked with a
    restricted unpickler first, so a weights file can never run code. `antialias` chooses how images are resized to
    Inception's 299x299: antialiased bilinear (True) or the TF1-style bilinear of the original FID code (False);
    None keeps torchmetrics' default. FIDs computed with different settings are not comparable. It does not apply
    to a custom feature module.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature, torch.nn.Module):
        return FrechetInceptionDistance(feature=feature).to(device)
    if feature != "inception":
        raise ValueError(f"feature must be 'inception' or a torch.nn.Module, got {feature!r}.")
    path = weights_path or os.environ.get(INCEPTION_ENV)
    if not path:
        raise _inception_missing(f"no path given by --inception_weights or ${INCEPTION_ENV}")
    if not Path(path).expanduser().is_file():
        raise _inception_missing(f"{path} does not exist")
    path = str(Path(path).expanduser())
    try:
        # torch-fidelity loads this file with weights_only=False; a file that passes the safe loader only holds
        # tensors, so the second load cannot execute anything.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means "not a plain tensor state dict"
        raise ValueError(
            f"{path} is not a plain PyTorch state dict of tensors ({err}); expected {INCEPTION_FILE}."
        ) from err
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise ValueError(f"{path} does not look like {INCEPTION_FILE}: no 'fc.weight' tensor in it.")
    try:
        kw = {} if antialias is None else {"antialias": bool(antialias)}
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=path, **kw)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"{err} (pip install torch-fidelity)") from err
    return metric.to(device)


def _as_uint8_chw(img: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """One image as a (3, H, W) uint8 tensor."""
    if isinstance(img, Image.Image):
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    t = torch.as_tensor(img)
    if t.dtype != torch.uint8:
        raise ValueError(f"FID images must be uint8 (0..255), got {t.dtype}.")
    if t.ndim == 3 and t.shape[0] != 3 and t.shape[-1] == 3:
        t = t.permute(2, 0, 1)  # HWC array
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"Expected a (3, H, W) or (H, W, 3) image, got shape {tuple(t.shape)}.")
    return t


def _batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """(B, 3, H, W) uint8 batches; a new batch starts whenever the image size changes (no resizing here)."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        if images.dtype != torch.uint8:
            raise ValueError(f"FID images must be uint8 (0..255), got {images.dtype}.")
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size]
        return
    batch: list[torch.Tensor] = []
    for img in images:
        t = _as_uint8_chw(img)
        if batch and (t.shape != batch[0].shape or len(batch) == batch_size):
            yield torch.stack(batch)
            batch = []
        batch.append(t)
    if batch:
        yield torch.stack(batch)


def _resolve_images(images, what: str):
    """A folder path becomes its list of images; anything else is passed through."""
    if isinstance(images, (str, Path)):
        report = LoadReport()
        loaded = load_image_folder(images, report)
        if report.unreadable:
            logger.warning("%s: %d unreadable files skipped in %s", what, len(report.unreadable), images)
        return loaded
    return images


def _count(images) -> int:
    return images.shape[0] if isinstance(images, torch.Tensor) and images.ndim == 4 else len(images)


@torch.no_grad()
def fid_between(fid_metric, images_a, images_b, batch_size: int = 32) -> float:
    """FID between two image sets (uint8 (N,3,H,W) tensors, lists of PIL images/arrays, or folder paths).

    `images_a` fills the metric's "real" side, `images_b` the "fake" side. The metric is reset first.
    """
    images_a = _resolve_images(images_a, "first image set")
    images_b = _resolve_images(images_b, "second image set")
    for imgs, what in ((images_a, "first"), (images_b, "second")):
        if _count(imgs) < 2:
            raise ValueError(f"FID needs at least 2 images per set; the {what} set has {_count(imgs)}.")
    fid_metric.reset()
    device = fid_metric.device
    for batch in _batches(images_a, batch_size):
        fid_metric.update(batch.to(device), real=True)
    for batch in _batches(images_b, batch_size):
        fid_metric.update(batch.to(device), real=False)
    return float(fid_metric.compute())


@torch.no_grad()
def extract_features(fid_metric, images, batch_size: int = 32) -> torch.Tensor:
    """The FID metric's own features (Inception pool3, or the custom module) of an image set, (N, D) float64.

    The same network and resize that `fid_metric.update` uses, so FID and KID computed from these features
    (apl.eval.stats) measure exactly what torchmetrics' FID measures."""
    images = _resolve_images(images, "image set")
    device = fid_metric.device
    feats = [fid_metric.inception(batch.to(device)).reshape(batch.shape[0], -1).double().cpu()
             for batch in _batches(images, batch_size)]
    if not feats:
        raise ValueError("no images to extract FID features from")
    out = torch.cat(feats)
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out).all(1)).sum())
        raise ValueError(f"the FID feature extractor returned NaN or inf for {bad} of {out.shape[0]} images")
    return out
