"""The soak benchmark: its process and memory probes, the growth fit, and (slow) a short real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import soak


def test_rss_and_children_of_a_real_process():
    assert soak.rss_kib(os.getpid()) > 1000
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in soak.children(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert soak.rss_kib(child.pid) is None


def test_growth_is_the_slope_after_warm_up():
    samples = [{"t_s": t, "requests": 100 * t, "x_kib": (5000 if t < 5 else 1000 + 2 * t)} for t in range(20)]
    # after warm-up: +2 KiB per 100 requests = 20 KiB per 1,000
    assert soak.growth_per_1000(samples, "x_kib", warmup_s=5) == pytest.approx(20.0)
    assert soak.growth_per_1000(samples[:6], "x_kib", warmup_s=5) is None  # too few samples to fit


def test_photos_decode():
    import io

    from PIL import Image

    pics = soak.photos(count=4)
    assert [Image.open(io.BytesIO(p)).format for p in pics] == ["JPEG", "PNG", "JPEG", "PNG"]


@pytest.mark.slow
@pytest.mark.server
def test_short_soak_has_no_unexpected_errors(served_repository, tmp_path):
    rc = soak.main(
        ["--repository", str(served_repository), "--minutes", "0.4", "--warmup-s", "5", "--out", str(tmp_path)]
    )
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert rc == 0, summary["unexpected_examples"]
    assert summary["unexpected_errors"] == 0 and summary["server_alive_at_end"]
    assert summary["bad_requests"] > 0 and summary["bad_refused_cleanly"] == summary["bad_requests"]
