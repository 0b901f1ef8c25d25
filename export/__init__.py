"""Exporters: each tower to ONNX, graph surgery, an FP16 ONNX variant and TensorRT FP16 engines (`make engines`)."""
