"""JPEG draft decoding (mim.model.preprocess): large JPEGs decode at a reduced DCT scale that keeps the shorter side at
least JPEG_DRAFT_MARGIN x image_size, other images are untouched, and the embeddings of real photos stay within
the gate (benchmarks/preprocess.py) of full decoding."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from benchmarks import preprocess as bench
from mim.model.config import PreprocessConfig
from mim.model.preprocess import JPEG_DRAFT_MARGIN, decode_image, preprocess_image_bytes

pytest.importorskip("skimage", reason="scikit-image (dev extra) ships the photos the gate uses")

CFG = PreprocessConfig(image_size=48)


def encoded(size: tuple[int, int], fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_a_large_jpeg_decodes_at_a_reduced_scale_that_keeps_the_margin():
    data = encoded((1600, 1200), "JPEG")
    assert decode_image(data, CFG).size == (1600, 1200)
    small = decode_image(data, CFG, draft=True)
    assert small.size == (200, 150)  # 1/8: the largest DCT reduction keeping the shorter side >= 96
    assert min(small.size) >= JPEG_DRAFT_MARGIN * CFG.image_size
    assert decode_image(data, PreprocessConfig(image_size=224), draft=True).size == (800, 600)  # 1/2 keeps 448


@pytest.mark.parametrize("size, fmt", [((1600, 1200), "PNG"), ((120, 90), "JPEG")])
def test_other_images_are_decoded_in_full(size, fmt):
    data = encoded(size, fmt)
    assert decode_image(data, CFG, draft=True).size == size
    np.testing.assert_array_equal(preprocess_image_bytes(data, CFG), preprocess_image_bytes(data, CFG, draft=False))


def test_the_pixel_limit_still_counts_the_full_image():
    cfg = PreprocessConfig(image_size=48, max_image_pixels=1_000_000)
    with pytest.raises(ValueError, match=r"1600x1200 = 1920000 pixels, over the limit of 1000000"):
        preprocess_image_bytes(encoded((1600, 1200), "JPEG"), cfg)


def test_real_photos_pass_the_embedding_gate(tiny_checkpoint):
    cfg, embed = bench.checkpoint_embedder(tiny_checkpoint)
    rows = bench.gate(bench.skimage_photos(megapixels=(1.0, 3.0)), cfg, embed)
    assert len(rows) == 12
    assert min(r["cosine"] for r in rows) >= bench.GATE_MIN_COSINE
    assert max(r["pixel_max_abs"] for r in rows) > 0  # the draft path really ran: pixels differ a little


def test_the_benchmark_writes_its_files_and_reports_the_ratio(tiny_checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", str(tiny_checkpoint), "--megapixels", "1", "--min-time", "0.05", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "preprocess.json").read_text())
    assert result["gate_passed"] and {r["size"] for r in result["throughput"]} == {"native", "1MP"}
    assert all(r["ratio"] > 0 for r in result["throughput"])
    assert (tmp_path / "preprocess.csv").is_file() and (tmp_path / "preprocess_gate.csv").is_file()
    assert "draft / full" in capsys.readouterr().out
