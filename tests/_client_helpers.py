"""Helpers for the client/search tests: a small catalog and a ranking comparison that tolerates float-level
ties. The in-process reference the served path is compared with is `mim.search.embedding.TorchEmbedder`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mim.data.catalog import Catalog
from mim.data.synth import ensure_catalog

# 4 categories x 3 patterns x 3 colours = 36 products (one model each, all with street photos), 64 px: generated
# in a few seconds.
SMALL_CATALOG = {
    "seed": 0,
    "image_size": 64,
    "categories": ["mug", "shirt", "shoe", "bag"],
    "patterns": ["solid", "stripes", "dots"],
    "colours": ["red", "blue", "green"],
    "variants": 1,
    "street_fraction": 1.0,
}


def small_catalog(root: Path) -> Catalog:
    return ensure_catalog(root, progress=False, **SMALL_CATALOG)


def assert_same_ranking(got, want, tol: float = 1e-4) -> None:
    """Two result lists rank the same products with the same scores, except that products whose reference
    scores are within `tol` of each other (float-level ties between runtimes) may swap places."""
    assert len(got) == len(want), (len(got), len(want))
    np.testing.assert_allclose([r.score for r in got], [r.score for r in want], atol=tol)
    ref = {r.id: r.score for r in want}
    for g, w in zip(got, want):
        if g.id != w.id:
            # An id outside the reference top-k can only be a tie with the reference's last result.
            ref_score = ref.get(g.id, want[-1].score if abs(g.score - want[-1].score) <= tol else -np.inf)
            assert abs(ref_score - w.score) <= tol, (
                f"rank {w.rank}: got id {g.id}, expected {w.id} (score {w.score:.6f}); not a tie"
            )
