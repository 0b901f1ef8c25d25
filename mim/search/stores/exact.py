"""The embedded exact index as a vector store: a `KnnIndex` that knows the file it lives in.

`ExactStore` is a `KnnIndex` (same search, same file format) with what the store interface adds: its location,
a path-less `save()`, `vectors(ids)`, `count`, `close()` and `drop()`, and the class methods the registry calls
(`open`, `exists`, `destroy`).

Device: a gallery opened from its file searches on `device` ("auto": the GPU where CuPy runs). A new gallery is
built on the host unless told otherwise, so the file the index command writes keeps float32 rows on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mim.search.knn import KnnIndex


class ExactStore(KnnIndex):
    """A KnnIndex persisted at one safetensors file. Create or open it with `ExactStore.open` (or `open_store`)."""

    _location: str = ""
    _host_rows: tuple[int, np.ndarray] | None = None  # (len, host copy of the rows) for `vectors`

    @classmethod
    def open(
        cls,
        location: str,
        *,
        dim: int | None = None,
        model_id: str | None = None,
        expected_model_id: str | None = None,
        device: str | None = None,
    ) -> ExactStore:
        """Load the file at `location`, or start an empty gallery there when there is none and `dim` is given.

        device: where searches run; default "auto" for a loaded gallery and "cpu" for a new one."""
        path = Path(location)
        if path.exists():
            store = cls.load(path, expected_model_id=expected_model_id, device=device or "auto")
        elif dim is None:
            raise FileNotFoundError(f"no gallery at {path}; build it first (index command) or check the path")
        else:
            store = cls(dim, device=device or "cpu", model_id=model_id)
        store._location = str(location)
        return store

    @staticmethod
    def exists(location: str) -> bool:
        return Path(location).exists()

    @staticmethod
    def destroy(location: str) -> None:
        Path(location).unlink(missing_ok=True)

    @property
    def location(self) -> str:
        return self._location

    @property
    def count(self) -> int:
        return len(self)

    def add(self, *args: Any, **kwargs: Any) -> None:
        self._host_rows = None
        super().add(*args, **kwargs)

    def remove(self, ids: Any) -> None:
        self._host_rows = None
        super().remove(ids)

    def vectors(self, ids: Any) -> np.ndarray:
        """(n, dim) float32 stored rows of `ids`, in the order given; an id not held -> KeyError. The host copy
        of the gallery is made once and kept until the next add or remove."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        held = self.ids  # ascending
        pos = np.searchsorted(held, ids)
        found = pos < held.size
        found[found] = held[pos[found]] == ids[found]
        if not found.all():
            raise KeyError(f"id {int(ids[~found][0])} is not in the gallery {self.location}")
        if self._host_rows is None or self._host_rows[0] != len(self):
            self._host_rows = (len(self), self.embeddings().astype(np.float32, copy=False))
        return self._host_rows[1][pos]

    def save(self, path: str | os.PathLike | None = None) -> None:
        """Write the gallery to its file atomically (KnnIndex.save); `path` defaults to the location."""
        if path is None and not self._location:
            raise ValueError("this store has no location; open it with ExactStore.open(location) or pass a path")
        target = Path(path if path is not None else self._location)
        target.parent.mkdir(parents=True, exist_ok=True)
        super().save(target)

    def close(self) -> None:
        """Nothing to release: the gallery is in memory and the file is closed after each save."""

    def drop(self) -> None:
        self.destroy(self._location)

    def __enter__(self) -> ExactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
