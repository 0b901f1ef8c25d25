"""Retrieval quality through the SERVED path, next to the same metrics in-process: serving must lose nothing.

    python -m benchmarks.quality --url 127.0.0.1:8001 --checkpoint artifacts/checkpoints/3tower \
        --catalog artifacts/catalog --out benchmarks/results

`mim.training.evaluate.evaluate` runs twice on the same catalog split: with the in-process torch model
(`mim.search.embedding.TorchEmbedder`) and with the served one (client/triton_client.EmbeddingClient -> preprocessing
models -> ONNX Runtime towers). Both are wrapped in a `Recording` embedder that keeps what they returned, so
besides the metric differences the report gives the embeddings' worst cosine and largest absolute difference,
row for row (`mim.search.ranking.parity`).

The DML / 3-tower / 4-tower table is trained and written by `mimsearch compare` (`make quality`) into
benchmarks/results/quality.{md,json}; this module only reads it for RESULTS.md and never retrains.

Writes <out>/quality_served.json and <out>/quality_served.md.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mim.atomic import atomic_write_text
from mim.commandline import CommandParser, at_least
from mim.layout import MODEL_ID, model_id_of_checkpoint
from mim.model.checkpoint import load_checkpoint
from mim.search.embedding import Embedder, TorchEmbedder
from mim.search.ranking import parity
from mim.training.evaluate import evaluate, markdown_table

from .common import now_utc, write_json

TRAINED_TABLE = Path(__file__).resolve().parent / "results" / "quality"  # mim.training.compare's --out default
TRAINED_COMMAND = "mimsearch compare --catalog artifacts/catalog --steps 600 --out benchmarks/results/quality"
# Served and in-process embeddings are the same FP32 math in two runtimes (torch vs ONNX Runtime).
MIN_COSINE = 0.9999
METRIC_TOLERANCE = 1e-6  # metrics are shares of queries: any flipped ranking moves them by >= 1/queries


@dataclass
class Recorder:
    """Wraps an embedding function and keeps every array it returned, in call order."""

    fn: Callable[[Sequence], np.ndarray]
    calls: list[np.ndarray] = field(default_factory=list)
    seconds: float = 0.0

    def __call__(self, items: Sequence) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.asarray(self.fn(items), dtype=np.float32)
        self.seconds += time.perf_counter() - t0
        self.calls.append(out)
        return out

    def all(self) -> np.ndarray:
        return np.concatenate(self.calls) if self.calls else np.zeros((0, 0), np.float32)


class Recording:
    """An Embedder that passes every call to `inner` and records the image and text embeddings it returned."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.images, self.texts = Recorder(inner.embed_images), Recorder(inner.embed_texts)

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        return self.images(images)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.texts(texts)

    def embed_multimodal(
        self, images: Sequence[bytes], texts: Sequence[str], image_weight: float | None = None
    ) -> np.ndarray:
        return self.inner.embed_multimodal(images, texts, image_weight)


def served_quality(url: str, checkpoint: Path, catalog, split: str = "test", wait_s: float = 60.0) -> dict:
    """Both evaluations, their metric differences and the embedding differences."""
    from client.triton_client import EmbeddingClient  # lazily: a client import error fails this step only

    local_rec = Recording(TorchEmbedder(load_checkpoint(checkpoint)))
    with EmbeddingClient(url, timeout_s=120.0) as client:
        client.wait_ready(wait_s)
        served_rec = Recording(client)
        served_metrics = evaluate(served_rec, catalog, split)
    local_metrics = evaluate(local_rec, catalog, split)
    diffs = {
        k: abs(served_metrics[k] - local_metrics[k])
        for k in local_metrics
        if isinstance(local_metrics[k], float) and k in served_metrics
    }
    embeddings = {
        "images": parity(served_rec.images.all(), local_rec.images.all()).as_dict(),
        "texts": parity(served_rec.texts.all(), local_rec.texts.all()).as_dict(),
    }
    ok = max(diffs.values(), default=0.0) <= METRIC_TOLERANCE and all(
        e["min_cosine"] >= MIN_COSINE for e in embeddings.values()
    )
    meta = json.loads((Path(checkpoint) / "config.json").read_text()).get("meta", {})
    return {
        "checkpoint": str(checkpoint),
        MODEL_ID: model_id_of_checkpoint(checkpoint),
        "checkpoint_meta": meta,
        "split": split,
        "rows": {"in-process (torch)": local_metrics, "served (Triton, ONNX Runtime)": served_metrics},
        "max_metric_diff": max(diffs.values(), default=0.0),
        "metric_diffs": diffs,
        "embeddings": embeddings,
        "seconds": {
            "in-process": local_rec.images.seconds + local_rec.texts.seconds,
            "served": served_rec.images.seconds + served_rec.texts.seconds,
        },
        "serving_loses_nothing": ok,
        "thresholds": {"min_cosine": MIN_COSINE, "metric_tolerance": METRIC_TOLERANCE},
    }


def served_markdown(report: dict) -> str:
    e = report["embeddings"]
    meta = report["checkpoint_meta"]
    kind = (
        "random-init (untrained: the metrics are chance level; the parity is the point)"
        if meta.get("random_init")
        else f"trained ({meta.get('objective', '?')}, step {meta.get('step', '?')})"
    )
    return "\n".join(
        [
            f"Checkpoint `{report['checkpoint']}` ({report[MODEL_ID]}), {kind}; split `{report['split']}`.",
            "",
            markdown_table(report["rows"]),
            "",
            f"Largest metric difference served vs in-process: {report['max_metric_diff']:.2e} "
            f"(tolerance {report['thresholds']['metric_tolerance']:g}). Embeddings, row for row: images "
            f"{e['images']['rows']} rows min cosine {e['images']['min_cosine']:.7f} max |diff| "
            f"{e['images']['max_abs_diff']:.2e}; texts {e['texts']['rows']} rows min cosine "
            f"{e['texts']['min_cosine']:.7f} max |diff| {e['texts']['max_abs_diff']:.2e}. "
            f"Serving loses nothing: **{'yes' if report['serving_loses_nothing'] else 'NO'}**.",
        ]
    )


def trained_table(base: Path = TRAINED_TABLE) -> str | None:
    """mim.training.compare's table (quality.md without its header), or None when `make quality` has not run."""
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    if not (md.is_file() and js.is_file()):
        return None
    doc = json.loads(js.read_text())
    return markdown_table(doc.get("means", doc))  # mim.training.compare writes means next to intervals and curves


def write_outputs(report: dict, out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "quality_served.md"
    atomic_write_text(
        md, f"# Retrieval quality, served vs in-process\n\nCommand: `{command}`\n\n{served_markdown(report)}\n"
    )
    return [write_json(report, out / "quality_served.json"), md]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = CommandParser(prog="mimsearch quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of a server running the checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the server was exported from")
    p.add_argument("--catalog", type=Path, default=Path("artifacts/catalog"), help="catalog folder or dataset")
    p.add_argument("--wait", type=at_least(0.0, float), default=60.0, help="seconds to wait for the server to be ready")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate on")
    p.add_argument("--out", type=Path, default=Path("artifacts/benchmarks"), help="writes quality_served.{md,json}")
    args = p.parse_args(argv)
    from mim.data.catalog import load_catalog

    report = served_quality(args.url, args.checkpoint, load_catalog(args.catalog), args.split, args.wait)
    report["date"] = now_utc()
    command = "python -m benchmarks.quality " + shlex.join(argv)
    write_outputs(report, args.out, command)
    print(served_markdown(report))
    return 0 if report["serving_loses_nothing"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
