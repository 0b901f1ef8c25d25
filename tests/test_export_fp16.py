"""The FP16 ONNX converter on a tiny hand-built transformer-like graph: FP32 I/O, normalisations and the
final L2 norm in FP32, weights in FP16, outputs within the cosine gate."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.fp16 import KEEP_FP32_OPS, convert_to_fp16, pinned_node_names
from mim.search.ranking import parity

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
W = 8


def tiny_block() -> onnx.ModelProto:
    """x (B, 8) -> LayerNorm -> MatMul -> Softmax -> MatMul -> Mul(x) residual -> L2 normalise -> y (B, 8)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.ones(W, np.float32), "ln_w"),
        numpy_helper.from_array(np.zeros(W, np.float32), "ln_b"),
        numpy_helper.from_array(rng.standard_normal((W, W)).astype(np.float32) / 3, "w1"),
        numpy_helper.from_array(rng.standard_normal((W, W)).astype(np.float32) / 3, "w2"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.float32(1e-12), "eps"),
        numpy_helper.from_array(np.float32(1.0), "one"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "ln_w", "ln_b"], ["ln"], axis=-1, name="ln"),
        helper.make_node("MatMul", ["ln", "w1"], ["h"], name="mm1"),
        helper.make_node("Softmax", ["h"], ["p"], axis=-1, name="softmax"),
        helper.make_node("MatMul", ["p", "w2"], ["z"], name="proj"),
        helper.make_node("Add", ["z", "x"], ["r"], name="residual"),  # reads the FP32 graph input directly
        helper.make_node("MatMul", ["r", "w1"], ["e"], name="final_proj"),
        # L2 norm tail: e * 1/sqrt(max(sum(e*e), eps))
        helper.make_node("Mul", ["e", "e"], ["sq"], name="sq"),
        helper.make_node("ReduceSum", ["sq", "axes"], ["ss"], keepdims=1, name="sum"),
        helper.make_node("Max", ["ss", "eps"], ["cl"], name="clamp"),
        helper.make_node("Sqrt", ["cl"], ["nrm"], name="sqrt"),
        helper.make_node("Div", ["one", "nrm"], ["inv"], name="inv"),
        helper.make_node("Mul", ["e", "inv"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", FLOAT, ["batch", W])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", W])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def converted():
    return convert_to_fp16(tiny_block())


def test_io_stays_fp32_with_contract_names(converted):
    model, _ = converted
    onnx.checker.check_model(model, full_check=True)
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.input] == [("x", FLOAT)]
    assert [(v.name, v.type.tensor_type.elem_type) for v in model.graph.output] == [("y", FLOAT)]


def test_normalisations_and_the_l2_tail_compute_in_fp32(converted):
    model, report = converted
    types = elem_types(model)
    pinned = {"LayerNormalization", "Softmax", "ReduceSum", "Sqrt", "Max", "Div"}
    for node in model.graph.node:
        if node.op_type in pinned:
            floats = [types[t] for t in node.input if t and types.get(t) in (FLOAT, HALF)]
            assert floats and all(t == FLOAT for t in floats), f"{node.op_type} {node.name} reads FP16"
    assert report["fp32_nodes"] == {
        "Div": 1,
        "LayerNormalization": 1,
        "Max": 1,
        "Mul": 2,
        "ReduceSum": 1,
        "Softmax": 1,
        "Sqrt": 1,
    }


def test_matmuls_run_in_fp16_with_fp16_weights(converted):
    model, _ = converted
    types = elem_types(model)
    for node in model.graph.node:
        if node.op_type == "MatMul":
            assert [types[t] for t in node.input] == [HALF, HALF], node.name
    assert all(i.data_type != FLOAT or i.name in ("ln_w", "ln_b", "eps", "one") for i in model.graph.initializer)


def test_no_redundant_cast_pairs(converted):
    model, report = converted
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "Cast":
            src = producers.get(node.input[0])
            assert src is None or src.op_type != "Cast", f"Cast {src.name} -> Cast {node.name}"
    # x -> fp16 (for the residual), LN -> fp16, Softmax in and out, final_proj -> fp32
    assert report["casts"] == 5


def test_outputs_pass_the_cosine_gate(converted):
    model, _ = converted
    ref_model = tiny_block()
    x = np.random.default_rng(3).standard_normal((9, W)).astype(np.float32)
    assert parity(run(model, x), run(ref_model, x)).min_cosine >= 0.999


def test_pinned_node_names_lists_the_ops_and_the_tail():
    names = pinned_node_names(tiny_block())
    assert names == {"ln", "softmax", "sq", "sum", "clamp", "sqrt", "inv", "scale"}
    assert "Sqrt" in KEEP_FP32_OPS and "LayerNormalization" in KEEP_FP32_OPS


def test_out_of_range_weight_is_refused():
    model = tiny_block()
    w = next(i for i in model.graph.initializer if i.name == "w1")
    w.CopyFrom(numpy_helper.from_array(np.full((W, W), 1e6, np.float32), "w1"))
    with pytest.raises(ValueError, match="beyond FP16's range"):
        convert_to_fp16(model)
