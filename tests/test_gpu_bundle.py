"""`make gpu-bundle` (benchmarks.gpu_bundle), the launcher's use of an unpacked bundle, and the stub env that
gives the python-backend stubs a numpy they can read (mim.serving.stub_env). The whole bundle serving from a
replica of a GPU machine's environment is tests/test_gpu_env.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import pytest

from benchmarks import gpu_bundle
from mim.serving import server as S
from mim.serving import stub_env

PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def fake_home(tmp_path, with_stub: bool = True):
    home = tmp_path / "mim-gpu"
    files = [
        "pytriton/tritonserver/bin/tritonserver",
        "pytriton/tritonserver/backends/python/libtriton_python.so",
        "nvidia_pytriton.libs/libtritonserver.so",
    ]
    if with_stub:
        files.append(f"pytriton/tritonserver/python_backend_stubs/{PY}/triton_python_backend_stub")
    for rel in files:
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_bytes(b"")
    (home / gpu_bundle.MANIFEST).write_text(json.dumps({"tritonserver": "nvidia-pytriton 0.7.0"}))
    return home


def test_the_launcher_uses_an_unpacked_bundle(tmp_path, monkeypatch):
    home = fake_home(tmp_path)
    monkeypatch.setenv(S.TRITON_HOME_ENV, str(home))
    paths = S.triton_paths()
    assert paths.binary == home / "pytriton/tritonserver/bin/tritonserver"
    assert paths.lib_dir == home / "nvidia_pytriton.libs" and paths.version == "0.7.0" and paths.home == home


def test_a_bundle_without_the_stub_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(S.TRITON_HOME_ENV, str(fake_home(tmp_path, with_stub=False)))
    with pytest.raises(S.TritonServerError, match=r"python backend stub for Python 3\.\d+ not found .* unpack"):
        S.triton_paths()


def _archive(tmp_path, manifest: dict):
    path = tmp_path / "mim-gpu.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo(f"{gpu_bundle.TOP}/{gpu_bundle.MANIFEST}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_a_bundle_for_another_python_is_refused_at_unpack_in_one_line(tmp_path):
    archive = _archive(tmp_path, {"format": gpu_bundle.FORMAT, "python": "3.99", "platform": "linux x86_64"})
    with pytest.raises(gpu_bundle.BundleError, match=r"built for Python 3\.99 on linux x86_64, this is Python 3\.\d+"):
        gpu_bundle.unpack(archive, tmp_path / "to")
    assert not (tmp_path / "to").exists()  # nothing unpacked
    code = gpu_bundle.main(["--unpack", str(archive), "--to", str(tmp_path / "to")])
    assert code == 1


def test_a_matching_bundle_unpacks_and_prints_its_exports(tmp_path, capsys):
    archive = _archive(tmp_path, {"format": gpu_bundle.FORMAT, "python": PY, "platform": f"linux {gpu_bundle.MACHINE}"})
    assert gpu_bundle.main(["--unpack", str(archive), "--to", str(tmp_path / "to")]) == 0
    lines = capsys.readouterr().out.splitlines()
    home = tmp_path / "to" / gpu_bundle.TOP
    assert f"export {S.TRITON_HOME_ENV}={home}" in lines
    assert any(line.startswith(f"export PYTHONPATH={home / 'site'}:") for line in lines)


def test_a_target_without_a_stub_is_refused_at_build():
    with pytest.raises(gpu_bundle.BundleError, match=r"no python-backend stub for Python 3\.99 .*it has .*3\.12"):
        gpu_bundle.check_target("3.99")


# --- the stub env --------------------------------------------------------------------------------------------
def _fake_numpy(folder, version: str, marker: str = "stub env numpy"):
    (folder / "numpy").mkdir(parents=True)
    (folder / "numpy" / "__init__.py").write_text(f"__version__ = {version!r}\nMARK = {marker!r}\n")
    (folder / f"numpy-{version}.dist-info").mkdir()
    return folder


def test_numpy_2_for_the_stubs_is_refused_with_what_to_do(tmp_path):
    folder = _fake_numpy(tmp_path / "np2", "2.1.0")
    with pytest.raises(
        stub_env.StubEnvError, match=r"would import numpy 2\.1\.0 .*pybind11 2\.10.*numpy<2.*MIM_STUB_NUMPY"
    ):
        stub_env.stub_numpy(folder)
    with pytest.raises(stub_env.StubEnvError, match=r"holds no numpy package"):
        stub_env.numpy_in_folder(tmp_path)


def test_a_numpy_built_for_another_python_is_refused(tmp_path):
    folder = _fake_numpy(tmp_path / "np", "1.26.4")
    (folder / "numpy" / "core").mkdir()
    (folder / "numpy" / "core" / "_multiarray_umath.cpython-39-x86_64-linux-gnu.so").write_bytes(b"")
    with pytest.raises(stub_env.StubEnvError, match=r"built for cpython-39, but this Python is cpython-3"):
        stub_env.numpy_in_folder(folder)


def test_the_stub_env_puts_its_numpy_before_every_other_package(tmp_path, monkeypatch):
    """The interpreter of the stub env imports the stub env's numpy even though this environment (a .pth
    line adds its site-packages) has another one, and still sees this environment's packages and PYTHONPATH."""
    extra = tmp_path / "on-pythonpath"
    (extra / "only_on_pythonpath").mkdir(parents=True)
    (extra / "only_on_pythonpath" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(extra))
    folder = _fake_numpy(tmp_path / "np1", "1.26.4")
    env_dir = stub_env.build_stub_env(tmp_path / "cache", folder)
    assert stub_env.build_stub_env(tmp_path / "cache", folder) == env_dir  # reused
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [env_dir.name]  # no half-built folder left
    code = "import numpy, safetensors, only_on_pythonpath; print(numpy.MARK, numpy.__version__)"
    # -I: ignore this process's PYTHONPATH, as the stub's interpreter does; the .pth line must bring it.
    out = subprocess.run([str(env_dir / "bin" / "python3"), "-I", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "stub env numpy 1.26.4"
    assert "numpy 1.26.4 (stub env)" in stub_env.describe(env_dir)


def test_without_a_numpy_folder_the_stubs_use_this_environments_numpy():
    info = stub_env.stub_numpy(None)  # the project's virtualenv pins numpy<2
    assert info.major == 1


@pytest.mark.slow
def test_the_bundle_fits_the_limit(tmp_path):
    """Packs ~250 MB with xz -9e (minutes on 2 cores) and downloads the Python 3.12 wheels."""
    manifest = gpu_bundle.build(tmp_path)
    assert manifest["bytes"] <= gpu_bundle.LIMIT_BYTES
    assert json.loads((tmp_path / "manifest.json").read_text())["files"] == manifest["files"]
