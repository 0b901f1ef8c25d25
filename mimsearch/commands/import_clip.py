"""`mimsearch import-clip`: convert a pretrained CLIP to a checkpoint (mim.model.import_clip)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mim.commandline import CommandParser
from mim.model import import_clip


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(
        prog="mimsearch import-clip",
        description=import_clip.__doc__,
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", type=Path, help="Hugging Face CLIPModel folder (config.json, model.safetensors, ...)")
    src.add_argument("--openclip", type=Path, help="OpenCLIP state dict (.safetensors, or .pt/.bin of tensors only)")
    ap.add_argument(
        "--arch",
        help=f"OpenCLIP architecture: one of {sorted(import_clip.OPENCLIP_ARCHS)} or an OpenCLIP model-config JSON",
    )
    ap.add_argument(
        "--tokenizer",
        choices=import_clip.TOKENIZERS,
        default="folder",
        help="--hf only: the folder's tokenizer files, or CLIP's published vocabulary shipped with this package "
        "(for a folder saved without tokenizer files)",
    )
    ap.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.openclip is not None and not args.arch:
        ap.error("--openclip needs --arch (e.g. ViT-B-32-quickgelu for OpenAI's weights)")
    try:
        if args.hf is not None:
            out = import_clip.import_hf(args.hf, args.out, tokenizer=args.tokenizer)
        else:
            out = import_clip.import_openclip(args.openclip, args.arch, args.out)
    except import_clip.ClipImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(import_clip.describe_import(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
