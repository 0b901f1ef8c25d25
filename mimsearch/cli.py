"""`mimsearch`: one command for the whole stack; each subcommand hands its arguments to a module's `main(argv)`.

    mimsearch catalog --out artifacts/catalog
    mimsearch import-clip --hf path/to/clip-vit-base-patch32 --out artifacts/checkpoints/clip
    mimsearch train --catalog artifacts/catalog --objective 3tower --steps 600 --out artifacts/checkpoints/3tower
    mimsearch engines --checkpoint artifacts/checkpoints/3tower      # into artifacts/model_repository
    mimsearch serve --repository artifacts/model_repository --config cpu
    mimsearch index --catalog artifacts/catalog --store gallery.safetensors     # or gallery.db, http://milvus:19530
    mimsearch search --store gallery.safetensors --text "zebra mug"
    mimsearch demo --artifacts artifacts

`mimsearch SUBCOMMAND --help` shows the subcommand's own flags. A mistake is reported as one `error:` line (exit
code 2 for wrong input, 1 for a failure); `mimsearch --debug SUBCOMMAND ...` (or MIM_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mim.commandline import CommandParser
from mim.errors import MimError, debug_wanted, one_line


@dataclass(frozen=True)
class Subcommand:
    module: str  # imported only when the subcommand runs, so `mimsearch --help` stays light (no torch)
    help: str
    prefix: tuple[str, ...] = ()  # arguments put before the user's (a module with subcommands of its own)


SUBCOMMANDS: dict[str, Subcommand] = {
    "catalog": Subcommand("mimsearch.commands.catalog", "generate the synthetic street-to-shop catalog"),
    "dataset": Subcommand(
        "mimsearch.commands.dataset", "write a catalog as a JSON Lines dataset (the format for your own data)"
    ),
    "import-clip": Subcommand(
        "mimsearch.commands.import_clip", "convert a pretrained CLIP (Hugging Face / OpenCLIP) to a checkpoint"
    ),
    "train": Subcommand("mimsearch.commands.train", "train a DML / 3-tower / 4-tower model into a checkpoint"),
    "evaluate": Subcommand(
        "mimsearch.commands.evaluate", "offline retrieval metrics of a checkpoint on a catalog split"
    ),
    "compare": Subcommand("mimsearch.commands.compare", "train and compare DML vs 3-tower vs 4-tower on the same data"),
    "diagnose": Subcommand(
        "mimsearch.commands.diagnose", "what a model's image matches share: attribute precision, top-1 mistakes"
    ),
    "export": Subcommand("export.onnx_export", "export a checkpoint's towers to ONNX (no install)"),
    "engines": Subcommand("export.engines", "export, gate, build TensorRT engines where possible, and install"),
    "repository": Subcommand("mimsearch.commands.repository", "write or check the generated Triton repository configs"),
    "serve": Subcommand("mimsearch.commands.serve", "run the bundled tritonserver on a model repository"),
    "index": Subcommand("client.cli", "embed a gallery through the server into a kNN index", ("index",)),
    "search": Subcommand("client.cli", "search an index by image, text, or image + text", ("search",)),
    "demo": Subcommand("mimsearch.demo", "the whole pipeline end to end on the CPU (make demo)"),
    "bench": Subcommand("benchmarks.run", "every benchmark in one run (make bench / bench-full)"),
    "perf": Subcommand("benchmarks.perf", "perf_analyzer sweeps of the served models"),
    "quality": Subcommand("benchmarks.quality", "retrieval quality through the served path vs in-process"),
    "knn-bench": Subcommand("benchmarks.knn_bench", "exact kNN against faiss"),
    "search-bench": Subcommand("benchmarks.search_bench", "search in one request vs embed + client-side kNN"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(
        prog="mimsearch",
        description=__doc__,
    )
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (also: MIM_DEBUG=1)")
    sub = ap.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for name, cmd in SUBCOMMANDS.items():
        # add_help=False: `mimsearch NAME --help` reaches the module's own parser with every flag it takes.
        sub.add_parser(name, help=cmd.help, add_help=False)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_wanted(argv)
    argv = [a for a in argv if a != "--debug"]  # anywhere: `mimsearch train ... --debug` works too
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help or the "invalid choice" error and exits
        return 2
    cmd = SUBCOMMANDS[argv[0]]
    try:
        module = importlib.import_module(cmd.module)
        rc = module.main([*cmd.prefix, *argv[1:]])
    except MimError as e:
        if debug:
            raise
        print(one_line(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
