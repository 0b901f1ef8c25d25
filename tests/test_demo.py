"""`make demo` end to end in its --quick form: a small catalog, a few training steps, a real tritonserver."""

from __future__ import annotations

import re

import pytest

from client import demo


@pytest.mark.server
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    art = tmp_path / "artifacts"
    assert demo.main(["--artifacts", str(art), "--quick", "--steps", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    headers = re.findall(r"^==> \[(\d)/8\] (\w+):", out, flags=re.M)
    assert [h[1] for h in headers] == ["catalog", "train", "export", "serve", "index", "search", "quality", "page"]
    # The served-vs-in-process line, with numbers in [0, 1].
    m = re.search(r"served image Recall@1 ([\d.]+) / Recall@10 ([\d.]+) vs in-process torch ([\d.]+) / ([\d.]+)", out)
    assert m, out[-3000:]
    served_r1, served_r10, local_r1, local_r10 = map(float, m.groups())
    assert 0 <= served_r1 <= served_r10 <= 1 and 0 <= local_r1 <= local_r10 <= 1
    # The served ONNX path and torch compute the same embeddings, so the recalls agree.
    assert abs(served_r10 - local_r10) <= 0.05
    assert re.search(r"^\s+mm-refine R@10\s+[\d.]+\s+[\d.]+$", out, flags=re.M)
    page = (art / "results.html").read_text()
    assert page.count('<li class="result') >= 6 and "data:image/png;base64," in page
    assert (art / "index" / "test.safetensors").is_file() and "server stopped" in out
