"""Statistics for the benchmark and the demo: intervals for proportions and means, paired method differences.

Every interval is an `Interval` (a named tuple ``(estimate, low, high)``) so it unpacks like a tuple and prints with
`format_interval`: ``0.83 [0.78, 0.87]``.

The bootstraps are percentile bootstraps driven by numpy's PCG64 with a fixed seed, so a result is the same on every
run and every machine for the same inputs, seed and number of resamples. Resamples are drawn in blocks whose size
depends only on the number of items, so memory stays bounded (about 32 MiB of indices) however many items there are.

Items are resampled independently unless ``groups`` is given: then whole groups are resampled (a cluster bootstrap),
which is the honest choice when items share a source of variation. In the benchmark an item is one
(content-style pair, prompt, seed); the images of one pair share that pair's trained adapters, so
``groups=pair_ids`` gives wider, truer intervals than treating every image as independent.

``crossed=(rows, cols)`` is for items that sit in a crossed design, as the benchmark's pairs do: a content appears
in a pair with every style, and B4M's stage-1 runs and the plain LoRAs of the merges are trained once per concept,
then shared by all that concept's pairs, so two pairs with the same content are not independent. Whole rows
(contents) and whole columns (styles) are then resampled, each with replacement and independently of the other,
and every item of a drawn (row, column) cell counts once per draw of its row times per draw of its column (Owen's
"pigeonhole" bootstrap, Ann. Appl. Stat. 2007, which is mildly conservative for crossed random effects). It is the
interval of a mean over a population of contents and styles, not over these concepts only.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

__all__ = [
    "Interval",
    "bootstrap_mean",
    "format_interval",
    "paired_bootstrap",
    "wilson_interval",
]

DEFAULT_RESAMPLES = 10_000
_BLOCK_ELEMENTS = 1 << 22  # indices drawn per block: 4 M int64 = 32 MiB


class Interval(NamedTuple):
    """A point estimate with the bounds of its confidence interval."""

    estimate: float
    low: float
    high: float

    def format(self, digits: int = 2, *, signed: bool = False) -> str:
        """As `format_interval`: ``"0.83 [0.78, 0.87]"``."""
        return format_interval(self, digits, signed=signed)

    @property
    def width(self) -> float:
        return self.high - self.low


def format_interval(interval: Interval | tuple[float, float, float], digits: int = 2, *, signed: bool = False) -> str:
    """``"0.83 [0.78, 0.87]"``: the estimate, then the interval's bounds, each with ``digits`` decimals.

    Args:
        interval: ``(estimate, low, high)``.
        digits: Decimals shown.
        signed: Show a ``+`` on positive numbers (for differences: ``"+0.02 [-0.01, +0.05]"``).
    """
    estimate, low, high = interval
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{estimate:{spec}} [{low:{spec}}, {high:{spec}}]"


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval for a proportion ``successes / n`` (for oracle accuracies and leakage rates).

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to zero width at 0 or n successes.

    Raises:
        ValueError: ``n`` is not positive or ``successes`` is not in ``0..n``.
    """
    if isinstance(n, bool) or int(n) != n or n <= 0:
        raise ValueError(f"n must be a positive whole number, got {n!r}")
    if isinstance(successes, bool) or int(successes) != successes or not 0 <= successes <= n:
        raise ValueError(f"successes must be a whole number in 0..{n}, got {successes!r}")
    z = _z(confidence)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)) / (1.0 + z2n)
    # Clamp against rounding, and make the bounds exact at the ends (the formula gives them up to an ulp).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high)


def _as_scores(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(x)))} NaN or infinite values")
    return x


def _group_sums(x: np.ndarray, groups: Sequence[Hashable] | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit sums and counts: one unit per item, or one per group (in order of first appearance)."""
    if groups is None:
        return x, np.ones_like(x)
    codes, n = _codes(groups, x.size, "groups")
    sums = np.bincount(codes, weights=x, minlength=n)
    counts = np.bincount(codes, minlength=n).astype(np.float64)
    return sums, counts


def _codes(labels: Sequence[Hashable], n: int, name: str) -> tuple[np.ndarray, int]:
    """Integer codes of ``labels`` (in order of first appearance) and how many distinct labels there are."""
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} labels for {n} items; give one label per item")
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(g, len(index)) for g in labels), dtype=np.int64, count=n)
    return codes, len(index)


def _crossed_means(
    x: np.ndarray, crossed: tuple[Sequence[Hashable], Sequence[Hashable]], n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """The pigeonhole bootstrap's resampled means (see the module notes)."""
    if len(crossed) != 2:
        raise ValueError(f"crossed must be (rows, cols), two label sequences; got {len(crossed)}")
    rows, n_rows = _codes(crossed[0], x.size, "crossed rows")
    cols, n_cols = _codes(crossed[1], x.size, "crossed cols")
    sums = np.zeros((n_rows, n_cols))
    counts = np.zeros((n_rows, n_cols))
    np.add.at(sums, (rows, cols), x)
    np.add.at(counts, (rows, cols), 1.0)
    means = np.empty(n_resamples, dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // (n_rows + n_cols))
    for start in range(0, n_resamples, block):
        k = min(block, n_resamples - start)
        a = rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=k).astype(np.float64)
        b = rng.multinomial(n_cols, np.full(n_cols, 1.0 / n_cols), size=k).astype(np.float64)
        num = np.einsum("kr,rc,kc->k", a, sums, b)
        den = np.einsum("kr,rc,kc->k", a, counts, b)
        # an incomplete design can draw rows and columns that share no item: such a draw has no mean
        means[start : start + k] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return means[np.isfinite(means)]


def _bootstrap(
    x: np.ndarray,
    groups: Sequence[Hashable] | None,
    n_resamples: int,
    confidence: float,
    seed: int,
    crossed: tuple[Sequence[Hashable], Sequence[Hashable]] | None = None,
) -> Interval:
    """Percentile bootstrap of the mean of ``x``, resampling items, whole groups, or whole rows and columns."""
    if isinstance(n_resamples, bool) or int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive whole number, got {n_resamples!r}")
    alpha = (1.0 - confidence) / 2.0
    _z(confidence)  # validates confidence
    if crossed is not None:
        if groups is not None:
            raise ValueError("give groups or crossed, not both")
        means = _crossed_means(x, crossed, n_resamples, np.random.default_rng(seed))
        low, high = np.quantile(means, [alpha, 1.0 - alpha])
        return Interval(float(x.mean()), float(low), float(high))
    sums, counts = _group_sums(x, groups)
    units = sums.size
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // units)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, block):
        rows = min(block, n_resamples - start)
        idx = rng.integers(0, units, size=(rows, units))
        means[start : start + rows] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(x.mean()), float(low), float(high))


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    *,
    groups: Sequence[Hashable] | None = None,
    crossed: tuple[Sequence[Hashable], Sequence[Hashable]] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` with its percentile-bootstrap confidence interval.

    Args:
        values: One score per item.
        groups: Optional label per item; whole groups are resampled (see the module notes).
        crossed: Optional ``(rows, cols)``, two labels per item (content and style): whole rows and columns are
            resampled, the pigeonhole bootstrap of the module notes. Not with ``groups``.
        n_resamples: Bootstrap resamples.
        confidence: The interval's coverage.
        seed: Seeds numpy's PCG64; the same inputs and seed give the same interval.

    Raises:
        ValueError: Empty, non-finite or non-1-D values; groups of the wrong length; bad settings.
    """
    return _bootstrap(_as_scores(values, "values"), groups, n_resamples, confidence, seed, crossed)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    groups: Sequence[Hashable] | None = None,
    crossed: tuple[Sequence[Hashable], Sequence[Hashable]] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The mean difference ``mean(a - b)`` of two methods scored on the same items, with its bootstrap interval.

    ``a[i]`` and ``b[i]`` must be the same item (same content-style pair, prompt and seed), so each resample keeps
    the pairs together and the item-to-item variation that both methods share cancels. An interval that excludes
    0 says that one method beats the other on these items at that confidence.

    Args:
        a: Method A's score per item.
        b: Method B's score per item, in the same item order.
        groups: Optional label per item; whole groups are resampled (see the module notes).
        crossed: Optional ``(rows, cols)``, two labels per item (content and style): whole rows and columns are
            resampled, the pigeonhole bootstrap of the module notes. Not with ``groups``.
        n_resamples: Bootstrap resamples.
        confidence: The interval's coverage.
        seed: Seeds numpy's PCG64.

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or as in `bootstrap_mean`.
    """
    xa, xb = _as_scores(a, "a"), _as_scores(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must score the same items, got {xa.size} and {xb.size} scores")
    return _bootstrap(xa - xb, groups, n_resamples, confidence, seed, crossed)
