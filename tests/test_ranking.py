"""mim.search.ranking on hand-computed values, the parity helper, and the search path loading without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mim import contract
from mim.search.ranking import (
    DEFAULT_REFINE_WEIGHT,
    exact_top_k,
    fuse,
    l2_normalize,
    parity,
    refine,
    refine_scores,
    row_cosines,
    top_k,
)

REPO = Path(__file__).resolve().parents[1]


def unit_rows(n: int, seed: int) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, 128)).astype(np.float32))


# --- normalise and fuse ------------------------------------------------------------------------------------------
def test_l2_normalize_by_hand():
    got = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]]))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], rtol=1e-7)  # a zero row stays zero
    # The floor is on the squared norm (as in mim.model.towers.l2_normalize): a row of norm 1e-7 is divided by 1e-6.
    np.testing.assert_allclose(l2_normalize(np.array([[1e-7, 0.0]])), [[0.1, 0.0]], rtol=1e-5)


def test_fuse_by_hand():
    img, txt = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    np.testing.assert_allclose(fuse(img, txt), [[2**-0.5, 2**-0.5]], rtol=1e-6)  # the contract's default 0.5
    assert contract.DEFAULT_IMAGE_WEIGHT == 0.5
    # w = 0.75: (0.75, 0.25) / sqrt(0.625)
    np.testing.assert_allclose(fuse(img, txt, 0.75), [[0.75 / 0.625**0.5, 0.25 / 0.625**0.5]], rtol=1e-6)
    # One weight per row, shape (N, 1).
    two = fuse(np.repeat(img, 2, 0), np.repeat(txt, 2, 0), np.array([[1.0], [0.0]]))
    np.testing.assert_allclose(two, [[1.0, 0.0], [0.0, 1.0]], atol=1e-7)


def test_fuse_math():
    img, txt = unit_rows(3, 0), unit_rows(3, 1)
    np.testing.assert_allclose(fuse(img, txt, 1.0), img, atol=1e-6)
    np.testing.assert_allclose(fuse(img, txt, 0.0), txt, atol=1e-6)
    mixed = 0.3 * img + 0.7 * txt
    np.testing.assert_allclose(fuse(img, txt, 0.3), mixed / np.linalg.norm(mixed, axis=1, keepdims=True), atol=1e-6)
    assert np.isfinite(fuse(img, -img, 0.5)).all()  # opposite vectors: a zero row stays finite


# --- exact top-k and refine ---------------------------------------------------------------------------------------
def test_exact_top_k_by_hand_with_ties():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    scores, rows = exact_top_k(queries, gallery, 4)
    # Query 0 scores (1, 0, 1, 0.6, -1): rows 0 and 2 tie and keep row order; rows 1 and 4 come after 3.
    # Query 1 scores (0, 1, 0, 0.8, 0): rows 0, 2, 4 tie at 0, so the first two of them in row order.
    assert rows.tolist() == [[0, 2, 3, 1], [1, 3, 0, 2]]
    np.testing.assert_allclose(scores, [[1.0, 1.0, 0.6, 0.0], [1.0, 0.8, 0.0, 0.0]])
    assert top_k(queries, gallery, 2).tolist() == [[0, 2], [1, 3]]
    assert exact_top_k(queries, gallery, 9)[1].shape == (2, 5)  # k above N returns every row


def test_exact_top_k_input_checks():
    with pytest.raises(ValueError, match=r"queries must be \(Q, D\) and gallery \(N, D\); got \(2,\) and \(3, 2\)"):
        exact_top_k(np.zeros(2), np.zeros((3, 2)), 1)
    with pytest.raises(ValueError, match="k must be a positive int; got 0"):
        exact_top_k(np.zeros((1, 2)), np.zeros((3, 2)), 0)


def test_refine_by_hand():
    gallery = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]])
    q_img, q_txt = np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 1.0, 0.0]])
    # cos(q, p) + b cos(s, p) with b = 1: rows 0..3 score 1.0, 1.4, 0.0, 1.4.
    np.testing.assert_allclose(refine_scores(q_img, q_txt, gallery[None]), [[1.0, 1.4, 0.0, 1.4]])
    assert DEFAULT_REFINE_WEIGHT == 1.0
    # Image top 3 are rows 0, 1, 3 (1.0, 0.8, 0.6); re-ranked: 1 and 3 tie at 1.4 (row order), then 0.
    assert refine(q_img, q_txt, gallery, k=3, top_n=3).tolist() == [[1, 3, 0]]
    # With top_n = 2, row 3 is not a candidate.
    assert refine(q_img, q_txt, gallery, k=3, top_n=2).tolist() == [[1, 0]]
    # b = 0.1: rows 0, 1, 3 score 1.0, 0.86, 0.68: the image order again.
    assert refine(q_img, q_txt, gallery, k=3, top_n=4, text_weight=0.1).tolist() == [[0, 1, 3]]


# --- parity ------------------------------------------------------------------------------------------------------
def test_parity_by_hand():
    want = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], np.float32)
    got = np.array([[1.0, 0.0], [0.0, 2.0], [4.0, 3.0]], np.float32)
    p = parity(got, want)
    # Row 2: cos((4, 3), (3, 4)) = 24 / 25; its entries differ by 1.
    assert (p.rows, p.worst_row) == (3, 2)
    assert p.min_cosine == pytest.approx(0.96) and p.max_abs_diff == pytest.approx(1.0)
    np.testing.assert_allclose(row_cosines(got, want), [1.0, 1.0, 0.96])
    assert p.as_dict() == {"rows": 3, "min_cosine": p.min_cosine, "max_abs_diff": 1.0, "worst_row": 2}
    assert parity(np.zeros((0, 4)), np.zeros((0, 4))).min_cosine == 1.0


def test_parity_never_passes_non_finite_rows():
    want = np.ones((2, 3), np.float32)
    got = want.copy()
    got[1, 0] = np.nan
    p = parity(got, want)
    assert p.min_cosine == -np.inf and p.worst_row == 1 and p.max_abs_diff == np.inf
    assert not p.min_cosine >= 0.0  # any gate fails
    with pytest.raises(ValueError, match=r"differ in shape: \(2, 3\) vs \(1, 3\)"):
        parity(got, want[:1])


# --- the search path without torch ---------------------------------------------------------------------------------
def _run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which `import torch` (and any torch submodule) fails."""
    prelude = "import sys\nsys.modules['torch'] = None  # import torch -> ImportError\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_really_blocks_torch():
    r = _run_without_torch("import torch")
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "module",
    [
        "client.search",
        "client.cli",
        "mimsearch.cli",
        "mim.search.ranking",
        "mim.search.embedding",
        "mim.training.evaluate",
    ],
)
def test_search_path_imports_without_torch(module):
    r = _run_without_torch(f"import {module}")
    assert r.returncode == 0, r.stderr


def test_search_cli_and_a_search_run_without_torch():
    code = """
        import numpy as np
        from client.search import SearchService
        from mim.search.stores.exact import ExactStore
        from mimsearch import cli

        for command in (["search", "--help"], ["index", "--help"]):  # `mimsearch search --help`: parses every flag
            try:
                cli.main(command)
            except SystemExit as e:
                assert e.code == 0, e.code

        class Fixed:  # an Embedder answering from fixed vectors: exercises the search code, not a model
            def embed_images(self, images):
                return np.array([[1.0, 0.0, 0.0]] * len(images), np.float32)

            def embed_texts(self, texts):
                return np.array([[0.0, 1.0, 0.0]] * len(texts), np.float32)

            def embed_multimodal(self, images, texts, image_weight=None):
                raise AssertionError("refine does not fuse")

        index = ExactStore(3, device="cpu")
        gallery = [[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0]]
        index.add([10, 11, 12, 13], np.array(gallery, np.float32))
        results = SearchService(Fixed(), index).by_image_text(b"", "", k=2, mode="refine", top_n=3)
        print([r.id for r in results])
        """
    r = _run_without_torch(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[11, 13]"
