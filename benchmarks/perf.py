"""Latency and throughput of the served models with the real `perf_analyzer`, against a running server.

    python -m benchmarks.perf --url 127.0.0.1:8001 --repository model_repository --catalog artifacts/catalog
    python -m benchmarks.perf --url 127.0.0.1:8001 --models embed_image --concurrency 1,4 --quick

For each model (the three ensembles and the two tower models) and each concurrency, one perf_analyzer run:
gRPC, the model's real inputs (encoded catalog JPEG/PNG images and real titles for the ensembles; the same
images and titles preprocessed exactly as the server does for the towers) from an `--input-data` JSON file,
bounded measurement windows, `-f` CSV. Parsed: throughput, p50/p90/p95/p99 latency (the CSV) and the server's
own breakdown: queue and compute time per model, and for an ensemble per composing model (stdout: perf_analyzer
prints the composing models' statistics there; its `--profile-export-file` in 2.50 holds per-request
timestamps only, and `--collect-metrics` reads GPU metrics, which a CPU server has none of).

Writes <out>/perf.csv (one row per model x concurrency), <out>/perf_breakdown.csv (one row per model x
concurrency x composing model, with its queue/compute split and the average batch the server formed),
<out>/perf.json and <out>/perf.png (latency vs throughput per model).

perf_analyzer comes from the tritonclient 2.50.0 wheel (later wheels drop it or need glibc 2.38). It links
against libb64.so.0d (Debian `libb64-0d`) and libcudart.so.12 (the `nvidia-cuda-runtime-cu12` wheel, even on a
CPU machine); `locate()` puts the wheel's lib/ and the bundled Triton libraries on LD_LIBRARY_PATH and, when
the binary still cannot start, names the missing library and how to install it.
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from mim import contract, layout

from .common import hardware, now_utc, versions, write_json, write_rows_csv

PERF_ANALYZER_ENV = "PERF_ANALYZER"  # path of a perf_analyzer binary to use instead of the wheel's
ENSEMBLES = (contract.EMBED_IMAGE, contract.EMBED_TEXT, contract.EMBED_MULTIMODAL)
TOWERS = (contract.IMAGE_ENCODER, contract.TEXT_ENCODER)
ALL_MODELS = TOWERS + ENSEMBLES
# What to do about each library perf_analyzer needs and a bare machine lacks.
LIBRARY_FIXES = {
    "libb64.so.0d": "install Debian's libb64-0d: `apt-get install -y libb64-0d` (`make system-deps` does it)",
    "libcudart.so.12": "install the CUDA runtime wheel: `pip install nvidia-cuda-runtime-cu12` (the `serve` extra); "
    "its nvidia/cuda_runtime/lib goes on LD_LIBRARY_PATH",
}
_MISSING_LIB = re.compile(r"error while loading shared libraries: (\S+?): cannot open shared object file")


class PerfAnalyzerError(RuntimeError):
    pass


# --- the binary --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]  # LD_LIBRARY_PATH with libcudart's folder and the bundled Triton libraries
    version: str

    def run(self, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.binary), *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )


def find_binary() -> Path:
    """$PERF_ANALYZER, else the tritonclient wheel's `perf_analyzer` (installed into this environment's bin/),
    else the first one on PATH."""
    tried = []
    if os.environ.get(PERF_ANALYZER_ENV):
        path = Path(os.environ[PERF_ANALYZER_ENV])
        if path.is_file():
            return path
        raise PerfAnalyzerError(f"${PERF_ANALYZER_ENV}={path} is not a file")
    candidates = [Path(sys.executable).parent / "perf_analyzer"]  # the venv's bin/, not the resolved interpreter's
    try:
        dist = metadata.distribution("tritonclient")
        candidates += [Path(dist.locate_file(f)) for f in dist.files or () if Path(str(f)).name == "perf_analyzer"]
    except metadata.PackageNotFoundError:
        tried.append("tritonclient is not installed")
    on_path = shutil.which("perf_analyzer")
    candidates += [Path(on_path)] if on_path else []
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path.resolve()
        tried.append(str(path))
    raise PerfAnalyzerError(
        "perf_analyzer not found (looked at " + ", ".join(tried) + "); it ships in the tritonclient 2.50.0 wheel: "
        "pip install 'tritonclient[grpc]==2.50.0'"
    )


def library_dirs() -> list[Path]:
    """Folders perf_analyzer's libraries come from. From an unpacked `make gpu-bundle`: the `lib/` beside the
    binary's `bin/` (libcudart.so.12 and libb64.so.0d under the names it asks for), and nothing else. Otherwise
    the nvidia-cuda-runtime-cu12 wheel's lib/ (libcudart.so.12) and the libraries of nvidia-pytriton's server."""
    import importlib.util

    if os.environ.get(PERF_ANALYZER_ENV):
        beside = Path(os.environ[PERF_ANALYZER_ENV]).resolve().parent.parent / "lib"
        if beside.is_dir():
            return [beside]
    dirs = []
    spec = importlib.util.find_spec("nvidia.cuda_runtime") if importlib.util.find_spec("nvidia") else None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "lib").is_dir():
            dirs.append(Path(loc) / "lib")
    try:
        from mim.serving.server import triton_paths

        dirs.append(triton_paths().lib_dir)
    except Exception:  # no nvidia-pytriton: perf_analyzer may still find everything elsewhere
        pass
    return dirs


def perf_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    parts = [str(d) for d in library_dirs()] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def diagnose_start_failure(binary: Path, returncode: int, output: str) -> str:
    """The message for a perf_analyzer that did not start: the missing library by name and its fix."""
    m = _MISSING_LIB.search(output)
    if m:
        lib = m.group(1)
        fix = LIBRARY_FIXES.get(lib, "install the package that provides it and put its folder on LD_LIBRARY_PATH")
        return f"perf_analyzer ({binary}) cannot start: shared library {lib} not found; {fix}"
    tail = "\n".join(output.strip().splitlines()[-5:])
    return f"perf_analyzer ({binary}) cannot start (exit code {returncode}):\n{tail}"


def locate() -> PerfAnalyzer:
    """The binary and its environment, checked by running `perf_analyzer --version` (PerfAnalyzerError naming
    the missing library when it does not start)."""
    binary = find_binary()
    env = perf_env()
    try:
        proc = subprocess.run(
            [str(binary), "--version"], env=env, capture_output=True, text=True, timeout=30, errors="replace"
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PerfAnalyzerError(f"perf_analyzer ({binary}) cannot start: {e}") from None
    if proc.returncode != 0:
        raise PerfAnalyzerError(diagnose_start_failure(binary, proc.returncode, proc.stdout + proc.stderr))
    return PerfAnalyzer(binary, env, (proc.stdout + proc.stderr).strip())


# --- input data --------------------------------------------------------------------------------------------
def serialize_bytes_elements(items: Sequence[bytes]) -> bytes:
    """Triton's BYTES wire format, which perf_analyzer expects inside a "b64" field: per element a 4-byte
    little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)


def deserialize_bytes_elements(buf: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(buf):
        if pos + 4 > len(buf):
            raise ValueError(
                f"truncated BYTES tensor: {len(buf) - pos} byte(s) left where a 4-byte length was expected"
            )
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise ValueError(f"truncated BYTES tensor: element of {n} bytes, {len(buf) - pos} left")
        out.append(buf[pos : pos + n])
        pos += n
    return out


def tensor_entry(spec: contract.TensorSpec, value: Any) -> dict:
    """One tensor of one batch-1 request in perf_analyzer's JSON: base64 content plus its shape (batch dim
    excluded, as in the model config). BYTES tensors take a list of byte strings (one per element); numeric
    ones an array in the contract dtype, sent as little-endian raw bytes."""
    if spec.dtype == "BYTES":
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value]
        raw, shape = serialize_bytes_elements(items), [len(items)]
    else:
        arr = np.ascontiguousarray(value, dtype=np.dtype(spec.numpy_dtype).newbyteorder("<"))
        raw, shape = arr.tobytes(), list(arr.shape)
    return {"content": {"b64": base64.b64encode(raw).decode("ascii")}, "shape": shape}


def decode_entry(spec: contract.TensorSpec, entry: dict) -> Any:
    """The inverse of tensor_entry (what perf_analyzer will send): list of bytes, or an array."""
    raw = base64.b64decode(entry["content"]["b64"])
    if spec.dtype == "BYTES":
        return deserialize_bytes_elements(raw)
    return np.frombuffer(raw, dtype=np.dtype(spec.numpy_dtype).newbyteorder("<")).reshape(entry["shape"])


@dataclass(frozen=True)
class Sample:
    """One request's worth of real data: an encoded image file and a text."""

    image: bytes
    text: str
    source: str  # where the image came from, for the record


def catalog_samples(catalog: Any, n: int, split: str = "test") -> list[Sample]:
    """n samples from a mim.data.catalog catalog: shop images (PNG) with their titles alternating with street photos
    (JPEG) with their short typed queries, so both encodings and both text lengths are in the mix."""
    products = catalog.products_in(split) or catalog.products
    queries = catalog.queries_in(split) or catalog.queries
    if not products:
        raise ValueError(f"catalog at {catalog.root} has no products")
    out = []
    for i in range(n):
        if i % 2 == 0 or not queries:
            p = products[(i // 2) % len(products)]
            out.append(Sample(catalog.read_bytes(p.image), p.title, p.image))
        else:
            q = queries[(i // 2) % len(queries)]
            out.append(Sample(catalog.read_bytes(q.image), q.short_text, q.image))
    return out


class TowerInputs:
    """Turns samples into the towers' inputs with the preprocessing the server itself runs (the repository's
    preprocess.json and tokenizer, through mim.serving.backends)."""

    def __init__(self, repository: Path):
        from mim.serving.backends import TextPreprocessor, read_preprocess

        self.image_cfg = read_preprocess(layout.version_dir(repository, contract.PREPROCESS_IMAGE))
        self.text = TextPreprocessor.from_dir(layout.version_dir(repository, contract.PREPROCESS_TEXT))

    def pixels(self, image: bytes) -> np.ndarray:  # (3, S, S) float32
        from mim.model.preprocess import preprocess_image_bytes

        return preprocess_image_bytes(image, self.image_cfg)

    def tokens(self, text: str) -> tuple[np.ndarray, np.ndarray]:  # (T,), (T,) int64
        ids, mask = self.text.encode([text])
        return ids[0], mask[0]


def request_data(model: str, sample: Sample, towers: TowerInputs | None = None) -> dict[str, dict]:
    """The JSON entry (all inputs of `model`) for one batch-1 request built from `sample`."""
    c = contract
    if model not in c.MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(c.MODELS)}")
    values: dict[str, Any] = {c.IMAGE.name: [sample.image], c.TEXT.name: [sample.text]}
    needs = {s.name for s in c.MODELS[model].inputs}
    if needs & {c.PIXEL_VALUES.name, c.INPUT_IDS.name, c.ATTENTION_MASK.name}:
        if towers is None:
            raise ValueError(f"{model} takes preprocessed tensors; pass TowerInputs(repository)")
        if c.PIXEL_VALUES.name in needs:
            values[c.PIXEL_VALUES.name] = towers.pixels(sample.image)
        if c.INPUT_IDS.name in needs:
            values[c.INPUT_IDS.name], values[c.ATTENTION_MASK.name] = towers.tokens(sample.text)
    return {spec.name: tensor_entry(spec, values[spec.name]) for spec in c.MODELS[model].inputs}


def write_input_data(path: Path, model: str, samples: Sequence[Sample], towers: TowerInputs | None = None) -> Path:
    """perf_analyzer's `--input-data` file: {"data": [one entry per request]}, sent round-robin."""
    doc = {"data": [request_data(model, s, towers) for s in samples]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


# --- measurement settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PerfSettings:
    concurrencies: tuple[int, ...]
    batch: int = 1
    # time_windows: each window lasts interval_ms; count_windows: each window holds >= request_count requests
    # (perf_analyzer starts such a window at 1 s and lengthens it as needed).
    mode: str = "time_windows"
    interval_ms: int = 2000
    request_count: int = 50
    # perf_analyzer reports the last 3 windows once their throughput and latency agree within stability_pct;
    # on a shared 2-core machine 10 % (its default) is rarely reached, so allow more and bound the tries.
    stability_pct: float = 20.0
    max_trials: int = 6
    protocol: str = "grpc"  # what the client (client/triton_client.py) uses

    def __post_init__(self) -> None:
        if self.mode not in ("time_windows", "count_windows"):
            raise ValueError(f"mode={self.mode!r}; expected time_windows or count_windows")
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError(f"concurrencies={self.concurrencies!r}; expected one or more integers >= 1")
        if self.max_trials < 3:
            raise ValueError(f"max_trials={self.max_trials}; perf_analyzer needs at least 3 windows to judge stability")

    def window_args(self) -> list[str]:
        args = [
            f"--measurement-mode={self.mode}",
            f"--stability-percentage={self.stability_pct:g}",
            f"--max-trials={self.max_trials}",
        ]
        if self.mode == "time_windows":
            return args + [f"--measurement-interval={self.interval_ms}"]
        return args + [f"--measurement-request-count={self.request_count}"]

    def time_bound_s(self) -> float:
        """Kill a run after this long: all trials at twice their nominal window, plus start-up."""
        window_s = self.interval_ms / 1000 if self.mode == "time_windows" else max(1.0, self.interval_ms / 1000)
        return 2 * (self.max_trials + 1) * window_s + 30

    def fixed_count_args(self, concurrency: int) -> list[str]:
        """The fallback when the windows never settle: one measurement of a fixed number of requests
        (`--request-count`), which perf_analyzer does not judge for stability."""
        return [f"--request-count={self.fallback_requests(concurrency)}"]

    def fallback_requests(self, concurrency: int) -> int:
        return max(100, self.request_count * concurrency)


QUICK = PerfSettings(concurrencies=(1, 4), interval_ms=500, stability_pct=30.0, max_trials=5)
FULL = PerfSettings(concurrencies=(1, 2, 4, 8), interval_ms=2000, stability_pct=20.0, max_trials=6)


# --- output parsers ----------------------------------------------------------------------------------------
# `-f` CSV columns (microseconds except the throughput) -> our names.
CSV_COLUMNS = {
    "Concurrency": "concurrency",
    "Inferences/Second": "throughput",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
}


def parse_csv(text: str) -> list[dict[str, float]]:
    """perf_analyzer's `-f` file (rows sorted by throughput, not concurrency) -> one dict per row with our
    names; unknown columns keep theirs."""
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row = {}
        for key, value in raw.items():
            if key is None or value in (None, ""):
                continue
            name = CSV_COLUMNS.get(key.strip(), key.strip())
            try:
                row[name] = float(value)
            except ValueError:
                row[name] = value
        if "concurrency" in row:
            row["concurrency"] = int(row["concurrency"])
        rows.append(row)
    return rows


_CONCURRENCY = re.compile(r"^Request concurrency:\s*(\d+)")
_COMPOSING_MODEL = re.compile(r"^\s+(\S+), version:\s*(\S+)\s*$")
_COUNT = re.compile(r"^\s+(Request count|Inference count|Execution count|Successful request count):\s*(\d+)")
_THROUGHPUT = re.compile(r"^\s+Throughput:\s*([\d.]+)\s*infer/sec")
_CLIENT_LATENCY = re.compile(r"^\s+(Avg|p50|p90|p95|p99) latency:\s*(\d+)\s*usec")
_SERVER_LATENCY = re.compile(r"^\s+Avg request latency:\s*(\d+)\s*usec\s*\((.*)\)")
_PART = re.compile(r"(overhead|queue|compute input|compute infer|compute output|compute)\s+(\d+)\s*usec")


def parse_stdout(text: str) -> dict[int, dict]:
    """perf_analyzer's report -> {concurrency: {"client": {...}, "server": {...}, "composing": {model: {...}}}}.

    Server figures are per request, in microseconds: avg_latency_us = overhead + queue + compute (an
    ensemble's own line splits compute no further; its composing models split it into input/infer/output).
    Counts: inference_count rows vs execution_count batches run (their ratio is the average batch)."""
    out: dict[int, dict] = {}
    level: dict | None = None
    section: dict | None = None
    for line in text.splitlines():
        m = _CONCURRENCY.match(line)
        if m:
            level = out.setdefault(int(m.group(1)), {"client": {}, "server": {}, "composing": {}})
            section = None
            continue
        if level is None:
            continue
        stripped = line.strip()
        if stripped == "Client:":
            section = level["client"]
            continue
        if stripped == "Server:":
            section = level["server"]
            continue
        if stripped == "Composing models:":
            section = None
            continue
        m = _COMPOSING_MODEL.match(line)
        if m:
            section = level["composing"].setdefault(m.group(1), {"version": m.group(2)})
            continue
        if section is None:
            continue
        if m := _COUNT.match(line):
            section[m.group(1).lower().replace(" ", "_")] = int(m.group(2))
        elif m := _THROUGHPUT.match(line):
            section["throughput"] = float(m.group(1))
        elif m := _CLIENT_LATENCY.match(line):
            section[f"{m.group(1).lower()}_latency_us"] = int(m.group(2))
        elif m := _SERVER_LATENCY.match(line):
            section["avg_latency_us"] = int(m.group(1))
            for part, usec in _PART.findall(m.group(2)):
                section[part.replace(" ", "_") + "_us"] = int(usec)
    return out


# --- running -----------------------------------------------------------------------------------------------
@dataclass
class Level:
    """One model at one concurrency: the perf row, the per-model breakdown, and how it was obtained."""

    row: dict[str, Any]
    breakdown: list[dict[str, Any]]
    command: list[str]
    stdout: str


def perf_args(
    model: str,
    url: str,
    input_file: Path,
    concurrency: int,
    settings: PerfSettings,
    csv_path: Path,
    window_args: Sequence[str] | None = None,
) -> list[str]:
    return [
        "-m",
        model,
        "-u",
        url,
        "-i",
        settings.protocol,
        "--input-data",
        str(input_file),
        "-b",
        str(settings.batch),
        f"--concurrency-range={concurrency}",
        *(settings.window_args() if window_args is None else window_args),
        "-f",
        str(csv_path),
    ]


def measure(
    pa: PerfAnalyzer,
    model: str,
    url: str,
    input_file: Path,
    concurrency: int,
    settings: PerfSettings,
    workdir: Path,
    label: str = "",
) -> Level:
    """One perf_analyzer run for one concurrency level.

    When the windows cannot settle within the tolerance (a shared 2-core machine), perf_analyzer exits without
    a result; the level is then measured once more as a single fixed-count measurement and its row says so
    (stable=False): a benchmark reports a noisy machine, it does not fail on one. Any other failure raises
    PerfAnalyzerError with perf_analyzer's own words."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"{label or model}_c{concurrency}".replace("@", "_at_")
    attempts = [
        (settings.window_args(), None),
        (
            settings.fixed_count_args(concurrency),
            f"windows did not settle within {settings.stability_pct:g}% in {settings.max_trials} tries; "
            f"one measurement of {settings.fallback_requests(concurrency)} requests",
        ),
    ]
    for i, (window_args, note) in enumerate(attempts, 1):
        csv_path = workdir / f"{tag}.csv"
        csv_path.unlink(missing_ok=True)
        args = perf_args(model, url, input_file, concurrency, settings, csv_path, window_args)
        t0 = time.monotonic()
        try:
            proc = pa.run(args, timeout=settings.time_bound_s())
        except subprocess.TimeoutExpired:
            raise PerfAnalyzerError(
                f"perf_analyzer on {model} (concurrency {concurrency}) ran past "
                f"{settings.time_bound_s():.0f} s: {shlex.join([str(pa.binary), *args])}"
            ) from None
        output = proc.stdout + proc.stderr
        (workdir / f"{tag}.log").write_text(f"$ {shlex.join([str(pa.binary), *args])}\n{output}")
        if proc.returncode == 0 and csv_path.is_file():
            level = _level(
                model,
                concurrency,
                settings,
                csv_path.read_text(),
                output,
                [str(pa.binary), *args],
                seconds=time.monotonic() - t0,
                label=label,
            )
            level.row.update(stable=note is None, attempts=i, note=note)
            return level
        if "Failed to obtain stable measurement" not in output or note is not None:
            raise PerfAnalyzerError(_run_failure(pa, model, concurrency, args, proc.returncode, output))
    raise AssertionError("unreachable")


def warm_up(pa: PerfAnalyzer, model: str, url: str, input_file: Path, requests: int = 32) -> None:
    """A few requests before measuring (first calls pay for lazy initialisation: ORT/torch allocations, gRPC
    channels); also fails fast, with the server's words, when the inputs do not fit the model."""
    args = [
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "--input-data",
        str(input_file),
        "--concurrency-range=1",
        f"--request-count={requests}",
    ]
    try:
        proc = pa.run(args, timeout=120)
    except subprocess.TimeoutExpired:
        raise PerfAnalyzerError(f"warm-up of {model} at {url} did not finish in 120 s") from None
    if proc.returncode != 0:
        raise PerfAnalyzerError(_run_failure(pa, model, 1, args, proc.returncode, proc.stdout + proc.stderr))


def _run_failure(pa: PerfAnalyzer, model: str, concurrency: int, args: list[str], code: int, output: str) -> str:
    if _MISSING_LIB.search(output):
        return diagnose_start_failure(pa.binary, code, output)
    tail = "\n".join(output.strip().splitlines()[-12:])
    return (
        f"perf_analyzer failed on {model} at concurrency {concurrency} (exit code {code}):\n{tail}\n"
        f"command: {shlex.join([str(pa.binary), *args])}"
    )


def _level(
    model: str,
    concurrency: int,
    s: PerfSettings,
    csv_text: str,
    stdout: str,
    command: list[str],
    *,
    seconds: float,
    label: str,
) -> Level:
    rows = [r for r in parse_csv(csv_text) if r.get("concurrency") == concurrency]
    if not rows:
        raise PerfAnalyzerError(
            f"perf_analyzer's CSV for {model} has no row for concurrency {concurrency}:\n{csv_text}"
        )
    csv_row = rows[0]
    report = parse_stdout(stdout).get(concurrency, {"client": {}, "server": {}, "composing": {}})
    server = report["server"]
    row: dict[str, Any] = {
        "model": label or model,
        "served_model": model,
        "concurrency": concurrency,
        "batch": s.batch,
        "throughput": csv_row.get("throughput"),
        **{f"{p}_ms": _ms(csv_row.get(f"{p}_us")) for p in ("p50", "p90", "p95", "p99")},
        "avg_ms": _ms(report["client"].get("avg_latency_us")),
        "server_queue_ms": _ms(server.get("queue_us", csv_row.get("server_queue_us"))),
        "server_compute_ms": _ms(_server_compute_us(server, csv_row)),
        "server_avg_batch": _avg_batch(server),
        "interval_ms": s.interval_ms,
        "stability_pct": s.stability_pct,
        "seconds": round(seconds, 2),
    }
    breakdown = [_breakdown_row(label or model, concurrency, model, "(whole model)", server)]
    breakdown += [
        _breakdown_row(label or model, concurrency, model, name, stats)
        for name, stats in sorted(report["composing"].items())
    ]
    return Level(row, breakdown, command, stdout)


def _server_compute_us(server: dict, csv_row: dict) -> float | None:
    """Server compute per request from the report (an ensemble's line has the total, a model's its parts);
    the CSV's columns otherwise (its queue and compute columns stay near 0 for ensembles)."""
    if "compute_us" in server:
        return server["compute_us"]
    parts = [server.get(k) for k in ("compute_input_us", "compute_infer_us", "compute_output_us")]
    if all(p is not None for p in parts):
        return sum(parts)
    keys = ("server_compute_input_us", "server_compute_infer_us", "server_compute_output_us")
    return sum(csv_row[k] for k in keys) if all(k in csv_row for k in keys) else None


def _breakdown_row(label: str, concurrency: int, model: str, component: str, stats: dict) -> dict[str, Any]:
    return {
        "model": label,
        "served_model": model,
        "concurrency": concurrency,
        "component": component,
        "inference_count": stats.get("inference_count"),
        "execution_count": stats.get("execution_count"),
        "avg_batch": _avg_batch(stats),
        "avg_latency_ms": _ms(stats.get("avg_latency_us")),
        "queue_ms": _ms(stats.get("queue_us")),
        "compute_input_ms": _ms(stats.get("compute_input_us")),
        "compute_infer_ms": _ms(stats.get("compute_infer_us")),
        "compute_output_ms": _ms(stats.get("compute_output_us")),
        "compute_ms": _ms(stats.get("compute_us")),
        "overhead_ms": _ms(stats.get("overhead_us")),
    }


def _ms(us: float | None) -> float | None:
    return None if us is None else round(float(us) / 1000.0, 4)


def _avg_batch(stats: dict) -> float | None:
    inf, exe = stats.get("inference_count"), stats.get("execution_count")
    return round(inf / exe, 3) if inf and exe else None


def sweep(
    pa: PerfAnalyzer,
    model: str,
    url: str,
    input_file: Path,
    settings: PerfSettings,
    workdir: Path,
    label: str = "",
    log=print,
) -> list[Level]:
    warm_up(pa, model, url, input_file)
    levels = []
    for c in settings.concurrencies:
        level = measure(pa, model, url, input_file, c, settings, workdir, label)
        log(format_row(level.row))
        levels.append(level)
    return levels


def format_row(r: dict) -> str:
    if r.get("throughput") is None:
        return f"  {r['model']:<26} c={r['concurrency']:<3} {r.get('note') or 'no result'}"
    return (
        f"  {r['model']:<26} c={r['concurrency']:<3} {r['throughput']:8.1f} infer/s  p50 {r['p50_ms']:7.2f} ms  "
        f"p99 {r['p99_ms']:7.2f} ms  server queue {r['server_queue_ms'] or 0:.2f} ms compute "
        f"{r['server_compute_ms'] or 0:.2f} ms" + ("" if r.get("stable") else "  (unsettled: fixed-count run)")
    )


# --- output ------------------------------------------------------------------------------------------------
PERF_FIELDS = [
    "model",
    "served_model",
    "concurrency",
    "batch",
    "throughput",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "avg_ms",
    "server_queue_ms",
    "server_compute_ms",
    "server_avg_batch",
    "stable",
    "attempts",
    "interval_ms",
    "stability_pct",
    "seconds",
    "note",
]
BREAKDOWN_FIELDS = [
    "model",
    "served_model",
    "concurrency",
    "component",
    "inference_count",
    "execution_count",
    "avg_batch",
    "avg_latency_ms",
    "queue_ms",
    "compute_input_ms",
    "compute_infer_ms",
    "compute_output_ms",
    "compute_ms",
    "overhead_ms",
]


def plot(rows: Sequence[dict], path: Path, title: str = "perf_analyzer: latency vs throughput") -> Path:
    """p50 (solid) and p99 (dotted) latency against throughput, one colour per model, points labelled with
    their concurrency (a trailing * marks a level whose windows did not settle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        sel = sorted(
            (r for r in rows if r["model"] == model and r.get("throughput") is not None), key=lambda r: r["concurrency"]
        )
        if not sel:
            continue
        color = colors[i % len(colors)]
        thr = [r["throughput"] for r in sel]
        ax.plot(thr, [r["p50_ms"] for r in sel], "o-", color=color, label=f"{model} p50")
        ax.plot(thr, [r["p99_ms"] for r in sel], ":", color=color, alpha=0.7)
        for r in sel:
            mark = "" if r.get("stable") else "*"
            ax.annotate(
                f"c{r['concurrency']}{mark}",
                (r["throughput"], r["p50_ms"]),
                textcoords="offset points",
                xytext=(3, 3),
                fontsize=7,
                color=color,
            )
    ax.set(xlabel="throughput (inferences / s)", ylabel="latency (ms); solid p50, dotted p99", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class SweepResult:
    rows: list[dict]
    breakdown: list[dict]
    commands: dict[str, str]  # model -> one perf_analyzer command line (the first concurrency)
    errors: dict[str, str]
    skipped: list[str] = dataclasses.field(default_factory=list)  # models not swept: the deadline had passed


def run_sweeps(
    pa: PerfAnalyzer,
    url: str,
    models: Sequence[str],
    input_files: dict[str, Path],
    settings: PerfSettings,
    workdir: Path,
    log=print,
    deadline: float | None = None,
) -> SweepResult:
    """Every model's sweep; a model whose runs fail is reported in `errors` and the others still run. Past
    `deadline` (a time.monotonic() value) no further model is started; those are listed in `skipped`."""
    result = SweepResult([], [], {}, {})
    for model in models:
        if deadline is not None and time.monotonic() > deadline:
            result.skipped.append(model)
            log(f"  {model}: not swept, the time budget is spent")
            continue
        try:
            levels = sweep(pa, model, url, input_files[model], settings, workdir, log=log)
        except PerfAnalyzerError as e:
            log(f"  {model}: {e}")
            result.errors[model] = str(e)
            continue
        result.rows += [lv.row for lv in levels]
        result.breakdown += [b for lv in levels for b in lv.breakdown]
        result.commands[model] = shlex.join(levels[0].command)
    return result


def write_outputs(result: SweepResult, out: Path, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        write_rows_csv(result.rows, out / "perf.csv", PERF_FIELDS),
        write_rows_csv(result.breakdown, out / "perf_breakdown.csv", BREAKDOWN_FIELDS),
        write_json(
            {
                **meta,
                "commands": result.commands,
                "errors": result.errors,
                "results": result.rows,
                "breakdown": result.breakdown,
            },
            out / "perf.json",
        ),
        plot(result.rows, out / "perf.png"),
    ]


def describe_inputs(files: dict[str, Path], samples: Sequence[Sample]) -> dict:
    """What the input-data files held, for the record: where each sample came from and each file's digest
    (the files are rebuilt from the catalog on every run, so the digest says whether two runs sent the same)."""
    import hashlib

    return {
        "samples": [{"image": s.source, "text": s.text, "image_bytes": len(s.image)} for s in samples],
        "files": {
            m: {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()[:16]} for m, p in files.items()
        },
    }


def prepare_inputs(
    models: Sequence[str], samples: Sequence[Sample], repository: Path | None, folder: Path
) -> dict[str, Path]:
    towers = TowerInputs(repository) if repository is not None and set(models) & set(TOWERS) else None
    return {m: write_input_data(folder / f"{m}.json", m, samples, towers) for m in models}


# --- CLI ---------------------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address host:port")
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="the served repository (its preprocess.json/tokenizer build the towers' inputs)",
    )
    p.add_argument("--catalog", type=Path, default=Path("artifacts/catalog"), help="images and titles to send")
    p.add_argument("--models", default=",".join(ALL_MODELS), help="comma-separated; default: towers + ensembles")
    p.add_argument("--concurrency", type=_ints, help="e.g. 1,2,4,8 (default: 1,4 with --quick, else 1,2,4,8)")
    p.add_argument("--batch", type=int, default=1, help="rows per request (-b)")
    p.add_argument("--mode", choices=("time_windows", "count_windows"), default="time_windows")
    p.add_argument("--interval-ms", type=int, help="time window length")
    p.add_argument("--request-count", type=int, default=50, help="requests per count window")
    p.add_argument("--samples", type=int, default=16, help="distinct requests in the input-data file")
    p.add_argument("--quick", action="store_true", help="short windows, concurrency 1 and 4")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/perf"), help="output folder")
    return p


def settings_from_args(args: argparse.Namespace) -> PerfSettings:
    base = QUICK if args.quick else FULL
    return dataclasses.replace(
        base,
        concurrencies=args.concurrency or base.concurrencies,
        batch=args.batch,
        mode=args.mode,
        interval_ms=args.interval_ms or base.interval_ms,
        request_count=args.request_count,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from mim.data.catalog import load_catalog

    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(contract.MODELS))
    if unknown:
        print(f"error: unknown models {unknown}; expected some of {list(ALL_MODELS)}", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
        pa = locate()
        samples = catalog_samples(load_catalog(args.catalog), args.samples)
    except (PerfAnalyzerError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inputs = prepare_inputs(models, samples, args.repository, args.out / "inputs")
    result = run_sweeps(pa, args.url, models, inputs, settings, args.out / "logs")
    meta = {
        "date": now_utc(),
        "command": "python -m benchmarks.perf " + shlex.join(argv),
        "hardware": hardware(),
        "versions": versions(),
        "settings": dataclasses.asdict(settings),
        "url": args.url,
        "inputs": describe_inputs(inputs, samples),
    }
    write_outputs(result, args.out, meta)
    print(f"wrote {args.out}/perf.csv, perf_breakdown.csv, perf.json, perf.png")
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
