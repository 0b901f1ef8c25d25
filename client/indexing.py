"""Build a gallery by embedding product images through the served `embed_image` ensemble, into any
`mim.search.stores.VectorStore`: a KnnIndex file (`gallery.safetensors`) or a Milvus collection (`gallery.db`,
`http://host:19530#name`).

Resumable: the partial gallery is saved every `save_every` batches (KnnIndex: temp file, fsync, rename; Milvus:
a flush), and a rerun opens it and embeds only the ids it does not hold yet. A crash therefore loses at most the
batches since the last save, and never corrupts the gallery. The gallery records the embedding model's identity;
resuming with another model is refused, so one gallery never mixes two embedding spaces.

Galleries come from the synthetic catalog (`catalog_items`) or from any folder of images with a CSV/JSONL
manifest (`manifest_items`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mim import contract
from mim.data.catalog import Catalog
from mim.errors import MimInputError
from mim.progress import progress_bar
from mim.search.stores import VectorStore, open_store, store_exists

from .triton_client import ClientError

EmbedImages = Callable[[Sequence[bytes]], np.ndarray]
DEFAULT_SAVE_EVERY = 4  # batches between checkpoints of the partial index: 4 x 64 images


@dataclass(frozen=True)
class GalleryItem:
    id: int
    image: Path  # absolute path of the image file
    title: str | None = None
    category: str | None = None
    source: str | None = field(default=None, compare=False)  # where it was listed: "manifest.jsonl:12", "product 7"

    def where(self) -> str:
        return f"{self.image} ({self.source})" if self.source else str(self.image)

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"image": str(self.image)}
        if self.title is not None:
            meta["title"] = self.title
        if self.category is not None:
            meta["category"] = self.category
        return meta


@dataclass
class IndexReport:
    index: VectorStore
    path: str | Path  # the store location
    added: int  # items embedded by this run
    resumed_from: int  # items already in the saved index when this run started
    complete: bool  # False when stopped early by max_batches
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item's file and source, why), with skip_bad

    def summary(self) -> str:
        state = "complete" if self.complete else "PARTIAL (rerun the same command to continue)"
        text = (
            f"{self.path}: {self.index.count} items ({self.resumed_from} resumed, {self.added} embedded now), "
            f"dim {self.index.dim}, model_id {self.index.model_id}, {state}"
        )
        if self.skipped:
            text += f"\nskipped {len(self.skipped)} bad image(s):" + "".join(
                f"\n  {w}: {why}" for w, why in self.skipped
            )
        return text


class BadImageError(MimInputError):
    """A gallery image the server refused (or that cannot be read): names its file and manifest line."""


# --- galleries --------------------------------------------------------------------------------------------------
def catalog_items(catalog: Catalog, split: str = "test") -> list[GalleryItem]:
    """The catalog ("shop") images of one split's products, or of every product with split="all"."""
    products = catalog.products if split == "all" else catalog.products_in(split)
    return [
        GalleryItem(
            p.product_id, catalog.path(p.image).resolve(), p.title, p.category, f"catalog product {p.product_id}"
        )
        for p in products
    ]


def manifest_items(images_dir: str | Path, manifest: str | Path) -> list[GalleryItem]:
    """Items from a CSV (header row) or JSONL manifest with fields `id` and `image` (a path relative to
    `images_dir`), and optionally `title` and `category`."""
    images_dir, manifest = Path(images_dir), Path(manifest)
    rows = list(_manifest_rows(manifest))
    if not rows:
        raise ValueError(f"{manifest}: no rows; expected a CSV with a header (id,image[,title,category]) or JSONL")
    items, seen = [], set()
    for line, row in rows:
        where = f"{manifest}:{line}"
        missing = [k for k in ("id", "image") if row.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; every row needs `id` and `image`")
        try:
            pid = int(row["id"])
        except (TypeError, ValueError):
            raise ValueError(f"{where}: id {row['id']!r} is not an integer; ids must be non-negative int64") from None
        if pid < 0 or pid in seen:
            raise ValueError(
                f"{where}: id {pid} is {'negative' if pid < 0 else 'a duplicate'}; ids must be unique and >= 0"
            )
        seen.add(pid)
        rel = Path(str(row["image"]))
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"{where}: image {str(rel)!r} must be a path relative to {images_dir} and stay inside it")
        path = (images_dir / rel).resolve()
        if not path.is_file():
            raise ValueError(f"{where}: image file {path} does not exist")
        title, cat = row.get("title"), row.get("category")
        items.append(
            GalleryItem(
                pid, path, None if title in (None, "") else str(title), None if cat in (None, "") else str(cat), where
            )
        )
    return items


def _manifest_rows(manifest: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if manifest.suffix.lower() in (".jsonl", ".ndjson"):
        with open(manifest, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{manifest}:{n}: not JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{manifest}:{n}: expected a JSON object per line")
                    yield n, row
    elif manifest.suffix.lower() == ".csv":
        with open(manifest, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                yield n, row
    else:
        raise ValueError(f"{manifest}: unknown manifest type {manifest.suffix!r}; expected .csv or .jsonl")


# --- building ---------------------------------------------------------------------------------------------------
def open_partial(
    out: str | Path, items: Sequence[GalleryItem], model_id: str | None, store_options: Mapping[str, Any] | None = None
) -> VectorStore | None:
    """The gallery saved at `out` by an earlier run over the same items and model, or None if there is none."""
    if not store_exists(out):
        return None
    try:
        index = open_store(out, expected_model_id=model_id, options=store_options)
    except ValueError as e:
        raise ValueError(f"cannot resume from {out}: {e}. Delete it to rebuild, or choose another --out") from None
    stray = np.setdiff1d(index.ids, np.array([it.id for it in items], dtype=np.int64))
    if stray.size:
        raise ValueError(
            f"cannot resume from {out}: it holds ids not in this gallery (e.g. {int(stray[0])}), so it "
            "was built from another gallery. Delete it to rebuild, or choose another --out"
        )
    return index


def build_index(
    embed_images: EmbedImages,
    items: Sequence[GalleryItem],
    out: str | Path,
    *,
    model_id: str | None,
    batch_size: int = contract.MAX_BATCH_SIZE,
    save_every: int = DEFAULT_SAVE_EVERY,
    max_batches: int | None = None,
    on_batch: Callable[[int, VectorStore], None] | None = None,
    progress: bool = True,
    store_options: Mapping[str, Any] | None = None,
    skip_bad: bool = False,
) -> IndexReport:
    """Embed every item not yet in the gallery at `out` (a store location, see `mim.search.stores`) and save it.

    `on_batch(batches_done, index)` runs after each batch is added (tests use it to simulate a crash).
    `max_batches` stops cleanly after that many batches (saved, `complete=False`). `store_options` go to the
    store as they are (`mim.search.stores.open_store`), e.g. the index of a Milvus collection this call creates.
    An image the server refuses raises BadImageError naming its file and manifest line; with `skip_bad` it is
    left out and listed in the report's `skipped`.
    """
    if batch_size < 1 or save_every < 1:
        raise ValueError(f"batch_size={batch_size} and save_every={save_every} must be >= 1")
    if not items:
        raise ValueError("the gallery is empty: nothing to index")
    index = open_partial(out, items, model_id, store_options)
    if index is not None and model_id is None:
        model_id = index.model_id
    have = set(index.ids.tolist()) if index is not None else set()
    todo = [it for it in items if it.id not in have]
    resumed = len(have)
    bar = progress_bar(total=len(items), initial=resumed, desc="index", unit="img", enabled=progress)
    batches = added = 0
    skipped: list[tuple[str, str]] = []
    try:
        for start in range(0, len(todo), batch_size):
            part, emb = _embed_batch(embed_images, todo[start : start + batch_size], skip_bad, skipped)
            if not part:
                continue
            if index is None:
                index = open_store(out, dim=emb.shape[1], model_id=model_id, options=store_options)
            index.add([it.id for it in part], emb, [it.metadata() for it in part])
            batches, added = batches + 1, added + len(part)
            bar.update(len(part))
            if batches % save_every == 0:
                index.save()
            if on_batch is not None:
                on_batch(batches, index)
            if max_batches is not None and batches >= max_batches and added < len(todo):
                index.save()
                return IndexReport(index, out, added, resumed, complete=False, skipped=skipped)
    finally:
        bar.close()
    if index is None:
        raise BadImageError(f"every image was refused, nothing to index: {skipped[0][0]}: {skipped[0][1]}, ...")
    index.save()
    return IndexReport(index, out, added, resumed, complete=True, skipped=skipped)


def _refused(e: Exception) -> str | None:
    """The reason when `e` says the image itself is bad (the server's INVALID_ARGUMENT, or an unreadable file);
    None for any other failure, which is raised as it is."""
    if isinstance(e, ClientError):
        return (e.server_message or str(e)) if e.status == "StatusCode.INVALID_ARGUMENT" else None
    return f"cannot read the file ({e})" if isinstance(e, OSError) else None


def _embed_batch(
    embed_images: EmbedImages, part: list[GalleryItem], skip_bad: bool, skipped: list[tuple[str, str]]
) -> tuple[list[GalleryItem], np.ndarray | None]:
    """(the items embedded, their (n, D) embeddings). A refused batch is retried one image at a time, so the
    bad image is found and named (or skipped) and the others are embedded."""
    try:
        return part, np.asarray(embed_images([it.image.read_bytes() for it in part]))
    except (ClientError, OSError) as e:
        if _refused(e) is None:
            raise
    good, embs = [], []
    for it in part:
        try:
            emb = np.asarray(embed_images([it.image.read_bytes()]))
        except (ClientError, OSError) as e:
            why = _refused(e)
            if why is None:
                raise
            if not skip_bad:
                raise BadImageError(
                    f"{it.where()}: {why}; expected an image the server decodes: fix or remove it, or pass --skip-bad"
                ) from None
            skipped.append((it.where(), why))
            continue
        good.append(it)
        embs.append(emb)
    return good, (np.concatenate(embs) if embs else None)
