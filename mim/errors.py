"""One root for every error a user can cause or fix, and the base class of each package.

A `MimError` is a message for a person: it says what was got, what was expected and what to do. The
`mimsearch` entry point prints it as one `error:` line and exits with its `exit_code` (2: the input is wrong, a
flag, a path or a file's content; 1: something failed while running, e.g. no server answering). Anything else
that escapes a command is a bug and keeps its traceback. `--debug` (or MIM_DEBUG=1) shows the traceback of a
MimError too.

Each package has one base, so a caller can catch one package's errors:

    mim.data      DataError       mim.model    ModelError     mim.training  TrainingError
    mim.search    SearchError     mim.serving  ServingError   (client, export, benchmarks: their own bases,
                                                                derived from MimError)

The input-error bases also derive from ValueError, the failure bases from RuntimeError, so code that caught the
builtin kinds keeps working.

May import: nothing of ours.
"""

from __future__ import annotations

import os


class MimError(Exception):
    """Root of the errors meant for the user: the message is the whole report."""

    exit_code = 1


class MimInputError(MimError, ValueError):
    """The input is wrong (a flag, a path, a file's content): exit code 2."""

    exit_code = 2


class MimFailure(MimError, RuntimeError):
    """Something failed while running (a server not answering, a tool missing): exit code 1."""

    exit_code = 1


class DataError(MimInputError):
    """mim.data: a catalog or dataset that cannot be read as one."""


class ModelError(MimInputError):
    """mim.model: a checkpoint, size, tokenizer or pretrained model that cannot be used."""


class TrainingError(MimInputError):
    """mim.training: training or evaluation settings that cannot work on the given data."""


class SearchError(MimFailure):
    """mim.search: a vector store that cannot be opened or written."""


class SearchInputError(SearchError, MimInputError):
    """mim.search: a store location or index setting that is wrong."""

    exit_code = 2  # MimFailure comes first in the method order and would give 1


class ServingError(MimFailure):
    """mim.serving: the Triton side (repository, gallery, server) failed."""


class ServingInputError(ServingError, MimInputError):
    """mim.serving: a repository or gallery given that cannot be used."""

    exit_code = 2  # MimFailure comes first in the method order and would give 1


DEBUG_ENV = "MIM_DEBUG"


def debug_wanted(argv: list[str]) -> bool:
    """True when the user asked for tracebacks: a `--debug` flag or MIM_DEBUG set to anything but 0/empty."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
    """The report: `error: ` and the message (whose first line is the cause; a server's log lines may follow)."""
    return "error: " + (str(error).strip() or type(error).__name__)
