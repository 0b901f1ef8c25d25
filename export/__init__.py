"""Exporters: each tower to ONNX, graph surgery, an FP16 ONNX variant and TensorRT FP16 engines (`make engines`)."""

from mim.errors import MimFailure


class ExportError(MimFailure):
    """Base of the exporters' errors (export, FP16 gate, TensorRT build, install): the message says what to do."""
