"""`mimsearch serve`: run the bundled tritonserver on a model repository until Ctrl-C (mim.serving.server)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mim.serving import server as lib
from mim.serving.runtimes import VARIANTS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mimsearch serve", description=lib.__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="model repository folder")
    p.add_argument(
        "--config",
        choices=lib.CONFIGS,
        default=lib.DEFAULT_CONFIG,
        help="config variant: " + ", ".join(f"{v.name} ({v.label})" for v in VARIANTS),
    )
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log", type=Path, default=None, help="log file (default: a temporary file)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=lib.STARTUP_TIMEOUT_S)
    p.add_argument(
        "--model-control",
        choices=lib.MODEL_CONTROL,
        default="explicit",
        help="explicit: models (re)load through the model-control API, e.g. a new gallery; none: load all, fixed",
    )
    return p


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and SIGTERM (docker stop,
    # systemd, kill) would otherwise end us without stopping the server. Restored on return, for callers
    # that run main() in-process (tests).
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return serve(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(args: argparse.Namespace) -> int:
    """Start the server, wait until it exits or we are told to stop; 0 on a requested stop."""
    server = lib.TritonServer(
        args.repository,
        config=args.config,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_path=args.log,
        log_verbose=args.log_verbose,
        startup_timeout=args.startup_timeout,
        model_control=args.model_control,
    )
    try:
        server.start()
    except lib.TritonServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except _Stop:
        return 0  # start() has stopped the server already
    print(
        f"tritonserver ready ({args.config}): grpc {server.grpc_url}  http {server.http_url}  "
        f"metrics {server.metrics_url}\nlog: {server.log_path}   (Ctrl-C to stop)",
        flush=True,
    )
    try:
        # A stub that dies leaves its model READY but unable to answer: say so, and stop, rather than serve errors.
        while True:
            time.sleep(lib.HEALTH_POLL_S)
            server.check_health()
    except lib.TritonServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except _Stop as e:
        print(f"{e}: stopping tritonserver ...", file=sys.stderr)
        return 0
    finally:
        # A second Ctrl-C must not abandon the server half-stopped (it runs in its own session); stop() is
        # bounded anyway: SIGKILL after the stop timeout.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
