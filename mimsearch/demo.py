"""The whole stack end to end on the CPU (`make demo`):

    mimsearch demo --artifacts artifacts [--steps 600] [--quick]      (or python -m mimsearch.demo)

 1. catalog   generate (or reuse) the synthetic street-to-shop catalog
 2. train     train the tiny 3-tower model and the image-only DML baseline (reuses checkpoints trained that far)
 3. export    export the towers to ONNX and install them into a COPY of model_repository/ under the artifacts
 4. serve     start the bundled tritonserver on 127.0.0.1 with the CPU configs
 5. index     embed the test-split gallery through the `embed_image` ensemble into a gallery store (`--store`:
              the exact KnnIndex file by default, or a Milvus Lite folder / Milvus URI); a KnnIndex file is also
              installed as the gallery of the server's `knn` model
 6. search    a few image, text and image + text (fusion and refine) searches; one of each kind also in one
              request through the search_* ensembles, printed next to the client-side result
 7. quality   Recall@1/10 of the served path on the test queries next to the in-process torch figures
 8. page      a self-contained HTML page of the searches, and the same street photos ranked by DML and by
              3-tower side by side (in-process), with results of another category marked

Everything lands under --artifacts; a rerun reuses the catalog, the checkpoint, the export and the index when
they are current. `--quick` uses a small catalog and a short training run (tests; a smoke check in ~1 minute).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from client.html import ComparisonBlock, QueryBlock, TableBlock, TextBlock, render_page, write_page
from client.indexing import build_index, catalog_items
from client.search import SearchResult, SearchService
from client.search_client import SearchClient
from client.triton_client import EmbeddingClient
from mim.commandline import CommandParser, at_least
from mim.data.catalog import Catalog, QueryPhoto
from mim.data.synth import ensure_catalog
from mim.errors import MimInputError
from mim.model.checkpoint import Checkpoint, load_checkpoint
from mim.search.embedding import TorchEmbedder
from mim.search.stores import VectorStore, delete_store, gallery_file, open_store, store_exists
from mim.serving.repository import prepare_repository
from mim.serving.server import TritonServer
from mim.training.compare import rank_gallery
from mim.training.evaluate import evaluate_per_query
from mim.training.stats import paired_difference
from mim.training.train import TrainConfig, train

SHOW_K = 5  # results printed per demo search (the page shows SHOW_K * 2)
METRICS = (
    "image R@1",
    "image R@10",
    "image catP@10",
    "title R@1",
    "mm-fusion R@1",
    "mm-fusion R@10",
    "mm-refine R@1",
    "mm-refine R@10",
)


@dataclass(frozen=True)
class DemoSettings:
    """Catalog and training sizes. The full demo uses the default catalog (1,920 products, 128 px) and the
    Makefile's 600 steps; --quick shrinks both so a test runs it in about a minute."""

    catalog: dict
    steps: int
    batch_size: int
    check_export: bool = True

    @classmethod
    def full(cls, steps: int | None) -> DemoSettings:
        return cls(catalog={"seed": 0}, steps=600 if steps is None else steps, batch_size=64)

    @classmethod
    def quick(cls, steps: int | None) -> DemoSettings:
        # 4 categories x 3 patterns x 3 colours = 36 products at 64 px, one model each, all with street photos,
        # split half/half (16 train, 20 test) so the test gallery holds more than the 10 results Recall@10 and
        # catP@10 need.
        small = {
            "seed": 0,
            "image_size": 64,
            "categories": ["mug", "shirt", "shoe", "bag"],
            "patterns": ["solid", "stripes", "dots"],
            "colours": ["red", "blue", "green"],
            "split": (0.5, 0.0, 0.5),
            "variants": 1,
            "street_fraction": 1.0,
        }
        return cls(catalog=small, steps=20 if steps is None else steps, batch_size=16, check_export=False)


class Steps:
    """Numbered step headers with the time each step took."""

    def __init__(self, total: int, out: Callable[[str], None] = print) -> None:
        self.total, self.n, self.out = total, 0, out
        self.t0 = self.t_step = time.monotonic()

    def __call__(self, title: str) -> None:
        now = time.monotonic()
        if self.n:
            self.out(f"    ({now - self.t_step:.1f}s)")
        self.n, self.t_step = self.n + 1, now
        self.out(f"\n==> [{self.n}/{self.total}] {title}")

    def done(self) -> float:
        now = time.monotonic()
        self.out(f"    ({now - self.t_step:.1f}s)")
        return now - self.t0


# --- the steps ----------------------------------------------------------------------------------------------------
def export_and_install(art: Path, ckpt: Path, check: bool = True) -> Path:
    """Copy the committed repository (configs, model.py files) to art/model_repository and install the export
    of `ckpt` into it; the export is redone only when art/export holds another checkpoint's.
    `check=False` skips the exporter's torch-vs-ONNX parity checks (--quick; the tests run them)."""
    from export.engines import build_and_install

    repo = prepare_repository(art / "model_repository")
    report = build_and_install(ckpt, repo, export_dir=art / "export", check=check, reuse_export=True)
    for line in report.lines():
        print(f"    {line}")
    return repo


def index_gallery(
    client: EmbeddingClient, catalog: Catalog, location: str | Path, model_id: str, progress: bool
) -> VectorStore:
    if store_exists(location):
        try:
            open_store(location, expected_model_id=model_id).close()
        except ValueError as e:
            print(f"    {location} is from another model or damaged ({e}); rebuilding it")
            delete_store(location)
    report = build_index(
        client.embed_images, catalog_items(catalog, "test"), location, model_id=model_id, progress=progress
    )
    print(f"    {report.summary()}")
    return report.index


@dataclass
class DemoSearch:
    label: str
    run: Callable[[], list[SearchResult]]
    image: bytes | None = None
    text: str | None = None
    mode: str | None = None
    expected_id: int | None = None
    expected: str | None = None  # the expected product in words, shown on the page


def _product_words(catalog: Catalog, product_id: int) -> str:
    p = catalog.product(product_id)
    return f"{p.title} (id {p.product_id}); marked green when it is among the results"


def demo_searches(service: SearchService, catalog: Catalog, k: int) -> list[DemoSearch]:
    """Two photo queries, two text queries, and one reformulation searched both by fusion and by refine."""
    queries = catalog.queries_in("test")
    refs = catalog.reformulations_in("test")
    out: list[DemoSearch] = []
    # One street photo of each of the first two categories, then two different typed queries.
    first_of = {}
    for q in queries:
        first_of.setdefault(catalog.product(q.product_id).category, q)
    for q in list(first_of.values())[:2]:
        img = catalog.read_bytes(q.image)
        p = catalog.product(q.product_id)
        out.append(
            DemoSearch(
                f"Street photo of a {p.category}: find it in the catalog",
                lambda img=img: service.by_image(img, k),
                img,
                None,
                "image",
                q.product_id,
                _product_words(catalog, q.product_id),
            )
        )
    texts = list(dict.fromkeys(q.short_text for q in reversed(queries)))[:2]
    for t in texts:
        out.append(
            DemoSearch(
                f"Typed query {t!r}",
                lambda t=t: service.by_text(t, k),
                None,
                t,
                "text",
                None,
                "no single one; every product whose title fits the words is a right answer",
            )
        )
    if refs:
        r = refs[0]
        q = next(x for x in queries if x.query_id == r.query_id)
        img = catalog.read_bytes(q.image)
        for mode in ("fusion", "refine"):
            out.append(
                DemoSearch(
                    f"Photo of a {catalog.product(r.source_product_id).title} + {r.text!r} ({mode})",
                    lambda img=img, t=r.text, m=mode: service.by_image_text(img, t, k, mode=m),
                    img,
                    r.text,
                    mode,
                    r.target_product_id,
                    _product_words(catalog, r.target_product_id),
                )
            )
    return out


def comparison_blocks(
    catalog: Catalog, checkpoints: Sequence[tuple[str, Checkpoint]], n_queries: int, k: int
) -> list[ComparisonBlock]:
    """The first test street photo of each of the first `n_queries` categories (in catalog order, not chosen by
    result), ranked over the test gallery by each model in-process."""
    first_of: dict[str, QueryPhoto] = {}
    for q in catalog.queries_in("test"):
        first_of.setdefault(catalog.product(q.product_id).category, q)
    queries = list(first_of.values())[:n_queries]
    images = [catalog.read_bytes(q.image) for q in queries]
    columns = []
    for _, ck in checkpoints:
        ids, scores = rank_gallery(ck, catalog, images, k)
        columns.append(
            [
                [_result(catalog, r + 1, int(i), float(sc)) for r, (i, sc) in enumerate(zip(row_i, row_s))]
                for row_i, row_s in zip(ids, scores)
            ]
        )
    blocks = []
    for j, q in enumerate(queries):
        p = catalog.product(q.product_id)
        blocks.append(
            ComparisonBlock(
                f"The same street photo of a {p.category}, ranked by each model",
                [(name, columns[m][j]) for m, (name, _) in enumerate(checkpoints)],
                image=images[j],
                expected_id=p.product_id,
                expected_category=p.category,
            )
        )
    return blocks


def _result(catalog: Catalog, rank: int, product_id: int, score: float) -> SearchResult:
    p = catalog.product(product_id)
    return SearchResult(rank, product_id, score, p.title, p.category, str(catalog.path(p.image)))


def print_results(s: DemoSearch, results: Sequence[SearchResult]) -> None:
    want = f" (correct product: {s.expected_id})" if s.expected_id is not None else ""
    print(f"  {s.label}{want}")
    for r in results[:SHOW_K]:
        mark = " <- correct" if r.id == s.expected_id else ""
        print(f"    {r.rank:>2}. {r.score:7.4f}  [{r.id:>4}] {r.title}{mark}")


def install_served_gallery(url: str, repo: Path, index_path: Path) -> None:
    """The index becomes the gallery of the server's `knn` model (a new version, loaded without a restart)."""
    from mim.serving.gallery import install_gallery

    version = install_gallery(index_path, repo)
    with SearchClient(url, timeout_s=120) as client:
        client.reload_gallery()
    print(f"    installed as {version} and loaded: the search_* ensembles now search it")


def served_side_by_side(client: SearchClient, s: DemoSearch, local: Sequence[SearchResult]) -> bool:
    """The same search in one request (search_* ensemble) printed next to the client-side result; True when
    both return the same ids."""
    k = len(local)
    if s.mode == "image":
        served, model = client.by_image(s.image, k), "search_image"
    elif s.mode == "text":
        served, model = client.by_text(s.text, k), "search_text"
    else:
        served, model = client.by_image_text(s.image, s.text, k), "search_multimodal"
    same = [r.id for r in served] == [r.id for r in local]
    print(f"  {s.label}: client-side (embed + local kNN) | server-side ({model}, one request)")
    for a, b in list(zip(local, served))[:SHOW_K]:
        print(f"    {a.rank:>2}. {a.score:7.4f} [{a.id:>4}] | {b.score:7.4f} [{b.id:>4}] {b.title}")
    print(f"    {'same ids' if same else 'DIFFERENT ids'} over the top {k}")
    return same


def quality_table(served: dict[str, float], local: dict[str, float]) -> str:
    lines = [f"    {'metric':<16}{'served (Triton)':>17}{'in-process torch':>18}"]
    for m in METRICS:
        if m in served and m in local:
            lines.append(f"    {m:<16}{served[m]:>17.3f}{local[m]:>18.3f}")
    return "\n".join(lines)


def means(per_query: dict, catalog: Catalog) -> dict[str, float]:
    """`mim.training.evaluate.evaluate`'s summary from per-query values (kept: the caption's interval needs them)."""
    out = {name: float(v.mean()) for name, v in per_query.items()}
    out["n_gallery"] = len(catalog.products_in("test"))
    out["n_queries"] = len(catalog.queries_in("test"))
    return out


def describe_model(ck: Checkpoint, path: Path) -> str:
    """The model in words: what it is, where it came from, and its id (the hash the server and galleries carry)."""
    meta = ck.meta
    if meta.get("source"):  # an imported pretrained model
        what = f"{meta['source']} import of {meta.get('source_path', '?')}"
    else:
        what = f"{meta.get('objective', '?')} trained here for {meta.get('step', '?')} steps on the synthetic catalog"
    return f"{what} ({path}), id {ck.model_id}"


def intro_block(catalog: Catalog, n_gallery: int) -> TextBlock:
    return TextBlock(
        "What this page shows",
        [
            f"A search engine over the {n_gallery} products of the test split of a synthetic street-to-shop "
            "catalog: each product has one catalog (shop) photo and a title; street photos show it in a scene. "
            "The model embeds photos and text into one space; the server (tritonserver) runs it, and a search "
            "returns the nearest catalog photos.",
            "Queries: street photos (find the photographed product), typed text, and a photo plus a reformulation "
            "such as 'in blue' (fusion: the two embeddings mixed; refine: photo candidates re-ranked by the text).",
            "Legend: a green border marks the expected product; in the model comparison at the end, a red border "
            "marks a result of another category than the photographed product. Scores are cosine similarities.",
        ],
    )


def metrics_block(served: dict[str, float], local: dict[str, float]) -> TableBlock:
    rows = [[m, f"{served[m]:.3f}", f"{local[m]:.3f}"] for m in METRICS if m in served and m in local]
    return TableBlock(
        "Retrieval quality on the whole test split: served vs in-process",
        ["metric", "served (Triton)", "in-process (torch)"],
        rows,
        caption=f"{int(served['n_queries'])} street photos searched over {int(served['n_gallery'])} products. "
        "R@k: share of queries whose expected product is in the top k; catP@10: share of the top 10 in the "
        "query product's category; title: a product's own title as the query; mm-: photo + reformulation. "
        "Equal columns mean serving (ONNX in Triton) loses nothing against the trained model.",
    )


def comparison_caption(side: Sequence[ComparisonBlock], dml_catp, three_catp, steps: int) -> str:
    """What the DML vs 3-tower blocks count, and whether the difference means anything at this budget: the
    paired bootstrap interval of catP@10 over every test photo, not the few photos shown."""
    k = len(side[0].columns[0][1]) if side else 0
    shown: dict[str, int] = {}  # model -> results of another category over the photos shown
    for block in side:
        for name, results in block.columns:
            shown[name] = shown.get(name, 0) + sum(r.category != block.expected_category for r in results)
    diff = paired_difference(three_catp, dml_catp)
    verdict = (
        "the interval excludes 0, so the difference is real at this budget"
        if diff.lo > 0 or diff.hi < 0
        else "the interval includes 0, so at this budget the two are not told apart"
    )
    counts = ", ".join(f"{name} {n}/{k * len(side)}" for name, n in shown.items())
    return (
        f"Counted below: results of another category than the photographed product in each model's top {k} (red "
        f"borders); over the {len(side)} photos shown: {counts}. The photos are the first test photo of each of "
        f"the first {len(side)} categories, not picked by result, and are too few to decide alone. Over all "
        f"{len(three_catp)} test photos, the share of the top 10 in the right category (catP@10) is DML "
        f"{float(dml_catp.mean()):.2f} and 3-tower {float(three_catp.mean()):.2f}; 3-tower minus DML "
        f"{diff.mean:+.2f} (95% paired bootstrap interval {diff.lo:+.2f} to {diff.hi:+.2f}) after {steps} "
        f"training steps: {verdict}. Both models are trained directly for the same steps: in the equal-budget "
        "controls of `make quality-full`, no two-stage recipe (a 4-tower developed from a 3-tower, with a "
        "restarted or a continued schedule) did better than a model trained directly for as many steps."
    )


# --- main ---------------------------------------------------------------------------------------------------------
def run(
    art: Path,
    settings: DemoSettings,
    *,
    store: str | Path | None = None,
    progress: bool = True,
    startup_timeout: float = 120.0,
) -> dict:
    """`store`: the gallery's location (default art/index/test.safetensors, the exact KnnIndex)."""
    if art.exists() and not art.is_dir():
        raise MimInputError(f"--artifacts {art} is a file; expected a folder (new or from an earlier demo run)")
    art.mkdir(parents=True, exist_ok=True)
    store = store or art / "index" / "test.safetensors"
    step = Steps(8)
    step("catalog: synthetic street-to-shop data")
    catalog = ensure_catalog(art / "catalog", progress=progress, **settings.catalog)
    print(
        f"    {catalog.root}: {len(catalog.products)} products; test split {len(catalog.products_in('test'))} "
        f"products, {len(catalog.queries_in('test'))} street photos, "
        f"{len(catalog.reformulations_in('test'))} reformulations"
    )

    step(f"train: tiny 3-tower model and the DML baseline, {settings.steps} steps each (reuses checkpoints)")
    ckpt_dir, dml_dir = art / "checkpoints" / "3tower", art / "checkpoints" / "dml"
    for objective, out in (("3tower", ckpt_dir), ("dml", dml_dir)):
        config = TrainConfig(
            objective=objective,
            steps=settings.steps,
            batch_size=min(settings.batch_size, len(catalog.paired("train"))),
        )
        train(config, catalog=str(catalog.root), out=str(out), resume=True, progress=progress)
    ck: Checkpoint = load_checkpoint(ckpt_dir)
    model_id = ck.model_id
    print(f"    checkpoint {ckpt_dir} (step {ck.meta.get('step')}, model_id {model_id})")

    step("export: ONNX towers into a copy of model_repository/")
    repo = export_and_install(art, ckpt_dir, check=settings.check_export)

    step("serve: bundled tritonserver on 127.0.0.1, CPU configs")
    log = art / "tritonserver.log"
    with TritonServer(repo, config="cpu", log_path=log, startup_timeout=startup_timeout) as server:
        print(f"    ready at grpc {server.grpc_url} (log {log})")
        with EmbeddingClient(server.grpc_url, timeout_s=60) as client:
            client.wait_ready(30)

            step("index: test-split gallery through the embed_image ensemble")
            index = index_gallery(client, catalog, store, model_id, progress)
            service = SearchService(client, index)
            install_served_gallery(server.grpc_url, repo, gallery_file(index, art / "index" / "served.safetensors"))

            step("search: image, text, image + text (fusion and refine)")
            blocks, first_of_mode = [], {}
            for s in demo_searches(service, catalog, min(2 * SHOW_K, len(index))):
                results = s.run()
                print_results(s, results)
                blocks.append(
                    QueryBlock(
                        s.label,
                        results,
                        image=s.image,
                        text=s.text,
                        mode=s.mode,
                        expected_id=s.expected_id,
                        expected=s.expected,
                    )
                )
                if s.mode in ("image", "text", "fusion"):
                    first_of_mode.setdefault(s.mode, (s, results))
            print("  search in one request: the search_* ensembles against the same searches done client-side")
            with SearchClient(server.grpc_url, timeout_s=60) as search_client:
                same = [served_side_by_side(search_client, s, r) for s, r in first_of_mode.values()]

            step("quality: served path vs in-process torch on the test queries")
            served = means(evaluate_per_query(client, catalog, "test"), catalog)
        local_per_query = evaluate_per_query(TorchEmbedder(ck), catalog, "test")
        local = means(local_per_query, catalog)
    print(quality_table(served, local))
    print(
        f"    served image Recall@1 {served['image R@1']:.3f} / Recall@10 {served['image R@10']:.3f} vs in-process "
        f"torch {local['image R@1']:.3f} / {local['image R@10']:.3f} ({served['n_queries']} queries, "
        f"{served['n_gallery']} gallery products)"
    )

    step("page: self-contained HTML results, DML vs 3-tower side by side")
    dml = load_checkpoint(dml_dir)
    side = comparison_blocks(catalog, [("DML (image only)", dml), ("3-tower", ck)], 4, 2 * SHOW_K)
    for b in side:
        counts = ", ".join(f"{name} {sum(r.category != b.expected_category for r in rs)}" for name, rs in b.columns)
        print(f"    {b.label}: results of another category in the top {2 * SHOW_K}: {counts}")
    dml_catp = evaluate_per_query(TorchEmbedder(dml), catalog, "test")["image catP@10"]
    caption = comparison_caption(side, dml_catp, local_per_query["image catP@10"], settings.steps)
    print(f"    {caption}")
    legend = TextBlock("DML (image only) vs 3-tower: the same street photos ranked by each model", [caption])
    page = art / "results.html"
    write_page(
        page,
        render_page(
            [intro_block(catalog, len(index)), metrics_block(served, local), *blocks, legend, *side],
            title="Multimodal visual search demo",
            subtitle=f"{len(index)} test products; model: {describe_model(ck, ckpt_dir)}; served by tritonserver (CPU)",
        ),
    )
    total = step.done()
    print(
        f"\nDone in {total:.0f}s (server stopped). Outputs under {art}/:\n"
        f"  results page   {page}\n  gallery index  {store}\n"
        f"  checkpoint     {ckpt_dir}\n  repository     {repo}\n  server log     {log}"
    )
    return {"served": served, "local": local, "page": page, "seconds": total, "server_side_same": same}


def main(argv: Sequence[str] | None = None) -> int:
    ap = CommandParser(
        prog="mimsearch demo",
        description=__doc__,
    )
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="where everything is written")
    ap.add_argument("--steps", type=at_least(1), help="training steps (default 600; 20 with --quick)")
    ap.add_argument("--quick", action="store_true", help="small catalog and short training (tests, smoke checks)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument(
        "--store", help="the gallery: KnnIndex file (default ARTIFACTS/index/test.safetensors), *.db or Milvus URI"
    )
    args = ap.parse_args(argv)
    settings = DemoSettings.quick(args.steps) if args.quick else DemoSettings.full(args.steps)
    run(args.artifacts, settings, store=args.store, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
