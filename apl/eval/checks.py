"""Checks that keep an evaluation from printing a number a reader would misread.

A face backend's embedding must be a finite, non-zero vector of the size it announces (else the run stops); a
generated image that is one flat colour (what NaN or exploding weights decode to) or a copy of another is counted;
and the identity summary is read for patterns that make its headline numbers flatter a broken prefix (faces erased,
no face at all, a prefix that changed nothing, ...). Each pattern becomes an Alert: printed beside the numbers,
listed in report.md and in summary.json["warnings"] with a stable code.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

# A mode's no-face rate this much above the rate without the prefix gets a warning: a prefix that erases faces
# scores "similarity 0" on every erased one, which reads as anonymisation in mean of mean / mean of max.
NO_FACE_GAP = 0.10
# With only the prefix's images there is no baseline; a no-face rate at least this high is then warned about.
NO_FACE_ALONE = 0.10
FEW_IDENTITIES = 10  # below this, intervals over identities are wide: say so
BLANK_RANGE = 2  # an image whose pixel values span at most this many levels is one flat colour


class FaceBackendError(ValueError):
    """A face backend that returned something that is not a usable embedding."""


@dataclass
class Alert:
    """One reason to distrust (part of) a result; `code` is stable, `message` is for people."""

    code: str
    message: str
    mode: str | None = None
    template_set: str | None = None

    @property
    def where(self) -> str:
        """'held_out/with', 'with' or '' (the default template set is not named)."""
        return "/".join(x for x in (self.template_set, self.mode) if x and x != "default")

    def as_dict(self) -> dict:
        """For summary.json: the fields that are set, and `where`."""
        return {k: v for k, v in asdict(self).items() if v is not None} | ({"where": self.where} if self.where else {})


def warning_line(w: dict) -> str:
    """One console line for a summary.json warning."""
    return f"WARNING [{w['code']}{' ' + w['where'] if w.get('where') else ''}]: {w['message']}"


def checked_embedding(emb: object, backend: object, where: str) -> np.ndarray | None:
    """A backend's embedding as a float64 vector, or None for no face; anything unusable stops the run."""
    if emb is None:
        return None
    name = getattr(backend, "name", type(backend).__name__)
    try:
        vec = np.asarray(emb, dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise FaceBackendError(f"face backend {name} returned a non-numeric embedding for {where} ({err})") from err
    want = getattr(backend, "embedding_dim", None)
    if isinstance(want, int) and want > 0 and vec.size != want:
        raise FaceBackendError(
            f"face backend {name} returned a {vec.size}-d embedding for {where} but announces {want}-d ones; "
            "the backend or its model file is broken"
        )
    if not np.isfinite(vec).all():
        raise FaceBackendError(
            f"face backend {name} returned an embedding with NaN or inf for {where}: no similarity can be computed "
            "from it (a damaged recogniser model, or a backend bug); fix the backend before scoring"
        )
    if not np.any(vec):
        raise FaceBackendError(f"face backend {name} returned an all-zero embedding for {where}; it is broken")
    return vec


def pixel_digest(image_rgb: np.ndarray) -> str:
    """sha256 of the decoded pixels (and shape): equal for equal pictures, whatever the file format."""
    h = hashlib.sha256(str(image_rgb.shape).encode())
    h.update(np.ascontiguousarray(image_rgb).tobytes())
    return h.hexdigest()


def is_blank(image_rgb: np.ndarray) -> bool:
    """True for an image of one flat colour (e.g. all black: what NaN latents decode to)."""
    return int(image_rgb.max()) - int(image_rgb.min()) <= BLANK_RANGE


@dataclass
class ImageStats:
    """What was seen in one mode's images besides faces."""

    n: int = 0
    blank: int = 0
    duplicates: int = 0  # images equal to an earlier one of the same mode (blank ones not counted again)
    digests: list[str] | None = None

    def add(self, image_rgb: np.ndarray, seen: set[str]) -> str:
        """Count one image; returns its digest."""
        digest = pixel_digest(image_rgb)
        self.n += 1
        if is_blank(image_rgb):
            self.blank += 1
        elif digest in seen:
            self.duplicates += 1
        seen.add(digest)
        if self.digests is None:
            self.digests = []
        self.digests.append(digest)
        return digest


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def mode_alerts(mode: str, s: dict, stats: ImageStats | None, template_set: str | None = None) -> list[Alert]:
    """Alerts about one mode's summary `s` (summarize()'s dict) and its image statistics."""
    out: list[Alert] = []

    def add(code: str, message: str) -> None:
        out.append(Alert(code, message, mode, template_set))

    n = s.get("n_images", 0)
    if n and s.get("n_faces", 0) == 0:
        add("no_faces", f"no face was detected in any of the {n} images: mean of mean / mean of max "
            f"({s['mean_of_mean']:.4f} / {s['mean_of_max']:.4f}) say 'no face', not 'anonymous'; ID accuracy and the "
            "mean over detected faces do not exist. Look at the images.")
    if stats is not None and stats.blank:
        add("blank_images", f"{stats.blank} of {stats.n} images are one flat colour (e.g. black: what NaN or "
            "exploding values in the model or prefix decode to); they count as 'no face' = similarity 0.")
    if stats is not None and stats.duplicates:
        add("duplicate_images", f"{stats.duplicates} of {stats.n} images are pixel-identical copies of another image "
            "of this set; the images do not vary as their seeds and names should make them.")
    per = s.get("images_per_identity") or {}
    if per and per.get("min") != per.get("max"):
        add("uneven_images", f"identities have {per['min']} to {per['max']} images: mean of max grows with the number "
            "of images, so it is not comparable across them (unreadable images were left out).")
    return out


def few_identities_alert(n_identities: int) -> Alert | None:
    """An alert when there are too few identities for figures over identities to separate small differences."""
    if 0 < n_identities < FEW_IDENTITIES:
        return Alert("few_identities", f"only {n_identities} identities: figures over identities have wide intervals "
                     "(see ci95), so do not read small differences between rows.")
    return None


def comparison_alerts(summaries: dict[str, dict], template_set: str | None = None,
                      same_identities: bool = True) -> list[Alert]:
    """Alerts that need both modes: faces erased by the prefix; identities that differ between the modes."""
    out: list[Alert] = []
    with_s, without_s = summaries.get("with"), summaries.get("without")
    if with_s and without_s and with_s.get("n_images") and without_s.get("n_images"):
        gap = with_s["no_face_rate"] - without_s["no_face_rate"]
        if gap >= NO_FACE_GAP:
            out.append(Alert(
                "no_face_gap",
                f"the no-face rate is {_rate(with_s['no_face_rate'])} with the prefix against "
                f"{_rate(without_s['no_face_rate'])} without: the prefix erases faces, and each erased face counts "
                "as similarity 0, so mean of mean / mean of max (and id_accuracy_all_images) flatter it. Read "
                "id_accuracy and mean_sim_faces (detected faces only) beside the no-face rate.",
                "with", template_set))
        if not same_identities:
            out.append(Alert("identities_differ", "the modes were scored over different identities (names missing in "
                             "one folder); their figures do not compare person for person.", None, template_set))
    elif with_s and with_s.get("n_images") and with_s["no_face_rate"] >= NO_FACE_ALONE:
        out.append(Alert(
            "no_face_unknown_baseline",
            f"{_rate(with_s['no_face_rate'])} of the images with the prefix have no face, and without --mode both "
            "there is no baseline to tell erased faces from the model's own misses; each counts as similarity 0.",
            "with", template_set))
    return out


def prefix_effect_alert(with_digests: list[str], without_digests: list[str],
                        template_set: str | None = None) -> Alert | None:
    """An alert when every with-prefix image equals its same-seed without-prefix image (the prefix did nothing)."""
    if with_digests and len(with_digests) == len(without_digests) and with_digests == without_digests:
        return Alert("prefix_no_effect", f"all {len(with_digests)} images with the prefix are pixel-identical to the "
                     "same-seed images without it: the prefix changed nothing (is the placeholder in the prompts?).",
                     "with", template_set)
    return None
