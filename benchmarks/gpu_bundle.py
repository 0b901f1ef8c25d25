"""`make gpu-bundle`: everything `python -m benchmarks.gpu` needs on a CUDA machine that has Python 3.12, torch
and CuPy but no Triton server, in one archive under 40 MiB.

    python -m benchmarks.gpu_bundle --out build/gpu-bundle      # writes mim-gpu.tar.xz + manifest.json

The archive unpacks into one folder (the README's "GPU" section shows the commands):

    tritonserver/{bin,backends,caches}        the server bundled in nvidia-pytriton, python backend included
    tritonserver/python_backend_stubs/3.12/   the python-backend stub for the target's Python
    libs/                                     the server's libraries (not its libpython3.13), libb64 for
                                              perf_analyzer
    bin/perf_analyzer                         from the tritonclient 2.50.0 wheel
    site/                                     pure-Python or abi3 packages the serving code imports
                                              (tritonclient, safetensors, tokenizers, onnx_graphsurgeon,
                                              threadpoolctl) and
                                              Pillow built for Python 3.12
    photos/*.jpg                              real photos (scikit-image's) for the parity checks and requests

`mim.serving.server` uses the server of that folder when MIM_TRITON_HOME points at it, and
`benchmarks.perf` takes the binary from PERF_ANALYZER.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

LIMIT_BYTES = 40 * 2**20
TARGET_PYTHON = "3.12"
ARCHIVE = "mim-gpu.tar.xz"
# Packages the python-backend models and the script import that a torch + CuPy machine may lack; each is pure
# Python or built for the stable ABI (abi3), so this environment's copy works on the target's Python.
SITE_PACKAGES = ("tritonclient", "safetensors", "tokenizers", "onnx_graphsurgeon", "threadpoolctl")
# Built per Python version: downloaded for the target's.
PER_VERSION_WHEELS = ("pillow",)
LIBB64 = "libb64.so.0d"
LIBB64_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")


class BundleError(RuntimeError):
    pass


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), symlinks=False)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _package_path(name: str) -> Path:
    """The folder of package `name`, or the file of a single-module distribution (threadpoolctl.py)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None:
        raise BundleError(f"package {name!r} is not installed here; pip install -e '.[serve,dev]'")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin)


def _libb64() -> Path:
    for d in LIBB64_DIRS:
        if (Path(d) / LIBB64).is_file():
            return Path(d) / LIBB64
    raise BundleError(f"{LIBB64} not found in {LIBB64_DIRS}; install the Debian package libb64-0d (make system-deps)")


def _download_wheels(names: Sequence[str], dest: Path) -> list[Path]:
    """Wheels of the installed versions of `names`, built for TARGET_PYTHON on manylinux x86_64."""
    pins = [f"{n}=={metadata.version(n)}" for n in names]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps"]
    cmd += ["--python-version", TARGET_PYTHON, "--platform", "manylinux_2_28_x86_64"]
    cmd += ["--platform", "manylinux2014_x86_64", "-d", str(dest), *pins]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError(f"pip download {' '.join(pins)} for Python {TARGET_PYTHON} failed: {proc.stderr.strip()}")
    return sorted(dest.glob("*.whl"))


def _photos(dest: Path) -> None:
    from .preprocess import skimage_photos

    dest.mkdir(parents=True)
    for p in skimage_photos(megapixels=(1.0,)):
        (dest / f"{p.name.replace('@', '_')}.jpg").write_bytes(p.data)


def stage(root: Path) -> dict[str, str]:
    """Copy every piece into `root`; returns what came from where."""
    import zipfile

    from mim.serving.server import triton_paths

    from .perf import find_binary

    paths = triton_paths()
    server = root / "tritonserver"
    for part in ("bin", "backends", "caches"):
        _copy(paths.root / part, server / part)
    stub = paths.root / "python_backend_stubs" / TARGET_PYTHON
    _copy(stub, server / "python_backend_stubs" / TARGET_PYTHON)
    libs = root / "libs"
    libs.mkdir()
    for lib in sorted(paths.lib_dir.iterdir()):
        if not lib.name.startswith("libpython"):  # the target brings its own libpython3.12
            shutil.copy2(lib, libs / lib.name)
    shutil.copy2(_libb64(), libs / LIBB64)
    pa = find_binary()
    _copy(pa, root / "bin" / "perf_analyzer")
    site = root / "site"
    for name in SITE_PACKAGES:
        src = _package_path(name)
        _copy(src, site / src.name)
    with tempfile.TemporaryDirectory() as tmp:
        for wheel in _download_wheels(PER_VERSION_WHEELS, Path(tmp)):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
    _photos(root / "photos")
    (root / "VERSION").write_text(f"nvidia-pytriton {paths.version}\n")
    return {
        "tritonserver": f"nvidia-pytriton {paths.version}",
        "perf_analyzer": f"{pa} (tritonclient {metadata.version('tritonclient')})",
        "site": ", ".join(
            [
                *SITE_PACKAGES,
                *(f"{n} {metadata.version(n)} (cp{TARGET_PYTHON.replace('.', '')})" for n in PER_VERSION_WHEELS),
            ]
        ),
    }


def build(out: Path) -> dict:
    """Stage, pack as tar.xz, check the size; returns the manifest (also written as manifest.json)."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / ARCHIVE
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        root = Path(tmp) / "mim-gpu"
        root.mkdir()
        sources = stage(root)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        unpacked = sum(p.stat().st_size for p in files)
        env = dict(os.environ, XZ_OPT="-6 -T0")
        subprocess.run(["tar", "-cJf", str(archive), "-C", tmp, "mim-gpu"], check=True, env=env)
    size = archive.stat().st_size
    manifest = {
        "archive": str(archive),
        "bytes": size,
        "unpacked_bytes": unpacked,
        "files": len(files),
        "sources": sources,
        "limit_bytes": LIMIT_BYTES,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if size > LIMIT_BYTES:
        raise BundleError(f"{archive} is {size / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB limit")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("build/gpu-bundle"), help="output folder (git-ignored)")
    args = p.parse_args(argv)
    try:
        m = build(args.out)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mib = m["bytes"] / 2**20
    print(f"{m['archive']}: {mib:.1f} MiB ({m['unpacked_bytes'] / 2**20:.0f} MiB unpacked, {m['files']} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
