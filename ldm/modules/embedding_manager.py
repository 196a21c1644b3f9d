"""The learned APL prefix: placeholder words (default `alz`) replaced by N trainable vectors in CLIP token space.

Textual-inversion style (Gal et al. 2022) with several vectors per placeholder: wherever the placeholder's single
BPE token appears, its one token embedding is replaced by the N learned vectors, the rest of the row shifts right
and the row is cut back to its length (77). Position embeddings are added afterwards by the text encoder.

Files: the original `.pt` layout (`string_to_token` / `string_to_param` ParameterDict), `.safetensors` with
metadata, and exports for AUTOMATIC1111 and diffusers. Reading never unpickles anything but tensors and plain data.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as save_safetensors
from torch import nn

from ldm.util import atomic_save, is_safetensors_file, read_pickled_weights

DEFAULT_PLACEHOLDER = "alz"
FORMAT_NAME = "apl-embedding"  # `format` metadata of our .safetensors files
FORMAT_VERSION = 1
A1111_PLACEHOLDER = "*"  # AUTOMATIC1111 files store their single term under '*' ...
A1111_TOKEN_ID = 265  # ... with the id of '*</w>', whatever the embedding is called
# Keyword arguments of the original (textual-inversion) constructor that are accepted when they keep their default.
_ORIGINAL_KWARGS = {"progressive_words": False, "per_image_tokens": False}


class EmbeddingFileError(ValueError):
    """An embedding file APL cannot use; the message names the file, what is wrong and what to do."""


INITS = ("uniform", "normal")  # how new vectors start: the original's uniform [0, 1), or token-embedding statistics


class PromptTooLong(ValueError):
    """A prompt that does not fit CLIP's 77 positions once the placeholder is expanded into its vectors."""


# Largest |value| a prefix vector may hold. CLIP token embeddings are below 1 in magnitude and trained APL prefixes
# stay within a few tens; values far beyond that come from a diverged run or a damaged file, and they overflow
# the text encoder (LayerNorm squares them; fp16 ends at 65504) into NaN or black images.
MAX_ABS_VALUE = 1e4

# Text widths of the released model families, for messages about a prefix of another width.
FAMILY_OF_WIDTH = {768: "SD v1.x (CLIP ViT-L/14)", 1024: "SD 2.x (OpenCLIP ViT-H/14)", 1280: "SDXL's second encoder"}


def width_family(width: int) -> str:
    """The model family whose text encoder has this width, for messages ('SD v1.x (CLIP ViT-L/14)')."""
    return FAMILY_OF_WIDTH.get(int(width), "the width of no released Stable Diffusion model: a test or toy model")


def check_vectors(vectors: torch.Tensor, where: str, fix: str) -> None:
    """Refuse prefix vectors (N, D) that are not floating point, hold NaN/inf, or exceed MAX_ABS_VALUE.

    `where` names the file and entry ("APL-500.pt: entry 'alz'"), `fix` says what to do; the message says which
    vectors are bad."""
    if not vectors.is_floating_point():
        raise EmbeddingFileError(f"{where} is {vectors.dtype}, not floating-point vectors; {fix}")
    v = vectors.detach().float().reshape(vectors.shape[0] if vectors.ndim > 1 else 1, -1)
    bad = ~torch.isfinite(v)
    if bad.any():
        rows = bad.any(1).nonzero().flatten().tolist()
        raise EmbeddingFileError(
            f"{where} holds NaN or infinite values ({int(bad.sum())} of {v.numel()}, in vector(s) "
            f"{_fmt_rows(rows)} of {v.shape[0]}): the prefix is broken; {fix}"
        )
    peak = v.abs().amax(1)
    if (peak > MAX_ABS_VALUE).any():
        rows = (peak > MAX_ABS_VALUE).nonzero().flatten().tolist()
        raise EmbeddingFileError(
            f"{where} holds values up to {float(peak.max()):.3g} in vector(s) {_fmt_rows(rows)} of {v.shape[0]}, "
            f"far outside any text embedding (APL accepts |value| <= {MAX_ABS_VALUE:g}; CLIP token embeddings are "
            f"below 1): the prefix is broken; {fix}"
        )


def _fmt_rows(rows: list[int], n: int = 6) -> str:
    return ", ".join(map(str, rows[:n])) + (f" ... (+{len(rows) - n})" if len(rows) > n else "")


READ_FIX = "use an earlier prefix from the run's embeddings/ folder, or retrain (e.g. with a lower --lr)"


class _PickledParameterDict:
    """Inert stand-in for a pickled `torch.nn.ParameterDict`: keeps the module's `_parameters`, imports nothing."""

    def __init__(self) -> None:
        self.parameters: dict[str, torch.Tensor] = {}

    def __setstate__(self, state) -> None:
        # A pickled nn.Module is NEWOBJ + BUILD with its __dict__ (possibly as (dict, slots)); only tensors matter.
        if isinstance(state, tuple) and len(state) == 2:
            state = state[0]
        params = state.get("_parameters") if isinstance(state, Mapping) else None
        self.parameters = dict(params) if isinstance(params, Mapping) else {}


# Only the ParameterDict name maps to the stand-in; every other non-tensor global in a file is refused by torch.
_SAFE_STAND_INS = [(_PickledParameterDict, "torch.nn.modules.container.ParameterDict")]


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    atomic_save(lambda tmp: write(str(tmp)), path)


# The zip members AUTOMATIC1111's loader (modules/safe.py) accepts; it refuses a file with any other member, and
# torch.save now also writes .format_version, .storage_alignment, byteorder and .data/serialization_id.
_PORTABLE_ZIP_MEMBER = re.compile(r"^archive/((data/\d+)|version|(data\.pkl))$")


def _archive_name(final: Path) -> str:
    """The zip folder torch.save would use for `final` (its stem), limited to characters every reader accepts."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", final.stem).lstrip(".") or "archive"


def _torch_save_portable(obj: object, path: str, final: Path) -> None:
    """torch.save into `path` as it would write `final` (zip folder named after `final`, not after a temporary
    file), keeping only the members every PyTorch and AUTOMATIC1111 reader accepts (data.pkl first)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # a file object: the archive folder is 'archive', renamed below
    root = _archive_name(final)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as dst:
        names = [n for n in src.namelist() if _PORTABLE_ZIP_MEMBER.match(n)]
        if "archive/data.pkl" not in names:
            raise RuntimeError(f"internal error: torch.save wrote no archive/data.pkl ({src.namelist()})")
        for name in sorted(names, key=lambda n: n != "archive/data.pkl"):
            dst.writestr(root + name[len("archive") :], src.read(name))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise EmbeddingFileError(
            f"embedding file not found: {path} (pass the .pt/.safetensors file that train.py wrote under embeddings/)"
        )
    if path.is_dir():
        raise EmbeddingFileError(f"{path} is a folder; pass the embedding file itself (.pt, .bin or .safetensors).")
    if path.stat().st_size == 0:
        raise EmbeddingFileError(f"{path} is empty (0 bytes): the save or copy did not finish.")


def _to_int(value, what: str, path: Path) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise EmbeddingFileError(f"{path}: {what} should be an integer token id, found {type(value).__name__} {value!r}.")


def _vectors(value, name: str, path: Path) -> torch.Tensor:
    """One entry's vectors as a plain (N, D) tensor; diffusers' single-vector files store (D,)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise EmbeddingFileError(f"{path}: entry {name!r} is {type(value).__name__}, not a float tensor of vectors.")
    t = value.detach().cpu()
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise EmbeddingFileError(f"{path}: entry {name!r} has shape {list(value.shape)}; expected (N, width).")
    check_vectors(t, f"{path}: entry {name!r}", READ_FIX)
    return t


def _read_pickle(path: Path) -> object:
    return read_pickled_weights(
        path,
        _SAFE_STAND_INS,
        EmbeddingFileError,
        kind="PyTorch embedding file",
        refusal="could run code when unpickled; APL reads only tensors and plain data from embedding files. If you "
        "trust its source, re-save it as .safetensors elsewhere.",
        retry="Copy or download it again.",
    )


_MODEL_KEY_PREFIXES = ("model.", "first_stage_model.", "cond_stage_model.", "model_ema.", "state_dict")


def _refuse_model(entries: Mapping, path: Path) -> None:
    """A model checkpoint passed where an embedding belongs: say so instead of complaining about tensor shapes."""
    if any(str(k).startswith(_MODEL_KEY_PREFIXES) for k in entries) or len(entries) > 64:
        raise EmbeddingFileError(
            f"{path} is a model checkpoint ({len(entries)} entries such as {sorted(map(str, entries))[0]!r}), not an "
            "embedding: pass the model with --ckpt_path and the trained prefix (.pt/.safetensors) as the embedding."
        )


def _refuse_sdxl(entries: Mapping, path: Path) -> None:
    if {"clip_g", "clip_l"} <= set(entries):
        raise EmbeddingFileError(
            f"{path} is an SDXL prefix (clip_l and clip_g vectors), and this is a single-encoder model (SD v1.x); use "
            "it with an SDXL model (--config_path configs/sdxl/sd_xl_base.yaml and an SDXL checkpoint)."
        )


def _read_safetensors(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor], dict]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except (SafetensorError, OSError, ValueError) as e:
        raise EmbeddingFileError(f"cannot read {path}: not a valid .safetensors file, or truncated ({e}).") from e
    if not tensors:
        raise EmbeddingFileError(f"{path} holds no tensors.")
    prefix = "string_to_param."
    if any(k.startswith(prefix) for k in tensors):  # our own layout
        params = {k[len(prefix) :]: _vectors(v, k, path) for k, v in tensors.items() if k.startswith(prefix)}
        meta: dict = {"format": raw_meta.get("format", FORMAT_NAME)}
        try:
            ids = json.loads(raw_meta.get("token_ids", "{}"))
            meta["format_version"] = int(raw_meta.get("format_version", FORMAT_VERSION))
            meta["num_vectors"] = int(raw_meta["num_vectors"]) if "num_vectors" in raw_meta else None
            meta["step"] = int(raw_meta["step"]) if raw_meta.get("step") else None
            meta["width"] = int(raw_meta["width"]) if "width" in raw_meta else None
        except (ValueError, TypeError) as e:
            raise EmbeddingFileError(f"{path}: malformed metadata ({e}); metadata was {raw_meta}.") from e
        if meta["format_version"] > FORMAT_VERSION:
            raise EmbeddingFileError(
                f"{path} has format version {meta['format_version']}; this APL reads up to "
                f"{FORMAT_VERSION}. Update APL."
            )
        meta["base_model"] = raw_meta.get("base_model") or None
        meta["placeholders"] = list(params)
        tokens = {s: _to_int(ids[s], f"token id of {s!r}", path) for s in params if s in ids}
        meta["token_ids"] = dict(tokens)
        return tokens, params, meta
    if set(tensors) == {"emb_params"}:  # AUTOMATIC1111 / kohya .safetensors
        meta = {"format": "a1111-safetensors", **{k: v for k, v in raw_meta.items() if k in ("name", "step")}}
        return {}, {A1111_PLACEHOLDER: _vectors(tensors["emb_params"], "emb_params", path)}, meta
    _refuse_sdxl(tensors, path)
    _refuse_model(tensors, path)
    # diffusers textual inversion: {token: vectors}
    return {}, {k: _vectors(v, k, path) for k, v in tensors.items()}, {"format": "diffusers"}


def read_embedding_file(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, torch.Tensor], dict]:
    """(string_to_token, string_to_param tensors (N, D), metadata) of an APL / textual-inversion file.

    Reads the original `.pt` layout, AUTOMATIC1111 `.pt`/`.safetensors`, diffusers `.bin`/`.safetensors` and
    our `.safetensors`, without unsafe unpickling. Token ids are returned only where the file stores them.
    """
    path = Path(path)
    _check_file(path)
    safetensors_bytes = is_safetensors_file(path, EmbeddingFileError)  # under a .pt name too
    if path.suffix.lower() == ".safetensors" or safetensors_bytes:
        return _read_safetensors(path)
    obj = _read_pickle(path)
    if not isinstance(obj, Mapping) or not obj:
        raise EmbeddingFileError(
            f"{path} holds a {type(obj).__name__}, not an embedding dict (expected "
            "'string_to_token'/'string_to_param' or {token: vectors})."
        )
    if "string_to_param" in obj:
        raw = obj["string_to_param"]
        raw = raw.parameters if isinstance(raw, _PickledParameterDict) else raw
        if not isinstance(raw, Mapping) or not raw:
            raise EmbeddingFileError(f"{path}: 'string_to_param' holds no vectors.")
        params = {str(k): _vectors(v, str(k), path) for k, v in raw.items()}
        raw_tokens = obj.get("string_to_token", {})
        if not isinstance(raw_tokens, Mapping):
            raise EmbeddingFileError(f"{path}: 'string_to_token' is {type(raw_tokens).__name__}, not a dict.")
        tokens = {str(k): _to_int(v, f"token id of {k!r}", path) for k, v in raw_tokens.items()}
        is_a1111 = set(params) == {A1111_PLACEHOLDER} and "name" in obj
        meta = {"format": "a1111" if is_a1111 else "original"}
        # A1111 and others add name/step/checkpoint fields; keep the plain ones.
        meta |= {
            k: v
            for k, v in obj.items()
            if k not in ("string_to_param", "string_to_token") and (v is None or isinstance(v, (str, int, float)))
        }
        return tokens, params, meta
    _refuse_sdxl(obj, path)
    _refuse_model(obj, path)
    if all(isinstance(v, torch.Tensor) for v in obj.values()):  # diffusers .bin: {token: vectors}
        return {}, {str(k): _vectors(v, str(k), path) for k, v in obj.items()}, {"format": "diffusers"}
    raise EmbeddingFileError(
        f"{path} is not an embedding file: keys {sorted(map(str, obj))[:8]}; expected "
        "'string_to_token'/'string_to_param' (APL, textual inversion, A1111) or {token: tensor} "
        "(diffusers). Is it a model checkpoint?"
    )


def _is_single_token(tokenizer, word: str) -> bool:
    try:
        tokenizer.token_id(word)
    except ValueError:
        return False
    return True


class EmbeddingManager(nn.Module):
    """Learned vectors for placeholder words, spliced into CLIP token embeddings (the `embedding_manager` hook)."""

    def __init__(
        self,
        embedder: nn.Module,
        placeholder_strings: Sequence[str] | None = None,
        num_vectors_per_token: int = 10,
        initializer_words: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
        init: str = "uniform",
        **kwargs,
    ) -> None:
        super().__init__()
        for key, value in kwargs.items():
            if key not in _ORIGINAL_KWARGS:
                raise TypeError(f"EmbeddingManager: unknown argument {key!r}.")
            if value != _ORIGINAL_KWARGS[key]:
                raise ValueError(
                    f"EmbeddingManager: {key}={value!r} is not supported (only the original default "
                    f"{_ORIGINAL_KWARGS[key]!r}, which APL trained with)."
                )
        placeholder_strings = list(placeholder_strings or [DEFAULT_PLACEHOLDER])
        if len(set(placeholder_strings)) != len(placeholder_strings):
            raise ValueError(f"EmbeddingManager: duplicate placeholder strings {placeholder_strings}.")
        if not isinstance(num_vectors_per_token, int) or num_vectors_per_token < 1:
            raise ValueError(
                f"EmbeddingManager: num_vectors_per_token must be a positive integer, got {num_vectors_per_token!r}."
            )
        token_embedding = embedder.token_embedding  # SD v1's CLIP, SDXL's CLIP ViT-L and OpenCLIP ViT-bigG alike
        self.tokenizer = embedder.tokenizer  # a plain object, not a submodule: the CLIP weights stay out of here
        self.num_vectors_per_token = num_vectors_per_token
        self.token_dim = token_embedding.weight.shape[1]
        self.metadata: dict = {}  # metadata of the last file loaded
        self.string_to_token_dict: dict[str, int] = {}
        self.string_to_param_dict = nn.ParameterDict()
        for i, placeholder in enumerate(placeholder_strings):
            token = self._single_token(placeholder)
            if token in self.string_to_token_dict.values():
                raise ValueError(f"EmbeddingManager: placeholders {placeholder_strings} share token id {token}.")
            if initializer_words and i < len(initializer_words):
                vectors = self._word_vectors(initializer_words[i], token_embedding)
            elif init == "normal":
                # At the scale of real token embeddings: per-dimension mean and spread of the vocabulary's vectors.
                table = token_embedding.weight.detach().float()
                noise = torch.randn(num_vectors_per_token, self.token_dim, generator=generator)
                vectors = (table.mean(0).cpu() + table.std(0).cpu() * noise).float()
            elif init == "uniform":
                # As the original: uniform [0, 1), float32; the global RNG unless a generator is given.
                vectors = torch.rand(num_vectors_per_token, self.token_dim, generator=generator)
            else:
                raise ValueError(f"EmbeddingManager: init must be one of {INITS}, got {init!r}.")
            self.string_to_token_dict[placeholder] = token
            self.string_to_param_dict[placeholder] = nn.Parameter(vectors.to(token_embedding.weight.device))

    def _single_token(self, placeholder: str) -> int:
        try:
            return self.tokenizer.token_id(placeholder)
        except ValueError as e:
            raise ValueError(f"EmbeddingManager: placeholder {e}") from None

    def _word_vectors(self, word: str, token_embedding: nn.Embedding) -> torch.Tensor:
        """The mean token embedding of `word` (any number of BPE pieces), repeated N times, float32."""
        ids = self.tokenizer.encode(word)
        if not ids:
            raise ValueError(f"EmbeddingManager: initializer word {word!r} has no tokens; pass a real word.")
        with torch.no_grad():
            mean = token_embedding.weight[torch.tensor(ids, device=token_embedding.weight.device)].float().mean(0)
        return mean.cpu().unsqueeze(0).repeat(self.num_vectors_per_token, 1)

    def prompt_room(self, prompt: str) -> tuple[int, int]:
        """(positions `prompt` needs once each placeholder becomes N vectors, positions there are): BOS and EOS
        included; CLIP has 77. A prompt that needs more loses its end-of-text token and its last words."""
        ids = self.tokenizer.encode(prompt)[: self.tokenizer.model_max_length - 2]  # what the tokenizer keeps
        tokens = set(self.string_to_token_dict.values())
        expanded = len(ids) + (self.num_vectors_per_token - 1) * sum(i in tokens for i in ids)
        return expanded + 2, self.tokenizer.model_max_length

    def check_prompts_fit(self, prompts: Sequence[str]) -> None:
        """Refuse prompts that the prefix's N vectors would push past CLIP's 77 positions (the insertion then cuts
        the end-of-text token and the last words, while the same prompt without the prefix keeps them)."""
        for prompt in prompts:
            need, have = self.prompt_room(prompt)
            if need > have:
                n = self.num_vectors_per_token
                fit = have - 2 - n
                raise PromptTooLong(
                    f"prompt {prompt[:80]!r}{'...' if len(prompt) > 80 else ''} is too long for the prefix: with "
                    f"each placeholder as {n} vectors it needs {need} of CLIP's {have} positions, so its last words "
                    f"and its end token would be cut. Shorten it to at most {fit} CLIP tokens besides the "
                    "placeholder."
                )

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The trainable vectors (the only parameters to optimise)."""
        return list(self.string_to_param_dict.values())

    def _sources(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For token ids (B, L): per output position of the expanded row, its source token (B, L), the index inside a
        placeholder's N vectors, whether it comes from a placeholder, and which placeholder each token is."""
        B, L = ids.shape
        N = self.num_vectors_per_token
        slot = torch.full_like(ids, -1)  # (B, L) which placeholder a token is, -1 for ordinary tokens
        for k, token in enumerate(self.string_to_token_dict.values()):
            slot = torch.where(ids == token, k, slot)
        is_placeholder = slot >= 0  # no early exit for rows without it: `.any()` would make the GPU wait for the host
        # Expanded row: token i covers output positions [end_i - width_i, end_i). Output position j comes from the
        # token whose span holds j. This equals the original's loop (insert N vectors per occurrence, right to
        # left, cut to L after each insertion): every cut only drops the tail, so the kept prefix is the same.
        width = torch.where(is_placeholder, N, 1)
        end = width.cumsum(1)  # (B, L), strictly increasing, end[:, -1] >= L
        pos = torch.arange(L, device=ids.device).expand(B, L).contiguous()
        src = torch.searchsorted(end, pos, right=True)  # (B, L) source token of each output position
        offset = pos - (end.gather(1, src) - width.gather(1, src))  # index inside a placeholder's N vectors
        return src, offset, is_placeholder.gather(1, src), slot

    def expand_ids(self, tokenized_text: torch.Tensor) -> torch.Tensor:
        """The token ids as the expanded row holds them (each placeholder repeated N times, the row cut back to its
        length): where an encoder that pools at the end-of-text token (SDXL's OpenCLIP) finds it now."""
        ids = tokenized_text
        src, _, _, _ = self._sources(ids)
        return ids.gather(1, src)

    def forward(self, tokenized_text: torch.Tensor, embedded_text: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) and their token embeddings (B, L, D) -> embeddings with each placeholder expanded."""
        B, L, D = embedded_text.shape
        device, N = embedded_text.device, self.num_vectors_per_token
        ids = tokenized_text.to(device)
        src, offset, from_placeholder, slot = self._sources(ids)
        table = torch.cat(self.embedding_parameters()).to(device=device, dtype=embedded_text.dtype)  # (P*N, D)
        vectors = table[slot.gather(1, src).clamp(min=0) * N + offset.clamp(max=N - 1)]  # (B, L, D)
        tokens = embedded_text.gather(1, src.unsqueeze(-1).expand(B, L, D))
        return torch.where(from_placeholder.unsqueeze(-1), vectors, tokens)

    # ----- files -----

    def _cpu_vectors(self, path: Path | None = None) -> dict[str, torch.Tensor]:
        """The vectors as float32 CPU tensors; with `path` (a file about to be written) they must be sound."""
        out = {s: p.detach().float().cpu().contiguous().clone() for s, p in self.string_to_param_dict.items()}
        if path is not None:
            for s, v in out.items():
                check_vectors(
                    v,
                    f"refusing to write {path}: placeholder {s!r}",
                    "nothing was written; export an earlier prefix file instead",
                )
        return out

    def save(self, path: str | os.PathLike, *, step: int | None = None, base_model: str | None = None) -> None:
        """Write the vectors atomically: `.pt` in the original layout, or `.safetensors` with metadata."""
        path = Path(path)
        vectors = self._cpu_vectors(path)
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            tensors = {f"string_to_param.{s}": v for s, v in vectors.items()}
            meta = {
                "format": FORMAT_NAME,
                "format_version": str(FORMAT_VERSION),
                "placeholders": json.dumps(list(vectors)),
                "num_vectors": str(self.num_vectors_per_token),
                "token_ids": json.dumps(self.string_to_token_dict),
                "width": str(self.token_dim),
                "base_model": base_model or "",
                "step": "" if step is None else str(int(step)),
            }
            _write_atomically(path, lambda tmp: save_safetensors(tensors, tmp, metadata=meta))
        elif suffix == ".pt":
            # The original layout (0-d token tensors, a real ParameterDict) so the original code reads it; the step
            # rides along as an extra key (the original reads only the two above; A1111 reads 'step' too).
            data: dict = {
                "string_to_token": {s: torch.tensor(t) for s, t in self.string_to_token_dict.items()},
                "string_to_param": nn.ParameterDict({s: nn.Parameter(v) for s, v in vectors.items()}),
            }
            if step is not None:
                data["step"] = int(step)
            _write_atomically(path, lambda tmp: _torch_save_portable(data, tmp, path))
        else:
            raise ValueError(
                f"EmbeddingManager.save: unknown file type {path.name!r}; use .pt (original layout) or .safetensors."
            )

    def load(self, path: str | os.PathLike) -> None:
        """Load vectors from any supported file; placeholders, N and width must match this manager."""
        self._load_entries(Path(path), *read_embedding_file(path))

    def _load_entries(self, path: Path, tokens: dict[str, int], params: dict[str, torch.Tensor], meta: dict) -> None:
        ours = list(self.string_to_param_dict)
        mapping = {s: s for s in params if s in self.string_to_param_dict}
        if set(mapping) != set(params) or len(params) != len(ours):
            # A1111/diffusers exports name their single entry '*' or an export token; take it for our placeholder.
            label_only = set(params) == {A1111_PLACEHOLDER} or not tokens
            if not (len(params) == 1 and len(ours) == 1 and label_only):
                raise EmbeddingFileError(
                    f"{path} holds placeholders {sorted(params)} but this manager has {ours}; build it with "
                    f"placeholder_strings={sorted(params)} or use EmbeddingManager.from_file(embedder, path)."
                )
            mapping = {next(iter(params)): ours[0]}
        for src, dst in mapping.items():
            if src != A1111_PLACEHOLDER and src in tokens and tokens[src] != self.string_to_token_dict[dst]:
                raise EmbeddingFileError(
                    f"{path}: placeholder {src!r} has token id {tokens[src]} in the file but "
                    f"{self.string_to_token_dict[dst]} with this tokenizer; it was made for another text encoder."
                )
            n, d = params[src].shape
            if d != self.token_dim:
                raise EmbeddingFileError(
                    f"{path}: vectors of {src!r} are {d}-d ({width_family(d)}) but this model's text encoder is "
                    f"{self.token_dim}-d ({width_family(self.token_dim)}): the prefix was trained for another model "
                    "family; use it with that model, or pass the matching --config_path/--ckpt_path."
                )
            if n != self.num_vectors_per_token:
                raise EmbeddingFileError(
                    f"{path}: {src!r} has {n} vectors but this manager has num_vectors_per_token="
                    f"{self.num_vectors_per_token}; build it with num_vectors_per_token={n} or use "
                    "EmbeddingManager.from_file(embedder, path)."
                )
        with torch.no_grad():  # copy in place: optimisers holding these Parameters stay valid
            for src, dst in mapping.items():
                self.string_to_param_dict[dst].copy_(params[src])
        self.metadata = dict(meta)

    @classmethod
    def from_file(cls, embedder: nn.Module, path: str | os.PathLike) -> EmbeddingManager:
        """A manager with the placeholders and vector count stored in `path`, loaded from it."""
        tokens, params, meta = read_embedding_file(path)
        counts = {s: v.shape[0] for s, v in params.items()}
        if len(set(counts.values())) != 1:
            raise EmbeddingFileError(f"{path}: placeholders have different vector counts {counts}; APL uses one N.")
        # '*' (A1111) and diffusers export tokens like '<alz>' are labels, not one-token words: use the default.
        names = [
            s if s != A1111_PLACEHOLDER and _is_single_token(embedder.tokenizer, s) else DEFAULT_PLACEHOLDER
            for s in params
        ]
        # A private generator: the placeholder init is overwritten, and the global RNG stream stays untouched.
        manager = cls(embedder, names, num_vectors_per_token=next(iter(counts.values())), generator=torch.Generator())
        manager._load_entries(Path(path), tokens, params, meta)
        return manager

    def _only_vectors(self, what: str, path: Path) -> tuple[str, torch.Tensor]:
        if len(self.string_to_param_dict) != 1:
            raise ValueError(
                f"{what} files hold one embedding; this manager has "
                f"{list(self.string_to_param_dict)}. Export a manager with one placeholder."
            )
        return next(iter(self._cpu_vectors(path).items()))

    def _export_metadata(self, base_model: str | None) -> dict[str, str]:
        """What an export records about where its vectors belong (readers that do not know the keys ignore them)."""
        return {"apl_width": str(self.token_dim), "apl_base_model": base_model or ""}

    def export_a1111(
        self, path: str | os.PathLike, name: str | None = None, step: int = 0, base_model: str | None = None
    ) -> None:
        """AUTOMATIC1111 textual-inversion file (`.pt`, or `.safetensors` with `emb_params`).

        AUTOMATIC1111, Forge and ComfyUI take the prompt word from the file name. diffusers, loading the `.pt`
        without `token=`, takes `name` as its token; it lower-cases prompts, so the name must be lower case and new
        to CLIP's vocabulary: the default is `<file name in lower case>`."""
        path = Path(path)
        default = "<" + re.sub(r"\s+", "_", path.stem.lower()) + ">"
        name = check_diffusers_token(name or default, self.tokenizer, "--name")
        _, vectors = self._only_vectors("AUTOMATIC1111", path)
        meta = self._export_metadata(base_model)
        if path.suffix.lower() == ".pt":
            data = {
                "string_to_token": {A1111_PLACEHOLDER: A1111_TOKEN_ID},
                "string_to_param": {A1111_PLACEHOLDER: vectors},
                "name": name,
                "step": int(step),
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                **meta,
            }
            _write_atomically(path, lambda tmp: _torch_save_portable(data, tmp, path))
        elif path.suffix.lower() == ".safetensors":
            meta |= {"name": name, "step": str(int(step))}
            _write_atomically(path, lambda tmp: save_safetensors({"emb_params": vectors}, tmp, metadata=meta))
        else:
            raise ValueError(f"export_a1111: unknown file type {path.name!r}; use .pt or .safetensors.")

    def export_diffusers(
        self, path: str | os.PathLike, token: str | None = None, base_model: str | None = None
    ) -> None:
        """diffusers textual-inversion file {token: (N, D)} (`.safetensors` or `.bin`) for `load_textual_inversion`.

        The default token is `<alz>`: diffusers refuses tokens already in the CLIP vocabulary, and `alz` is one
        (the word piece 12936, besides the word token 41128 that APL uses)."""
        path = Path(path)
        placeholder = next(iter(self.string_to_param_dict), DEFAULT_PLACEHOLDER)
        token = check_diffusers_token(token or f"<{placeholder}>", self.tokenizer, "--token")
        _, vectors = self._only_vectors("diffusers textual-inversion", path)
        if path.suffix.lower() == ".safetensors":
            meta = self._export_metadata(base_model)
            _write_atomically(path, lambda tmp: save_safetensors({token: vectors}, tmp, metadata=meta))
        elif path.suffix.lower() == ".bin":  # one key only: diffusers reads a .bin with one entry as {token: vectors}
            _write_atomically(path, lambda tmp: _torch_save_portable({token: vectors}, tmp, path))
        else:
            raise ValueError(f"export_diffusers: unknown file type {path.name!r}; use .safetensors or .bin.")


def check_diffusers_token(token: str, tokenizer, flag: str) -> str:
    """A token diffusers' load_textual_inversion uses with all its vectors, or ValueError saying what to pass.

    diffusers adds the token and `<token>_1 ... <token>_{N-1}` to the tokenizer, and the CLIP tokenizer lower-cases
    every prompt first: a token with capitals no longer matches the lower-cased prompt past its first vector. It
    also refuses a token that is already a CLIP word, and a token with spaces is split."""
    if not token or token != token.strip() or any(c.isspace() for c in token):
        raise ValueError(f"{flag} {token!r}: a token must be one word without spaces, e.g. '<alz>'.")
    if token != token.lower():
        raise ValueError(
            f"{flag} {token!r} has capitals; diffusers lower-cases prompts, so it would use only the first of the "
            f"prefix's vectors. Use {token.lower()!r}."
        )
    if token in tokenizer.encoder or f"{token}</w>" in tokenizer.encoder:
        raise ValueError(
            f"{flag} {token!r} is already in the CLIP vocabulary, so diffusers' load_textual_inversion would "
            f"refuse it; use a new token such as '<{token.strip('<>')}>'."
        )
    return token
