"""Triton python-backend plumbing shared by every `model_repository/<name>/1/model.py`.

Converts Triton's request objects into `backends.Request`s and `backends.Response`s back into
`InferenceResponse`s; everything else is in `mim.serving.backends`. `pb_utils` (the module
`triton_python_backend_utils`, which exists only inside the backend's stub process) is passed in rather than
imported, so this file imports anywhere and is tested with a stand-in.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mim import contract
from mim.model.preprocess import InputError
from mim.serving import backends, stub_env


def version_dir(args: Mapping[str, str]) -> Path:
    """The folder of the model version being loaded. The python backend passes the MODEL folder as
    `model_repository` (not the repository root), and the version as a string."""
    return Path(args["model_repository"]) / str(args["model_version"])


def make_handler(name: str, args: Mapping[str, str]) -> backends.Handler:
    """`initialize`: build the handler from the version folder and the config Triton loaded (the variant
    chosen with --model-config-name, so its parameters are the ones used)."""
    print(f"[{args.get('model_instance_name', name)}] {environment_line()}", flush=True)  # into the server log
    check_numpy(np.__version__)
    device_id = int(args.get("model_instance_device_id", 0) or 0)  # the GPU of a KIND_GPU instance
    return backends.make_handler(name, version_dir(args), json.loads(args["model_config"]), device_id)


def environment_line() -> str:
    """Which Python and numpy this stub runs, from where: the first thing to read in a server log when tensors
    come out wrong (mim.serving.stub_env explains why numpy's version matters here)."""
    return (
        f"numpy {np.__version__} from {np.__file__}; Python {sys.version.split()[0]} ({sys.executable}); "
        f"sys.path[0:3] = {sys.path[0:3]}"
    )


def check_numpy(version: str) -> None:
    """Refuse to load under a numpy the stub's pybind11 reads wrongly: a clear load error instead of corrupt
    tensors and a dead stub at the first request."""
    if not stub_env.numpy_works_in_stub(version):
        raise RuntimeError(
            f"this python-backend stub imports numpy {version}, but the stub (pybind11 "
            f"{stub_env.PYBIND11_OF_STUB}) reads numpy 2 arrays wrongly; start the server with "
            "`mimsearch serve` / mim.serving.server.TritonServer, which give the stubs numpy 1.x "
            f"(${stub_env.STUB_NUMPY_ENV} or a `make gpu-bundle`), or install 'numpy<2' in the server's environment"
        )


def request_params(request: Any) -> dict[str, Any]:
    """A request's parameters (a JSON object in the python backend), {} when it has none. A payload that is not
    a JSON object is the request's error (InputError), never read as "use the defaults"."""
    raw = request.parameters() if hasattr(request, "parameters") else ""
    if not raw:
        return {}
    try:
        params = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise InputError(f"request parameters are not JSON ({e}): {str(raw)[:80]!r}; expected a JSON object") from e
    if not isinstance(params, dict):
        raise InputError(f"request parameters must be a JSON object; got {type(params).__name__} {str(raw)[:80]!r}")
    return params


def to_request(pb_utils: Any, io: contract.ModelIO, request: Any, tensor_io: bool = False) -> backends.Request:
    """`tensor_io`: hand the inputs over as torch tensors where Triton put them (host or GPU), else as NumPy."""
    inputs = {}
    for spec in io.inputs:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is not None:  # a missing input is reported by the handler's check
            inputs[spec.name] = torch_tensor(tensor) if tensor_io else host_array(tensor)
    return backends.Request(inputs, request_params(request))


def torch_tensor(tensor: Any) -> Any:
    """A Triton input tensor as a torch tensor on the same device, sharing its memory (DLPack, no copy)."""
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack())


def host_array(tensor: Any) -> Any:
    """A Triton input tensor as a NumPy array. With FORCE_CPU_ONLY_INPUT_TENSORS=no an input may live on the
    GPU, where `as_numpy()` fails: it is then taken through DLPack (zero-copy into torch) and copied to host,
    since the handlers compute with NumPy/ONNX Runtime."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    from torch.utils.dlpack import from_dlpack  # torch only where a GPU tensor actually arrives

    return from_dlpack(tensor.to_dlpack()).cpu().numpy()


def to_response(pb_utils: Any, response: backends.Response) -> Any:
    if response.ok:
        tensors = [output_tensor(pb_utils, name, array) for name, array in response.outputs.items()]
        return pb_utils.InferenceResponse(output_tensors=tensors)
    return pb_utils.InferenceResponse(error=triton_error(pb_utils, response.error, response.code))


def output_tensor(pb_utils: Any, name: str, value: Any) -> Any:
    """A NumPy array is copied into a Triton tensor; a torch tensor (host or GPU) is shared through DLPack."""
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value)
    from torch.utils.dlpack import to_dlpack

    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value))


def triton_error(pb_utils: Any, message: str, code: str) -> Any:
    """TritonError with a status code (INVALID_ARG, INTERNAL) where the python backend has codes (>= 23.10)."""
    error_cls = pb_utils.TritonError
    code_value = getattr(error_cls, code, None)
    return error_cls(message) if code_value is None else error_cls(message, code_value)


def execute(pb_utils: Any, handler: backends.Handler, requests: Sequence[Any]) -> list[Any]:
    """`execute`: one response per request, in order; the good requests run together as one batch, and a
    request whose parameters cannot be read gets its own error."""
    converted: list[backends.Request] = []
    refused: dict[int, backends.Response] = {}
    for i, r in enumerate(requests):
        try:
            converted.append(to_request(pb_utils, handler.io, r, handler.tensor_io))
        except InputError as e:
            refused[i] = backends.Response(error=f"{handler.io.name}: {e}", code=backends.INVALID_ARG)
    answers = iter(handler(converted) if converted else [])
    return [to_response(pb_utils, refused[i] if i in refused else next(answers)) for i in range(len(requests))]
