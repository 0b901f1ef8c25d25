"""Graph surgery on exported towers: small named passes over an onnx-graphsurgeon graph.

Each pass is a function `(gs.Graph) -> gs.Graph` that does one thing and ends in `cleanup().toposort()`, so
passes compose in any order and each can be tested alone on a tiny hand-built model. `run_passes` applies a
list of them to an `onnx.ModelProto` and records the node count before and after each one; the exporter
stores that report in `export.json`.

What the TorchScript exporter leaves behind in our towers, and the pass that removes it:
- `Constant` nodes and `Identity` nodes aliasing deduplicated weights (LayerNorm scales that are equal at
  init): `fold_constants`, `remove_identity`.
- For every attention reshape a `Shape -> Gather -> Unsqueeze -> Concat` subgraph that recomputes
  `(batch, T, 3, H, Dh)` at run time although only the batch is unknown: `fold_reshape_shapes` replaces it by
  a constant shape with `-1` in the one run-time slot.
- Casts that do nothing (to the type the tensor already has) or that undo a lossless widening (the FP16
  variant's `fp16 -> fp32 -> fp16` pairs between two FP32-pinned ops): `remove_redundant_casts`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

Pass = Callable[[gs.Graph], gs.Graph]


# --- passes ------------------------------------------------------------------------------------------------
def fold_constants(graph: gs.Graph) -> gs.Graph:
    """Evaluate every subgraph whose inputs are all constants (ONNX Runtime does the arithmetic), including
    `Shape` of tensors whose dims are static, and replace it with its value."""
    import onnxruntime as ort

    # Folding runs ORT's own optimiser on each constant subgraph; its warnings about nodes it cannot
    # simplify further are noise here.
    ort.set_default_logger_severity(3)
    graph.fold_constants(fold_shapes=True)
    return graph.cleanup().toposort()


def remove_identity(graph: gs.Graph) -> gs.Graph:
    """Remove `Identity` nodes (and inference-time `Dropout`, which is one): consumers read the source tensor.

    An Identity whose output is a graph output is kept unless its source can take the output's name: graph
    outputs are the tensor contract and keep their names.
    """
    outputs = {id(t) for t in graph.outputs}
    inputs = {id(t) for t in graph.inputs}
    for node in list(graph.nodes):
        if not _is_noop(node):
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if id(dst) in outputs:
            renamable = isinstance(src, gs.Variable) and id(src) not in inputs and id(src) not in outputs
            if not renamable:
                continue
            src.name = dst.name
            graph.outputs = [src if t is dst else t for t in graph.outputs]
            outputs = {id(t) for t in graph.outputs}
        _reroute(dst, src)
        node.outputs.clear()
    return graph.cleanup().toposort()


def remove_redundant_casts(graph: gs.Graph) -> gs.Graph:
    """Drop `Cast`s to the type their input already has, and let `Cast(Cast(x, A->B), B->C)` read `x`
    directly when A->B is a lossless widening (so the pair equals one A->C cast, or nothing when A == C)."""
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "Cast" or not node.outputs:
                continue
            src = node.inputs[0]
            to = _cast_target(node)
            producer = src.inputs[0] if isinstance(src, gs.Variable) and len(src.inputs) == 1 else None
            if producer is not None and producer.op == "Cast":
                origin = producer.inputs[0]
                if _lossless(_dtype(origin), _dtype(src)):
                    node.inputs[0] = origin
                    src, changed = origin, True
            if _dtype(src) is not None and _dtype(src) == to and _bypass(graph, node, src):
                changed = True
    return graph.cleanup().toposort()


def fold_reshape_shapes(graph: gs.Graph) -> gs.Graph:
    """Replace a `Reshape` target computed at run time from `Shape` pieces by a constant target.

    The tracer emits `Shape -> Gather -> Unsqueeze -> Concat` (and `Shape -> Slice -> Concat`) for
    `x.reshape(b, t, ...)`; only the batch is unknown before run time. Each slot of the target becomes:
    - its value, when it is a constant or a dim that shape inference knows;
    - `0` ("copy this dim of the input"), when it is `Shape(data)[k]` at slot k of the Reshape's own input;
    - `-1` for the one remaining run-time slot, if only one remains: the original target was valid, so that
      slot equals (input size / product of the others), which is what `-1` computes.
    Targets with two run-time slots, or `allowzero=1`, are left alone. The shape subgraph becomes dead and
    is removed.
    """
    for node in graph.nodes:
        if node.op != "Reshape" or node.attrs.get("allowzero", 0) == 1:
            continue
        shape = node.inputs[1]
        if isinstance(shape, gs.Constant) or len(shape.inputs) != 1 or shape.inputs[0].op != "Concat":
            continue
        slots: list[int | tuple[gs.Tensor, int] | None] = []
        for piece in shape.inputs[0].inputs:
            elements = _shape_elements(piece)
            if elements is None:  # a piece of unknown length: cannot line slots up
                slots = []
                break
            slots.extend(elements)
        if not slots:
            continue
        data = node.inputs[0]
        values = [0 if isinstance(v, tuple) and v[0] is data and v[1] == k else v for k, v in enumerate(slots)]
        unknown = [k for k, v in enumerate(values) if not isinstance(v, int)]
        if len(unknown) > 1 or (unknown and -1 in values):
            continue
        for k in unknown:
            values[k] = -1
        node.inputs[1] = gs.Constant(f"{node.name}_shape_folded", np.asarray(values, dtype=np.int64))
    return graph.cleanup().toposort()


def _shape_elements(t: gs.Tensor) -> list[int | tuple[gs.Tensor, int] | None] | None:
    """The elements of a 1-D int64 shape piece: ints where known, `(x, i)` for a run-time `x.shape[i]`, None
    for anything else; None overall if the piece's length is not known."""
    if isinstance(t, gs.Constant):
        return [int(v) for v in np.asarray(t.values).reshape(-1)]
    if len(t.inputs) != 1:
        return [None] if t.shape is not None and list(t.shape) == [1] else None
    node = t.inputs[0]
    src = node.inputs[0] if node.inputs else None
    if node.op == "Unsqueeze" and src is not None and src.shape is not None and len(src.shape) == 0:
        return [_scalar_dim(src)]
    if node.op == "Slice" and src is not None and _is_shape_of(src):
        x = src.inputs[0].inputs[0]
        bounds = _const_ints(node.inputs[1:]) if len(node.inputs) >= 3 else None
        if x.shape is None or bounds is None or any(len(b) != 1 for b in bounds):
            return None
        start, end, *rest = (b[0] for b in bounds)
        if (rest and rest[0] != 0) or (len(rest) > 1 and rest[1] != 1):  # axes must be [0], steps [1]
            return None
        rank = len(x.shape)
        start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
        return [_dim(x, i) for i in range(start, end)]
    return [None] if t.shape is not None and list(t.shape) == [1] else None


def _scalar_dim(t: gs.Tensor) -> int | tuple[gs.Tensor, int] | None:
    """`Gather(Shape(x), i)` with a constant scalar i -> x.shape[i] (int if static, else `(x, i)`)."""
    if len(t.inputs) != 1 or t.inputs[0].op != "Gather":
        return None
    gather = t.inputs[0]
    src, idx = gather.inputs[0], gather.inputs[1]
    if not _is_shape_of(src) or not isinstance(idx, gs.Constant) or np.asarray(idx.values).size != 1:
        return None
    x = src.inputs[0].inputs[0]
    if x.shape is None:
        return None
    i = int(np.asarray(idx.values).reshape(-1)[0])
    return _dim(x, i + len(x.shape) if i < 0 else i)


def _is_shape_of(t: gs.Tensor) -> bool:
    return (
        len(t.inputs) == 1
        and t.inputs[0].op == "Shape"
        and not t.inputs[0].attrs.get("start")
        and (t.inputs[0].attrs.get("end") is None)
    )


def _dim(x: gs.Tensor, i: int) -> int | tuple[gs.Tensor, int]:
    d = x.shape[i]
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else (x, i)


def _const_ints(tensors: Sequence[gs.Tensor]) -> list[list[int]] | None:
    if not all(isinstance(t, gs.Constant) for t in tensors):
        return None
    return [[int(v) for v in np.asarray(t.values).reshape(-1)] for t in tensors]


def remove_dead_nodes(graph: gs.Graph) -> gs.Graph:
    """Remove nodes and initializers that no graph output depends on. Graph inputs stay even when unused:
    they are the tensor contract, and Triton sends every declared input."""
    return graph.cleanup(remove_unused_node_outputs=True, remove_unused_graph_inputs=False).toposort()


# The order the exporter uses: fold first (it exposes static shapes to the reshape pass), then remove what
# folding left idle.
DEFAULT_PASSES: tuple[Pass, ...] = (
    fold_constants,
    remove_identity,
    fold_reshape_shapes,
    remove_redundant_casts,
    remove_dead_nodes,
)


# --- driver ------------------------------------------------------------------------------------------------
def run_passes(model: onnx.ModelProto, passes: Sequence[Pass] = DEFAULT_PASSES) -> tuple[onnx.ModelProto, list[dict]]:
    """Apply `passes` in order. Returns the new model and one `{"pass", "nodes_before", "nodes_after"}` row per
    pass (node counts include `Constant` nodes, so folding them shows)."""
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    report = []
    for p in passes:
        before = len(graph.nodes)
        graph = p(graph)
        report.append({"pass": p.__name__, "nodes_before": before, "nodes_after": len(graph.nodes)})
        log.debug("surgery %s: %d -> %d nodes", p.__name__, before, len(graph.nodes))
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out, report


def count_nodes(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


# --- helpers -----------------------------------------------------------------------------------------------
def _is_noop(node: gs.Node) -> bool:
    if node.op == "Identity":
        return len(node.inputs) == 1 and len(node.outputs) == 1
    if node.op == "Dropout":
        # Inference-mode Dropout copies its input; the optional mask output must be unused.
        training = node.inputs[2] if len(node.inputs) > 2 else None
        in_training = training is not None and not (isinstance(training, gs.Constant) and not np.any(training.values))
        mask_used = len(node.outputs) > 1 and bool(node.outputs[1].outputs)
        return not in_training and not mask_used
    return False


def _reroute(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` read `new` instead."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def _bypass(graph: gs.Graph, node: gs.Node, src: gs.Tensor) -> bool:
    """Remove a no-op single-output node, keeping graph-output names. Returns whether it was removed."""
    dst = node.outputs[0]
    if any(t is dst for t in graph.outputs):
        renamable = isinstance(src, gs.Variable) and src.inputs and not any(t is src for t in graph.outputs)
        if not renamable:
            return False
        src.name = dst.name
        graph.outputs = [src if t is dst else t for t in graph.outputs]
    _reroute(dst, src)
    node.outputs.clear()
    return True


def _cast_target(node: gs.Node) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))


def _dtype(t: gs.Tensor) -> np.dtype | None:
    if isinstance(t, gs.Constant):
        return np.dtype(t.values.dtype)
    if t.dtype is None:
        return None
    try:
        return np.dtype(t.dtype)
    except TypeError:  # onnx dtypes numpy lacks (bfloat16, float8)
        return None


# Casts A -> B that keep every value of A exactly, so a following B -> C cast sees what A -> C would.
_WIDENINGS = {
    ("float16", "float32"),
    ("float16", "float64"),
    ("float32", "float64"),
    ("int8", "int16"),
    ("int8", "int32"),
    ("int8", "int64"),
    ("int16", "int32"),
    ("int16", "int64"),
    ("int32", "int64"),
    ("uint8", "int16"),
    ("uint8", "int32"),
    ("uint8", "int64"),
    ("uint16", "int32"),
    ("uint16", "int64"),
    ("uint32", "int64"),
}


def _lossless(a: np.dtype | None, b: np.dtype | None) -> bool:
    return a is not None and b is not None and (a == b or (a.name, b.name) in _WIDENINGS)
