"""The baseline a Python user would write instead of our repository: PyTriton serving the torch towers eagerly.

    python -m benchmarks.pytriton_baseline --checkpoint CKPT --grpc-port 8101 --http-port 8100 --metrics-port 8102

Binds `embed_image`, `embed_text` and `embed_multimodal` with the same tensor names, dtypes and batch limit as
our ensembles (mim.contract), so perf_analyzer sends both servers the same input-data files. Each is one
`@batch` inference callable that runs the in-process torch embedder (`mim.search.embedding.TorchEmbedder`: Python
preprocessing, the checkpoint's tokenizer, the torch model in eager mode) under PyTriton's default dynamic batcher.
PyTriton launches the same bundled tritonserver binary (nvidia-pytriton) and proxies requests to this process;
every listener is bound to 127.0.0.1.

`PyTritonProcess` runs this module as a child process (its own interpreter, so its torch threads and GIL do not
share the benchmark driver's) and waits, bounded, until it is ready.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mim import contract
from mim.commandline import CommandParser
from mim.serving.server import python_library_dir

HOST = "127.0.0.1"
READY_LINE = "pytriton baseline ready"
# PyTriton restricts these endpoints behind a generated token by default. perf_analyzer reads the server-side
# breakdown from the statistics endpoint and cannot send the token over gRPC, so statistics stays open; the
# listeners are on 127.0.0.1 only.
RESTRICTED_ENDPOINTS = ["shared-memory", "model-repository", "trace", "logging"]


def _rows(arr: np.ndarray) -> list[bytes]:
    """(N, 1) BYTES input -> N byte strings (PyTriton hands them over as np.bytes_ or object arrays)."""
    return [v if isinstance(v, bytes) else bytes(v) for v in arr.reshape(len(arr))]


def make_infer_functions(checkpoint: Path, threads: int | None = None) -> dict:
    """name -> (infer callable, inputs, outputs) for PyTriton's `bind`; the torch model is loaded once."""
    import torch
    from pytriton.decorators import batch
    from pytriton.model_config import Tensor

    from mim.model.checkpoint import load_checkpoint
    from mim.search.embedding import TorchEmbedder

    if threads:
        torch.set_num_threads(threads)
    ck = load_checkpoint(checkpoint)
    # The torch model run eagerly per request batch: Python preprocessing, torch forward, fusion in NumPy.
    embedder, pre = TorchEmbedder(ck), ck.pre_cfg

    @batch
    def embed_image(image: np.ndarray) -> dict:
        return {contract.EMBEDDING.name: embedder.embed_images(_rows(image))}

    @batch
    def embed_text(text: np.ndarray) -> dict:
        return {contract.EMBEDDING.name: embedder.embed_texts(_rows(text))}

    @batch
    def embed_multimodal(image: np.ndarray, text: np.ndarray) -> dict:
        return {contract.EMBEDDING.name: embedder.embed_multimodal(_rows(image), _rows(text))}

    def tensor(spec: contract.TensorSpec) -> Tensor:
        dims = spec.resolve_dims(ck.model_cfg, pre)
        return Tensor(name=spec.name, dtype=np.bytes_ if spec.dtype == "BYTES" else spec.numpy_dtype, shape=dims)

    fns = {
        contract.EMBED_IMAGE: embed_image,
        contract.EMBED_TEXT: embed_text,
        contract.EMBED_MULTIMODAL: embed_multimodal,
    }
    return {
        name: (
            fn,
            [tensor(s) for s in contract.MODELS[name].inputs],
            [tensor(s) for s in contract.MODELS[name].outputs],
        )
        for name, fn in fns.items()
    }


def serve(checkpoint: Path, grpc_port: int, http_port: int, metrics_port: int, threads: int | None = None) -> None:
    """Blocks serving until SIGINT/SIGTERM."""
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    config = TritonConfig(
        grpc_address=HOST,
        grpc_port=grpc_port,
        http_address=HOST,
        http_port=http_port,
        metrics_address=HOST,
        metrics_port=metrics_port,
        allow_gpu_metrics=False,
    )
    security = TritonSecurityConfig(restricted_endpoints=list(RESTRICTED_ENDPOINTS))
    functions = make_infer_functions(checkpoint, threads)
    with Triton(config=config, security_config=security) as triton:
        for name, (fn, inputs, outputs) in functions.items():
            # What a PyTriton user writes: the contract's batch limit, the default batcher (no queue delay).
            triton.bind(
                model_name=name,
                infer_func=fn,
                inputs=inputs,
                outputs=outputs,
                config=ModelConfig(max_batch_size=contract.MAX_BATCH_SIZE, batcher=DynamicBatcher()),
            )
        print(f"{READY_LINE}: grpc {HOST}:{grpc_port} http {HOST}:{http_port}", flush=True)
        triton.serve()


class PyTritonProcess:
    """The baseline server as a child process on free 127.0.0.1 ports, as a context manager."""

    def __init__(self, checkpoint: Path, log_path: Path, *, startup_timeout: float = 120.0, threads: int | None = None):
        from mim.serving.server import free_port

        self.checkpoint = Path(checkpoint)
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.threads = threads
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.pytriton_baseline",
            "--checkpoint",
            str(self.checkpoint),
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--metrics-port",
            str(self.metrics_port),
        ]
        return cmd + (["--threads", str(self.threads)] if self.threads else [])

    def start(self) -> PyTritonProcess:
        self.start_async()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def start_async(self) -> PyTritonProcess:
        """Launch without waiting (overlaps its start-up with other work); call wait_ready() before use."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        root = Path(__file__).resolve().parents[1]
        env = stub_env(root)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        models = (contract.EMBED_IMAGE, contract.EMBED_TEXT, contract.EMBED_MULTIMODAL)
        urls = [f"http://{HOST}:{self.http_port}/v2/health/ready"] + [
            f"http://{HOST}:{self.http_port}/v2/models/{m}/ready" for m in models
        ]
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"PyTriton baseline exited with code {code} while starting; log {self.log_path}:\n{self.log_tail()}"
                )
            if all(_http_ok(u) for u in urls):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"PyTriton baseline not ready after {self.startup_timeout:.0f} s; log "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGINT to the group (PyTriton stops its tritonserver and cleans its workspace), SIGKILL after 20 s."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self.process = None

    def __enter__(self) -> PyTritonProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stub_env(root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: this checkout importable, and this interpreter's libpython first on
    LD_LIBRARY_PATH (see `mim.serving.server.python_library_dir`). PyTriton appends its own library folder to
    what it inherits."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    libdir = python_library_dir()
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    return env


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the session start_new_session created: the child, its tritonserver, stubs
    except (ProcessLookupError, PermissionError):
        pass


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    p = CommandParser(prog="python -m benchmarks.pytriton_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder (mimsearch train)")
    p.add_argument("--grpc-port", type=int, default=8101)
    p.add_argument("--http-port", type=int, default=8100)
    p.add_argument("--metrics-port", type=int, default=8102)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        serve(args.checkpoint, args.grpc_port, args.http_port, args.metrics_port, args.threads)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
