"""Ground-truth embedding files: an (N, D) .npy and a names file whose line i names row i, linked by a digest.

dataset_generation.py writes both and puts a header line in the names file,

    # apl-ground-truth v1 npy_sha256=<hex> names_sha256=<hex> rows=N dim=D backend=<face backend>

so that a names file of another .npy (same row count, other people) or a names file edited afterwards is refused
instead of scoring faces against the wrong person's embedding. Pairs written before the header existed still load,
marked unlinked (the caller warns): refusing them would strand every existing ground truth, and rewriting them is
one rerun of dataset_generation.py --gt_npy on the same --outdir (it only recomputes the embeddings).
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apl.eval.images import clean_name
from apl.io import atomic_write_bytes

HEADER_TAG = "# apl-ground-truth v1"
_HEADER = re.compile(r"^# apl-ground-truth v1((?:\s+\w+=\S+)*)\s*$")
_REWRITE = "write both again with dataset_generation.py --gt_npy (on the same --outdir it only recomputes them)"


class GroundTruthMismatch(ValueError):
    """A names file that does not belong to the embeddings file it is paired with."""


@dataclass
class GroundTruthLink:
    """What the names file's header says about its .npy (all None for an unlinked, older pair)."""

    linked: bool
    npy_sha256: str | None = None
    backend: str | None = None
    dim: int | None = None


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def names_sha256(names: list[str]) -> str:
    """sha256 of the names in row order (one per line), as recorded in the header."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def _read_npy(npy_path: Path) -> np.ndarray:
    if npy_path.stat().st_size == 0:
        raise ValueError(
            f"The ground-truth embeddings file {npy_path} is empty (0 bytes), e.g. from an interrupted copy; "
            f"{_REWRITE}, or pass --gt_folder."
        )
    try:
        embs = np.load(npy_path, allow_pickle=False)  # never unpickle objects from a data file
    except (ValueError, EOFError, OSError) as err:  # EOFError: a truncated file
        raise ValueError(
            f"{npy_path} is not a complete, plain numeric .npy array ({type(err).__name__}: {err}); {_REWRITE}."
        ) from err
    if embs.ndim == 1:
        embs = embs[None, :]
    if embs.ndim != 2 or embs.shape[0] == 0 or embs.shape[1] == 0:
        raise ValueError(f"{npy_path} must hold an (N, D) array of embeddings, got shape {embs.shape}.")
    if not np.issubdtype(embs.dtype, np.floating):
        raise ValueError(f"{npy_path} holds {embs.dtype} values, but face embeddings are floating-point; {_REWRITE}.")
    return embs


def _check_rows(embs: np.ndarray, names: list[str], npy_path: Path) -> np.ndarray:
    """Each row finite and non-zero (else it names the row and person), returned L2-normalised as float32."""
    x = embs.astype(np.float64)
    finite = np.isfinite(x).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(x), x, 0.0), axis=1)
    for i in range(x.shape[0]):
        problem = "holds NaN or inf" if not finite[i] else "is all zeros" if norms[i] == 0 else None
        if problem:
            bad = int((~finite).sum() + ((norms == 0) & finite).sum())
            raise ValueError(
                f"{npy_path} row {i} ({names[i]!r}) {problem} ({bad} of {x.shape[0]} rows are unusable): it cannot "
                f"be compared with a face; {_REWRITE}, or pass --gt_folder."
            )
    return (x / norms[:, None]).astype(np.float32)


def _parse_header(line: str, names_path: Path) -> dict[str, str]:
    match = _HEADER.match(line.strip())
    if not match:
        raise ValueError(f"{names_path}: the '{HEADER_TAG}' line is damaged ({line.strip()[:80]!r}); {_REWRITE}.")
    return dict(part.split("=", 1) for part in match.group(1).split())


def read_ground_truth(npy_path: str | Path, names_path: str | Path) -> tuple[dict[str, np.ndarray], GroundTruthLink]:
    """{name: unit embedding} and the link recorded in the names file; a mismatched or damaged pair is refused."""
    npy_path, names_path = Path(npy_path), Path(names_path)
    for p, what in ((npy_path, "ground-truth embeddings (.npy)"), (names_path, "ground-truth names file")):
        if not p.is_file():
            raise FileNotFoundError(f"The {what} {p} does not exist; dataset_generation.py --gt_npy writes the .npy "
                                    "and its names file together, or pass --gt_folder with reference photos.")
    embs = _read_npy(npy_path)
    try:
        lines = names_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"the names file {names_path} is not UTF-8 text ({err}); save it as UTF-8, one name a "
                         "line") from err
    header = next((ln for ln in lines if ln.startswith(HEADER_TAG)), None)
    # Blank lines (e.g. a trailing newline) and '#' comments are not names.
    names = [clean_name(ln) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    link = GroundTruthLink(linked=False)
    if header is not None:
        fields = _parse_header(header, names_path)
        recorded, actual = fields.get("npy_sha256", ""), file_sha256(npy_path)
        if recorded != actual:
            raise GroundTruthMismatch(
                f"--gt_names {names_path} belongs to another embeddings file than --gt_npy {npy_path}: it records "
                f"sha256 {recorded[:12]}..., {npy_path} has {actual[:12]}...; its names would label the wrong rows. "
                f"Pass the names file written together with {npy_path}, or {_REWRITE}."
            )
        if fields.get("names_sha256") != names_sha256(names):
            raise GroundTruthMismatch(
                f"--gt_names {names_path} was edited after it was written with {npy_path} (its names no longer match "
                f"the recorded digest), so line i may no longer name row i. Restore the file, or {_REWRITE}."
            )
        dim = fields.get("dim", "")
        link = GroundTruthLink(True, actual, fields.get("backend") or None, int(dim) if dim.isdigit() else None)
    if len(names) != embs.shape[0]:
        raise GroundTruthMismatch(
            f"Ground truth mismatch: {npy_path} has {embs.shape[0]} embeddings but {names_path} has {len(names)} "
            f"names. Line i of the names file must name row i of the array."
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{names_path} lists these names more than once: {dupes}.")
    return dict(zip(names, _check_rows(embs, names, npy_path), strict=True)), link


def load_ground_truth(npy_path: str | Path, names_path: str | Path) -> dict[str, np.ndarray]:
    """Read a group of ground-truth embeddings (see read_ground_truth), without the link."""
    return read_ground_truth(npy_path, names_path)[0]


def save_ground_truth(
    gt: dict[str, np.ndarray], npy_path: str | Path, names_path: str | Path, backend: str | None = None
) -> None:
    """Write ground truth as a linked pair: the .npy, then the names file headed by the .npy's digest (atomic)."""
    names = list(gt)
    if not names:
        raise ValueError("No ground-truth embeddings to save.")
    if any("\n" in n or n.lstrip().startswith("#") for n in names):
        raise ValueError("Identity names must not contain newlines or start with '#'.")
    rows = np.stack([np.asarray(gt[n], dtype=np.float32).ravel() for n in names])
    if not np.isfinite(rows).all():
        bad = [n for n, r in zip(names, rows, strict=True) if not np.isfinite(r).all()]
        raise ValueError(f"Ground-truth embeddings of {bad[:5]} hold NaN or inf; not written.")
    buf = io.BytesIO()
    np.save(buf, rows)
    data = buf.getvalue()
    header = (
        f"{HEADER_TAG} npy_sha256={hashlib.sha256(data).hexdigest()} names_sha256={names_sha256(names)} "
        f"rows={rows.shape[0]} dim={rows.shape[1]}" + (f" backend={backend}" if backend else "")
    )
    atomic_write_bytes(data, npy_path)
    atomic_write_bytes((header + "\n" + "\n".join(names) + "\n").encode("utf-8"), names_path)
