"""Export a trained APL prefix for other tools: AUTOMATIC1111 / Forge / ComfyUI embeddings, or diffusers.

python export_prefix.py embeddings/APL-1000.pt --format a1111 --out APL.safetensors      # prompt word: APL
python export_prefix.py embeddings/APL-1000.pt --format diffusers --out apl-diffusers.safetensors
    # diffusers: pipe.load_textual_inversion("apl-diffusers.safetensors", token="<alz>")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.modules.embedding_manager import EmbeddingFileError, EmbeddingManager, read_embedding_file
from ldm.modules.encoders.modules import FrozenCLIPEmbedder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--name", default=None, help="A1111 embedding name (default: the output file name)")
    p.add_argument("--token", default=None, help="diffusers token (default '<alz>'; must not be a CLIP word)")
    return p


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
        _, params, meta = read_embedding_file(args.embedding)
        width = next(iter(params.values())).shape[-1]
        # Only the tokenizer and the width matter for exporting: a one-layer encoder of that width is enough.
        embedder = FrozenCLIPEmbedder(width=width, layers=1, heads=1)
        em = EmbeddingManager.from_file(embedder, args.embedding)
        step = int(meta.get("step") or 0)
        if args.format == "a1111":
            em.export_a1111(out, name=args.name, step=step)
        elif args.format == "diffusers":
            em.export_diffusers(out, token=args.token)
        else:
            em.save(out, step=step, base_model=meta.get("base_model"))
        print(f"wrote {out}")
        return 0
    except (EmbeddingFileError, ValueError, OSError) as e:
        print(f"export_prefix.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
