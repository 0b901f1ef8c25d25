"""What every benchmark of this package writes besides its figures: the machine, the versions, the date, and
rows as CSV / markdown. The CPU model and the side-by-side timer come from `benchmarks.knn_bench`, so all
benchmarks describe the machine and time in-process calls the same way.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from mim import contract, tables
from mim.atomic import atomic_write_text

from .knn_bench import cpu_model

# Distributions whose versions decide the figures (the server binary comes from nvidia-pytriton, the
# perf_analyzer binary from tritonclient, the in-process ceiling from onnxruntime, the PyTriton baseline from torch).
VERSIONED = (
    "numpy",
    "torch",
    "onnxruntime",
    "tritonclient",
    "nvidia-pytriton",
    "nvidia-cuda-runtime-cu12",
    "faiss-cpu",
    "matplotlib",
)
# tritonserver version of the binary bundled in nvidia-pytriton 0.7.0 (the package does not expose it).
BUNDLED_TRITONSERVER = {"0.7.0": "2.51"}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["tritonserver (bundled)"] = BUNDLED_TRITONSERVER.get(out["nvidia-pytriton"], "unknown")
    out["perf_analyzer"] = f"from the tritonclient {out['tritonclient']} wheel"
    return out


def hardware() -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        # Shared machines: the load before and after a run says how much the figures can be trusted.
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_rows_csv(rows: Sequence[dict], path: Path, fields: Sequence[str] | None = None) -> Path:
    """Rows as CSV; the columns are `fields`, or every key in order of first appearance. None -> empty cell."""
    fields = list(fields or _keys(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
    return path


def write_json(obj: Any, path: Path) -> Path:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path


def _keys(rows: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(r))
    return list(seen)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers with `digits` decimals, None/NaN as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], digits: int = 2) -> str:
    """Result rows (dicts) as a table (mim.tables'); `columns` = (key, header) pairs."""
    cells = ([fmt(r.get(k), digits) for k, _ in columns] for r in rows)
    return tables.markdown_table([h for _, h in columns], cells)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def tower_flops(model_cfg, name: str) -> float:
    """Matmul FLOPs per item (2 per multiply-add): patch embedding, attention projections, scores and mixing,
    MLP, final projection. ViT-B/16 at 224 px: 35.1 GFLOP."""
    if name == contract.IMAGE_ENCODER:
        v = model_cfg.vision
        patches = (v.image_size // v.patch_size) ** 2
        t, w, layers, hidden = patches + 1, v.width, v.layers, int(v.width * v.mlp_ratio)
        stem = 2 * patches * 3 * v.patch_size**2 * w
    else:
        x = model_cfg.text
        t, w, layers, hidden = x.context_length, x.width, x.layers, int(x.width * x.mlp_ratio)
        stem = 0
    per_layer = 2 * t * (4 * w * w + 2 * w * hidden) + 2 * 2 * t * t * w
    return float(stem + layers * per_layer + 2 * w * model_cfg.embed_dim)
