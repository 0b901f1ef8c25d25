"""CLIP shapes (224 px, 77 tokens, causal text with end-of-text pooling) through the export stack unchanged:
ONNX export with graph surgery and its FP32/FP16 parity gates, the catalog FP16 gate, the generated Triton
configs and the TensorRT optimization profiles, all driven by the imported checkpoint's config."""

from __future__ import annotations

import io
import json

import pytest
from _clip_helpers import TINY_TEXT, TINY_VISION, random_clip, real_photos, save_hf_folder
from PIL import Image

from export.fp16_gate import fp16_gate
from export.onnx_export import export_checkpoint
from export.tensorrt_build import BatchRange, tower_profile
from mim import contract
from mim.data.dataset import load_dataset
from mim.model.config import get_size
from mim.model.import_clip import import_hf
from mim.serving import repository as R


@pytest.fixture(scope="module")
def clip224(tmp_path_factory):
    """A narrow CLIP at the real input shapes: 224 px in 16 px patches (197 tokens), 77-token causal text."""
    root = tmp_path_factory.mktemp("clip224")
    model = random_clip(TINY_TEXT, {**TINY_VISION, "image_size": 224}, seed=2)
    return import_hf(save_hf_folder(model, root / "hf"), root / "ckpt")


def _photo_dataset(root) -> object:
    """Five real photos as products, each queried by a mirrored copy; the last two products are the test split."""
    rows = []
    for i, data in enumerate(real_photos()):
        im = Image.open(io.BytesIO(data)).convert("RGB")
        im.save(root / f"p{i}.png")
        im.transpose(Image.FLIP_LEFT_RIGHT).save(root / f"q{i}.png")
        split = "test" if i >= 3 else "train"
        rows.append({"query_image": f"q{i}.png", "product_id": i, "product_image": f"p{i}.png", "split": split})
        rows[-1]["title"] = ["portrait photo", "cropped portrait", "face close-up", "tall strip", "blue gift box"][i]
    (root / "photos.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return load_dataset(root / "photos.jsonl")


def test_clip_shapes_export_and_pass_the_gates(clip224, tmp_path):
    report = export_checkpoint(clip224, tmp_path / "export", fp16=True, check=True)  # raises below the gates
    for tower in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER):
        entry = report["towers"][tower]
        assert entry["parity_fp32"]["min_cosine"] >= 0.99999 and entry["parity_fp16"]["min_cosine"] >= 0.999
    gate = fp16_gate(clip224, tmp_path / "export", _photo_dataset(tmp_path), split="test")
    assert gate["min_cosine_images"] >= 0.999 and gate["min_cosine_titles"] >= 0.999


@pytest.mark.parametrize("size", ["clip-vit-b-32", "clip-vit-b-16", "clip-vit-l-14"])
def test_clip_sizes_drive_configs_and_profiles(size):
    spec = get_size(size)
    by_path = {c.path: c.config for c in R.build_configs(spec.model, spec.preprocess)}
    assert list(by_path["preprocess_image/config.pbtxt"].output[0].dims) == [3, 224, 224]
    assert list(by_path["text_encoder/configs/cpu.pbtxt"].input[0].dims) == [77]
    assert list(by_path["embed_multimodal/config.pbtxt"].output[0].dims) == [spec.model.embed_dim]
    image = tower_profile(contract.MODELS[contract.IMAGE_ENCODER], spec.model, BatchRange(1, 16, 64))
    text = tower_profile(contract.MODELS[contract.TEXT_ENCODER], spec.model, BatchRange(1, 16, 64))
    assert image[contract.PIXEL_VALUES.name][2] == (64, 3, 224, 224)
    assert text[contract.INPUT_IDS.name][0] == (1, 77)
