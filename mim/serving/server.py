"""Launch the tritonserver bundled in the `nvidia-pytriton` wheel, without Docker.

    mimsearch serve --repository artifacts/model_repository --config cpu          # `make serve`
    mimsearch serve --repository artifacts/model_repository --config cpu --grpc-port 8001

The wheel carries `pytriton/tritonserver/bin/tritonserver` (Triton 2.51) with its shared libraries in
`nvidia_pytriton.libs/`, the python backend, and one backend stub per Python version. The python backend
expects the stub next to `libtriton_python.so`, so a backend folder with both is assembled once in a cache
folder and passed with `--backend-directory`. The python models run in the stub with this environment's
packages (so they `import mim`), through a stub env that gives them numpy 1.x (mim.serving.stub_env). Every
listener binds to 127.0.0.1 only.

Config variants (the rows of mim.serving.runtimes.VARIANTS): each selects `configs/<name>.pbtxt` with
`--model-config-name`; `default` uses each model's `config.pbtxt` (TensorRT engines, NGC container).

Model control: `explicit` (the default) loads the repository's servable models at start-up
(`mim.serving.gallery.servable_models`: everything, except the `knn` model and the search ensembles until a
gallery is installed) and lets clients load and reload models through Triton's model-control API, which is how
a new gallery goes into service without a restart. `none` loads every model folder and allows no reloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from mim.errors import ServingError
from mim.serving import stub_env
from mim.serving.runtimes import CPU, variant_names

HOST = "127.0.0.1"
CONFIGS = variant_names()
DEFAULT_CONFIG = CPU
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
MODEL_CONTROL = ("explicit", "none")
LOG_TAIL_LINES = 25
HEALTH_POLL_S = 2.0  # how often `serve` checks the server process and its stubs


class TritonServerError(ServingError):
    pass


class PortTaken(TritonServerError):
    """A port the server would listen on is in use: wrong input (exit code 2)."""

    exit_code = 2


class RepositoryNotFound(TritonServerError):
    """The repository given is not a folder: wrong input (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class TritonPaths:
    """Where the bundled server's pieces are: `root` is `pytriton/tritonserver` and `lib_dir` its sibling
    `nvidia_pytriton.libs`, in the installed wheel and in an unpacked `make gpu-bundle` alike, which is where
    the binaries' RPATHs ($ORIGIN/../../../nvidia_pytriton.libs) look for their libraries."""

    root: Path  # pytriton/tritonserver
    binary: Path  # tritonserver
    lib_dir: Path  # nvidia_pytriton.libs
    python_backend: Path  # backends/python (libtriton_python.so + triton_python_backend_utils.py)
    stub: Path  # python_backend_stubs/<X.Y>/triton_python_backend_stub for the running Python
    version: str  # nvidia-pytriton version, keys the backend cache

    home: Path | None = None  # an unpacked `make gpu-bundle`, when the server comes from one

    def env(self, stub_env: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the server. Its libraries resolve through their RPATHs (the bundled layout mirrors
        the wheel's), so nothing of the bundle goes on LD_LIBRARY_PATH; only the folder of this Python's
        libpython does, for the stub. PATH starts with the stub env's bin/ (mim.serving.stub_env), from which
        the stubs' embedded interpreter takes its packages; without one, with this Python's bin/."""
        env = dict(os.environ if base is None else base)
        dirs = (python_library_dir(), env.get("LD_LIBRARY_PATH", ""))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in dirs if p)
        bin_dir = stub_env / "bin" if stub_env is not None else Path(sys.executable).parent
        env["PATH"] = os.pathsep.join((str(bin_dir), env.get("PATH", "")))
        return env


def python_library_dir() -> str | None:
    """The folder of THIS interpreter's libpython, to put first on LD_LIBRARY_PATH of the python-backend stub.

    The stub links `libpython3.X.so.1.0` and would otherwise load the system's (Debian's 3.11.2 here), whose C
    modules need not match the standard library of the interpreter running this code (pyenv's 3.11.7 here):
    PyTriton's proxy model dies on that mismatch ("'_thread.RLock' object has no attribute
    '_recursion_count'"). None when this interpreter has no shared libpython."""
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
    if libdir and ldlib and (Path(libdir) / ldlib).exists():
        return libdir
    return None


# A folder unpacked from `make gpu-bundle` (benchmarks/gpu_bundle.py) holding the same server without the
# nvidia-pytriton package, in the wheel's layout: pytriton/tritonserver/, nvidia_pytriton.libs/, MANIFEST.json.
TRITON_HOME_ENV = "MIM_TRITON_HOME"
BUNDLE_MANIFEST = "MANIFEST.json"


def triton_paths() -> TritonPaths:
    """Locate the bundled tritonserver: in $MIM_TRITON_HOME when set, else in the installed `nvidia-pytriton`
    package; explain what is missing."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    home = os.environ.get(TRITON_HOME_ENV)
    bundle: Path | None = None
    if home:
        bundle = Path(home)
        site = bundle
        manifest = bundle / BUNDLE_MANIFEST
        version = json.loads(manifest.read_text()).get("tritonserver", "bundle") if manifest.is_file() else "bundle"
        version = version.split()[-1]
        fix = f"unpack the archive of `make gpu-bundle` into ${TRITON_HOME_ENV} ({home}) again"
    else:
        try:
            import pytriton
        except ImportError:
            raise TritonServerError(
                "the bundled tritonserver comes with the `nvidia-pytriton` package; install the serving extra: "
                f"pip install -e '.[serve]' (or point ${TRITON_HOME_ENV} at an unpacked `make gpu-bundle`)"
            ) from None
        site = Path(pytriton.__file__).resolve().parent.parent
        version = metadata.version("nvidia-pytriton")
        fix = "reinstall nvidia-pytriton: pip install -e '.[serve]'"
    root, lib_dir = site / "pytriton" / "tritonserver", site / "nvidia_pytriton.libs"
    paths = TritonPaths(
        root=root,
        binary=root / "bin" / "tritonserver",
        lib_dir=lib_dir,
        python_backend=root / "backends" / "python",
        stub=root / "python_backend_stubs" / py / "triton_python_backend_stub",
        version=version,
        home=bundle,
    )
    for what, path in (
        ("tritonserver binary", paths.binary),
        ("library folder", paths.lib_dir),
        ("python backend", paths.python_backend / "libtriton_python.so"),
        (f"python backend stub for Python {py}", paths.stub),
    ):
        if not path.exists():
            raise TritonServerError(f"{what} not found at {path}; {fix}")
    return paths


def default_cache_dir() -> Path:
    base = os.environ.get("MIM_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mim"


BACKENDS_IN_TREE = Path("pytriton") / "tritonserver" / "backends"  # from the top of a backend folder


def backend_dir(paths: TritonPaths | None = None, cache_dir: str | Path | None = None) -> Path:
    """A `--backend-directory` holding `python/` = the bundled python backend + the stub for this Python.

    The python backend expects its stub next to `libtriton_python.so`, and both find their libraries through
    the RPATH `$ORIGIN/../../../../nvidia_pytriton.libs`; so the folder mirrors the wheel's layout, with a link
    to the server's library folder at the top:

        <cache>/triton-backends-.../nvidia_pytriton.libs -> the server's libraries
        <cache>/triton-backends-.../pytriton/tritonserver/backends/python/{libtriton_python.so, stub, ...}

    Built once per (server, Python version) under the cache folder; assembled in a temporary folder and renamed
    into place, so concurrent first runs cannot see a half-copied backend. Returns the `backends` folder."""
    paths = paths or triton_paths()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    libs_key = hashlib.sha256(str(paths.lib_dir.resolve()).encode()).hexdigest()[:8]
    target = Path(cache_dir or default_cache_dir()) / f"triton-backends-{paths.version}-py{py}-{libs_key}"
    if _backend_complete(target, paths):
        return target / BACKENDS_IN_TREE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        dst = tmp / BACKENDS_IN_TREE / "python"
        shutil.copytree(paths.python_backend, dst, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(paths.stub, dst / paths.stub.name)
        (tmp / paths.lib_dir.name).symlink_to(paths.lib_dir.resolve())
        # Another process may have finished first while we copied: a complete target is never replaced. Only a
        # stale or half-copied one is removed; a rename that loses to someone else's leaves theirs in place.
        for _ in range(3):
            if _backend_complete(target, paths):
                return target / BACKENDS_IN_TREE
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(tmp, target)
                return target / BACKENDS_IN_TREE
            except OSError:
                continue
        raise TritonServerError(f"could not assemble the python backend folder {target}; remove it and retry")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _backend_complete(target: Path, paths: TritonPaths) -> bool:
    python = target / BACKENDS_IN_TREE / "python"
    wanted = [(paths.stub, python / paths.stub.name)]
    wanted += [(f, python / f.name) for f in paths.python_backend.iterdir() if f.is_file()]
    libs = target / paths.lib_dir.name
    return libs.is_dir() and all(dst.is_file() and dst.stat().st_size == src.stat().st_size for src, dst in wanted)


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (the OS picks it); the server binds it right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(port: int, host: str = HOST) -> bool:
    """Whether something listens on host:port now (a bind test; SO_REUSEADDR so that connections of a stopped
    server lingering in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
        return False


def listening_ports(pid: int) -> set[int] | None:
    """The TCP ports process `pid` itself listens on (Linux /proc); None where /proc cannot tell. Readiness
    counts only on our own process's port: another server on it must not make ours look ready."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    inodes = set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile (listdir's own descriptor, for one)
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()  # sl local_address rem_address st ... inode (10th column)
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def config_name_args(config: str) -> list[str]:
    if config not in CONFIGS:
        raise ValueError(f"config {config!r}; expected one of {list(CONFIGS)}")
    return [] if config == "default" else [f"--model-config-name={config}"]


class TritonServer:
    """A tritonserver process on 127.0.0.1, as a context manager.

        with TritonServer("model_repository", config="cpu") as server:
            client = tritonclient.grpc.InferenceServerClient(server.grpc_url)

    Ports are free ones unless given. Start-up waits (bounded) until the server reports ready, i.e. every
    model loaded; a server that exits or is not ready in time raises TritonServerError with the log tail.
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        config: str = DEFAULT_CONFIG,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        log_path: str | Path | None = None,
        log_verbose: int = 0,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        stop_timeout: float = STOP_TIMEOUT_S,
        cache_dir: str | Path | None = None,
        extra_args: Sequence[str] = (),
        model_control: str = "explicit",
        models: Sequence[str] | None = None,
    ):
        if model_control not in MODEL_CONTROL:
            raise ValueError(f"model_control={model_control!r}; expected one of {MODEL_CONTROL}")
        self.repository = Path(repository).resolve()
        self.config = config
        self._config_args = config_name_args(config)
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_path = Path(log_path) if log_path else _temp_log()
        self.log_verbose = log_verbose
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cache_dir = cache_dir
        self.extra_args = list(extra_args)
        self.model_control = model_control
        self.models = None if models is None else list(models)  # explicit mode; None: servable_models()
        self.process: subprocess.Popen | None = None
        self._seen_stubs: set[str] = set()  # python-backend instances seen running (dead_stubs compares)

    # --- addresses ---
    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"  # tritonclient.grpc takes host:port without a scheme

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"  # likewise tritonclient.http

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    # --- life cycle ---
    def command(self, paths: TritonPaths | None = None) -> list[str]:
        paths = paths or triton_paths()
        return [
            str(paths.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir(paths, self.cache_dir)}",
            *self._config_args,
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={HOST}",
            f"--http-port={self.http_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",  # no DCGM on CPU machines; CPU metrics stay on
            "--strict-readiness=true",  # ready only when every model is
            "--exit-on-error=true",  # a model that fails to load stops the server (and start() reports why)
            f"--exit-timeout-secs={max(1, int(self.stop_timeout) - 2)}",
            f"--log-verbose={self.log_verbose}",
            *self._model_control_args(),
            *self.extra_args,
        ]

    def _model_control_args(self) -> list[str]:
        if self.model_control == "none":
            return []
        from mim.serving.gallery import servable_models

        models = servable_models(self.repository) if self.models is None else self.models
        return ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]

    def start(self) -> TritonServer:
        if self.process is not None:
            raise TritonServerError("server already started")
        if not self.repository.is_dir():
            raise RepositoryNotFound(
                f"model repository {self.repository} is not a directory; expected one installed by `mimsearch "
                "engines` (give it as --repository)"
            )
        self.check_ports()
        paths = triton_paths()
        try:
            env_dir = stub_env.build_stub_env(self.cache_dir or default_cache_dir(), stub_env.numpy_source(paths.home))
        except stub_env.StubEnvError as e:
            raise TritonServerError(str(e)) from None
        cmd = self.command(paths)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"# {stub_env.describe(env_dir)}\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            # Own session: Ctrl-C in a terminal reaches only us, and stop() can signal the whole group
            # (the server and its python-backend stubs).
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=paths.env(env_dir),
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def check_ports(self) -> None:
        """PortTaken naming the port and the flag that moves it, before anything starts."""
        for name, port in (("grpc", self.grpc_port), ("http", self.http_port), ("metrics", self.metrics_port)):
            if port_taken(port):
                raise PortTaken(
                    f"port {port} on {HOST} ({name}) is in use by another process; expected a free port: stop "
                    f"that process (another `mimsearch serve`?) or give another --{name}-port"
                )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} while starting (repository {self.repository}, "
                    f"config {self.config!r}){self._diagnosis()}"
                )
            ports = listening_ports(self.process.pid)
            if (ports is None or self.http_port in ports) and _http_ok(url):
                self._seen_stubs.update(stub_processes(self.process.pid))
                return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {self.startup_timeout:.0f} s (repository {self.repository}, "
                    f"config {self.config!r}){self._diagnosis()}"
                )
            time.sleep(0.2)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def dead_stubs(self) -> list[str]:
        """Python-backend instances (e.g. `preprocess_image_0_0`) seen running earlier whose stub process is
        gone while their model is still loaded. Triton keeps such a model READY and answers each of its
        requests with "Stub process '...' is not healthy", so readiness alone does not show it."""
        if not self.is_running():
            return []
        alive = stub_processes(self.process.pid)
        loaded = self.loaded_models()
        dead = [name for name in sorted(self._seen_stubs - set(alive)) if _model_of_instance(name, loaded)]
        self._seen_stubs.update(alive)
        return dead

    def loaded_models(self) -> set[str]:
        """Names of the models the server reports READY (repository index over HTTP); empty when unreachable."""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5.0) as r:
                return {m["name"] for m in json.loads(r.read()) if m.get("state") == "READY"}
        except (urllib.error.URLError, OSError, ValueError):
            return set()

    def check_health(self) -> None:
        """Raise TritonServerError when the server has exited or a stub died under a loaded model: the dead
        instances by name, then the error lines of the server log."""
        if self.process is not None and self.process.poll() is not None:
            raise TritonServerError(f"tritonserver exited with code {self.process.returncode}{self._diagnosis()}")
        dead = self.dead_stubs()
        if dead:
            raise TritonServerError(
                f"python-backend stub of {', '.join(dead)} died; Triton answers its requests with 'not healthy' "
                f"until the model is reloaded. Errors in the server log ({self.log_path}):\n"
                + (error_lines(self.log_text()) or self.log_tail())
            )

    def stop(self) -> int | None:
        """SIGINT (Triton unloads models and waits for in-flight requests), SIGKILL to the process group
        after `stop_timeout`. Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)  # the hung server and its python-backend stubs
        code = proc.wait()
        self.process = None
        return code

    def _diagnosis(self) -> str:
        """The models that failed to load, each with its first error line, then the log's tail."""
        failures = load_failures(self.log_text())
        listed = "".join(f"\n  {name}: {message}" for name, message in failures.items())
        head = f"\nmodels that failed to load:{listed}" if failures else ""
        return f"{head}\nlog {self.log_path}, last lines:\n{self.log_tail()}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_LOAD_FAILURE = re.compile(r"failed to load (?:model )?'([^']+)'(?: version \S+)?: (.*?)(?:\\n|\"?$)", re.MULTILINE)


def load_failures(log_text: str) -> dict[str, str]:
    """Model name -> first line of its load error, from tritonserver's log ("failed to load 'x' version 1: ...")."""
    return {m.group(1): m.group(2) for m in _LOAD_FAILURE.finditer(log_text)}


STUB_BINARY = "triton_python_backend_stub"
STUB_NAME_ARG = 8  # argv of a stub: binary, model path, shm region, sizes x2, parent pid, lib dir, ipc, NAME, dir


def stub_processes(server_pid: int) -> dict[str, int]:
    """Instance name -> pid of the python-backend stubs running under the server `server_pid` (Linux /proc).
    Zombies (exited, not yet reaped) do not count."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after its ")".
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) != server_pid or state == "Z" or len(argv) <= STUB_NAME_ARG:
            continue
        if argv[0].decode(errors="replace").endswith(STUB_BINARY):
            found[argv[STUB_NAME_ARG].decode(errors="replace")] = int(entry.name)
    return found


def _model_of_instance(instance: str, models: set[str]) -> str | None:
    """`knn_0_0` -> `knn` when `knn` is among `models` (instance names are <model>_<group>_<index>)."""
    base = instance.rsplit("_", 2)[0]
    return base if base in models else None


_ERROR_LINE = re.compile(r"^E\d{4} |Traceback|Error|error:|terminate called|what\(\):|is not healthy")


def error_lines(log_text: str, limit: int = 12) -> str:
    """The last `limit` lines of a server log that report an error (Triton's E-lines, Python tracebacks, C++
    aborts of a stub)."""
    lines = [line for line in log_text.splitlines() if _ERROR_LINE.search(line)]
    return "\n".join(lines[-limit:])


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group we created with start_new_session
    except (ProcessLookupError, PermissionError):
        pass


def _temp_log() -> Path:
    fd, path = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
    os.close(fd)
    return Path(path)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False
