"""ONNX export of the tiny towers: contract I/O, parity with torch on random inputs, the FP16 variant, the
Triton repository install, and `python -m export.engines` end to end (ONNX path; no TensorRT here)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_checkpoint

from export import engines
from export.install import InstallError, install
from export.onnx_export import (
    FP16_MIN_COSINE,
    FP32_MIN_COSINE,
    ExportError,
    ParityError,
    check_io,
    check_parity,
    export_checkpoint,
    onnx_filename,
    random_inputs,
)
from export.surgery import DEFAULT_PASSES
from export.tensorrt_build import tensorrt_unavailable_reason
from mim import contract
from mim.layout import model_id_of_checkpoint
from mim.model.checkpoint import load_checkpoint
from mim.model.config import ModelConfig, PreprocessConfig

ENCODERS = (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)
ONNX_TYPES = {"FP32": onnx.TensorProto.FLOAT, "INT64": onnx.TensorProto.INT64}


@pytest.fixture(scope="module")
def make_engines(tiny_checkpoint, tmp_path_factory):
    """`make engines` (= `python -m export.engines`) run once for the module, in process: every export test
    below reads what it wrote. Returns (export_dir, repo, exit code, stdout)."""
    root = tmp_path_factory.mktemp("engines")
    export_dir, repo = root / "artifacts/export", root / "model_repository"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = engines.main(
            ["--checkpoint", str(tiny_checkpoint), "--repository", str(repo), "--export-dir", str(export_dir)]
        )
    return export_dir, repo, rc, stdout.getvalue()


@pytest.fixture(scope="module")
def exported(make_engines):
    export_dir = make_engines[0]
    return export_dir, json.loads((export_dir / "export.json").read_text())


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


def tower_module(ckpt, name):
    return {contract.IMAGE_ENCODER: ckpt.model.image, contract.TEXT_ENCODER: ckpt.model.text}[name]


# --- the files and their graphs ------------------------------------------------------------------------------
def test_writes_every_artifact(exported, tiny_checkpoint):
    out, report = exported
    names = {p.name for p in out.iterdir()}
    assert names == {
        "image_encoder.onnx",
        "text_encoder.onnx",
        "image_encoder.fp16.onnx",
        "text_encoder.fp16.onnx",
        "image_encoder.safetensors",
        "text_encoder.safetensors",
        "preprocess.json",
        "model.json",
        "tokenizer.json",
        "export.json",
    }
    ckpt = load_checkpoint(tiny_checkpoint)
    assert PreprocessConfig.from_dict(json.loads((out / "preprocess.json").read_text())) == ckpt.pre_cfg
    assert ModelConfig.from_dict(json.loads((out / "model.json").read_text())) == ckpt.model_cfg
    assert (out / "tokenizer.json").read_bytes() == (tiny_checkpoint / "tokenizer.json").read_bytes()
    assert json.loads((out / "export.json").read_text()) == report
    assert report["model_id"] == model_id_of_checkpoint(tiny_checkpoint)
    assert report["opset"] == 17


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tower", ENCODERS)
def test_graph_io_is_the_contract(exported, ckpt, tower, fp16):
    out, _ = exported
    model = onnx.load(out / onnx_filename(tower, fp16=fp16))
    onnx.checker.check_model(model, full_check=True)
    io = contract.MODELS[tower]
    check_io(model, io, ckpt.model_cfg)  # raises on any difference; the explicit checks below say what it means
    for values, specs in ((model.graph.input, io.inputs), (model.graph.output, io.outputs)):
        assert [v.name for v in values] == [s.name for s in specs]
        for v, spec in zip(values, specs):
            t = v.type.tensor_type
            assert t.elem_type == ONNX_TYPES[spec.dtype]
            assert t.shape.dim[0].dim_param == "batch" and not t.shape.dim[0].dim_value
            assert [d.dim_value for d in t.shape.dim[1:]] == list(spec.resolve_dims(ckpt.model_cfg))
    assert model.opset_import[0].version == 17


def test_no_tracer_names_at_the_boundary(exported):
    out, _ = exported
    contract_names = {s.name for m in contract.MODELS.values() for s in (*m.inputs, *m.outputs)}
    for path in out.glob("*.onnx"):
        model = onnx.load(path)
        for v in (*model.graph.input, *model.graph.output):
            assert v.name in contract_names, f"{path.name}: {v.name}"
            assert not re.search(r"(^\d+$)|(\.\d+$)|onnx::", v.name)


def test_surgery_shrinks_both_towers_and_is_reported(exported):
    _, report = exported
    for tower in ENCODERS:
        t = report["towers"][tower]
        assert [r["pass"] for r in t["surgery"]] == [p.__name__ for p in DEFAULT_PASSES]
        assert t["surgery"][0]["nodes_before"] == t["nodes_exported"]
        assert t["surgery"][-1]["nodes_after"] == t["nodes"]
        assert t["nodes"] < 0.6 * t["nodes_exported"], t["surgery"]  # about halves: see export.json
    for path in (report["towers"][tower]["file"] for tower in ENCODERS):
        ops = {n.op_type for n in onnx.load(exported[0] / path).graph.node}
        assert "Identity" not in ops and "Constant" not in ops


def test_normalisations_stay_single_fp32_ops(exported):
    # The TorchScript exporter at opset 17 emits LayerNormalization as one op: that is what the FP16
    # converter and the TensorRT builder pin.
    out, _ = exported
    for tower in ENCODERS:
        model = onnx.load(out / onnx_filename(tower, fp16=True))
        ops = [n.op_type for n in model.graph.node]
        assert "LayerNormalization" in ops and "ReduceMean" not in ops and "Pow" not in ops
        inferred = onnx.shape_inference.infer_shapes(model).graph
        types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.value_info, *inferred.input)}
        types.update({i.name: i.data_type for i in inferred.initializer})
        for n in model.graph.node:
            if n.op_type in ("LayerNormalization", "Softmax", "ReduceSum", "Sqrt"):
                assert types[n.input[0]] == onnx.TensorProto.FLOAT, n.name


# --- parity ----------------------------------------------------------------------------------------------------
def test_export_reports_parity_at_batch_1_and_7(exported):
    _, report = exported
    for tower in ENCODERS:
        t = report["towers"][tower]
        assert [b["batch"] for b in t["parity_fp32"]["batches"]] == [1, 7]
        assert t["parity_fp32"]["min_cosine"] >= FP32_MIN_COSINE
        assert t["parity_fp32"]["max_abs_diff"] < 1e-5
        assert t["parity_fp16"]["min_cosine"] >= FP16_MIN_COSINE


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("tower", ENCODERS)
def test_onnx_runtime_matches_torch(exported, ckpt, tower, batch):
    out, _ = exported
    inputs = random_inputs(contract.MODELS[tower], ckpt.model_cfg, batch, seed=42)
    fp32 = check_parity(out / onnx_filename(tower), tower_module(ckpt, tower), inputs)
    fp16 = check_parity(
        out / onnx_filename(tower, fp16=True), tower_module(ckpt, tower), inputs, min_cosine=FP16_MIN_COSINE
    )
    assert fp32["batch"] == fp16["batch"] == batch
    assert fp32["min_cosine"] >= FP32_MIN_COSINE and fp16["min_cosine"] >= FP16_MIN_COSINE
    assert fp32["max_abs_diff"] <= fp16["max_abs_diff"]


def test_random_inputs_are_never_degenerate(ckpt):
    cfg = ckpt.model_cfg
    s, t = cfg.vision.image_size, cfg.text.context_length
    img = random_inputs(contract.MODELS[contract.IMAGE_ENCODER], cfg, 6, seed=0)["pixel_values"]
    assert img.shape == (6, 3, s, s) and img.dtype == np.float32 and 0.9 < img.std() < 1.1
    txt = random_inputs(contract.MODELS[contract.TEXT_ENCODER], cfg, 50, seed=0)
    ids, mask = txt["input_ids"], txt["attention_mask"]
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (50, t)
    assert ids.min() >= 4 and ids.max() < cfg.text.vocab_size
    assert (mask[:, 0] == 1).all() and len(set(mask.sum(1))) > 5  # varied lengths, [CLS] always kept
    assert (np.diff(mask, axis=1) <= 0).all()  # padding only at the end


def test_parity_error_names_the_row_and_the_gate(exported, tmp_path):
    out, _ = exported
    other = load_checkpoint(make_tiny_checkpoint(tmp_path / "other", seed=1))  # other weights, same shapes
    inputs = random_inputs(contract.MODELS[contract.TEXT_ENCODER], other.model_cfg, 3, seed=0)
    with pytest.raises(ParityError, match=r"row \d+ of batch 3 has cosine .* expected >= 0.99999"):
        check_parity(out / onnx_filename(contract.TEXT_ENCODER), other.model.text, inputs)


def test_check_io_rejects_a_graph_off_contract(exported, ckpt):
    out, _ = exported
    model = onnx.load(out / onnx_filename(contract.IMAGE_ENCODER))
    model.graph.input[0].name = "input.1"
    with pytest.raises(ExportError, match=r"graph inputs are \['input.1'\]; the contract expects \['pixel_values'\]"):
        check_io(model, contract.MODELS[contract.IMAGE_ENCODER], ckpt.model_cfg)
    model = onnx.load(out / onnx_filename(contract.IMAGE_ENCODER))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # a batch baked in
    s = ckpt.model_cfg.vision.image_size
    with pytest.raises(ExportError, match=rf"dims \[4, 3, {s}, {s}\]; contract says \['batch', 3, {s}, {s}\]"):
        check_io(model, contract.MODELS[contract.IMAGE_ENCODER], ckpt.model_cfg)


# --- install ---------------------------------------------------------------------------------------------------
def expected_layout(repo: Path, plans: bool = False) -> set[Path]:
    files = {
        repo / "preprocess_image/1/preprocess.json",
        repo / "preprocess_text/1/preprocess.json",
        repo / "preprocess_text/1/tokenizer.json",
    }
    for tower in ENCODERS:
        files |= {repo / tower / "1/model.onnx", repo / tower / "1/model.fp16.onnx", repo / tower / "1/export.json"}
        files |= {repo / tower / "1/model.json"}  # the encoder reads its vocabulary size from it
        files |= {repo / tower / "1/model.safetensors"}  # the torch variants' weights
        if plans:
            files |= {repo / tower / "1/model.plan", repo / tower / "1/model.plan.json"}
    return files


def test_install_layout(exported, tmp_path):
    out, _ = exported
    repo = tmp_path / "model_repository"
    written = install(out, repo)
    assert set(written) == expected_layout(repo)
    assert len(written) == len(set(written))
    assert not list(repo.rglob("*.plan"))
    for tower in ENCODERS:
        assert (repo / tower / "1/model.onnx").read_bytes() == (out / f"{tower}.onnx").read_bytes()
        assert (repo / tower / "1/model.onnx").stat().st_mode & 0o044 == 0o044  # readable by a server user
    assert (repo / "preprocess_text/1/tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def fake_plan(export_dir: Path, tower: str, model_id: str) -> None:
    (export_dir / f"{tower}.plan").write_bytes(b"not really an engine")
    (export_dir / f"{tower}.plan.json").write_text(json.dumps({"model_id": model_id}))


def test_install_copies_only_plans_built_from_this_checkpoint(exported, tmp_path):
    src, report = exported
    out = tmp_path / "export"
    shutil.copytree(src, out)
    repo = tmp_path / "repo"
    fake_plan(out, contract.IMAGE_ENCODER, report["model_id"])
    fake_plan(out, contract.TEXT_ENCODER, "0123456789abcdef")  # an old build
    written = install(out, repo)
    assert repo / "image_encoder/1/model.plan" in written and repo / "image_encoder/1/model.plan.json" in written
    assert not (repo / "text_encoder/1/model.plan").exists()

    # A later export of other weights without engines: the repository must not keep serving the old plan.
    for tower in ENCODERS:
        (out / f"{tower}.plan").unlink()
        (out / f"{tower}.plan.json").unlink()
    meta = json.loads((out / "export.json").read_text())
    meta["model_id"] = "fedcba9876543210"
    (out / "export.json").write_text(json.dumps(meta))
    assert set(install(out, repo)) == expected_layout(repo)
    assert not list(repo.rglob("model.plan*"))


def test_install_refuses_an_unfinished_export(tmp_path):
    (tmp_path / "image_encoder.onnx").write_bytes(b"")
    with pytest.raises(InstallError, match=r"export.json not found: .* is not a finished export; run"):
        install(tmp_path, tmp_path / "repo")


# --- make engines, end to end ---------------------------------------------------------------------------------
def test_engines_cli_installs_the_onnx_path_and_says_why_no_engine(make_engines):
    export_dir, repo, rc, stdout = make_engines
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the engine path is covered by tests/test_tensorrt_build.py")
    assert rc == 0
    lines = [ln for ln in stdout.splitlines() if "TensorRT" in ln]
    assert lines == [
        f"TensorRT not available ({reason}): built ONNX artifacts for the CPU/ONNX path only; no engine was built"
    ]
    assert expected_layout(repo) <= {p for p in repo.rglob("*") if p.is_file()}
    assert not list(repo.rglob("*.plan")) and not list(export_dir.rglob("*.plan"))
    assert "installed 13 files" in stdout


def test_engines_message_when_tensorrt_does_not_import(exported, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    # Whatever this machine has: with `import tensorrt` failing, one line says so and no engine is built.
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    monkeypatch.setattr(engines, "export_checkpoint", lambda ckpt, out, **kw: exported[1])
    monkeypatch.setattr(engines, "build_engines", lambda *a, **k: pytest.fail("must not build"))
    rc = engines.main(
        ["--checkpoint", str(tiny_checkpoint), "--repository", str(tmp_path / "repo"), "--export-dir", str(exported[0])]
    )
    assert rc == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "TensorRT" in ln]
    assert len(lines) == 1 and re.fullmatch(
        r"TensorRT not available \(.*tensorrt.*\): .*; no engine was built", lines[0]
    )


def test_engines_main_no_tensorrt_flag(exported, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    # --no-tensorrt skips even where TensorRT exists; the export itself is the module fixture's (reused).
    calls = []
    monkeypatch.setattr(engines, "export_checkpoint", lambda ckpt, out, **kw: calls.append(kw) or exported[1])
    monkeypatch.setattr(engines, "build_engines", lambda *a, **k: pytest.fail("must not build"))
    rc = engines.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--repository",
            str(tmp_path / "repo"),
            "--export-dir",
            str(exported[0]),
            "--no-tensorrt",
            "--no-check",
        ]
    )
    assert rc == 0 and calls == [{"check": False}]
    text = capsys.readouterr().out
    assert text.count("no engine was built") == 1 and "--no-tensorrt" in text


def test_engines_main_rejects_a_bad_batch_range(tiny_checkpoint, tmp_path, capsys):
    rc = engines.main(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--repository",
            str(tmp_path / "r"),
            "--min-batch",
            "8",
            "--opt-batch",
            "4",
        ]
    )
    assert rc == 2
    assert "expected 1 <= min <= opt <= max" in capsys.readouterr().err


def test_export_checkpoint_without_fp16_or_checks(tiny_checkpoint, tmp_path):
    (tmp_path / "text_encoder.fp16.onnx").write_bytes(b"left from an earlier export")  # must not be installed
    report = export_checkpoint(tiny_checkpoint, tmp_path, fp16=False, check=False)
    assert not list(tmp_path.glob("*.fp16.onnx"))
    assert all("parity_fp32" not in t and "fp16" not in t for t in report["towers"].values())
    assert (tmp_path / "export.json").is_file() and (tmp_path / "text_encoder.onnx").is_file()


# --- GPU tower benchmark (runs only where CUDA is; its pure parts here) ---------------------------------------
def test_bench_flop_counts_match_the_known_figures():
    from export.bench_towers import image_flops, text_flops
    from mim.model.config import get_size

    base = get_size("base").model
    assert image_flops(base.vision, base.embed_dim) == pytest.approx(35.1e9, rel=0.01)  # ViT-B/16 at 224 px
    assert text_flops(base.text, base.embed_dim) == pytest.approx(5.96e9, rel=0.01)


def test_bench_without_cuda_says_why_and_exits_0(capsys, monkeypatch):
    from export import bench_towers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_towers.main(["--batches", "1,2"]) == 0
    assert "CUDA not available" in capsys.readouterr().out
