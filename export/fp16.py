"""FP16 variant of an exported tower, for GPU runtimes without TensorRT (ONNX Runtime CUDA, the python backend).

Weights and matrix work go to FP16; the normalisation reductions stay FP32, because their sums of squares
overflow FP16's 65504 (the known CLIP-in-FP16 failure): every `LayerNormalization`, `ReduceMean`, `Pow`,
`Sqrt`, `Softmax`, `ReduceSum`, and the output tail after the last projection (the final L2 normalisation)
run in FP32 with `Cast`s inserted around them. Graph inputs and outputs stay FP32, so the tensor contract
(and every client and config.pbtxt) is the same for both variants.

How: each float tensor gets the precision of the node producing it (graph inputs: FP32; FP16 nodes: FP16;
pinned nodes: FP32). A consumer that needs the other precision reads it through one shared `Cast` per tensor
and target type. Float initializers read by FP16 nodes are stored in FP16 (one copy per initializer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .surgery import remove_redundant_casts

# Ops computed in FP32 wherever they are. LayerNormalization is a single op at opset >= 17 with the
# TorchScript exporter (our towers have no ReduceMean/Pow decomposition); the decomposed forms are listed
# for older opsets and other exporters.
KEEP_FP32_OPS = frozenset(
    {
        "LayerNormalization",
        "ReduceMean",
        "Pow",
        "Sqrt",
        "Softmax",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "LpNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "BatchNormalization",
    }
)
# Walking back from a graph output, these end the FP32 output tail: the projection stays FP16 (tensor-core
# matmul with FP32 accumulation on the GPU); the L2 normalisation after it stays FP32.
_TAIL_STOP = frozenset({"MatMul", "Gemm", "Conv", "Gather", "Einsum"})

F32, F16 = np.dtype(np.float32), np.dtype(np.float16)


def convert_to_fp16(
    model: onnx.ModelProto, keep_fp32_ops: Iterable[str] = KEEP_FP32_OPS
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Return the FP16 variant of an FP32 model and a report
    `{"fp32_nodes": {op: count}, "fp16_nodes": n, "casts_inserted": n}`."""
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    keep = _pinned_nodes(graph, frozenset(keep_fp32_ops))
    conv = _Converter(graph)
    for node in list(graph.nodes):
        if id(node) in keep:
            conv.pin_fp32(node)
        else:
            conv.to_fp16(node)
    conv.restore_outputs()
    graph = remove_redundant_casts(graph.cleanup().toposort())
    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    report = {
        "fp32_nodes": dict(sorted(Counter(n.op for n in graph.nodes if id(n) in keep).items())),
        "fp16_nodes": sum(1 for n in graph.nodes if id(n) not in keep and n.op != "Cast"),
        "casts": sum(1 for n in graph.nodes if n.op == "Cast"),
        "keep_fp32_ops": sorted(keep_fp32_ops),
    }
    return out, report


def pinned_node_names(model: onnx.ModelProto, keep_fp32_ops: Iterable[str] = KEEP_FP32_OPS) -> set[str]:
    """Names of the ONNX nodes to keep in FP32 (used by the TensorRT builder to pin the matching layers)."""
    graph = gs.import_onnx(model)
    keep = _pinned_nodes(graph, frozenset(keep_fp32_ops))
    return {n.name for n in graph.nodes if id(n) in keep}


def _pinned_nodes(graph: gs.Graph, keep_ops: frozenset[str]) -> set[int]:
    """Ids of nodes to run in FP32: the listed op types, plus the output tail back to the last projection."""
    keep = {id(n) for n in graph.nodes if n.op in keep_ops}
    stack = [t.inputs[0] for t in graph.outputs if t.inputs]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen or node.op in _TAIL_STOP:
            continue
        seen.add(id(node))
        keep.add(id(node))
        stack.extend(t.inputs[0] for t in node.inputs if isinstance(t, gs.Variable) and t.inputs)
    return keep


class _Converter:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.casts: dict[tuple[int, str], gs.Variable] = {}  # (id(tensor), target) -> cast output
        self.half_consts: dict[int, gs.Constant] = {}
        self.original_outputs = {id(t): t.name for t in graph.outputs}

    # float32 Variables produced by FP16 nodes get dtype float16; this tells which precision a tensor has now.
    def to_fp16(self, node: gs.Node) -> None:
        for i, t in enumerate(node.inputs):
            if _is_float(t, F32):
                node.inputs[i] = self._half_const(t) if isinstance(t, gs.Constant) else self._cast(t, F16)
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
        if node.op == "ConstantOfShape":
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant) and value.values.dtype == F32:
                node.attrs["value"] = gs.Constant(value.name, value.values.astype(F16))
        for t in node.outputs:
            if _is_float(t, F32):
                t.dtype = F16

    def pin_fp32(self, node: gs.Node) -> None:
        for i, t in enumerate(node.inputs):
            if isinstance(t, gs.Variable) and _is_float(t, F16):
                node.inputs[i] = self._cast(t, F32)

    def restore_outputs(self) -> None:
        """Graph outputs keep their FP32 type and their contract names."""
        outs = []
        for t in self.graph.outputs:
            if _is_float(t, F16):
                name = t.name
                t.name = f"{name}_fp16"
                cast = gs.Variable(name, dtype=F32, shape=t.shape)
                self.graph.nodes.append(
                    gs.Node(
                        "Cast", name=f"{name}_to_fp32", attrs={"to": onnx.TensorProto.FLOAT}, inputs=[t], outputs=[cast]
                    )
                )
                t = cast
            outs.append(t)
        self.graph.outputs = outs

    def _cast(self, t: gs.Variable, target: np.dtype) -> gs.Variable:
        key = (id(t), target.name)
        if key not in self.casts:
            out = gs.Variable(f"{t.name}_{target.name}", dtype=target, shape=t.shape)
            to = onnx.TensorProto.FLOAT16 if target == F16 else onnx.TensorProto.FLOAT
            self.graph.nodes.append(
                gs.Node("Cast", name=f"{t.name}_cast_{target.name}", attrs={"to": to}, inputs=[t], outputs=[out])
            )
            self.casts[key] = out
        return self.casts[key]

    def _half_const(self, c: gs.Constant) -> gs.Constant:
        if id(c) not in self.half_consts:
            values = np.asarray(c.values)
            if np.any(np.abs(values[np.isfinite(values)]) > np.finfo(np.float16).max):
                raise ValueError(f"initializer {c.name!r} has values beyond FP16's range ({np.abs(values).max():.3g})")
            self.half_consts[id(c)] = gs.Constant(f"{c.name}_fp16", values.astype(F16))
        return self.half_consts[id(c)]


def _is_float(t: gs.Tensor, dtype: np.dtype) -> bool:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype == dtype
    try:
        return t.dtype is not None and np.dtype(t.dtype) == dtype
    except TypeError:
        return False
