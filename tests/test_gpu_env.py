"""The GPU machine's environment, replicated on the CPU: the served path must answer there, not only here.

GPU machines run a torch image: its own Python, numpy 2, torch, and none of this project's installed packages
(no tritonclient, no nvidia-pytriton). This test builds such an environment beside the project's virtualenv,
with numpy 2, torch and pytest and nothing else, builds the `make gpu-bundle` archive for this Python, and runs
`benchmarks.gpu_check` from it exactly as a GPU machine does (CUDA hidden; tiny sizes). The bundle is unpacked
into a fresh folder; the towers and kNN steps run; the bundled server serves the `torch` config, perf_analyzer
from the bundle sweeps the three embedding ensembles, and the client from the bundle checks `embed_image`,
`embed_text`, `embed_multimodal` and `search_image` against the in-process model.

Built once per set of inputs under build/gpu-env/ (a few minutes: a virtualenv with torch, and the archive);
reused after. `make test` runs it after the default suite (`make test-gpu-env`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_bundle
from benchmarks.gpu_check import MAX_FILES
from mim import contract

pytestmark = [pytest.mark.gpu_env, pytest.mark.server]

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "gpu-env"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
# The GPU machine's torch image, as far as the served path is concerned: numpy 2, torch, pytest.
REPLICA_PACKAGES = ("numpy>=2,<3", "torch==2.13.0", "pytest>=8,<10")
MIN_COSINE = 0.9999  # FP32 on both sides here


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def replica_python() -> Path:
    """A virtualenv with only REPLICA_PACKAGES (built once; a half-built one is never reused)."""
    venv = CACHE / f"venv-py{PY}-{_digest(*REPLICA_PACKAGES)}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *REPLICA_PACKAGES], check=True, timeout=900)
    (venv / ".complete").write_text("\n".join(REPLICA_PACKAGES) + "\n")
    return python


def replica_bundle() -> Path:
    """The bundle for this Python, rebuilt when the bundle builder or the launcher changes."""
    sources = [REPO / "benchmarks" / "gpu_bundle.py", REPO / "mim" / "serving" / "stub_env.py"]
    key = _digest(PY, *(p.read_text() for p in sources))
    out = CACHE / f"bundle-py{PY}-{key}"
    archive = out / gpu_bundle.ARCHIVE
    if not archive.is_file():
        shutil.rmtree(out, ignore_errors=True)
        gpu_bundle.build(out, PY, limit=1 << 40, xz_level="-0")  # unpacked on this machine: speed over size
    return archive


def test_the_served_path_answers_in_the_gpu_machines_environment(tmp_path):
    python = replica_python()
    probe = subprocess.run(
        [str(python), "-c", "import numpy, importlib.util as u; print(numpy.__version__, u.find_spec('tritonclient'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert int(probe[0].split(".")[0]) >= 2 and probe[1] == "None", probe  # numpy 2, no tritonclient
    archive = replica_bundle()
    out = tmp_path / "out"
    # A clean environment, as a GPU machine's shell: no virtualenv, no PYTHONPATH, CUDA hidden.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(CUDA_VISIBLE_DEVICES="", MIM_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [str(python), "-m", "benchmarks.gpu_check", "--bundle", str(archive), "--to", str(tmp_path / "unpacked")]
    cmd += ["--out", str(out), "--tiny", "--steps", "towers,knn,serving", "--no-pytest", "--total-s", "420"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    summary = (out / "summary.md").read_text() if (out / "summary.md").is_file() else proc.stdout[-4000:]
    assert proc.returncode == 0, f"{summary}\n{proc.stderr[-3000:]}"
    result = json.loads((out / "gpu.json").read_text())
    serving = result["serving"]
    assert serving["config"] == "torch" and not serving.get("errors") and not serving.get("health"), serving
    parity = serving["parity"]
    for model in (contract.EMBED_IMAGE, contract.EMBED_TEXT, contract.EMBED_MULTIMODAL):
        assert parity[model] >= MIN_COSINE, (model, parity)
    assert parity[contract.SEARCH_IMAGE] == 1.0, parity  # every photo finds itself first
    assert {r["model"] for r in serving["rows"]} == {
        contract.EMBED_IMAGE,
        contract.EMBED_TEXT,
        contract.EMBED_MULTIMODAL,
    }
    assert all(r["throughput"] > 0 for r in serving["rows"])
    # Every python-backend stub ran numpy 1.x from the stub env, while the launcher ran numpy 2.
    stubs = serving["stub_environment"]
    assert stubs and all(line.startswith("numpy 1.") and "stub-env" in line for line in stubs), stubs
    # The GPU script's other steps ran there too: the towers (FP32 against FP32 on the CPU) and the kNN table.
    assert result["towers"] and all(r["min_cosine_vs_fp32"] >= 0.999 for r in result["towers"]), result["towers"]
    assert result["knn"] and not result["errors"], result["errors"]
    assert len(list(out.iterdir())) <= MAX_FILES
