"""The tritonserver launcher without starting a server: paths in the installed wheel, the backend folder, the
command line (127.0.0.1 only, config variants) and the CLI's errors. Starting a real server is tested in
test_serving.py (marked `server`)."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from mim.serving import server as S
from mimsearch.commands import serve as serve_cmd


def test_triton_paths_point_into_the_installed_wheel():
    paths = S.triton_paths()
    assert paths.binary.name == "tritonserver" and os.access(paths.binary, os.X_OK)
    assert (paths.python_backend / "libtriton_python.so").is_file()
    assert paths.stub.parent.name == f"{os.sys.version_info.major}.{os.sys.version_info.minor}"
    env = paths.env(base={"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    # Only this interpreter's libpython goes first (the stub must load the libpython matching our stdlib); the
    # server's own libraries resolve through its RPATH, so nothing of the bundle is put in front of the system's.
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [d for d in (S.python_library_dir(), "/opt/lib") if d]
    assert env["PATH"].split(os.pathsep)[0] == str(S.Path(S.sys.executable).parent)
    stubbed = paths.env(S.Path("/cache/stub-env"), base={"PATH": "/usr/bin"})
    assert stubbed["PATH"].split(os.pathsep) == ["/cache/stub-env/bin", "/usr/bin"]


def test_the_binary_runs_with_the_bundled_libraries():
    paths = S.triton_paths()
    out = subprocess.run([str(paths.binary), "--help"], env=paths.env(), capture_output=True, text=True, timeout=60)
    assert "--model-config-name" in out.stdout + out.stderr  # the flag our config variants rely on


def test_backend_dir_is_built_once_and_safe_to_build_concurrently(tmp_path):
    paths = S.triton_paths()
    results, errors = [], []

    def build():
        try:
            results.append(S.backend_dir(paths, tmp_path))
        except Exception as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    python = results[0] / "python"
    assert {p.name for p in python.iterdir()} >= {"libtriton_python.so", "triton_python_backend_stub"}
    top = results[0].parents[2]  # <cache>/triton-backends-.../pytriton/tritonserver/backends
    assert [p.name for p in tmp_path.iterdir()] == [top.name]  # no temporary folders left behind
    # The stub and the backend find their libraries through RPATH $ORIGIN/../../../../nvidia_pytriton.libs.
    assert (top / "nvidia_pytriton.libs").resolve() == paths.lib_dir.resolve()
    env = {"LD_LIBRARY_PATH": S.python_library_dir() or ""}
    for binary in (python / "triton_python_backend_stub", python / "libtriton_python.so"):
        ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, timeout=30).stdout
        assert "not found" not in ldd, ldd
    stub = python / "triton_python_backend_stub"
    stub.write_bytes(b"truncated")  # a damaged cache is rebuilt
    assert S.backend_dir(paths, tmp_path) == results[0] and stub.stat().st_size == paths.stub.stat().st_size


def test_command_binds_localhost_and_selects_the_config_variant(tmp_path):
    server = S.TritonServer(tmp_path, config="cpu", grpc_port=9001, cache_dir=tmp_path / "cache")
    cmd = server.command()
    for flag in ("--grpc-address", "--http-address", "--metrics-address"):
        assert f"{flag}=127.0.0.1" in cmd
    assert "--grpc-port=9001" in cmd and "--model-config-name=cpu" in cmd
    assert f"--model-repository={tmp_path.resolve()}" in cmd
    assert server.grpc_url == "127.0.0.1:9001"
    assert server.metrics_url == f"http://127.0.0.1:{server.metrics_port}/metrics"
    default = S.TritonServer(tmp_path, config="default", cache_dir=tmp_path / "cache").command()
    assert not any(a.startswith("--model-config-name") for a in default)  # TensorRT config.pbtxt
    with pytest.raises(
        ValueError, match=r"config 'tensorrt'; expected one of \['cpu', 'gpu_onnx', 'torch', 'gpu_torch', 'default'\]"
    ):
        S.TritonServer(tmp_path, config="tensorrt")


def test_free_ports_differ():
    server = S.TritonServer(".")
    assert len({server.grpc_port, server.http_port, server.metrics_port}) == 3


def test_cli_reports_a_missing_repository(tmp_path, capsys):
    assert serve_cmd.main(["--repository", str(tmp_path / "nope"), "--grpc-port", "0"]) == 1
    assert f"model repository {tmp_path / 'nope'} is not a directory" in capsys.readouterr().err


def test_cli_restores_signal_handlers(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    serve_cmd.main(["--repository", str(tmp_path / "nope")])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_load_failures_are_read_from_the_log():
    log = (
        "E1125 model_lifecycle.cc:642] \"failed to load 'fuse' version 1: "
        'Internal: ValueError: bad weight\\n\\nAt:\\n  x"\n'
        "I1125 model_lifecycle.cc:777] \"failed to load 'fuse'\"\n"
        "E1125 model_lifecycle.cc:642] \"failed to load 'text_encoder' version 1: Invalid argument: no file\"\n"
        "E1125 model_repository_manager.cc:724] \"failed to load model 'embed_text': at least one version must be\"\n"
    )
    assert S.load_failures(log) == {
        "fuse": "Internal: ValueError: bad weight",
        "text_encoder": "Invalid argument: no file",
        "embed_text": "at least one version must be",
    }
