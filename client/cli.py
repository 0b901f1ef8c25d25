"""Index a gallery through the served model, and search it (`mimsearch index`, `mimsearch search`).

    mimsearch index  --url 127.0.0.1:8001 --catalog artifacts/catalog --split test --store gallery.safetensors
    mimsearch index  --url ... --images photos/ --manifest photos/items.csv --store gallery.safetensors
    mimsearch index  --url h1:8001,h2:8001 --catalog ... --store http://milvus:19530#products --milvus-index HNSW
    mimsearch search --url ... --store gallery.safetensors --image photo.jpg -k 10
    mimsearch search --url ... --store gallery.db --text "zebra mug" --json
    mimsearch search --url ... --store gallery.safetensors --image photo.jpg --text "in blue" \\
        --mode refine --html out.html
    mimsearch index  --url ... --catalog artifacts/catalog --store gallery.safetensors --install REPO
    mimsearch search --url ... --server-side --image photo.jpg --text "in blue" -k 10

`index` embeds every gallery image with the `embed_image` ensemble and saves a gallery holding the ids, the
embeddings, each item's title/category/image path, and the identity of the embedding model. `--store` picks
where (`mim.search.stores`): a KnnIndex file (*.safetensors, the exact in-process index), a Milvus Lite folder (*.db)
or a Milvus server/cluster URI (http://host:19530#collection, token from $MILVUS_TOKEN). `--out` and `--index`
are older names of `--store`. Indexing is resumable: the partial gallery is saved every few batches, and
rerunning the same command continues where it stopped. `--url` takes several Triton replicas separated by
commas; requests are spread over them and fail over when one stops answering. A manifest for `--images` is
a CSV with a header or a JSONL file with fields id, image (relative to --images), and optionally title and
category.

The model identity (`mim.layout`: a hash of the checkpoint's weights) comes from the server itself: the
installer writes it as the `model_id` parameter of the served encoders, read here through the model-config
API. `--model-id` overrides it. `index` records it in the gallery, and `search` refuses a gallery built with
another model.

`index --install REPO` also installs the finished index as the gallery of REPO's `knn` model (a new version
folder) and asks the server at --url to load it; requests in flight finish on the old gallery. `search
--server-side` then searches in one request through the `search_*` ensembles, with no local index.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mim import contract, layout
from mim.commandline import CommandParser, at_least
from mim.data.catalog import load_catalog
from mim.errors import MimError, MimInputError, one_line
from mim.search.ranking import DEFAULT_REFINE_WEIGHT, REFINE_TOP_N
from mim.search.stores import check_options, describe_locations, gallery_file, open_store

from .html import QueryBlock, render_page, write_page
from .indexing import DEFAULT_SAVE_EVERY, build_index, catalog_items, manifest_items
from .search import MODES, SearchResult, SearchService
from .search_client import SearchClient
from .triton_client import DEFAULT_URL, ClientError, EmbeddingClient


class UsageError(MimInputError):
    """Flags that do not make a command; reported as `error: ...` with exit code 2."""


# --- model identity ---------------------------------------------------------------------------------------------
def served_model_id(client: EmbeddingClient) -> str | None:
    """The identity of the model the server runs: the `model_id` parameter of its image encoder's config."""
    return layout.served_model_id(client.model_config(contract.IMAGE_ENCODER))


def resolve_model_id(args: argparse.Namespace, client: EmbeddingClient) -> tuple[str, str]:
    """(model id, where it came from): --model-id, else the server's. Unknown is an error that says what to do."""
    if args.model_id:
        return args.model_id, "--model-id"
    found = served_model_id(client)
    if found is None:
        raise UsageError(f"{args.command}: {layout.UNKNOWN_MODEL_ID_HELP}")
    return found, f"the server's {contract.IMAGE_ENCODER} config"


# --- output -----------------------------------------------------------------------------------------------------
def format_results(results: Sequence[SearchResult]) -> str:
    lines = [f"{'rank':>4}  {'id':>7}  {'score':>7}  {'category':<10}  title"]
    for r in results:
        lines.append(f"{r.rank:>4}  {r.id:>7}  {r.score:>7.4f}  {(r.category or '-'):<10}  {r.title or '-'}")
    return "\n".join(lines)


def results_json(query: dict, results: Sequence[SearchResult]) -> str:
    return json.dumps({"query": query, "results": [r.to_dict() for r in results]}, indent=2)


# --- commands ---------------------------------------------------------------------------------------------------
def cmd_index(args: argparse.Namespace) -> int:
    if bool(args.catalog) == bool(args.images):
        raise UsageError("index: give exactly one gallery: --catalog DIR, or --images DIR --manifest FILE")
    if args.images and not args.manifest:
        raise UsageError("index: --images needs --manifest FILE (CSV or JSONL with id, image[, title, category])")
    options = check_options(args.store, store_options(args))  # a bad option is refused before the server is asked
    items = (
        catalog_items(load_catalog(args.catalog), args.split)
        if args.catalog
        else manifest_items(args.images, args.manifest)
    )
    with EmbeddingClient(args.url, timeout_s=args.timeout, retries=args.retries, max_batch=args.batch_size) as client:
        client.wait_ready(args.wait)
        model_id, source = resolve_model_id(args, client)
        print(
            f"indexing {len(items)} images from {args.catalog or args.images} into {args.store} "
            f"(model_id {model_id} from {source})",
            file=sys.stderr,
        )
        report = build_index(
            client.embed_images,
            items,
            args.store,
            model_id=model_id,
            batch_size=args.batch_size,
            save_every=args.save_every,
            max_batches=args.max_batches,
            progress=not args.no_progress,
            store_options=options,
            skip_bad=args.skip_bad,
        )
    try:
        print(report.summary())
        if not report.complete:
            return 3
        if args.install:  # the served knn model loads a KnnIndex file: the store's own, or a copy of it
            with tempfile.TemporaryDirectory(prefix="gallery-") as tmp:
                path = gallery_file(report.index, Path(tmp) / "gallery.safetensors")
                install_and_reload(path, args.install, args.url, args.timeout)
        return 0
    finally:
        report.index.close()


def store_options(args: argparse.Namespace) -> dict[str, str]:
    """--store-option KEY=VALUE flags (and the --milvus-index shorthand) -> the store's options, untouched."""
    options = {}
    for item in args.store_option or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--store-option {item!r}: expected KEY=VALUE (e.g. index=HNSW:ef=128)")
        options[key.strip()] = value
    if args.milvus_index:
        options["index"] = args.milvus_index
    return options


def install_and_reload(index_path: Path, repo: Path, url: str, timeout: float) -> None:
    """Install the index as the repository's next gallery, then have the server at `url` load it."""
    from mim.serving.gallery import install_gallery

    version = install_gallery(index_path, repo)
    print(f"installed {index_path} as {version}")
    with SearchClient(url, timeout_s=timeout) as client:
        try:
            client.reload_gallery()
        except ClientError as e:
            print(
                f"warning: the server at {url} did not load it ({e.server_message or e}); a server with explicit "
                "model control (mimsearch serve) loads it now, others at their next start",
                file=sys.stderr,
            )
            return
    print(f"the server at {url} now serves it")


def _report(
    args: argparse.Namespace,
    query: dict,
    results: Sequence[SearchResult],
    image: bytes | None,
    mode: str,
    subtitle: str,
) -> int:
    """Print a search's results (table or JSON) and write the HTML page when --html asks for one."""
    if args.html:
        label = " + ".join(x for x in (args.image and Path(args.image).name, args.text and repr(args.text)) if x)
        page = render_page([QueryBlock(label, results, image=image, text=args.text, mode=mode)], subtitle=subtitle)
        write_page(args.html, page)
    print(results_json(query, results) if args.json else format_results(results))
    if args.html and not args.json:
        print(f"HTML page: {args.html}")
    return 0


def cmd_search_server_side(args: argparse.Namespace) -> int:
    """Search in one request per query through the search_* ensembles; the gallery is the server's."""
    if args.store is not None:
        raise UsageError("search: --server-side searches the server's gallery; drop --store")
    if args.image is not None and args.text is not None and args.mode != "fusion":
        raise UsageError("search: --server-side does fusion only; use --store with --mode refine")
    image = Path(args.image).read_bytes() if args.image else None
    with SearchClient(args.url, timeout_s=args.timeout, retries=args.retries) as client:
        client.wait_ready(args.wait)
        if image is not None and args.text is not None:
            results = client.by_image_text(
                image, args.text, args.k, image_weight=args.image_weight, categories=args.category
            )
            mode = "fusion"
        elif image is not None:
            results, mode = client.by_image(image, args.k, categories=args.category), "image"
        else:
            results, mode = client.by_text(args.text, args.k, categories=args.category), "text"
    query = {"image": args.image, "text": args.text, "mode": mode, "k": args.k, "server_side": True}
    return _report(args, query, results, image, mode, f"served gallery at {args.url} (search in one request)")


def cmd_search(args: argparse.Namespace) -> int:
    if args.image is None and args.text is None:
        raise UsageError("search: give --image FILE, --text TEXT, or both")
    if args.server_side:
        return cmd_search_server_side(args)
    if args.store is None:
        raise UsageError(f"search: give --store (the gallery: {describe_locations()}), or --server-side")
    image = Path(args.image).read_bytes() if args.image else None
    with EmbeddingClient(args.url, timeout_s=args.timeout, retries=args.retries) as client:
        client.wait_ready(args.wait)
        expected, _ = resolve_model_id(args, client)
        index = open_store(args.store, expected_model_id=expected)
        service = SearchService(client, index)
        try:
            if image is not None and args.text is not None:
                results = service.by_image_text(
                    image,
                    args.text,
                    args.k,
                    mode=args.mode,
                    image_weight=args.image_weight,
                    text_weight=args.text_weight,
                    top_n=args.top_n,
                    categories=args.category,
                )
                mode = args.mode
            elif image is not None:
                results, mode = service.by_image(image, args.k, categories=args.category), "image"
            else:
                results, mode = service.by_text(args.text, args.k, categories=args.category), "text"
        finally:
            index.close()
    query = {
        "image": args.image,
        "text": args.text,
        "mode": mode,
        "k": args.k,
        "store": str(args.store),
        "model_id": index.model_id,
    }
    return _report(
        args, query, results, image, mode, f"gallery {args.store} ({index.count} items, model {index.model_id})"
    )


# --- parser -----------------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="Triton gRPC address host:port, or several replicas as h1:p1,h2:p2 (default %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=3, help="extra attempts when the server is UNAVAILABLE")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the server to be ready")
    p.add_argument("--model-id", help="identity of the embedding model (default: the served model's, from the server)")


def build_parser() -> argparse.ArgumentParser:
    ap = CommandParser(
        prog="mimsearch",
        description=__doc__,
    )
    sub = ap.add_subparsers(dest="command", required=True)

    ix = sub.add_parser(
        "index",
        help="embed a gallery through the server into a store (resumable)",
        description="Embed a gallery (a catalog split, or a folder of images with a manifest) through the server's "
        "embed_image ensemble into a store: a KnnIndex file or a Milvus collection. Rerun the same command to "
        "continue an interrupted run; --install makes the index the server's gallery for server-side search.",
    )
    _common(ix)
    ix.add_argument("--catalog", help="synthetic catalog folder (mimsearch catalog)")
    ix.add_argument(
        "--split", default="test", choices=["train", "val", "test", "all"], help="catalog products to index"
    )
    ix.add_argument("--images", help="folder of images (with --manifest)")
    ix.add_argument("--manifest", help="CSV/JSONL with id, image[, title, category] (with --images)")
    ix.add_argument("--store", "--out", dest="store", required=True, help=f"where: {describe_locations()}")
    ix.add_argument(
        "--store-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option handed to the store as it is (repeatable); see mim.search.stores.REGISTRY's classes",
    )
    ix.add_argument(
        "--milvus-index",
        help="shorthand for --store-option index=SPEC, the index of a new Milvus collection: FLAT (default, exact), "
        "HNSW[:ef=64,M=16], IVF_FLAT[:nlist=N,nprobe=16], GPU_CAGRA (Milvus server with GPUs)",
    )
    ix.add_argument("--batch-size", type=at_least(1), default=contract.MAX_BATCH_SIZE, help="images per request")
    ix.add_argument(
        "--save-every", type=at_least(1), default=DEFAULT_SAVE_EVERY, help="batches between saves of the partial index"
    )
    ix.add_argument(
        "--max-batches", type=at_least(1), help="stop (saved, exit 3) after this many batches; rerun to continue"
    )
    ix.add_argument("--no-progress", action="store_true", help="no progress bar")
    ix.add_argument(
        "--skip-bad", action="store_true", help="leave out images the server refuses and list them (default: stop)"
    )
    ix.add_argument(
        "--install",
        type=Path,
        metavar="REPO",
        help="also install the index as the gallery of REPO's knn model and load it on the server at --url",
    )
    ix.set_defaults(func=cmd_index)

    se = sub.add_parser(
        "search",
        help="search a gallery by image, text, or image + text",
        description="Search a gallery by image, by text, or by image + text (fusion, or refine: image candidates "
        "re-ranked by the text), embedding the query through the server; --server-side searches the server's "
        "installed gallery in one request instead.",
    )
    _common(se)
    se.add_argument(
        "--store", "--index", dest="store", help=f"the gallery: {describe_locations()}; not with --server-side"
    )
    se.add_argument(
        "--server-side", action="store_true", help="search in one request through the server's search_* ensembles"
    )
    se.add_argument("--image", help="query image file")
    se.add_argument("--text", help="query text; with --image, the reformulation ('in blue')")
    se.add_argument("--mode", choices=MODES, default="fusion", help="image + text: fusion or refine")
    se.add_argument("-k", type=at_least(1), default=contract.DEFAULT_K, help="results to return")
    se.add_argument(
        "--image-weight", type=float, default=contract.DEFAULT_IMAGE_WEIGHT, help="fusion: weight a of the image"
    )
    se.add_argument(
        "--text-weight", type=float, default=DEFAULT_REFINE_WEIGHT, help="refine: weight b of cos(text, product)"
    )
    se.add_argument("--top-n", type=at_least(1), default=REFINE_TOP_N, help="refine: image candidates re-ranked")
    se.add_argument("--category", action="append", help="only this category (repeatable; every query kind)")
    se.add_argument("--json", action="store_true", help="print JSON (query + results) instead of a table")
    se.add_argument("--html", type=Path, help="also write a self-contained HTML results page")
    se.set_defaults(func=cmd_search)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MimError as e:  # the library's errors: 2 for wrong input, 1 for a failure (e.g. no server)
        print(one_line(e), file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
