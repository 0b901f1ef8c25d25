"""`mimsearch train`: train a DML / 3-tower / 4-tower model into a checkpoint (mim.training.train)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields

from mim.model.losses import OBJECTIVES
from mim.training import train as lib

D = lib.TrainConfig()  # the settings' defaults have one owner


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mimsearch train", description=lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--catalog",
        default="artifacts/catalog",
        help="catalog folder (generated if missing), or a JSON Lines dataset manifest (mim/data/dataset.py)",
    )
    ap.add_argument("--catalog-seed", type=int, default=0)
    ap.add_argument("--size", default=D.size, help="named model size (mim.model.config.SIZES)")
    ap.add_argument("--objective", choices=OBJECTIVES, default=D.objective)
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument(
        "--init-from",
        help="start from this checkpoint's weights, tokenizer and preprocessing (e.g. 4-tower from 3-tower, or an "
        "imported CLIP: mimsearch import-clip)",
    )
    ap.add_argument("--resume", action="store_true", help="continue from --out if it holds a checkpoint")
    ap.add_argument("--steps", type=int, default=D.steps)
    ap.add_argument("--batch-size", type=int, default=D.batch_size, help="street-to-shop pairs per batch")
    ap.add_argument(
        "--catalog-rows",
        type=int,
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
        type=float,
        default=D.align_weight,
        help="weight of every image-text term (q-t, p-t, q-s, p-s) next to the image-image term's 1.0",
    )
    ap.add_argument("--lr", type=float, default=D.lr)
    ap.add_argument("--weight-decay", type=float, default=D.weight_decay)
    ap.add_argument("--warmup", type=int, default=D.warmup)
    ap.add_argument("--seed", type=int, default=D.seed)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = lib.TrainConfig(**{f.name: getattr(args, f.name) for f in fields(lib.TrainConfig)})
    lib.train(
        config,
        catalog=args.catalog,
        out=args.out,
        init_from=args.init_from,
        resume=args.resume,
        catalog_seed=args.catalog_seed,
        save_every=args.save_every,
        device=args.device,
        progress=not args.no_progress,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
