"""The `mimsearch` subcommands that drive the core package, one thin module each.

Each module is a `main(argv=None) -> int` that parses its flags, calls library functions of `mim`, prints what
they return and maps the library's input errors to exit code 2. No decision or computation lives here: what a
test or another program needs is a library call. The libraries under `mim/` hold no argument parsing.

May import: `mim` (any subpackage); never `client`, `export` or `benchmarks`.
"""

from __future__ import annotations

from pathlib import Path


def named_paths(specs: list[str]) -> dict[str, str]:
    """Repeated `--checkpoint [name=]path` flags -> name -> path; the folder's name where none is given."""
    named = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        named[name or Path(path).name] = path
    return named
