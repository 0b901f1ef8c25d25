"""`mimsearch train`: train a DML / 3-tower / 4-tower model into a checkpoint (mim.training.train)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from mim.commandline import CommandParser, at_least
from mim.model.config import SIZES
from mim.model.losses import OBJECTIVES
from mim.training import train as lib

D = lib.TrainConfig()  # the settings' defaults have one owner


def add_batch_flags(ap: argparse.ArgumentParser) -> None:
    """The flags that shape a training batch and its loss, shared by `train` and `compare` (defaults:
    TrainConfig's)."""
    ap.add_argument(
        "--batch-size",
        type=at_least(2),
        default=D.batch_size,
        help="street-to-shop pairs per batch (at most the training products with street photos)",
    )
    ap.add_argument(
        "--catalog-rows",
        type=at_least(0),
        default=D.catalog_rows,
        help="products without street photos added per batch to the photo-title term (0: pairs only)",
    )
    ap.add_argument(
        "--hard-negatives",
        action=argparse.BooleanOptionalAction,
        default=D.hard_negatives,
        help="compose batches of look-alikes of other categories (same pattern or colour)",
    )
    ap.add_argument(
        "--align-weight",
        type=at_least(0.0, float),
        default=D.align_weight,
        help="weight of every image-text term (q-t, p-t, q-s, p-s) next to the image-image term's 1.0",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(
        prog="mimsearch train",
        description=lib.__doc__,
    )
    ap.add_argument(
        "--catalog",
        default="artifacts/catalog",
        help="catalog folder (make one with `mimsearch catalog`), or a JSON Lines dataset manifest (`mimsearch "
        "dataset` writes an example)",
    )
    ap.add_argument("--size", default=D.size, choices=sorted(SIZES), help="named model size for a new model")
    ap.add_argument("--objective", choices=OBJECTIVES, default=D.objective, help="training objective")
    ap.add_argument("--out", required=True, help="checkpoint folder to write (refused if not empty, see --resume)")
    ap.add_argument(
        "--init-from",
        help="start from this checkpoint's weights, tokenizer and preprocessing (e.g. 4-tower from 3-tower, or an "
        "imported CLIP: mimsearch import-clip)",
    )
    again = ap.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    again.add_argument("--overwrite", action="store_true", help="train from scratch over a non-empty --out")
    ap.add_argument("--steps", type=at_least(1), default=D.steps, help="optimizer steps in all (with --resume too)")
    add_batch_flags(ap)
    ap.add_argument("--lr", type=at_least(0.0, float), default=D.lr, help="peak learning rate (AdamW)")
    ap.add_argument("--weight-decay", type=at_least(0.0, float), default=D.weight_decay, help="AdamW weight decay")
    ap.add_argument("--warmup", type=at_least(0), default=D.warmup, help="linear warm-up steps before the cosine decay")
    ap.add_argument(
        "--schedule-steps",
        type=at_least(0),
        default=D.schedule_steps,
        help="length of the warm-up + cosine schedule this run is part of (0: --steps)",
    )
    ap.add_argument(
        "--schedule-start",
        type=at_least(0),
        default=D.schedule_start,
        help="the schedule step this run starts at: continue --init-from's schedule (and optimizer state) there",
    )
    ap.add_argument("--seed", type=int, default=D.seed, help="seed of the initialisation and of the batches")
    ap.add_argument("--save-every", type=at_least(1), default=200, help="write the checkpoint every N steps")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when torch sees it")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lib.check_out_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    config = lib.TrainConfig(**{f.name: getattr(args, f.name) for f in fields(lib.TrainConfig)})
    lib.train(
        config,
        catalog=args.catalog,
        out=args.out,
        init_from=args.init_from,
        resume=args.resume,
        save_every=args.save_every,
        device=args.device,
        progress=not args.no_progress,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
