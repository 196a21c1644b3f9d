"""Export a trained APL prefix for other tools: AUTOMATIC1111 / Forge / ComfyUI embeddings, or diffusers.

python export_prefix.py embeddings/APL-1000.pt --format a1111 --out APL.safetensors      # prompt word: APL
python export_prefix.py embeddings/APL-1000.pt --format diffusers --out apl-diffusers.safetensors
    # diffusers: pipe.load_textual_inversion("apl-diffusers.safetensors", token="<alz>")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.modules.embedding_manager import (
    EmbeddingFileError,
    EmbeddingManager,
    check_diffusers_token,
    read_embedding_file,
    width_family,
)
from ldm.modules.encoders.modules import FrozenCLIPEmbedder
from ldm.modules.prefix import is_sdxl_embedding


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="export_prefix.py",  # the same name in messages when main() is called from Python
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("embedding", help="APL prefix file (.pt or .safetensors) written by train.py")
    p.add_argument(
        "--format",
        choices=["a1111", "diffusers", "pt", "safetensors"],
        required=True,
        help="a1111: AUTOMATIC1111 embedding (.pt/.safetensors); diffusers: textual-inversion file "
        "(.safetensors/.bin); pt/safetensors: APL's own formats",
    )
    p.add_argument(
        "--out", required=True, help="output file; with --format pt/safetensors it must end in .pt/.safetensors"
    )
    p.add_argument(
        "--name",
        default=None,
        help="name stored in the A1111 file, which diffusers uses as its token when loading it without token= "
        "(default '<file name in lower case>'; lower case, no spaces, not a CLIP word). A1111, Forge and ComfyUI take "
        "the prompt word from the file name",
    )
    p.add_argument(
        "--token",
        default=None,
        help="diffusers token (default '<alz>'; lower case, no spaces, not a CLIP word: diffusers lower-cases "
        "prompts, and a token with capitals would use only the first vector)",
    )
    p.add_argument(
        "--base",
        choices=["auto", *BASES],
        default="auto",
        help="model family the export is for: sd1 = SD v1.x (768-d text vectors), sd2 = SD 2.x (1024-d), sdxl = "
        "SDXL (768-d clip_l + 1280-d clip_g); auto = the family the prefix's width belongs to. A prefix of another "
        "width is refused (the target tools would skip, drop or reject it)",
    )
    p.add_argument(
        "--force", action="store_true", help="write the export even when the prefix's width fits no --base"
    )
    return p


# Export targets and the text widths their loaders expect (SDXL: clip_l + clip_g).
BASES = {"sd1": (768,), "sd2": (1024,), "sdxl": (768, 1280)}


def check_base(widths: tuple[int, ...], base: str, force: bool, source: str) -> None:
    """A prefix is exported only for the model family its width belongs to (unless --force)."""
    fits = [b for b, w in BASES.items() if w == widths]
    if force or (fits and base in ("auto", fits[0])):
        return
    shown = "+".join(map(str, widths))
    family = width_family(widths[0]) if len(widths) == 1 else "SDXL" if fits else "no released model"
    if base == "auto":
        raise ValueError(
            f"{source} holds {shown}-d vectors ({family}), which fit no export target (SD v1.x 768, SD 2.x 1024, "
            "SDXL 768+1280): A1111/Forge would skip the file, ComfyUI drop it, diffusers refuse it. --force writes "
            "it anyway."
        )
    want = "+".join(map(str, BASES[base]))
    hint = f"Pass --base {fits[0]} if it is for that family" if fits else "It fits none of the export targets"
    raise ValueError(
        f"{source} holds {shown}-d vectors ({family}), but --base {base} models take {want}-d ones: A1111/Forge "
        f"would skip the file, ComfyUI drop it with a warning, diffusers refuse it. {hint}; --force writes it anyway."
    )


def check_out_suffix(out: Path, fmt: str) -> None:
    """APL's own formats are chosen by the file suffix: --out must end in the one --format names."""
    if fmt in ("pt", "safetensors") and out.suffix.lower() != f".{fmt}":
        other = "safetensors" if fmt == "pt" else "pt"
        hint = f" (or --format {other})" if out.suffix.lower() == f".{other}" else ""
        raise ValueError(
            f"--format {fmt} writes a .{fmt} file but --out {out} "
            f"{f'ends in {out.suffix!r}' if out.suffix else 'has no suffix'}; "
            f"use --out {out.with_suffix('.' + fmt)}{hint}"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = Path(args.out)
        check_out_suffix(out, args.format)
        if is_sdxl_embedding(args.embedding):
            return _export_sdxl(args, out)
        _, params, meta = read_embedding_file(args.embedding)
        width = next(iter(params.values())).shape[-1]
        # Only the tokenizer and the width matter for exporting: a one-layer encoder of that width is enough.
        embedder = FrozenCLIPEmbedder(width=width, layers=1, heads=1)
        em = EmbeddingManager.from_file(embedder, args.embedding)
        if args.format in ("a1111", "diffusers"):  # other tools' formats; APL's own keep any width
            check_base((width,), args.base, args.force, args.embedding)
        step = int(meta.get("step") or 0)
        base_model = meta.get("base_model") or None
        if args.format == "a1111":
            em.export_a1111(out, name=args.name, step=step, base_model=base_model)
        elif args.format == "diffusers":
            em.export_diffusers(out, token=args.token, base_model=base_model)
        else:
            em.save(out, step=step, base_model=base_model)
        print(f"wrote {out}: {em.num_vectors_per_token} vectors, {width}-d ({width_family(width)})")
        return 0
    except (EmbeddingFileError, ValueError, OSError) as e:
        print(f"export_prefix.py: error: {e}", file=sys.stderr)
        return 2


def _export_sdxl(args: argparse.Namespace, out: Path) -> int:
    """An SDXL prefix (clip_l + clip_g): A1111/Forge/ComfyUI's SDXL file, or one diffusers file per encoder."""
    from ldm.modules.encoders.tokenizer import CLIPTokenizer
    from ldm.modules.prefix import export_sdxl_diffusers, read_sdxl_embedding, save_sdxl

    vectors, meta = read_sdxl_embedding(args.embedding)
    widths = (vectors["clip_l"].shape[1], vectors["clip_g"].shape[1])
    if args.format in ("a1111", "diffusers"):
        check_base(widths, args.base, args.force, args.embedding)
    step, base_model = int(meta.get("step") or 0), meta.get("base_model") or None
    placeholder = (meta.get("placeholders") or ["alz"])[0]
    if args.format == "diffusers":
        token = check_diffusers_token(args.token or f"<{placeholder}>", CLIPTokenizer(), "--token")
        written = export_sdxl_diffusers(vectors, out, token, base_model)
        print(f"wrote {' and '.join(map(str, written))}: load each with load_textual_inversion(..., token={token!r}, "
              "text_encoder=..., tokenizer=...) for text_encoder/tokenizer and text_encoder_2/tokenizer_2")
        return 0
    token_id = (meta.get("token_ids") or {}).get(placeholder)
    save_sdxl(vectors, out, placeholder, token_id, step=step, base_model=base_model)
    print(f"wrote {out}: {vectors['clip_l'].shape[0]} vectors per encoder, {widths[0]}+{widths[1]}-d (SDXL)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
