"""The encoder runtimes table and registry: every reader takes its variants from `runtimes.VARIANTS`, and the
handler factory builds an encoder with whatever runtime its config names (without Triton)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format

from benchmarks import gpu
from mim import contract
from mim.model.config import get_size
from mim.serving import backends as B
from mim.serving import runtimes, server
from mim.serving.repository import build_configs, encoder_configs

SPEC = get_size("tiny")
PROBED: list[tuple] = []


def _probe_builder(name, version_dir, params, dims, device_id=0):
    """A stand-in runtime: records what the factory hands a builder."""
    PROBED.append((name, version_dir, dict(params), device_id))
    return "probe handler"


def _encoder_json(variant: runtimes.Variant) -> dict:
    cfg = next(
        c.config
        for c in encoder_configs(contract.IMAGE_ENCODER, SPEC.model, SPEC.preprocess)
        if c.relpath == variant.relpath
    )
    return json_format.MessageToDict(cfg, preserving_proto_field_name=True)


def test_every_variant_names_a_known_runtime_and_every_runtime_resolves():
    for v in runtimes.VARIANTS:
        assert v.runtime in runtimes.RUNTIMES or v.runtime in runtimes.PLATFORMS, v
    for name in runtimes.RUNTIMES:
        assert callable(runtimes.encoder_builder(name)), name
    assert len(set(runtimes.variant_names())) == len(runtimes.VARIANTS)


def test_the_launcher_and_the_gpu_script_read_the_table():
    assert server.CONFIGS == runtimes.variant_names()
    assert {gpu.GPU_CONFIG, gpu.CPU_CONFIG} <= set(runtimes.variant_names())


def test_the_generator_writes_one_config_per_variant_and_encoder():
    written = {(c.model, c.relpath) for c in build_configs()}
    for model in (contract.IMAGE_ENCODER, contract.TEXT_ENCODER):
        assert {(model, v.relpath) for v in runtimes.VARIANTS} <= written


@pytest.mark.parametrize("variant", [v for v in runtimes.VARIANTS if v.runtime in runtimes.RUNTIMES], ids=str)
def test_each_python_variant_reaches_its_runtime_builder(variant, monkeypatch, tmp_path):
    # Every runtime pointed at the probe: the config alone must say which runtime is asked for.
    for name in runtimes.RUNTIMES:
        monkeypatch.setitem(runtimes.RUNTIMES, name, f"{__name__}:_probe_builder")
    PROBED.clear()
    config = _encoder_json(variant)
    assert B.make_handler(contract.IMAGE_ENCODER, tmp_path, config, device_id=3) == "probe handler"
    ((name, version_dir, params, device_id),) = PROBED
    assert (name, version_dir, device_id) == (contract.IMAGE_ENCODER, Path(tmp_path), 3)
    assert params.get(runtimes.RUNTIME_PARAM, runtimes.DEFAULT_RUNTIME) == variant.runtime


def test_a_new_runtime_is_one_registry_line(monkeypatch, tmp_path):
    monkeypatch.setitem(runtimes.RUNTIMES, "probe", f"{__name__}:_probe_builder")
    PROBED.clear()
    config = {"parameters": {runtimes.RUNTIME_PARAM: {"string_value": "probe"}}}
    assert B.make_handler(contract.TEXT_ENCODER, tmp_path, config) == "probe handler"
    assert PROBED[0][0] == contract.TEXT_ENCODER


def test_an_unknown_runtime_is_refused_with_the_known_ones(tmp_path):
    config = {"parameters": {runtimes.RUNTIME_PARAM: {"string_value": "openvino"}}}
    with pytest.raises(ValueError, match=r"unknown encoder runtime 'openvino' .*expected one of \['onnx', 'torch'\]"):
        B.make_handler(contract.IMAGE_ENCODER, tmp_path, config)


def test_an_unknown_variant_is_refused():
    assert runtimes.get_variant("torch").runtime == "torch"
    with pytest.raises(ValueError, match=r"unknown config variant 'tpu'; expected one of \['cpu'"):
        runtimes.get_variant("tpu")
