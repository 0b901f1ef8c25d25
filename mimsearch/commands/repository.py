"""`mimsearch repository`: write or check the generated Triton repository configs (mim.serving.repository)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mim.commandline import CommandParser
from mim.serving import repository as lib


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="mimsearch repository", description=lib.__doc__.split("\n\n")[0])
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="write all generated files")
    action.add_argument("--check", action="store_true", help="list differences from the generator; exit 1 if any")
    p.add_argument("--repository", type=Path, default=lib.DEFAULT_REPOSITORY, help="model repository folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--size", default=lib.DEFAULT_SIZE, help="named size from mim.model.config.SIZES (default: tiny)")
    src.add_argument("--checkpoint", type=Path, help="take the dims from this checkpoint's config.json")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model_cfg, pre_cfg = lib.configs_for(args.size, args.checkpoint)
        # Dims only: the model identity is written by `export.engines.install`, with the artifacts it names.
        if args.write:
            paths = lib.write_repository(args.repository, model_cfg, pre_cfg)
            print(f"wrote {len(paths)} files under {args.repository}")
            return 0
        problems = lib.check_repository(args.repository, model_cfg, pre_cfg)
    except (lib.RepositoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(line)
    if problems:
        print(
            f"{len(problems)} difference(s); run `{lib.WRITE_COMMAND} --repository {args.repository}`", file=sys.stderr
        )
        return 1
    print(f"{args.repository} is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
