"""`mimsearch dataset`: write a synthetic catalog as a JSON Lines dataset (mim.data.dataset)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mim.commandline import CommandParser
from mim.data import dataset
from mim.data.catalog import load_catalog


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(
        prog="mimsearch dataset",
        description=dataset.__doc__,
    )
    ap.add_argument("--catalog", required=True, help="synthetic catalog folder to export")
    ap.add_argument("--out", required=True, help="JSON Lines file to write inside the catalog folder")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = dataset.write_dataset(load_catalog(args.catalog), args.out)
    except dataset.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
