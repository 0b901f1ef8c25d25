"""Training objectives (docs/METHOD.md, "Objectives"): symmetric in-batch InfoNCE with false-negative masking.

DML baseline: InfoNCE(q, p)
3-tower:     InfoNCE(q, p) + w_qt InfoNCE(q, t) + w_pt InfoNCE(p, t)
4-tower:     3-tower + w_qs InfoNCE(q, s) + w_ps InfoNCE(p, s)
q, p: query-photo and product-photo embeddings (one image encoder); t, s: title and short-query embeddings
(one text encoder). All rows are L2-normalised. The first B rows of p and t belong to the B street-to-shop pairs
of q (and s); p and t may carry more rows, catalog products without street photos, which only the p-t term sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("dml", "3tower", "4tower")


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned batches a, b (B, D).

    `same` (B, B) bool marks pairs that are not true negatives (same product, same text). Those off-diagonal
    entries are removed from both softmax denominators; the diagonal positive is always kept.
    """
    logits = scale * (a @ b.t())  # (B, B)
    if same is not None:
        eye = torch.eye(len(a), dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


@dataclass(frozen=True)
class LossWeights:
    qt: float = 1.0
    pt: float = 1.0
    qs: float = 1.0
    ps: float = 1.0

    @classmethod
    def uniform(cls, w: float) -> LossWeights:
        """Every image-text term at weight w (the image-image term keeps 1.0)."""
        if not (isinstance(w, (int, float)) and 0 <= w < float("inf")):
            raise ValueError(f"image-text loss weight {w!r}; expected a finite number >= 0 (1.0 is the default)")
        return cls(float(w), float(w), float(w), float(w))


def same_matrix(keys: list) -> torch.Tensor:
    """(B, B) bool: keys[i] == keys[j]."""
    codes = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    c = torch.tensor([codes[k] for k in keys])
    return c[:, None] == c[None, :]


def _words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.split(r"[\s\-]+", text.lower()) if w)


def describes_matrix(titles: list[str], texts: list[str]) -> torch.Tensor:
    """(B, B) bool: M[i, j] = every word of texts[j] occurs in titles[i], i.e. short query j also describes
    product i ("blue mug" describes "blue zebra-striped ceramic mug") and is no negative for it.

    One matrix serves both directions of `info_nce`: after transposing, entry (i, j) reads M[j, i]."""
    tw = [_words(t) for t in titles]
    sw = [_words(s) for s in texts]
    return torch.tensor([[bool(s) and s <= t for s in sw] for t in tw])


def mim_loss(
    objective: str,
    scale: torch.Tensor,
    q: torch.Tensor,
    p: torch.Tensor,
    t: torch.Tensor | None,
    s: torch.Tensor | None,
    product_ids: list[int],
    titles: list[str] | None = None,
    short_texts: list[str] | None = None,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its named parts for one batch.

    q (B, D); p (P, D) with P >= B, rows [:B] paired with q; t (P, D) titles of p's rows; s (B, D); product_ids and
    titles have P entries, short_texts B."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    n = len(q)
    if len(p) < n or len(product_ids) != len(p):
        raise ValueError(
            f"need len(p) >= len(q) and one product id per p row; got q {n}, p {len(p)}, ids {len(product_ids)}"
        )
    same_pid = same_matrix(product_ids).to(q.device)
    parts = {"qp": info_nce(q, p[:n], scale, same_pid[:n, :n])}
    total = parts["qp"]
    if objective in ("3tower", "4tower"):
        if t is None or titles is None:
            raise ValueError(f"objective {objective!r} needs title embeddings and titles")
        # Same title = same concept (all models of one combination share it): not a negative for each other.
        same_t = same_pid | same_matrix(titles).to(q.device)
        parts["qt"] = info_nce(q, t[:n], scale, same_t[:n, :n])
        parts["pt"] = info_nce(p, t, scale, same_t)
        total = total + weights.qt * parts["qt"] + weights.pt * parts["pt"]
    if objective == "4tower":
        if s is None or short_texts is None:
            raise ValueError("objective '4tower' needs short-query embeddings and texts")
        # Short queries ("zebra mug") describe many products: a query whose words all occur in another row's
        # title is not a negative for that row's images.
        same_s = same_pid[:n, :n] | describes_matrix(titles[:n], short_texts).to(q.device)
        parts["qs"] = info_nce(q, s, scale, same_s)
        parts["ps"] = info_nce(p[:n], s, scale, same_s)
        total = total + weights.qs * parts["qs"] + weights.ps * parts["ps"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
