"""Bootstrap confidence intervals for retrieval metrics over queries and training seeds (NumPy only).

A metric is a mean of per-query values (a hit 0/1, a precision) over the queries of several training runs that
differ only in their seed: values (S, Q), row s = seed s, column q = query q (the same queries in every row). The
interval has to cover both sources of noise, so each bootstrap replicate resamples the seeds and the queries with
replacement, independently, and takes the mean of the resampled (seed, query) table:

    stat_b = sum_s sum_q ws[b, s] * wq[b, q] * values[s, q] / (S * Q)

with ws, wq multinomial counts (how often each seed / query was drawn). The reported interval is the percentile
interval of stat_b. A difference of two models on the same seeds and queries (`paired_difference`) resamples the
per-(seed, query) differences, which is tighter than comparing the two intervals and is the test to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float

    def overlaps(self, other: Interval) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def _table(values: np.ndarray | list) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]  # one seed
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise ValueError(f"values must be (seeds, queries) with at least one of each; got shape {np.shape(values)}")
    if not np.isfinite(v).all():
        raise ValueError("values hold NaN or infinity; every per-query value must be a finite number")
    return v


def bootstrap_interval(
    values: np.ndarray | list, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> Interval:
    """Mean of values (S, Q) (or (Q,) for one seed) and its percentile bootstrap interval over seeds and queries.

    Deterministic in `seed`. With one seed only the queries are resampled."""
    v = _table(values)
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}; expected a confidence level in (0, 1), e.g. 0.95")
    if n_boot < 100:
        raise ValueError(f"n_boot={n_boot!r}; use at least 100 replicates (2000 is the default)")
    s, q = v.shape
    rng = np.random.default_rng(seed)
    ws = rng.multinomial(s, np.full(s, 1.0 / s), size=n_boot).astype(np.float64)  # (B, S)
    wq = rng.multinomial(q, np.full(q, 1.0 / q), size=n_boot).astype(np.float64)  # (B, Q)
    stats = np.einsum("bs,sq,bq->b", ws, v, wq) / (s * q)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(float(v.mean()), float(lo), float(hi))


def paired_difference(
    a: np.ndarray | list, b: np.ndarray | list, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> Interval:
    """Interval of mean(a - b) for two models evaluated on the same seeds and queries (same shapes)."""
    va, vb = _table(a), _table(b)
    if va.shape != vb.shape:
        raise ValueError(f"paired values need the same (seeds, queries) shape; got {va.shape} and {vb.shape}")
    return bootstrap_interval(va - vb, n_boot=n_boot, level=level, seed=seed)
