"""Evaluation metrics on hand-made rankings."""

from __future__ import annotations

import numpy as np
import pytest

from mim.search.ranking import fuse, refine, top_k
from mim.training.evaluate import (
    category_precision_at_k,
    category_precision_per_query,
    hits_at_k,
    markdown_table,
    recall_at_k,
)


def test_recall_at_k_on_a_hand_made_ranking():
    ranked = np.array([[5, 1, 2], [1, 5, 2], [2, 1, 5], [7, 8, 9]])
    target = np.array([5, 5, 5, 5])
    assert recall_at_k(ranked, target, ks=(1, 2, 3)) == {"R@1": 0.25, "R@2": 0.5, "R@3": 0.75}


def test_recall_input_checks():
    with pytest.raises(ValueError, match=r"ranked must be \(Q, K\)"):
        recall_at_k(np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="no queries"):
        recall_at_k(np.zeros((0, 3)), np.zeros(0))


def test_category_precision():
    rc = np.array([["mug", "mug", "shoe", "hat"], ["bag", "bag", "bag", "bag"]])
    assert category_precision_at_k(rc, np.array(["mug", "bag"]), k=4) == pytest.approx((2 / 4 + 1) / 2)
    with pytest.raises(ValueError, match="at least 10 ranked results"):
        category_precision_at_k(rc, np.array(["mug", "bag"]))


def test_top_k_is_exact_with_ties_broken_by_index():
    g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    q = np.array([[1.0, 0.0]])
    assert top_k(q, g, 3).tolist() == [[0, 2, 3]]


def test_fusion_and_refine():
    img = np.array([[1.0, 0.0, 0.0]])
    txt = np.array([[0.0, 1.0, 0.0]])
    f = fuse(img, txt, 0.5)
    np.testing.assert_allclose(f, [[2**-0.5, 2**-0.5, 0.0]], rtol=1e-6)
    gallery = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    # Image alone prefers row 0; the text pulls row 1 to the top among the image candidates.
    assert top_k(img, gallery, 1).tolist() == [[0]]
    assert refine(img, txt, gallery, k=2, top_n=2).tolist() == [[1, 0]]


def test_markdown_table():
    md = markdown_table({"dml": {"image R@1": 0.5}}, ["image R@1", "title R@1"])
    assert md.splitlines()[2] == "| dml | 0.500 | - |"


def test_per_query_values_average_to_the_metrics():
    # Titles as targets: the models of one combination share a title, so any of them is a hit.
    ranked = np.array([["red mug", "blue mug"], ["blue mug", "red mug"], ["red hat", "red mug"]])
    hits = hits_at_k(ranked, np.array(["blue mug", "blue mug", "red hat"]), ks=(1, 2))
    np.testing.assert_array_equal(hits["R@1"], [0.0, 1.0, 1.0])
    np.testing.assert_array_equal(hits["R@2"], [1.0, 1.0, 1.0])
    rc = np.array([["mug", "hat", "mug"], ["hat", "hat", "hat"]])
    per = category_precision_per_query(rc, np.array(["mug", "mug"]), k=3)
    np.testing.assert_allclose(per, [2 / 3, 0.0])
    assert category_precision_at_k(rc, np.array(["mug", "mug"]), k=3) == pytest.approx(per.mean())
