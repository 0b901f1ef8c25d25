"""The FP16 gate on real catalog data (images, street photos, titles) and its retrieval-parity check."""

from __future__ import annotations

import pytest

from export import fp16_gate as G
from export.engines import main as engines_main
from mim.data.synth import CATEGORIES, COLOURS, PATTERNS, generate_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return generate_catalog(
        tmp_path_factory.mktemp("gatecat"),
        seed=5,
        image_size=48,
        categories=CATEGORIES[:4],
        patterns=PATTERNS[:3],
        colours=COLOURS[:3],
        split=(0.5, 0.1, 0.4),
        variants=1,
        progress=False,
    )


def test_gate_passes_on_the_exported_fp16_towers(tiny_checkpoint, catalog, tmp_path, capsys):
    repo = tmp_path / "repo"
    export_dir = tmp_path / "export"
    args = ["--checkpoint", str(tiny_checkpoint), "--repository", str(repo), "--export-dir", str(export_dir)]
    assert engines_main([*args, "--catalog", str(catalog.root)]) == 0
    assert "FP16 gate on test split" in capsys.readouterr().out
    report = G.fp16_gate(tiny_checkpoint, export_dir, catalog)
    assert report["n_images"] == len(catalog.products_in("test")) + len(catalog.queries_in("test"))
    assert report["min_cosine_images"] >= G.MIN_COSINE and report["min_cosine_titles"] >= G.MIN_COSINE
    assert report["recall10_fp32"] - report["recall10_fp16"] <= G.MAX_RECALL_DROP


def test_gate_refuses_towers_that_drift(tiny_checkpoint, catalog, tmp_path, monkeypatch):
    export_dir = tmp_path / "export"
    engines_main(
        ["--checkpoint", str(tiny_checkpoint), "--repository", str(tmp_path / "r"), "--export-dir", str(export_dir)]
    )
    real = G.OnnxEmbedder.embed_images

    def drifting(self, images):  # FP16 towers whose image embeddings are off by a rotation-like perturbation
        return real(self, images)[:, ::-1].copy()

    monkeypatch.setattr(G.OnnxEmbedder, "embed_images", drifting)
    with pytest.raises(G.GateError, match=r"fail the cosine gate on the test split: images"):
        G.fp16_gate(tiny_checkpoint, export_dir, catalog)


def test_gate_needs_the_fp16_files(tiny_checkpoint, catalog, tmp_path):
    with pytest.raises(G.GateError, match="FP16 ONNX missing"):
        G.fp16_gate(tiny_checkpoint, tmp_path, catalog)
