"""`make gpu-bundle` (benchmarks.gpu_bundle) and the server launcher's use of an unpacked bundle."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import gpu_bundle
from mim.serving import server as S


def fake_home(tmp_path, with_stub: bool = True):
    home = tmp_path / "mim-gpu"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = ["tritonserver/bin/tritonserver", "tritonserver/backends/python/libtriton_python.so", "libs/libb64.so.0d"]
    if with_stub:
        files.append(f"tritonserver/python_backend_stubs/{py}/triton_python_backend_stub")
    for rel in files:
        (home / rel).parent.mkdir(parents=True, exist_ok=True)
        (home / rel).write_bytes(b"")
    (home / "VERSION").write_text("nvidia-pytriton 0.7.0\n")
    return home


def test_the_launcher_uses_an_unpacked_bundle(tmp_path, monkeypatch):
    home = fake_home(tmp_path)
    monkeypatch.setenv(S.TRITON_HOME_ENV, str(home))
    paths = S.triton_paths()
    assert paths.binary == home / "tritonserver/bin/tritonserver"
    assert paths.lib_dir == home / "libs" and paths.version == "0.7.0"


def test_a_bundle_without_the_stub_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv(S.TRITON_HOME_ENV, str(fake_home(tmp_path, with_stub=False)))
    with pytest.raises(S.TritonServerError, match=r"python backend stub for Python 3\.\d+ not found .* unpack"):
        S.triton_paths()


@pytest.mark.slow
def test_the_bundle_fits_the_limit(tmp_path):
    """Packs ~160 MB with xz (minutes on 2 cores) and downloads the Python 3.12 Pillow wheel."""
    manifest = gpu_bundle.build(tmp_path)
    assert manifest["bytes"] <= gpu_bundle.LIMIT_BYTES
    assert json.loads((tmp_path / "manifest.json").read_text())["files"] == manifest["files"]
