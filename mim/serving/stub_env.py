"""The Python environment of the python-backend stubs: which interpreter they embed and which numpy they import.

Why this module exists (both facts were observed by printing from inside a served model):

1. The stub of the bundled Triton 2.51 (`triton_python_backend_stub`) embeds Python through pybind11 2.10,
   which predates numpy 2. pybind11 2.10 reads a dtype's item size straight out of numpy's `PyArray_Descr`
   struct; numpy 2 changed that struct (its `flags` field grew to 64 bits and `elsize` moved), so under numpy 2
   the stub reads 0 where the item size should be. Every array it builds then has stride 0 or size 0: a BYTES
   input decodes as its first byte repeated (`deserialize_bytes_tensor` fails with "unpack_from requires a
   buffer of at least 84215049 bytes", 0x05050505 read from "\x05\x00\x00\x00hello"), and an FP32 output
   leaves the stub empty. The stub dies, and Triton answers "Stub process ... is not healthy" from then on.
2. The stub's interpreter does not read PYTHONPATH: with PYTHONPATH set in its environment, it is absent from
   its `sys.path`. The interpreter finds its packages the way any Python finds its prefix: through the first
   `python3` on PATH and the `pyvenv.cfg` next to it. So a numpy 1.x put first on PYTHONPATH never reaches it;
   it imports whatever the virtualenv on PATH holds (numpy 2 on machines whose torch image ships numpy 2).

The remedy needs no change to the server: the launcher builds a small virtualenv for the stubs (a "stub env"),
puts its `bin/` first on the server's PATH, and fills it with

- `numpy` 1.x, when the launching environment has numpy 2: from `$MIM_STUB_NUMPY` (a folder holding an
  unpacked numpy 1.x for this Python) or from the `stub-site/` folder of an unpacked `make gpu-bundle`;
- one `.pth` line that adds, after it, the folders of PYTHONPATH and the launching environment's
  site-packages, so the stubs import the same packages (torch, the project, the bundle's `site/`) as the
  launcher, except numpy.

Its own site-packages come before every folder the `.pth` line adds, so the numpy 1.x there provably wins. The
stub env is built once per set of inputs under the cache folder and renamed into place complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import site
import sys
import tempfile
import venv
from dataclasses import dataclass
from pathlib import Path

STUB_NUMPY_ENV = "MIM_STUB_NUMPY"  # a folder holding numpy 1.x (package + dist-info) for this Python
BUNDLE_STUB_SITE = "stub-site"  # that folder inside an unpacked `make gpu-bundle`
PTH_NAME = "zz_mim_stub_parents.pth"  # processed after anything else in the stub env's site-packages
FORMAT = 1  # bump when the layout of a stub env changes, so cached ones are rebuilt
PYBIND11_OF_STUB = "2.10"  # the pybind11 the bundled stub was built with (python_backend r24.10)


class StubEnvError(RuntimeError):
    pass


@dataclass(frozen=True)
class NumpyInfo:
    version: str
    where: str  # the folder it comes from

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def numpy_works_in_stub(version: str) -> bool:
    """True for the numpy versions the stub's pybind11 2.10 reads correctly (1.x)."""
    return int(version.split(".")[0]) < 2


def numpy_in_folder(folder: Path) -> NumpyInfo:
    """The numpy unpacked in `folder` (`numpy/` plus `numpy-X.Y.Z.dist-info/`), checked against this Python."""
    if not (folder / "numpy" / "__init__.py").is_file():
        raise StubEnvError(f"{folder} holds no numpy package (numpy/__init__.py); expected an unpacked numpy 1.x")
    infos = sorted(folder.glob("numpy-*.dist-info"))
    if not infos:
        raise StubEnvError(f"{folder} has numpy/ but no numpy-*.dist-info; unpack the whole numpy wheel there")
    version = infos[-1].name[len("numpy-") : -len(".dist-info")]
    tag = sys.implementation.cache_tag  # e.g. cpython-312
    built_for = sorted({m.group(1) for m in map(_ABI.search, _extension_names(folder / "numpy")) if m})
    if built_for and tag not in built_for:
        raise StubEnvError(
            f"numpy {version} in {folder} is built for {', '.join(built_for)}, but this Python is {tag}; "
            f"unpack a numpy<2 wheel for Python {sys.version_info.major}.{sys.version_info.minor} there"
        )
    return NumpyInfo(version, str(folder))


_ABI = re.compile(r"\.(cpython-\d+)-")


def _extension_names(pkg: Path) -> list[str]:
    core = pkg / "core"
    return [p.name for p in core.glob("_multiarray_umath*.so")] if core.is_dir() else []


def launcher_numpy() -> NumpyInfo:
    """The numpy this (launching) environment imports."""
    import numpy

    return NumpyInfo(numpy.__version__, str(Path(numpy.__file__).resolve().parent.parent))


def numpy_source(bundle_home: str | Path | None = None) -> Path | None:
    """The folder of numpy 1.x to give the stubs: $MIM_STUB_NUMPY, else the bundle's stub-site/, else None
    (the stubs then import the launching environment's numpy)."""
    explicit = os.environ.get(STUB_NUMPY_ENV)
    if explicit:
        folder = Path(explicit)
        if not folder.is_dir():
            raise StubEnvError(f"${STUB_NUMPY_ENV}={explicit} is not a folder; point it at an unpacked numpy 1.x")
        return folder
    if bundle_home is not None and (Path(bundle_home) / BUNDLE_STUB_SITE).is_dir():
        return Path(bundle_home) / BUNDLE_STUB_SITE
    return None


def stub_numpy(numpy_dir: Path | None) -> NumpyInfo:
    """The numpy the stubs will import, refused (StubEnvError) when it is one their pybind11 cannot read."""
    info = numpy_in_folder(numpy_dir) if numpy_dir is not None else launcher_numpy()
    if not numpy_works_in_stub(info.version):
        raise StubEnvError(
            f"the python-backend stubs would import numpy {info.version} (from {info.where}), but the bundled "
            f"tritonserver's stub is built with pybind11 {PYBIND11_OF_STUB}, which reads numpy 2 arrays wrongly "
            "(every tensor crossing it is corrupted); give the stubs numpy 1.x: install 'numpy<2' here, or set "
            f"${STUB_NUMPY_ENV} to a folder holding an unpacked numpy 1.x wheel for Python "
            f"{sys.version_info.major}.{sys.version_info.minor} (`make gpu-bundle` carries one as "
            f"{BUNDLE_STUB_SITE}/)"
        )
    return info


def parent_sites() -> list[str]:
    """The folders the stubs should import from after their own site-packages, in the launcher's order:
    PYTHONPATH first, then this environment's site-packages (a virtualenv's, or the system's)."""
    folders = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    folders += site.getsitepackages()
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        folders.append(site.getusersitepackages())
    resolved = [str(Path(p).resolve()) for p in folders if Path(p).is_dir()]
    return list(dict.fromkeys(resolved))


def _site_packages(env_dir: Path) -> Path:
    return env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _key(numpy_dir: Path | None, parents: list[str]) -> str:
    facts = {
        "format": FORMAT,
        "python": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
        "version": sys.version,
        "numpy": str(numpy_dir.resolve()) if numpy_dir else None,
        "parents": parents,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def build_stub_env(cache_dir: str | Path, numpy_dir: Path | None) -> Path:
    """The stub env for this Python, `numpy_dir` (or None) and the current PYTHONPATH/site-packages: built
    under `cache_dir` on first use, reused after. Returns its folder; `<folder>/bin` goes first on PATH."""
    stub_numpy(numpy_dir)  # refuse before building anything
    parents = parent_sites()
    target = Path(cache_dir) / f"stub-env-py{sys.version_info.major}{sys.version_info.minor}-{_key(numpy_dir, parents)}"
    if (target / "pyvenv.cfg").is_file() and (_site_packages(target) / PTH_NAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # No pip, no activate scripts needed: the stub only looks for bin/python3 and pyvenv.cfg.
        venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(tmp)
        sp = _site_packages(tmp)
        if numpy_dir is not None:
            for entry in numpy_dir.iterdir():
                if entry.name.startswith("numpy"):  # numpy/, numpy.libs/, numpy-X.dist-info/
                    (sp / entry.name).symlink_to(entry.resolve())
        # A .pth line starting with `import` is executed at start-up; addsitedir appends (after this env's own
        # site-packages) and also runs those folders' .pth files (editable installs).
        line = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents)
        (sp / PTH_NAME).write_text(line + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another launcher finished the same env first: theirs is as good
            if not (target / "pyvenv.cfg").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def describe(env_dir: Path) -> str:
    """One line for logs: which env and numpy the stubs get."""
    sp = _site_packages(env_dir)
    own = sorted(sp.glob("numpy-*.dist-info"))
    numpy = own[-1].name[len("numpy-") : -len(".dist-info")] + " (stub env)" if own else "the launcher's"
    return f"python-backend stub env {env_dir} (numpy {numpy})"
