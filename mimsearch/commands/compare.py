"""`mimsearch compare`: train DML, 3-tower and 4-tower on the same data and seeds, then compare them
(mim.training.compare)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mim.commandline import CommandParser, at_least
from mim.data.dataset import open_catalog
from mim.training import compare as lib
from mim.training.train import TrainConfig

from .train import add_batch_flags

D = TrainConfig()  # the settings' defaults have one owner


def _seeds(text: str) -> list[int]:
    try:
        return lib.parse_seeds(text)
    except ValueError as e:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(
        prog="mimsearch compare",
        description=lib.__doc__,
    )
    ap.add_argument(
        "--catalog",
        default="artifacts/catalog",
        help="catalog folder (make one with `mimsearch catalog`) or JSON Lines dataset manifest",
    )
    ap.add_argument("--checkpoints", default="artifacts/checkpoints", help="where each run's checkpoint goes")
    ap.add_argument("--steps", type=at_least(1), default=D.steps, help="optimizer steps of each run")
    add_batch_flags(ap)
    ap.add_argument(
        "--jobs",
        type=at_least(1),
        default=1,
        help="train in this many processes at once (the CPU cores are shared out among them); 1: in this one",
    )
    ap.add_argument("--seeds", type=_seeds, default=[0], help="training seeds, e.g. 0,1,2")
    ap.add_argument("--runs", default=None, help=f"subset of {','.join(r[0] for r in lib.RUNS + lib.CONTROLS)}")
    ap.add_argument(
        "--controls",
        action="store_true",
        help="add the equal-budget controls: DML, 3-tower and 4-tower trained directly for twice the steps, and the "
        "progressive 4-tower with one continued schedule",
    )
    ap.add_argument(
        "--eval-every", type=at_least(0), default=0, help="learning-curve points every N steps (0: at the end)"
    )
    ap.add_argument("--size", default=D.size, help="named model size (mim.model.config.SIZES)")
    ap.add_argument("--out", default="artifacts/quality", help="writes OUT.md, OUT.json and OUT.png")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        runs = lib.select_runs(args.runs, args.controls)
    except ValueError as e:
        ap.error(str(e))
    catalog = open_catalog(args.catalog)  # never generated here: `mimsearch catalog` makes one
    t0, c0 = time.time(), time.process_time()
    try:
        base = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            catalog_rows=args.catalog_rows,
            hard_negatives=args.hard_negatives,
            align_weight=args.align_weight,
            size=args.size,
        )
        result = lib.run_comparison(
            catalog,
            Path(args.checkpoints),
            base,
            seeds=args.seeds,
            runs=runs,
            eval_every=args.eval_every,
            progress=not args.no_progress,
            jobs=args.jobs,
            # The validation split, where a catalog has one: choices (the progressive schedule) are made there.
            val=bool(catalog.products_in("val") and catalog.queries_in("val")),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall, cpu = time.time() - t0, time.process_time() - c0 + result["worker_cpu_seconds"]
    command = "mimsearch compare " + " ".join(argv if argv is not None else sys.argv[1:])
    header, recorded = lib.describe(
        catalog, result, base, command=command, seeds=args.seeds, jobs=args.jobs, wall=wall, cpu=cpu
    )
    for path in lib.write_report(Path(args.out), header, result, recorded):
        print(f"wrote {path}", file=sys.stderr)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
