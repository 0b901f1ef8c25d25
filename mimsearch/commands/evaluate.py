"""`mimsearch evaluate`: offline retrieval metrics of checkpoints on a catalog split (mim.training.evaluate)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mim.commandline import CommandParser
from mim.data.dataset import open_catalog
from mim.training import evaluate as lib
from mimsearch.commands import named_paths


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(
        prog="mimsearch evaluate",
        description=lib.__doc__,
    )
    ap.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="checkpoint folder; repeat to compare (name=path also works)",
    )
    ap.add_argument("--catalog", default="artifacts/catalog", help="catalog folder or JSON Lines dataset manifest")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"], help="catalog split to evaluate on")
    ap.add_argument("--out", help="write OUT.md and OUT.json")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = lib.evaluate_checkpoints(named_paths(args.checkpoint), open_catalog(args.catalog), args.split)
    print(lib.markdown_table(rows))
    if args.out:
        command = "mimsearch evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
        lib.write_results(args.out, rows, f"Split: {args.split}; command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
