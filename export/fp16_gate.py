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

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mim import contract
from mim.catalog import Catalog, load_catalog
from mim.checkpoint import Checkpoint, load_checkpoint
from mim.evaluate import Embedder, embed_images, embed_texts, evaluate, torch_embedder
from mim.preprocess import preprocess_image_bytes
from mim.serving.backends import OnnxEncoder

from .onnx_export import onnx_filename

MIN_COSINE = 0.999
MAX_RECALL_DROP = 0.005  # 0.5 points of Recall@10
BATCH = contract.MAX_BATCH_SIZE


class GateError(RuntimeError):
    pass


def onnx_embedder(ck: Checkpoint, image_onnx: str | Path, text_onnx: str | Path) -> Embedder:
    """An Embedder running the exported towers with the serving code's ONNX Runtime runner (CPU here; the FP16
    graphs keep FP32 I/O), so the gate exercises what Triton's CPU models run."""

    def encoder(path, name):
        io = contract.MODELS[name]
        return OnnxEncoder(path, io, {t.name: t.resolve_dims(ck.model_cfg) for t in io.inputs}, intra_op_threads=2)

    img, txt = encoder(image_onnx, contract.IMAGE_ENCODER), encoder(text_onnx, contract.TEXT_ENCODER)

    def images(data: Sequence[bytes]) -> np.ndarray:
        out = [np.zeros((0, ck.model_cfg.embed_dim), np.float32)]
        for i in range(0, len(data), BATCH):
            px = np.stack([preprocess_image_bytes(b, ck.pre_cfg) for b in data[i : i + BATCH]])
            out.append(img({contract.PIXEL_VALUES.name: px}))
        return np.concatenate(out)

    def texts(data: Sequence[str]) -> np.ndarray:
        out = [np.zeros((0, ck.model_cfg.embed_dim), np.float32)]
        for i in range(0, len(data), BATCH):
            ids, mask = ck.tokenizer.encode_batch(list(data[i : i + BATCH]))
            out.append(txt({contract.INPUT_IDS.name: ids, contract.ATTENTION_MASK.name: mask}))
        return np.concatenate(out)

    return Embedder(images, texts)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(cos.min()) if len(cos) else 1.0


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
    fp16 = onnx_embedder(ck, *paths)
    images = [catalog.read_bytes(p.image) for p in catalog.products_in(split)]
    images += [catalog.read_bytes(q.image) for q in catalog.queries_in(split)]
    texts = [p.title for p in catalog.products_in(split)]
    cos_img = _min_cosine(fp16.images(images), embed_images(ck, images))
    cos_txt = _min_cosine(fp16.texts(texts), embed_texts(ck, texts))
    r32 = evaluate(torch_embedder(ck), catalog, split)["image R@10"]
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
    ap = argparse.ArgumentParser(
        prog="python -m export.fp16_gate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
