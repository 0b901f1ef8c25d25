"""`mimsearch catalog`: generate the synthetic street-to-shop catalog (mim.data.synth)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import fields

from mim.commandline import CommandParser, at_least
from mim.data import synth
from mim.data.catalog import summary

D = synth.CatalogParams()  # the parameters' defaults have one owner


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(prog="mimsearch catalog", description=synth.__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="catalog root directory")
    ap.add_argument("--seed", type=int, default=D.seed, help="seed of the products, photos and splits")
    ap.add_argument(
        "--image-size", type=at_least(32), default=D.image_size, help="side of the square images, in pixels"
    )
    ap.add_argument(
        "--n-train-queries", type=int, default=D.n_train_queries, help="query photos per paired train product"
    )
    ap.add_argument("--n-eval-queries", type=int, default=D.n_eval_queries, help="query photos per val/test product")
    ap.add_argument("--categories", default=None, help=f"comma-separated subset of {','.join(synth.CATEGORIES)}")
    ap.add_argument("--patterns", default=None, help=f"comma-separated subset of {','.join(synth.PATTERNS)}")
    ap.add_argument("--colours", default=None, help=f"comma-separated subset of {','.join(synth.COLOURS)}")
    ap.add_argument("--variants", type=int, default=D.variants, help="models per category (products per combo)")
    ap.add_argument(
        "--street-fraction",
        type=float,
        default=D.street_fraction,
        help="share of training products with street photos (val/test products always have them)",
    )
    ap.add_argument(
        "--street-layout",
        choices=list(synth.STREET_LAYOUTS),
        default=D.street_layout,
        help="subject: the product fills most of its street photo; crowded: distractors as big as it (format 3)",
    )
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching catalog exists")
    ap.add_argument("--sheet", default=None, help="also save a contact sheet PNG of test products here")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        params = synth.CatalogParams(
            **{f.name: getattr(args, f.name) for f in fields(synth.CatalogParams) if f.name != "split"}
        )
        make = synth.generate_catalog if args.force else synth.ensure_catalog
        cat = make(args.out, params, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(cat))
    print(f"  ready in {time.perf_counter() - t0:.1f}s")
    if args.sheet:
        print(f"  contact sheet: {synth.save_contact_sheet(cat, args.sheet)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
