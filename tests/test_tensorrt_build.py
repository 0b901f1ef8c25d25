"""TensorRT engine building. The pure logic (profiles from the contract, the staleness check, the "not
available" reason, the import without TensorRT) runs everywhere; real builds run where `tensorrt` imports
and a GPU is visible (marker `tensorrt`)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from export import tensorrt_build as tb
from export.tensorrt_build import BatchRange, engine_is_current, engine_staleness, profile_for, tower_profile
from mim import contract
from mim.model.config import get_size

TINY = get_size("tiny").model
BASE = get_size("base").model
ENV = {"tensorrt_version": "10.3.0", "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}
HASH = "a109f3e64dc3459c"


# --- profiles ------------------------------------------------------------------------------------------------
def test_profile_for_takes_dims_from_the_contract():
    s = TINY.vision.image_size
    assert profile_for(contract.PIXEL_VALUES, TINY) == ((1, 3, s, s), (16, 3, s, s), (64, 3, s, s))
    assert profile_for(contract.PIXEL_VALUES, BASE, BatchRange(2, 8, 32)) == (
        (2, 3, 224, 224),
        (8, 3, 224, 224),
        (32, 3, 224, 224),
    )
    assert profile_for(contract.INPUT_IDS, BASE)[2] == (contract.MAX_BATCH_SIZE, 77)


def test_tower_profile_covers_every_input_with_one_batch_range():
    prof = tower_profile(contract.MODELS[contract.TEXT_ENCODER], TINY, BatchRange(1, 4, 8))
    t = TINY.text.context_length
    assert prof == {"input_ids": ((1, t), (4, t), (8, t)), "attention_mask": ((1, t), (4, t), (8, t))}
    assert list(tower_profile(contract.MODELS[contract.IMAGE_ENCODER], TINY)) == ["pixel_values"]


def test_default_max_batch_is_the_contracts():
    assert BatchRange().max == contract.MAX_BATCH_SIZE


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 1, 2), r"min=0 opt=1 max=2; expected 1 <= min <= opt <= max"),
        ((4, 2, 8), r"expected 1 <= min <= opt <= max"),
        ((1, 16, contract.MAX_BATCH_SIZE + 1), r"exceeds the contract's MAX_BATCH_SIZE"),
    ],
)
def test_batch_range_is_validated(args, match):
    with pytest.raises(ValueError, match=match):
        BatchRange(*args)


# --- staleness -------------------------------------------------------------------------------------------------
def write_plan(tmp_path: Path, **overrides) -> Path:
    """A plan file and the plan.json `build_engine` would write for the tiny image tower's default profile."""
    plan = tmp_path / "image_encoder.plan"
    plan.write_bytes(b"engine bytes")
    s = TINY.vision.image_size
    meta = {
        **ENV,
        "model_id": HASH,
        "profile": {"pixel_values": [[1, 3, s, s], [16, 3, s, s], [64, 3, s, s]]},
        "plan_sha256": hashlib.sha256(b"engine bytes").hexdigest(),
        **overrides,
    }
    (tmp_path / "image_encoder.plan.json").write_text(json.dumps(meta))
    return plan


def test_a_plan_built_here_for_this_checkpoint_is_current(tmp_path):
    plan = write_plan(tmp_path)
    prof = tower_profile(contract.MODELS[contract.IMAGE_ENCODER], TINY)
    assert engine_is_current(plan, HASH, environment=ENV, profile=prof)
    assert engine_staleness(plan, HASH, environment=ENV) is None


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}, r"gpu_name='NVIDIA A100-SXM4-80GB'"),
        ({"compute_capability": "8.9"}, r"compute_capability='8.9', this machine has '9.0'"),
        ({"tensorrt_version": "10.0.1"}, r"tensorrt_version='10.0.1', this machine has '10.3.0'"),
        ({"model_id": "0000000000000000"}, r"model '0000000000000000', exporting 'a109f3e64dc3459c'"),
        ({"plan_sha256": "0" * 64}, r"was replaced after it was built"),
    ],
)
def test_a_plan_for_another_gpu_tensorrt_or_checkpoint_is_stale(tmp_path, overrides, match):
    plan = write_plan(tmp_path, **overrides)
    reason = engine_staleness(plan, HASH, environment=ENV)
    assert reason is not None and re.search(match, reason), reason
    assert not engine_is_current(plan, HASH, environment=ENV)


def test_a_plan_for_another_profile_is_stale(tmp_path):
    plan = write_plan(tmp_path)
    prof = tower_profile(contract.MODELS[contract.IMAGE_ENCODER], TINY, BatchRange(1, 32, 64))
    assert "differs from the requested" in engine_staleness(plan, HASH, environment=ENV, profile=prof)


def test_missing_plan_or_metadata_is_stale(tmp_path):
    assert "no engine at" in engine_staleness(tmp_path / "x.plan", HASH, environment=ENV)
    plan = write_plan(tmp_path)
    (tmp_path / "image_encoder.plan.json").unlink()
    assert "cannot tell what the engine was built for" in engine_staleness(plan, HASH, environment=ENV)
    (tmp_path / "image_encoder.plan.json").write_text("{not json")
    assert "is not valid JSON" in engine_staleness(plan, HASH, environment=ENV)


# --- without TensorRT ----------------------------------------------------------------------------------------
def test_reason_when_tensorrt_does_not_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    reason = tb.tensorrt_unavailable_reason()
    assert reason is not None and "tensorrt" in reason


def test_module_imports_without_tensorrt():
    code = "import sys, export.tensorrt_build, export.engines; print('tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_onnx_layer_name_mapping():
    assert tb._onnx_node_of("/ReduceSum") == "/ReduceSum"
    assert tb._onnx_node_of("/blocks.0/Softmax [ONNX Layer: /blocks.0/attn/Softmax]") == "/blocks.0/attn/Softmax"


def test_io_for_onnx_finds_the_contract_model():
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["pixel_values"], ["image_embeds"])],
        "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", 3, 8, 8])],
    )
    assert tb.io_for_onnx(helper.make_model(g)).name == contract.IMAGE_ENCODER
    g.output[0].name = "308"
    with pytest.raises(tb.TensorRTError, match=r"outputs \['308'\] match no model of mim.contract"):
        tb.io_for_onnx(onnx.ModelProto(graph=g))


# --- with TensorRT and a GPU ---------------------------------------------------------------------------------
def _needs_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (only NVIDIA's index carries it)")
    reason = tb.tensorrt_unavailable_reason()
    if reason is not None:
        pytest.skip(f"TensorRT engines cannot be built here: {reason}")


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    _needs_tensorrt()
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("trt_export")
    return out, export_checkpoint(tiny_checkpoint, out, fp16=False)


@pytest.mark.tensorrt
@pytest.mark.parametrize("tower", [contract.IMAGE_ENCODER, contract.TEXT_ENCODER])
def test_build_engine_and_parity(tiny_export, tower):
    from mim.model.config import ModelConfig

    out, report = tiny_export
    model_cfg = ModelConfig.from_dict(json.loads((out / "model.json").read_text()))
    prof = tower_profile(contract.MODELS[tower], model_cfg, BatchRange(1, 4, 8))
    plan = out / tb.plan_filename(tower)
    meta = tb.build_engine(
        out / f"{tower}.onnx",
        plan,
        fp16=True,
        profile=prof,
        timing_cache_path=out / "timing.cache",
        model_id=report["model_id"],
    )
    assert plan.is_file() and (out / f"{tower}.plan.json").is_file() and (out / "timing.cache").is_file()
    assert [r["name"] for r in meta["io"]] == [
        s.name for s in (*contract.MODELS[tower].inputs, *contract.MODELS[tower].outputs)
    ]
    assert meta["fp32_layers"] > 0
    assert engine_is_current(plan, report["model_id"], profile=prof)
    assert not engine_is_current(plan, "another-checkpoint", profile=prof)
    result = tb.engine_parity(plan, out / f"{tower}.onnx", batches=(1, 7))
    assert result["min_cosine"] >= 0.999


@pytest.mark.tensorrt
def test_parser_errors_are_reported(tmp_path):
    _needs_tensorrt()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(tb.TensorRTError, match="could not parse"):
        tb.network_from_onnx(bad)
