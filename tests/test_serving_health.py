"""A python-backend stub that dies is reported by name, with the server log's errors, although Triton keeps its
model READY (a real tritonserver with a one-model repository; the stub is killed the way a crash ends it)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mim.serving import server as S

pytestmark = pytest.mark.server

CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
MODEL = """import triton_python_backend_utils as pb_utils
from mim.serving import python_backend


class TritonPythonModel:
    def initialize(self, args):
        print(f"[echo] {python_backend.environment_line()}", flush=True)

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
            for r in requests
        ]
"""


@pytest.fixture
def echo_server(tmp_path):
    (tmp_path / "repo" / "echo" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "echo" / "config.pbtxt").write_text(CONFIG)
    (tmp_path / "repo" / "echo" / "1" / "model.py").write_text(MODEL)
    server = S.TritonServer(tmp_path / "repo", model_control="none", log_path=tmp_path / "server.log")
    with server:
        yield server


def test_a_dead_stub_is_named_with_the_log_errors(echo_server):
    stubs = S.stub_processes(echo_server.process.pid)
    assert list(stubs) == ["echo_0_0"]
    assert echo_server.dead_stubs() == [] and echo_server.loaded_models() == {"echo"}
    echo_server.check_health()  # healthy: no error
    # The stub printed which numpy it runs, from where (the first thing to read when tensors come out wrong).
    assert "[echo] numpy 1." in echo_server.log_text()
    os.kill(stubs["echo_0_0"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while S.stub_processes(echo_server.process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert echo_server.dead_stubs() == ["echo_0_0"]
    with pytest.raises(S.TritonServerError, match=r"python-backend stub of echo_0_0 died; .*not healthy.*reloaded"):
        echo_server.check_health()


def test_error_lines_pick_the_errors_out_of_a_server_log():
    log = "\n".join(
        [
            'I1204 19:29:57.1 1 server.cc:1] "loaded"',
            'E1204 19:30:14.0 1 ensemble.cc:2] "unable to create stream"',
            "Traceback (most recent call last):",
            "terminate called after throwing an instance of 'pybind11::error_already_set'",
            "  what():  error: unpack_from requires a buffer of at least 84215049 bytes",
            'I1204 19:30:15.0 1 server.cc:3] "fine"',
        ]
    )
    lines = S.error_lines(log).splitlines()
    assert len(lines) == 4 and lines[0].startswith("E1204") and "what():" in lines[-1]
