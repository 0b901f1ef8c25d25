"""Each graph-surgery pass on a tiny hand-built model: it does what it says, and ONNX Runtime's outputs are
unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from export.surgery import (
    DEFAULT_PASSES,
    fold_constants,
    fold_reshape_shapes,
    remove_dead_nodes,
    remove_identity,
    remove_redundant_casts,
    run_passes,
)

FLOAT, HALF, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


def make_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def const(name: str, values) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(values), name)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def apply(model: onnx.ModelProto, p) -> onnx.ModelProto:
    out, report = run_passes(model, [p])
    onnx.checker.check_model(out, full_check=True)
    assert report[0]["pass"] == p.__name__
    return out


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_same_outputs(before, after, feeds_list):
    for feeds in feeds_list:
        for a, b in zip(run(before, feeds), run(after, feeds)):
            np.testing.assert_allclose(a, b, rtol=0, atol=0)


def x_feeds(*batches, width=4, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((b, width)).astype(np.float32)} for b in batches]


def test_fold_constants_folds_constant_arithmetic_and_static_shapes():
    # y = x * ((c1 + c2) * float(x.shape[1])): the Add is constant; Shape->Gather on the static dim 1 is too.
    nodes = [
        helper.make_node("Constant", [], ["c1"], value=helper.make_tensor("v1", FLOAT, [4], [1, 2, 3, 4])),
        helper.make_node("Add", ["c1", "c2"], ["s"]),
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "one"], ["width"], axis=0),
        helper.make_node("Cast", ["width"], ["widthf"], to=FLOAT),
        helper.make_node("Mul", ["s", "widthf"], ["k"]),
        helper.make_node("Mul", ["x", "k"], ["y"]),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 4])],
        [const("c2", np.full(4, 0.5, np.float32)), const("one", np.int64(1))],
    )
    out = apply(model, fold_constants)
    assert ops(out) == ["Mul"]
    assert_same_outputs(model, out, x_feeds(1, 5))


def test_remove_identity_rewires_consumers_and_keeps_the_output_name():
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Identity", ["b"], ["y"]),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 4])],
    )
    out = apply(model, remove_identity)
    assert ops(out) == ["Relu"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert_same_outputs(model, out, x_feeds(1, 3))


def test_remove_identity_keeps_an_identity_between_graph_input_and_output():
    # Removing it would need the output to take the input's name: the contract names both, so it stays.
    model = make_model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 4])],
    )
    out = apply(model, remove_identity)
    assert ops(out) == ["Identity"]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]


def test_remove_redundant_casts_collapses_lossless_round_trips_only():
    # h: fp16 -> fp32 -> fp16 is the identity (lossless widening then back): removed.
    # x: fp32 -> fp16 -> fp32 rounds: kept. Cast fp32 -> fp32 is a no-op: removed.
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=FLOAT),  # no-op
        helper.make_node("Cast", ["x32"], ["x16"], to=HALF),
        helper.make_node("Cast", ["x16"], ["xr"], to=FLOAT),  # lossy round trip: must stay
        helper.make_node("Cast", ["h"], ["h32"], to=FLOAT),
        helper.make_node("Cast", ["h32"], ["h16"], to=HALF),  # lossless round trip: collapses
        helper.make_node("Relu", ["h16"], ["hr"]),
        helper.make_node("Cast", ["hr"], ["hrf"], to=FLOAT),
        helper.make_node("Add", ["xr", "hrf"], ["y"]),
    ]
    model = make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("h", HALF, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 4])],
    )
    out = apply(model, remove_redundant_casts)
    assert ops(out).count("Cast") == 3  # x -> fp16, back to fp32, relu -> fp32
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert list(relu.input) == ["h"]
    rng = np.random.default_rng(1)
    feeds = [
        {"x": (rng.standard_normal((b, 4)) * 3).astype(np.float32), "h": rng.standard_normal((b, 4)).astype(np.float16)}
        for b in (1, 6)
    ]
    assert_same_outputs(model, out, feeds)


def test_remove_redundant_casts_keeps_a_no_op_cast_feeding_only_the_graph_output_from_an_input():
    model = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=FLOAT)],
        [helper.make_tensor_value_info("x", FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 4])],
    )
    out = apply(model, remove_redundant_casts)
    assert [o.name for o in out.graph.output] == ["y"] and ops(out) == ["Cast"]


def reshape_model(copy_own_dim: bool = False) -> onnx.ModelProto:
    # y = data.reshape(x.shape[0], 2, 3): the TorchScript exporter's Shape -> Gather -> Unsqueeze -> Concat.
    # data is x itself (copy_own_dim) or another tensor with the same batch, as in attention blocks.
    data = "x" if copy_own_dim else "xr"
    nodes = [
        helper.make_node("Relu", ["x"], ["xr"]),
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Concat", ["b1", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", [data, "target"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 2, 3])],
        [const("zero", np.int64(0)), const("axes", np.array([0], np.int64)), const("rest", np.array([2, 3], np.int64))],
    )


def reshape_target(model: onnx.ModelProto) -> list[int]:
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    return onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == reshape.input[1])).tolist()


def test_fold_reshape_shapes_puts_minus_one_in_the_runtime_slot():
    model = reshape_model()
    out = apply(model, fold_reshape_shapes)
    assert sorted(ops(out)) == ["Relu", "Reshape"]
    assert reshape_target(out) == [-1, 2, 3]
    assert_same_outputs(model, out, x_feeds(1, 7, width=6))


def test_fold_reshape_shapes_copies_a_dim_of_its_own_input():
    model = reshape_model(copy_own_dim=True)
    out = apply(model, fold_reshape_shapes)
    assert ops(out) == ["Reshape"] and reshape_target(out) == [0, 2, 3]  # 0: copy input dim 0
    assert_same_outputs(model, out, x_feeds(1, 7, width=6))


def test_fold_reshape_shapes_handles_the_flatten_slice():
    # y = x.flatten(1) as traced: Reshape(x, Concat(Slice(Shape(x), 0, 1), [-1])).
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Slice", ["shp", "s0", "s1"], ["lead"]),
        helper.make_node("Concat", ["lead", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["batch", 2, 3])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 6])],
        [
            const("s0", np.array([0], np.int64)),
            const("s1", np.array([1], np.int64)),
            const("minus1", np.array([-1], np.int64)),
        ],
    )
    out = apply(model, fold_reshape_shapes)
    assert ops(out) == ["Reshape"] and reshape_target(out) == [0, -1]
    rng = np.random.default_rng(0)
    assert_same_outputs(model, out, [{"x": rng.standard_normal((b, 2, 3)).astype(np.float32)} for b in (1, 4)])


def test_fold_reshape_shapes_leaves_two_runtime_slots_alone():
    nodes = [
        helper.make_node("Relu", ["x"], ["xr"]),
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Gather", ["shp", "one"], ["w"], axis=0),
        helper.make_node("Unsqueeze", ["w", "axes"], ["w1"]),
        helper.make_node("Concat", ["b1", "w1"], ["target"], axis=0),
        helper.make_node("Reshape", ["xr", "target"], ["y"]),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", "width"])],
        [const("zero", np.int64(0)), const("one", np.int64(1)), const("axes", np.array([0], np.int64))],
    )
    out = apply(model, fold_reshape_shapes)
    assert sorted(ops(out)) == sorted(ops(model))


def test_remove_dead_nodes_keeps_unused_contract_inputs():
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dangling"]),  # feeds nothing
    ]
    model = make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("unused", FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("y", FLOAT, ["batch", 4])],
        [const("stale_weight", np.ones(4, np.float32))],
    )
    out = apply(model, remove_dead_nodes)
    assert ops(out) == ["Relu"]
    assert [i.name for i in out.graph.input] == ["x", "unused"]
    assert not out.graph.initializer
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((3, 4)).astype(np.float32), "unused": np.ones((3, 4), np.float32)}
    np.testing.assert_array_equal(run(model, feeds)[0], run(out, feeds)[0])


def test_run_passes_reports_node_counts_per_pass():
    model = reshape_model()
    # Put an Identity and a constant Add in front, so several passes have work.
    graph = gs.import_onnx(model)
    x = graph.inputs[0]
    ident = gs.Variable("x_id", dtype=np.float32, shape=x.shape)
    added = gs.Variable("x_add", dtype=np.float32, shape=x.shape)
    zero = gs.Constant("zeros", np.zeros(6, np.float32))
    twice = gs.Variable("zz", dtype=np.float32, shape=[6])
    graph.nodes += [
        gs.Node("Identity", inputs=[x], outputs=[ident]),
        gs.Node("Add", inputs=[zero, zero], outputs=[twice]),
        gs.Node("Add", inputs=[ident, twice], outputs=[added]),
    ]
    reshape = next(n for n in graph.nodes if n.op == "Reshape")
    reshape.inputs[0] = added
    model = gs.export_onnx(graph.cleanup().toposort())

    out, report = run_passes(model, DEFAULT_PASSES)
    assert [r["pass"] for r in report] == [p.__name__ for p in DEFAULT_PASSES]
    assert report[0]["nodes_before"] == len(model.graph.node) == 8
    for prev, nxt in zip(report, report[1:]):
        assert prev["nodes_after"] == nxt["nodes_before"]
    assert sorted(ops(out)) == ["Add", "Reshape"] and reshape_target(out) == [-1, 2, 3]
    assert_same_outputs(model, out, x_feeds(1, 4, width=6))


@pytest.mark.parametrize("p", DEFAULT_PASSES, ids=lambda p: p.__name__)
def test_every_pass_ends_clean_and_sorted(p):
    # A graph listed out of order with a dead node: each pass must leave it topologically sorted and clean.
    model = reshape_model()
    nodes = list(model.graph.node)[::-1] + [helper.make_node("Relu", ["x"], ["dead"])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out, _ = run_passes(model, [p])
    onnx.checker.check_model(out, full_check=True)  # fails on a graph that is not topologically sorted
    assert "dead" not in {o for n in out.graph.node for o in n.output}
