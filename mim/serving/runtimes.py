"""Encoder runtimes: the registry the python-backend handler factory looks a runtime up in.

An encoder model's config names its runtime in the parameter `RUNTIME_PARAM` (absent: `DEFAULT_RUNTIME`).
Each runtime maps to the function that builds the encoder's handler, named as "module:function" and imported
only when a model asks for it (the way fsspec's registry names implementations), so ONNX Runtime models never
import torch and no module here imports a runtime's code. Every builder has one signature:

    build(name, version_dir, params, dims, device_id) -> Handler

with `params` the model config's string parameters and `dims` its per-row tensor dims. Adding a runtime is one
module holding its builder and one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

RUNTIME_PARAM = "encoder_backend"
DEFAULT_RUNTIME = "onnx"

RUNTIMES: dict[str, str] = {
    "onnx": "mim.serving.backends:build_onnx_encoder",  # ONNX Runtime, CPU or CUDA provider
    "torch": "mim.serving.torch_backend:build_handler",  # the towers in torch, FP32 CPU or FP16 CUDA graphs
}


def encoder_builder(runtime: str) -> Callable[..., Any]:
    """The handler builder of `runtime`; an unknown name is refused with the known ones."""
    if runtime not in RUNTIMES:
        raise ValueError(
            f"unknown encoder runtime {runtime!r} (model config parameter {RUNTIME_PARAM!r}); expected one of "
            f"{sorted(RUNTIMES)}: regenerate the repository (mimsearch repository --write)"
        )
    module, _, function = RUNTIMES[runtime].partition(":")
    return getattr(importlib.import_module(module), function)
