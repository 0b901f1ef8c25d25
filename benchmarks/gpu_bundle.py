"""`make gpu-bundle`: what a CUDA machine with only Python, torch and numpy needs to serve and measure this
project, in one archive under 40 MiB, plus the commands that unpack and check it there.

    python -m benchmarks.gpu_bundle --out build/gpu-bundle                  # for Python 3.12 (the default)
    python -m benchmarks.gpu_bundle --out build/replica --python 3.11       # for this machine's Python
    python -m benchmarks.gpu_bundle --unpack build/gpu-bundle/mim-gpu.tar.xz --to /tmp/mim   # prints exports

The archive unpacks into one folder, `mim-gpu/`, in the layout of the nvidia-pytriton wheel, so the server's
RPATHs ($ORIGIN/../../../nvidia_pytriton.libs) find its libraries without LD_LIBRARY_PATH:

    MANIFEST.json                               target Python and platform, versions, what came from where
    pytriton/tritonserver/{bin,backends,caches} the server, python backend included
    pytriton/tritonserver/python_backend_stubs/<X.Y>/   the python-backend stub for the target's Python
    nvidia_pytriton.libs/                       the server's libraries (not libpython: the target brings its own)
    perf/bin/perf_analyzer                      from the tritonclient 2.50.0 wheel
    perf/lib/                                   its two libraries under the names it asks for: libcudart.so.12,
                                                libb64.so.0d (only perf_analyzer's LD_LIBRARY_PATH gets this)
    site/                                       packages the serving code, the client and the GPU script import
                                                that a torch + numpy environment lacks (tritonclient, grpc,
                                                protobuf, rapidjson, Pillow, tokenizers, safetensors, ...)
    stub-site/                                  numpy 1.26 for the python-backend stubs only
                                                (mim.serving.stub_env says why they cannot use numpy 2)
    photos/*.jpg                                real photos (scikit-image's) for parity checks and requests

`--unpack` refuses an archive built for another Python or platform, naming both, and prints the three exports
(MIM_TRITON_HOME, PERF_ANALYZER, PYTHONPATH) that `mim.serving.server` and `benchmarks.perf` read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from mim.serving import stub_env

# A device call carries at most 64 MiB: the working tree (about 5 MiB) plus this archive, with room to spare.
LIMIT_BYTES = 50 * 2**20
XZ_LEVEL = "-9e"
TARGET_PYTHON = "3.12"
ARCHIVE = "mim-gpu.tar.xz"
TOP = "mim-gpu"
MANIFEST = "MANIFEST.json"  # mim.serving.server.BUNDLE_MANIFEST reads the server version from it
FORMAT = 2
MACHINE = "x86_64"  # the bundled server binaries' architecture
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Copied from this environment: pure Python, or built for the stable ABI (abi3), so they run on the target's Python.
COPIED_PACKAGES = ("tritonclient", "safetensors", "tokenizers", "threadpoolctl", "packaging", "tqdm")
# Built per Python version (or too new here): downloaded for the target's, at the version installed here.
DOWNLOADED = ("pillow", "grpcio", "python-rapidjson", "protobuf")
STUB_NUMPY = "numpy==1.26.4"  # the newest numpy 1.x; wheels exist for Python 3.9 to 3.12
STUB_SITE = stub_env.BUNDLE_STUB_SITE  # its folder in the bundle, where the launcher looks for it
# Inside numpy, what the stubs never import: tests, the SIMD test extension, type stubs, build tooling.
NUMPY_SKIP = ("tests", "f2py", "distutils", "_pyinstaller", "typing", "*.pyi", "*.pxd", "*.h", "_simd.*")
# Pillow's optional plugins the serving path never uses (AVIF, font rendering, colour management, Tk) and the
# libraries only they link: about 9 MB unpacked. Decoding JPEG, PNG, WebP, TIFF, GIF and BMP stays.
PILLOW_PRUNE = (
    "PIL/_avif.*",
    "PIL/_imagingcms.*",
    "PIL/_imagingft.*",
    "PIL/_imagingtk.*",
    "pillow.libs/libavif-*",
    "pillow.libs/liblcms2-*",
    "pillow.libs/libfreetype-*",
    "pillow.libs/libharfbuzz-*",
    "pillow.libs/libbrotli*",
    "pillow.libs/libpng16-*",
)
LIBB64 = "libb64.so.0d"
LIBB64_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib")
CUDART = "libcudart.so.12"


class BundleError(RuntimeError):
    pass


def _copy(src: Path, dst: Path, skip: Sequence[str] = ("__pycache__", "*.pyc")) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip), symlinks=False)
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


def _cudart() -> Path:
    from .perf import library_dirs

    for d in library_dirs():
        if (d / CUDART).is_file():
            return d / CUDART
    raise BundleError(f"{CUDART} not found; install the CUDA runtime wheel: pip install -e '.[serve]'")


def _download(pins: Sequence[str], dest: Path, python: str) -> list[Path]:
    """Wheels of `pins` built for `python` on manylinux x86_64."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps"]
    cmd += ["--python-version", python, *(a for p in WHEEL_PLATFORMS for a in ("--platform", p))]
    cmd += ["-d", str(dest), *pins]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BundleError(f"pip download {' '.join(pins)} for Python {python} failed: {proc.stderr.strip()}")
    return sorted(dest.glob("*.whl"))


def check_target(python: str) -> None:
    """Refuse (at build time) a target the bundled server cannot serve: another architecture than the server's
    binaries, or a Python without a python-backend stub in the wheel."""
    from mim.serving.server import triton_paths

    machine = platform.machine()
    if sys.platform != "linux" or machine != MACHINE:
        raise BundleError(f"the bundled tritonserver is Linux {MACHINE}; this machine is {sys.platform} {machine}")
    stubs = triton_paths().root / "python_backend_stubs"
    if not (stubs / python / "triton_python_backend_stub").is_file():
        have = ", ".join(sorted(p.name for p in stubs.iterdir()))
        raise BundleError(f"no python-backend stub for Python {python} in nvidia-pytriton (it has {have})")


def stage(root: Path, python: str = TARGET_PYTHON) -> dict:
    """Copy every piece into `root`; returns the manifest (what came from where, for which target)."""
    from mim.serving.server import triton_paths

    from .perf import find_binary

    check_target(python)
    paths = triton_paths()
    server = root / "pytriton" / "tritonserver"
    for part in ("bin", "backends", "caches"):
        _copy(paths.root / part, server / part)
    _copy(paths.root / "python_backend_stubs" / python, server / "python_backend_stubs" / python)
    libs = root / paths.lib_dir.name
    libs.mkdir()
    for lib in sorted(paths.lib_dir.iterdir()):
        if not lib.name.startswith("libpython"):  # the target brings its own libpython3.X
            shutil.copy2(lib, libs / lib.name)
    pa = find_binary()
    _copy(pa, root / "perf" / "bin" / "perf_analyzer")
    _copy(_cudart(), root / "perf" / "lib" / CUDART)  # perf_analyzer asks for it by this name
    _copy(_libb64(), root / "perf" / "lib" / LIBB64)
    site = root / "site"
    for name in COPIED_PACKAGES:
        src = _package_path(name)
        _copy(src, site / src.name)
    pins = [f"{n}=={metadata.version(n)}" for n in DOWNLOADED]
    with tempfile.TemporaryDirectory() as tmp:
        for wheel in _download(pins, Path(tmp) / "site", python):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
        for pattern in PILLOW_PRUNE:
            for path in site.glob(pattern):
                path.unlink()
        (numpy_wheel,) = _download([STUB_NUMPY], Path(tmp) / "stub", python)
        with zipfile.ZipFile(numpy_wheel) as z:
            z.extractall(Path(tmp) / "numpy")
        for entry in (Path(tmp) / "numpy").iterdir():
            _copy(entry, root / STUB_SITE / entry.name, skip=("__pycache__", *NUMPY_SKIP))
    _photos(root / "photos")
    manifest = {
        "format": FORMAT,
        "python": python,
        "platform": f"linux {MACHINE}",
        "tritonserver": f"nvidia-pytriton {paths.version}",
        "perf_analyzer": f"tritonclient {metadata.version('tritonclient')}",
        "site": [*COPIED_PACKAGES, *pins],
        "stub_numpy": STUB_NUMPY.split("==")[1],
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _photos(dest: Path) -> None:
    from .preprocess import skimage_photos

    dest.mkdir(parents=True)
    for p in skimage_photos(megapixels=(1.0,)):
        (dest / f"{p.name.replace('@', '_')}.jpg").write_bytes(p.data)


def build(out: Path, python: str = TARGET_PYTHON, *, limit: int = LIMIT_BYTES, xz_level: str = XZ_LEVEL) -> dict:
    """Stage, pack as tar.xz, check the size; returns the manifest plus sizes (also written as manifest.json
    beside the archive). `xz_level` trades time for size: -9e for the archive that travels, -0 where it is
    unpacked on the same machine (the test of the GPU machine's environment)."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / ARCHIVE
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        root = Path(tmp) / TOP
        root.mkdir()
        manifest = stage(root, python)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        unpacked = sum(p.stat().st_size for p in files)
        env = dict(os.environ, XZ_OPT=f"{xz_level} -T0")
        partial = archive.with_name(archive.name + ".partial")
        subprocess.run(["tar", "-cJf", str(partial), "-C", tmp, TOP], check=True, env=env)
        os.replace(partial, archive)  # a half-written archive never has the final name
    size = archive.stat().st_size
    manifest = {**manifest, "archive": str(archive), "bytes": size, "unpacked_bytes": unpacked, "files": len(files)}
    manifest["limit_bytes"] = limit
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if size > limit:
        raise BundleError(f"{archive} is {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit")
    return manifest


def check_manifest(manifest: dict, where: str) -> None:
    """Refuse a bundle built for another Python or platform than the one running this, in one line."""
    here_py = f"{sys.version_info.major}.{sys.version_info.minor}"
    here = f"Python {here_py} on {sys.platform} {platform.machine()}"
    built = f"Python {manifest.get('python')} on {manifest.get('platform')}"
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{where} is bundle format {manifest.get('format')}, expected {FORMAT}: rebuild it")
    if manifest.get("python") != here_py or manifest.get("platform") != f"{sys.platform} {platform.machine()}":
        raise BundleError(
            f"{where} is built for {built}, this is {here}: rebuild it with "
            f"`python -m benchmarks.gpu_bundle --python {here_py}` on a Linux {MACHINE} machine"
        )


def unpack(archive: Path, dest: Path) -> Path:
    """Unpack `archive` into `dest` (its `mim-gpu/` folder replaced whole) after checking its manifest against
    this Python and platform. Returns the unpacked folder."""
    if not archive.is_file():
        raise BundleError(f"{archive} not found; build it with `make gpu-bundle`")
    with tarfile.open(archive) as tar:
        member = tar.extractfile(f"{TOP}/{MANIFEST}")
        if member is None:
            raise BundleError(f"{archive} has no {TOP}/{MANIFEST}: not an archive of `make gpu-bundle`")
        check_manifest(json.load(member), str(archive))
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack.", dir=dest))
        try:
            tar.extractall(tmp, filter="tar")  # keeps the executable bits; refuses paths outside tmp
            home = dest / TOP
            if home.exists():
                shutil.rmtree(home)
            os.rename(tmp / TOP, home)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return home


def exports(home: Path, repo: Path) -> dict[str, str]:
    """The variables that make this project use an unpacked bundle: the server, perf_analyzer, and the bundle's
    packages (then the repository) on PYTHONPATH for the client and scripts."""
    from mim.serving.server import TRITON_HOME_ENV

    from .perf import PERF_ANALYZER_ENV

    pythonpath = [str(home / "site"), str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {
        TRITON_HOME_ENV: str(home),
        PERF_ANALYZER_ENV: str(home / "perf" / "bin" / "perf_analyzer"),
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(pythonpath)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("build/gpu-bundle"), help="output folder (git-ignored)")
    p.add_argument("--python", default=TARGET_PYTHON, help="the target machine's Python X.Y (default: %(default)s)")
    p.add_argument("--unpack", type=Path, metavar="ARCHIVE", help="unpack ARCHIVE (checked) and print its exports")
    p.add_argument("--to", type=Path, default=Path("/tmp/mim"), help="where --unpack puts mim-gpu/")
    args = p.parse_args(argv)
    try:
        if args.unpack:
            home = unpack(args.unpack, args.to)
            for key, value in exports(home, Path.cwd()).items():
                print(f"export {key}={value}")
            return 0
        m = build(args.out, args.python)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mib = m["bytes"] / 2**20
    print(f"{m['archive']}: {mib:.1f} MiB ({m['unpacked_bytes'] / 2**20:.0f} MiB unpacked, {m['files']} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
