"""The self-contained HTML results page: escaping, inlined images, and a render in a real headless Chromium."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.html import (
    ComparisonBlock,
    QueryBlock,
    TableBlock,
    TextBlock,
    data_uri,
    render_page,
    sniff_mime,
    write_page,
)
from client.search import SearchResult

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
NASTY = '<script>alert("x")</script> & "quoted" \'mug\''


def _image(colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste(Image.new("RGB", (40, 40), colour), (12, 12))
    img.save(buf, format=fmt)
    return buf.getvalue()


def _results(tmp_path: Path, n: int, titles: list[str] | None = None) -> list[SearchResult]:
    out = []
    for i in range(n):
        path = tmp_path / f"p{i}.png"
        path.write_bytes(_image((40 * i % 255, 120, 200 - 30 * i % 200)))
        title = titles[i] if titles else f"product number {i}"
        out.append(SearchResult(i + 1, 100 + i, 0.9 - 0.05 * i, title, "mug", str(path)))
    return out


class _Page(HTMLParser):
    """Collects, per results list, the titles of its items, and every <img> src and <script> tag."""

    def __init__(self):
        super().__init__()
        self.lists: list[list[str]] = []
        self.srcs: list[str] = []
        self.scripts = 0
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "ol" and a.get("class") == "results":
            self.lists.append([])
        elif tag == "div" and a.get("class") == "title":
            self._in_title = True
            self.lists[-1].append("")
        elif tag == "img":
            self.srcs.append(a.get("src", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "div":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.lists[-1][-1] += data


def test_page_escapes_text_and_inlines_images(tmp_path):
    results = _results(tmp_path, 3, titles=[NASTY, "plain", "a < b"])
    results.append(SearchResult(4, 7, 0.1, None, None, str(tmp_path / "missing.png")))
    page = render_page(
        [
            QueryBlock(
                f"query {NASTY}", results, image=_image((1, 2, 3), "JPEG"), text=NASTY, mode="fusion", expected_id=101
            )
        ],
        title="t & t",
    )
    assert "<script>" not in page and "&lt;script&gt;" in page and "&quot;quoted&quot;" in page
    parsed = _Page()
    parsed.feed(page)
    assert parsed.scripts == 0
    assert parsed.lists == [[NASTY, "plain", "a < b", "product 7"]]
    assert parsed.srcs[0].startswith("data:image/jpeg;base64,")  # the query image
    assert all(s.startswith("data:image/png;base64,") for s in parsed.srcs[1:]) and len(parsed.srcs) == 4
    assert 'class="thumb missing"' in page  # the missing file is a placeholder, not a broken link
    assert '<li class="result hit" data-id="101"' in page


def test_side_by_side_marks_other_categories(tmp_path):
    dml = _results(tmp_path, 4, titles=["yellow mug", "yellow chair", "yellow chair", NASTY])
    dml[1:3] = [dataclasses.replace(r, category="chair") for r in dml[1:3]]
    three = _results(tmp_path, 4, titles=["yellow mug", "red mug", "blue mug", "green mug"])
    block = ComparisonBlock(
        "street photo of a yellow mug",
        [("DML", dml), ("3-tower", three)],
        image=_image((240, 205, 30), "JPEG"),
        expected_id=100,
        expected_category="mug",
        notes=[NASTY],
    )
    page = render_page([block, QueryBlock("typed", three, text="mug")])
    parsed = _Page()
    parsed.feed(page)
    assert parsed.lists[:2] == [["yellow mug", "yellow chair", "yellow chair", NASTY], [t.title for t in three]]
    assert parsed.scripts == 0 and "&lt;script&gt;" in page
    assert page.count('<li class="result off-category"') == 2
    assert 'data-model="DML"><h3>DML &middot; 2/4 of another category</h3>' in page
    assert 'data-model="3-tower"><h3>3-tower &middot; 0/4 of another category</h3>' in page
    assert page.count('class="result hit"') == 2  # the expected product in both columns


def test_mime_sniffing_uses_magic_bytes():
    assert sniff_mime(_image((0, 0, 0))) == "image/png"
    assert sniff_mime(_image((0, 0, 0), "JPEG")) == "image/jpeg"
    assert sniff_mime(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_mime(b"<svg onload=alert(1)>") is None and data_uri(b"<svg>") is None


@pytest.mark.browser
def test_page_renders_in_headless_chromium(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM}; `make system-deps` installs it (apt-get install chromium)")
    blocks = [
        QueryBlock(
            "photo + 'in blue'",
            _results(tmp_path, 5, [f"blue mug {i} {NASTY}" for i in range(5)]),
            image=_image((200, 40, 40), "JPEG"),
            text="in blue",
            mode="refine",
            expected_id=102,
        ),
        QueryBlock("typed query", _results(tmp_path, 3), text="zebra mug", mode="text"),
    ]
    page = write_page(tmp_path / "results.html", render_page(blocks, subtitle="browser test"))
    profile = tmp_path / "profile"
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
    ]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Page()
    parsed.feed(dom.stdout)
    assert [len(x) for x in parsed.lists] == [5, 3]
    assert parsed.lists[0] == [f"blue mug {i} {NASTY}" for i in range(5)] and parsed.scripts == 0
    assert len(parsed.srcs) == 1 + 5 + 3 and all(s.startswith("data:image/") for s in parsed.srcs)

    shot = tmp_path / "results.png"
    run = subprocess.run(
        flags + ["--window-size=1100,900", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (900, 1100) and pixels.std() > 10  # something was drawn, not a blank page
    # The query image's red square is drawn in the first block (left of the text), not just referenced.
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert red.sum() > 500


def test_text_table_expected_and_caption_are_escaped(tmp_path):
    page = render_page(
        [
            TextBlock("What this page shows", [f"intro {NASTY}", "legend"]),
            TableBlock("metrics", ["metric", "served"], [["image R@1", "0.500"], [NASTY, "1"]], caption=NASTY),
            QueryBlock("q", _results(tmp_path, 2), expected=f"the mug {NASTY}"),
            ComparisonBlock("c", [("DML", _results(tmp_path, 2))], caption=f"counted {NASTY}"),
        ]
    )
    assert "<script>" not in page and page.count("&lt;script&gt;") == 5
    assert "<p>intro &lt;script&gt;" in page and "<td>image R@1</td><td>0.500</td>" in page
    assert '<div class="expected">expected product: the mug &lt;script&gt;' in page
    assert '<p class="caption">counted &lt;script&gt;' in page


@pytest.mark.browser
def test_a_page_that_explains_itself_in_headless_chromium(tmp_path):
    """The demo page's parts drawn by a real browser: read back by content, and ten results laid out as two rows
    of five (found in the screenshot by the colours of results 1, 5 and 6). The screenshot stays in tmp_path
    (results-explained.png) for a person to look at."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"chromium not found at {CHROMIUM}; `make system-deps` installs it (apt-get install chromium)")
    results = _results(tmp_path, 10)
    marks = {0: (230, 20, 20), 4: (20, 20, 230), 5: (20, 200, 20)}  # results 1, 5, 6: red, blue, green
    for i, colour in marks.items():
        Path(results[i].image).write_bytes(_image(colour))
    blocks = [
        TextBlock("What this page shows", ["A search over the test products.", "Legend: green marks the expected."]),
        TableBlock("Served vs in-process", ["metric", "served", "in-process"], [["image R@1", "0.500", "0.500"]]),
        QueryBlock("Street photo of a mug", results, image=_image((90, 90, 90), "JPEG"), expected="a mug (id 100)"),
        ComparisonBlock("DML vs 3-tower", [("DML", results[1:3]), ("3-tower", results[1:3])], caption="Counted: x"),
    ]
    page = write_page(tmp_path / "results.html", render_page(blocks, subtitle="model: tiny (trained here), id ab"))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"]
    flags += ["--disable-background-networking", "--disable-component-update", f"--user-data-dir={tmp_path / 'p'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in ("What this page shows", "<td>image R@1</td>", "expected product: a mug (id 100)", "Counted: x"):
        assert text in dom.stdout, text
    shot = tmp_path / "results-explained.png"
    run = subprocess.run(
        flags + ["--window-size=1200,1400", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)

    def centre(colour):
        r, g, b = colour
        mask = (np.abs(pixels - np.array([r, g, b])) < 25).all(axis=-1)
        ys, xs = np.nonzero(mask)
        assert len(ys) > 500, colour  # drawn (a 40 px square scaled into the thumbnail)
        return ys.mean(), xs.mean()

    (y1, x1), (y5, x5), (y6, x6) = centre(marks[0]), centre(marks[4]), centre(marks[5])
    assert abs(y5 - y1) < 5 and x5 > x1 + 400  # results 1..5 on one row
    assert y6 > y1 + 100 and abs(x6 - x1) < 5  # result 6 starts the second row, under result 1
