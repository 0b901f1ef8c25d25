"""Soak: mixed traffic against one tritonserver for a long while, watching its memory and every answer.

    python -m benchmarks.soak --repository artifacts/model_repository --minutes 10        # after `make engines`
    python -m benchmarks.soak --repository REPO --minutes 2 --out /tmp/soak     # a shorter run

`--concurrency` asyncio workers (default 16) send, in a fixed rotation, requests of these kinds:

    image        embed_image of a photo (PNG or JPEG)               must equal the first answer for that photo
    text         embed_text of a title                              likewise
    multimodal   embed_multimodal with a random image_weight        a unit vector
    search       embed_image, then top-10 in a KnnIndex gallery     the photo's own gallery item ranks first
    bad image    embed_image of bytes that are not an image         must be refused with INVALID_ARGUMENT
    bad text     embed_text of bytes that are not UTF-8             likewise (sent raw, past the client's checks)

Every 10 s it samples the resident memory (VmRSS) of tritonserver and of each python-backend stub process (the
server's children), and the counts so far. An answer that differs from what is expected, a good request that
fails, or a bad request that is not refused cleanly counts as an unexpected error. The server must stay up.

Memory growth is the slope of a least-squares line through (requests, RSS) over the samples after warm-up
(the first --warmup-s seconds), per process and summed, in KiB per 1,000 requests.

Writes <out>/soak.csv (samples), <out>/soak.json (summary, command, machine) and <out>/soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mim import contract
from mim.commandline import CommandParser

from .common import hardware, now_utc, versions, write_json, write_rows_csv

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SAMPLE_S = 10.0
KINDS = ("image", "text", "multimodal", "search", "image", "text", "bad image", "image", "multimodal", "bad text")
TITLES = ["blue zebra mug", "red polka-dot shirt", "green plaid shoe", "yellow striped bag", "in red", "with dots"]


# --- the server's processes -------------------------------------------------------------------------------------
def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> dict[int, str]:
    """pid -> command name of the direct children of `pid` (the python-backend stubs of a tritonserver)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out[int(d.name)] = comm
    return out


def stub_models(pid: int) -> str:
    """The model a python-backend stub serves, from its command line (Triton passes the model's path)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for a in args:
        text = a.decode(errors="replace")
        if "/model.py" in text or text.endswith(".py"):
            return Path(text).parent.parent.name
    return args[1].decode(errors="replace")[-40:] if len(args) > 1 else "?"


# --- traffic --------------------------------------------------------------------------------------------------------
def photos(count: int = 24, size: int = 96, seed: int = 0) -> list[bytes]:
    """Small synthetic photos (stripes and blobs in random colours), half PNG, half JPEG."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for i in range(count):
        img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y = rng.randrange(size), rng.randrange(size)
            r = rng.randrange(6, size // 3)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, format="PNG" if i % 2 else "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@dataclass
class Tally:
    sent: Counter = field(default_factory=Counter)
    refused_cleanly: int = 0
    unexpected: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.sent.values())


class Traffic:
    def __init__(self, url: str, images: list[bytes], timeout_s: float) -> None:
        from client.triton_client import AsyncEmbeddingClient

        self.client = AsyncEmbeddingClient(url, timeout_s=timeout_s, retries=0)
        self.images = images
        self.tally = Tally()
        self.first: dict[tuple[str, int], np.ndarray] = {}
        self.index = None

    async def prepare(self) -> None:
        """The gallery for search requests: the photos themselves, ids 0..n-1."""
        from mim.search.knn import KnnIndex

        emb = await self.client.embed_images(self.images)
        self.index = KnnIndex(emb.shape[1], device="cpu")
        self.index.add(np.arange(len(self.images)), emb)

    async def one(self, kind: str, i: int) -> None:
        from client.triton_client import ClientError

        self.tally.sent[kind] += 1
        try:
            if kind.startswith("bad"):
                await self._bad(kind, i)
                return
            await self._good(kind, i)
        except ClientError as e:
            self.tally.unexpected.append(f"{kind} #{i}: {e}")

    async def _good(self, kind: str, i: int) -> None:
        n = len(self.images)
        if kind == "image":
            self._same(("image", i % n), (await self.client.embed_images([self.images[i % n]]))[0])
        elif kind == "text":
            t = i % len(TITLES)
            self._same(("text", t), (await self.client.embed_texts([TITLES[t]]))[0])
        elif kind == "multimodal":
            w = (i % 11) / 10
            out = await self.client.embed_multimodal([self.images[i % n]], [TITLES[i % len(TITLES)]], w)
            if abs(float(np.linalg.norm(out[0])) - 1) > 1e-3:
                self.tally.unexpected.append(f"multimodal #{i}: norm {np.linalg.norm(out[0]):.4f}, expected 1")
        elif kind == "search":
            q = await self.client.embed_images([self.images[i % n]])
            _, ids = self.index.search(q, 10)
            if ids[0, 0] != i % n:
                self.tally.unexpected.append(f"search #{i}: photo {i % n} ranked {ids[0, 0]} first, not itself")

    def _same(self, key: tuple[str, int], emb: np.ndarray) -> None:
        ref = self.first.setdefault(key, emb)
        if float(np.abs(ref - emb).max()) > 1e-4:
            self.tally.unexpected.append(f"{key}: answer moved by {np.abs(ref - emb).max():.2e} from the first one")

    async def _bad(self, kind: str, i: int) -> None:
        from tritonclient.utils import InferenceServerException

        from client.triton_client import ClientError, infer_args, plan_texts

        if kind == "bad image":
            junk = os.urandom(64 + i % 200)  # not an image: the server must refuse it
            try:
                await self.client.embed_images([junk])
            except ClientError as e:
                self._refused(kind, i, e.status)
                return
        else:
            chunk = plan_texts(["x"], 1)[0]
            chunk.inputs[contract.TEXT.name][0, 0] = b"\xff\xfe bad utf-8 " + bytes([128 + i % 100])
            try:
                await self.client._client.infer(**infer_args(chunk), client_timeout=self.client.timeout_s)
            except InferenceServerException as e:
                self._refused(kind, i, e.status())
                return
        self.tally.unexpected.append(f"{kind} #{i}: answered instead of refused")

    def _refused(self, kind: str, i: int, status: str | None) -> None:
        if status == "StatusCode.INVALID_ARGUMENT":
            self.tally.refused_cleanly += 1
        else:
            self.tally.unexpected.append(f"{kind} #{i}: refused with {status}, expected INVALID_ARGUMENT")


# --- the run --------------------------------------------------------------------------------------------------------
async def soak(args: argparse.Namespace, server, log) -> tuple[list[dict], Traffic]:
    traffic = Traffic(server.grpc_url, photos(), args.timeout)
    await traffic.client.wait_ready(120)
    await traffic.prepare()
    pid = server.process.pid
    stubs = {p: stub_models(p) for p in children(pid)}
    log(f"tritonserver pid {pid}; python-backend stubs: {', '.join(f'{p} ({m})' for p, m in stubs.items())}")
    counter = itertools.count()
    deadline = time.monotonic() + args.minutes * 60
    samples: list[dict] = []
    t0 = time.monotonic()

    def sample() -> None:
        row = {"t_s": round(time.monotonic() - t0, 1), "requests": traffic.tally.total}
        row["unexpected"] = len(traffic.tally.unexpected)
        row["refused_cleanly"] = traffic.tally.refused_cleanly
        row["tritonserver_kib"] = rss_kib(pid)
        for p, model in stubs.items():
            row[f"stub {model} ({p})_kib"] = rss_kib(p)
        row["total_kib"] = sum(v for k, v in row.items() if k.endswith("_kib") and v)
        samples.append(row)
        log(
            f"t={row['t_s']:>6.0f}s requests {row['requests']:>7} unexpected {row['unexpected']} "
            f"tritonserver {row['tritonserver_kib'] / 1024:.0f} MiB, all {row['total_kib'] / 1024:.0f} MiB"
        )

    async def worker() -> None:
        while time.monotonic() < deadline and server.is_running():
            i = next(counter)
            await traffic.one(KINDS[i % len(KINDS)], i)

    async def sampler() -> None:
        while time.monotonic() < deadline:
            sample()
            await asyncio.sleep(min(SAMPLE_S, max(0.0, deadline - time.monotonic())))

    await asyncio.gather(sampler(), *(worker() for _ in range(args.concurrency)))
    sample()
    await traffic.client.close()
    return samples, traffic


def growth_per_1000(samples: list[dict], key: str, warmup_s: float) -> float | None:
    """Least-squares slope of `key` (KiB) against the request count, after warm-up, per 1,000 requests."""
    pts = [(s["requests"], s[key]) for s in samples if s["t_s"] >= warmup_s and s.get(key) is not None]
    if len(pts) < 3 or pts[-1][0] == pts[0][0]:
        return None
    x, y = np.array(pts, dtype=np.float64).T
    return float(np.polyfit(x, y, 1)[0] * 1000)


def plot(samples: list[dict], path: Path, warmup_s: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in samples[0] if k.endswith("_kib") and k != "total_kib"]
    fig, ax = plt.subplots(figsize=(9, 5))
    x = [s["requests"] for s in samples]
    for k in keys:
        ax.plot(x, [(s[k] or 0) / 1024 for s in samples], label=k.removesuffix("_kib"))
    warm = next((s["requests"] for s in samples if s["t_s"] >= warmup_s), None)
    if warm is not None:
        ax.axvline(warm, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("requests answered or refused")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("tritonserver and python-backend stubs under mixed traffic")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"), help="installed model repository")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the traffic (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmup-s", type=float, default=60.0, help="seconds left out of the memory slope")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    from mim.serving.server import TritonServer

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started, before = now_utc(), hardware()
    with TritonServer(args.repository, config="cpu") as server:  # log in a temp file, named on failure
        samples, traffic = asyncio.run(soak(args, server, lambda line: print(line, flush=True)))
        alive = server.is_running()
    keys = [k for k in samples[0] if k.endswith("_kib")]
    growth = {k.removesuffix("_kib"): growth_per_1000(samples, k, args.warmup_s) for k in keys}
    bad = traffic.tally.sent["bad image"] + traffic.tally.sent["bad text"]
    summary = {
        "command": "python -m benchmarks.soak " + " ".join(argv),
        "started": started,
        "finished": now_utc(),
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "requests": traffic.tally.total,
        "requests_per_kind": dict(traffic.tally.sent),
        "bad_requests": bad,
        "bad_refused_cleanly": traffic.tally.refused_cleanly,
        "unexpected_errors": len(traffic.tally.unexpected),
        "unexpected_examples": traffic.tally.unexpected[:20],
        "server_alive_at_end": alive,
        "rss_growth_kib_per_1000_requests_after_warmup": growth,
        "rss_mib_first_last": {
            k.removesuffix("_kib"): [round((samples[0][k] or 0) / 1024, 1), round((samples[-1][k] or 0) / 1024, 1)]
            for k in keys
        },
        "hardware_before": before,
        "hardware_after": hardware(),
        "versions": versions(),
    }
    write_rows_csv(samples, args.out / "soak.csv")
    write_json(summary, args.out / "soak.json")
    plot(samples, args.out / "soak.png", args.warmup_s)
    print(
        f"{traffic.tally.total} requests in {args.minutes:g} min at concurrency {args.concurrency}: "
        f"{len(traffic.tally.unexpected)} unexpected errors, {traffic.tally.refused_cleanly}/{bad} bad requests "
        f"refused cleanly, server alive: {alive}; RSS growth after warm-up (KiB per 1,000 requests): "
        + ", ".join(f"{k} {v:.1f}" for k, v in growth.items() if v is not None)
    )
    print(f"wrote {args.out}/soak.csv, soak.json, soak.png")
    return 0 if alive and not traffic.tally.unexpected and traffic.tally.refused_cleanly == bad else 1


if __name__ == "__main__":
    sys.exit(main())
