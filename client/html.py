"""A self-contained HTML page of search results: every image is inlined as a data: URI and the CSS is inline, so
the file opens anywhere (a laptop, a CI artifact, an e-mail attachment) without the catalog next to it.

    page = render_page([QueryBlock("photo + 'in blue'", image=photo, text="in blue", mode="fusion", results=hits)])
    write_page("results.html", page)

A `ComparisonBlock` shows one query's rankings by several models side by side (DML next to 3-tower), with the
results of another category than the query's product marked, so the false positives can be counted by eye; its
caption says what is counted. A `TextBlock` (an introduction, a legend) and a `TableBlock` (e.g. metrics) let a
page explain itself. Results sit in a grid of five per row (ten results: two rows).

All text (titles, query text, categories, paths) is HTML-escaped; nothing from the index or the query reaches
the page as markup.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mim.atomic import atomic_write_text

from .search import SearchResult

_MIME = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def sniff_mime(data: bytes) -> str | None:
    """The image type from the file's magic bytes (not its name), or None for anything else."""
    for magic, mime in _MIME:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def data_uri(data: bytes) -> str | None:
    mime = sniff_mime(data)
    return None if mime is None else f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


@dataclass
class QueryBlock:
    """One query and its ranked results. `expected_id` (optional) marks the correct product, if known."""

    label: str
    results: Sequence[SearchResult]
    image: bytes | None = None
    text: str | None = None
    mode: str | None = None
    expected_id: int | None = None
    notes: list[str] = field(default_factory=list)
    expected: str | None = None  # the product the query should find, in words ("red zebra mug, id 12")


@dataclass
class TextBlock:
    """A heading and paragraphs of plain text (escaped): an introduction or a legend."""

    heading: str
    paragraphs: Sequence[str]


@dataclass
class TableBlock:
    """A table of text cells under a heading, with an optional caption below it."""

    heading: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str | None = None


@dataclass
class ComparisonBlock:
    """One query ranked by several models: columns are (model name, its results), shown side by side."""

    label: str
    columns: Sequence[tuple[str, Sequence[SearchResult]]]
    image: bytes | None = None
    expected_id: int | None = None
    expected_category: str | None = None  # results of any other category are marked as false positives
    notes: list[str] = field(default_factory=list)
    caption: str | None = None  # what is counted, and what the counts can tell


def _read_image(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def _img(data: bytes | None, alt: str, cls: str) -> str:
    uri = data_uri(data) if data else None
    if uri is None:
        return f'<div class="{cls} missing" role="img" aria-label="{html.escape(alt)}">no image</div>'
    return f'<img class="{cls}" src="{uri}" alt="{html.escape(alt)}">'


def _result(
    r: SearchResult,
    expected_id: int | None,
    load: Callable[[str | None], bytes | None],
    expected_category: str | None = None,
) -> str:
    e = html.escape
    hit = expected_id is not None and r.id == expected_id
    off = expected_category is not None and r.category != expected_category
    cls = "result" + (" hit" if hit else "") + (" off-category" if off else "")
    title = r.title if r.title is not None else f"product {r.id}"
    return (
        f'<li class="{cls}" data-id="{r.id}" data-rank="{r.rank}">'
        f"{_img(load(r.image), title, 'thumb')}"
        f'<div class="rank">#{r.rank}{" &#10003;" if hit else ""}</div>'
        f'<div class="title">{e(title)}</div>'
        f'<div class="meta"><span class="score">{r.score:.4f}</span> &middot; '
        f'<span class="category">{e(r.category or "-")}</span> &middot; id {r.id}</div>'
        "</li>"
    )


def _block(b: QueryBlock, load: Callable[[str | None], bytes | None]) -> str:
    e = html.escape
    query = []
    if b.image is not None:
        query.append(_img(b.image, "query image", "query-image"))
    if b.text is not None:
        query.append(f'<div class="query-text">&ldquo;{e(b.text)}&rdquo;</div>')
    if b.mode:
        query.append(f'<div class="mode">mode: {e(b.mode)}</div>')
    if b.expected:
        query.append(f'<div class="expected">expected product: {e(b.expected)}</div>')
    query += [f'<div class="note">{e(n)}</div>' for n in b.notes]
    items = "".join(_result(r, b.expected_id, load) for r in b.results)
    return (
        f'<section class="query-block"><h2>{e(b.label)}</h2>'
        f'<div class="query">{"".join(query)}</div>'
        f'<ol class="results">{items}</ol></section>'
    )


def _comparison(b: ComparisonBlock, load: Callable[[str | None], bytes | None]) -> str:
    e = html.escape
    query = [_img(b.image, "query image", "query-image")] if b.image is not None else []
    query += [f'<div class="note">{e(n)}</div>' for n in b.notes]
    cols = []
    for name, results in b.columns:
        items = "".join(_result(r, b.expected_id, load, b.expected_category) for r in results)
        summary = ""
        if b.expected_category is not None:
            off = sum(r.category != b.expected_category for r in results)
            summary = f" &middot; {off}/{len(results)} of another category"
        cols.append(
            f'<div class="column" data-model="{e(name)}"><h3>{e(name)}{summary}</h3>'
            f'<ol class="results">{items}</ol></div>'
        )
    caption = f'<p class="caption">{e(b.caption)}</p>' if b.caption else ""
    return (
        f'<section class="query-block comparison"><h2>{e(b.label)}</h2>'
        f'<div class="query">{"".join(query)}</div><div class="columns">{"".join(cols)}</div>{caption}</section>'
    )


def _text(b: TextBlock, load: Callable[[str | None], bytes | None]) -> str:
    e = html.escape
    paragraphs = "".join(f"<p>{e(p)}</p>" for p in b.paragraphs)
    return f'<section class="text-block"><h2>{e(b.heading)}</h2>{paragraphs}</section>'


def _table(b: TableBlock, load: Callable[[str | None], bytes | None]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in b.header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
    caption = f'<p class="caption">{e(b.caption)}</p>' if b.caption else ""
    return (
        f'<section class="table-block"><h2>{e(b.heading)}</h2>'
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{caption}</section>"
    )


_RENDER = {QueryBlock: _block, ComparisonBlock: _comparison, TextBlock: _text, TableBlock: _table}
Block = QueryBlock | ComparisonBlock | TextBlock | TableBlock


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:22px;margin:0 0 4px} .subtitle{color:#666;margin-bottom:16px}
.query-block{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin-bottom:20px}
.query-block h2{font-size:16px;margin:0 0 8px}
.query{display:flex;gap:16px;align-items:center;margin-bottom:10px}
.query-image{width:128px;height:128px;object-fit:contain;border:2px solid #444;border-radius:4px}
.query-text{font-size:18px;font-style:italic} .mode,.note{color:#666;font-size:13px}
.results{display:grid;grid-template-columns:repeat(5,144px);gap:10px;list-style:none;padding:0;margin:0}
.result{box-sizing:border-box;width:144px;border:1px solid #e3e3e3;border-radius:6px;padding:6px}
.result{font-size:12px;background:#fff}
.result.hit{border:2px solid #2a9d3a;background:#effaf0}
.thumb{width:128px;height:128px;object-fit:contain;display:block}
.missing{display:flex;align-items:center;justify-content:center;background:#eee;color:#999}
.rank{font-weight:bold} .title{margin:2px 0;overflow-wrap:anywhere} .meta{color:#666}
.result.off-category{border:2px solid #c62828;background:#fdeeee}
.columns{display:flex;flex-wrap:wrap;gap:24px}
.column h3{font-size:14px;margin:0 0 6px}
.expected{font-size:13px;color:#1b6e2a} .caption{color:#444;font-size:13px;max-width:1100px;margin:10px 0 0}
.text-block,.table-block{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin-bottom:20px}
.text-block h2,.table-block h2{font-size:16px;margin:0 0 8px} .text-block p{max-width:1100px;margin:6px 0}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
"""


def render_page(
    blocks: Sequence[Block],
    *,
    title: str = "Visual search results",
    subtitle: str | None = None,
    load_image: Callable[[str | None], bytes | None] = _read_image,
) -> str:
    """The whole page as a string. `load_image(path)` reads a result's image (None = show a placeholder)."""
    e = html.escape
    body = "".join(_RENDER[type(b)](b, load_image) for b in blocks)
    sub = f'<div class="subtitle">{e(subtitle)}</div>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{_CSS}</style></head>"
        f"<body><h1>{e(title)}</h1>{sub}{body}</body></html>\n"
    )


def write_page(path: str | Path, page: str) -> Path:
    path = Path(path)
    atomic_write_text(path, page)
    return path
