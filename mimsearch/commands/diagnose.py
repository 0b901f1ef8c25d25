"""`mimsearch diagnose`: what a model's image matches share (mim.training.diagnose)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mim.commandline import CommandParser
from mim.data.dataset import open_catalog
from mim.training import diagnose as lib
from mimsearch.commands import named_paths


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(
        prog="mimsearch diagnose",
        description=lib.__doc__,
    )
    ap.add_argument("--checkpoint", action="append", required=True, help="checkpoint folder (name=path); repeat")
    ap.add_argument("--catalog", default="artifacts/catalog", help="catalog folder or JSON Lines dataset manifest")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"], help="catalog split to evaluate on")
    ap.add_argument("--out", help="also write OUT.md and OUT.json")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        catalog = open_catalog(args.catalog)
        rows = lib.diagnose_checkpoints(named_paths(args.checkpoint), catalog, args.split)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(lib.markdown(rows))
    if args.out:
        lib.write_diagnosis(args.out, rows, args.split)
    return 0


if __name__ == "__main__":
    sys.exit(main())
