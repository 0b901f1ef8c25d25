"""`make gpu-check`: everything a lent GPU machine does for this project, from the repository root, in one call
bounded to 9 minutes, leaving at most 8 files in one folder.

    python3 -m benchmarks.gpu_check --bundle build/gpu-bundle/mim-gpu.tar.xz --out "$OUT"     # on the GPU machine
    python -m benchmarks.gpu_check --bundle B --tiny --steps serving --no-pytest --out DIR     # the CPU replica

1. unpacks the bundle of `make gpu-bundle` into --to (refused, in one line, if it was built for another Python
   or platform) and points the project at it (MIM_TRITON_HOME, PERF_ANALYZER, PYTHONPATH);
2. checks that every module the serving path, the client and the GPU script import is importable, and names
   the missing ones;
3. runs the GPU tests that are not slow-marked (`pytest -m 'gpu and not slow'` over the files that have them);
4. runs `python -m benchmarks.gpu` (towers, kNN, and the `gpu_torch` ensembles served from the bundle under
   perf_analyzer, each checked against the in-process model), each step within its own budget;
5. writes summary.md (the pytest result, the benchmark tables, the served-vs-in-process figures, errors) and
   copies it with gpu.json, the CSVs, the plot and the server log's error lines into --out.

Each stage has its own time limit inside --total-s; a stage that runs out is stopped and reported, and the
files of the stages before it are kept. Exit code 0 only when every stage passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import gpu_bundle

TOTAL_S = 540.0  # 9 minutes: a device call may run 10
PYTEST_S = 120.0  # the GPU tests that are not slow-marked; the slow ones are for a longer session
# What the serving path (python-backend models), the client and the GPU script import beyond the standard
# library; the bundle brings those a torch + numpy machine lacks.
REQUIRED_MODULES = (
    "numpy",
    "torch",
    "PIL",
    "tokenizers",
    "safetensors",
    "threadpoolctl",
    "tqdm",
    "packaging",
    "google.protobuf",
    "grpc",
    "rapidjson",
    "tritonclient.grpc",
)
MAX_FILES = 8
KEPT = ("gpu.json", "towers.csv", "knn.csv", "perf.csv", "gpu.png")


class CheckError(RuntimeError):
    pass


def missing_modules(env: dict[str, str], python: str = sys.executable) -> list[str]:
    """The REQUIRED_MODULES that `python` cannot import with `env` (checked in a child, as the stages run)."""
    code = (
        "import importlib, json, sys\n"
        "bad = []\n"
        f"for m in {list(REQUIRED_MODULES)!r}:\n"
        "    try:\n        importlib.import_module(m)\n"
        "    except Exception as e:\n        bad.append(f'{m} ({type(e).__name__}: {e})')\n"
        "print(json.dumps(bad))\n"
    )
    proc = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return [f"(the check itself failed: {proc.stderr.strip()[-300:]})"]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stub_numpy_problem(home: Path, python: str = sys.executable) -> str | None:
    """None when the bundle's numpy for the stubs imports in this Python (alone, as the stubs will import it
    first), else what went wrong."""
    code = f"import sys; sys.path.insert(0, {str(home / gpu_bundle.STUB_SITE)!r}); import numpy, numpy.random"
    proc = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=120)
    return None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]


def gpu_test_files(repo: Path) -> list[str]:
    """Test files that hold GPU-marked tests."""
    return sorted(str(p.relative_to(repo)) for p in (repo / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def run_stage(name: str, cmd: list[str], env: dict[str, str], timeout: float, log_path: Path) -> dict:
    """Run one stage with a time limit; its output goes to `log_path`. Returns what happened."""
    t0 = time.monotonic()
    print(f"== {name} (at most {timeout:.0f} s): {' '.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=max(1.0, timeout))
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.monotonic() - t0
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    print("\n".join(tail), flush=True)
    status = "ok" if code == 0 else ("timed out" if code is None else f"exit code {code}")
    return {"stage": name, "status": status, "seconds": round(seconds, 1), "tail": tail}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("build/gpu-bundle") / gpu_bundle.ARCHIVE)
    p.add_argument("--to", type=Path, default=Path("/tmp/mim"), help="where the bundle is unpacked")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "build/gpu-check"))
    p.add_argument("--total-s", type=float, default=TOTAL_S, help="wall-clock bound of the whole check")
    p.add_argument("--steps", default="towers,knn,serving", help="benchmarks.gpu steps")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU machine)")
    p.add_argument("--no-pytest", action="store_true", help="skip the GPU tests")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.total_s
    repo = Path.cwd()
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    stages: list[dict] = []
    try:
        home = gpu_bundle.unpack(args.bundle, args.to)
    except gpu_bundle.BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    env = dict(os.environ, **gpu_bundle.exports(home, repo))
    missing = missing_modules(env)
    problem = stub_numpy_problem(home)
    missing += [f"numpy for the stubs ({problem})"] if problem else []
    stages.append({"stage": "imports", "status": "ok" if not missing else "missing: " + "; ".join(missing)})
    print(f"== imports: {stages[-1]['status']}", flush=True)
    if not args.no_pytest:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu and not slow", "-q", "-p", "no:cacheprovider"]
        cmd += ["--continue-on-collection-errors", *gpu_test_files(repo)]
        left = deadline - time.monotonic()
        stages.append(run_stage("pytest -m gpu", cmd, env, min(PYTEST_S, left - 60), work / "pytest.txt"))
    cmd = [sys.executable, "-m", "benchmarks.gpu", "--out", str(work / "gpu"), "--steps", args.steps]
    cmd += ["--photos", str(home / "photos")] + (["--tiny"] if args.tiny else [])
    stages.append(run_stage("benchmarks.gpu", cmd, env, deadline - time.monotonic() - 10, work / "gpu.txt"))
    write_summary(args.out, work, stages)
    return 0 if all(s["status"] == "ok" for s in stages) else 1


def write_summary(out: Path, work: Path, stages: list[dict]) -> list[Path]:
    """summary.md + the kept result files + the server log's error lines, at most MAX_FILES files in `out`."""
    from mim.serving.server import error_lines

    from .gpu import summary

    lines = ["# GPU check", ""]
    lines += [f"- {s['stage']}: {s['status']}" + (f" ({s['seconds']} s)" if "seconds" in s else "") for s in stages]
    result_path = work / "gpu" / "gpu.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        lines += ["", summary(result)]
        for step, tb in result.get("tracebacks", {}).items():
            lines += ["", f"## {step} traceback", "```", tb.rstrip(), "```"]
    for s in stages:
        if s["status"] != "ok" and s.get("tail"):
            lines += ["", f"## {s['stage']}: last lines", "```", *s["tail"], "```"]
    written = [out / "summary.md"]
    written[0].write_text("\n".join(lines) + "\n")
    server_log = work / "gpu" / "tritonserver.log"
    if server_log.is_file():
        written.append(out / "server-errors.log")
        written[-1].write_text(error_lines(server_log.read_text(errors="replace"), limit=200) + "\n")
    if (work / "pytest.txt").is_file():
        written.append(out / "pytest.txt")
        shutil.copy2(work / "pytest.txt", written[-1])
    for name in KEPT:
        if (work / "gpu" / name).is_file() and len(written) < MAX_FILES:
            written.append(out / name)
            shutil.copy2(work / "gpu" / name, written[-1])
    shutil.rmtree(work, ignore_errors=True)  # $OUT brings back only the kept files
    print((out / "summary.md").read_text(), flush=True)
    return written


if __name__ == "__main__":
    raise SystemExit(main())
