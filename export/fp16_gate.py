"""The FP16 gate on real data: the FP16 ONNX towers against the FP32 torch model on a catalog split.

Random inputs (the exporter's own parity check) say the graph is right; this says FP16 is good enough for
retrieval on the images and titles the model is for:

- per-row cosine >= 0.999 between FP16 ONNX and FP32 torch embeddings of every catalog image, street photo and
  title of the split;
- retrieval parity: image Recall@10 (street photo -> product over the split's gallery) with the FP16 embeddings
  within 0.5 points of the FP32 figure.

    python -m export.fp16_gate --checkpoint CKPT --export-dir artifacts/export --catalog artifacts/catalog
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from export import ExportError
from mim import contract
from mim.commandline import CommandParser
from mim.data.catalog import Catalog, load_catalog
from mim.model.checkpoint import load_checkpoint
from mim.search.embedding import TorchEmbedder
from mim.search.ranking import parity
from mim.serving.onnx_embedder import OnnxEmbedder
from mim.training.evaluate import evaluate

from .onnx_export import onnx_filename

MIN_COSINE = 0.999
MAX_RECALL_DROP = 0.005  # 0.5 points of Recall@10


class GateError(ExportError):
    pass


def fp16_gate(ckpt_dir: str | Path, export_dir: str | Path, catalog: Catalog, split: str = "test") -> dict[str, Any]:
    """Run the gate; raise GateError naming the failing figure, else return the figures."""
    ck = load_checkpoint(ckpt_dir)
    export_dir = Path(export_dir)
    paths = [
        export_dir / onnx_filename(contract.IMAGE_ENCODER, fp16=True),
        export_dir / onnx_filename(contract.TEXT_ENCODER, fp16=True),
    ]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise GateError(f"FP16 ONNX missing: {missing}; export with FP16 on (python -m export.onnx_export)")
    # The serving code's ONNX Runtime runner (CPU here; the FP16 graphs keep FP32 I/O): what Triton's CPU models run.
    fp16 = OnnxEmbedder.from_files(*paths, ck.model_cfg, ck.pre_cfg, ck.tokenizer)
    fp32 = TorchEmbedder(ck)
    images = [catalog.read_bytes(p.image) for p in catalog.products_in(split)]
    images += [catalog.read_bytes(q.image) for q in catalog.queries_in(split)]
    texts = [p.title for p in catalog.products_in(split)]
    cos_img = parity(fp16.embed_images(images), fp32.embed_images(images)).min_cosine
    cos_txt = parity(fp16.embed_texts(texts), fp32.embed_texts(texts)).min_cosine
    r32 = evaluate(fp32, catalog, split)["image R@10"]
    r16 = evaluate(fp16, catalog, split)["image R@10"]
    report = {
        "split": split,
        "n_images": len(images),
        "n_titles": len(texts),
        "min_cosine_images": cos_img,
        "min_cosine_titles": cos_txt,
        "recall10_fp32": r32,
        "recall10_fp16": r16,
        "min_cosine_gate": MIN_COSINE,
        "max_recall_drop": MAX_RECALL_DROP,
    }
    if min(cos_img, cos_txt) < MIN_COSINE:
        raise GateError(
            f"FP16 towers fail the cosine gate on the {split} split: images {cos_img:.6f}, titles "
            f"{cos_txt:.6f}, need >= {MIN_COSINE}; keep more of the graph in FP32 (export/fp16.py)"
        )
    if r32 - r16 > MAX_RECALL_DROP:
        raise GateError(
            f"FP16 towers lose retrieval quality on the {split} split: Recall@10 {r16:.4f} vs FP32 "
            f"{r32:.4f}, more than {MAX_RECALL_DROP} lower"
        )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = CommandParser(
        prog="python -m export.fp16_gate",
        description=__doc__,
    )
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--export-dir", default=Path("artifacts/export"), type=Path)
    ap.add_argument("--catalog", default=Path("artifacts/catalog"), type=Path)
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    args = ap.parse_args(argv)
    try:
        report = fp16_gate(args.checkpoint, args.export_dir, load_catalog(args.catalog), args.split)
    except GateError as e:
        print(f"FP16 gate FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
