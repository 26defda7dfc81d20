"""Statistics the tables, the report and the experiments share: intervals and tests on accuracies.

Every accuracy kvbench reports is a proportion of ``n`` samples, and two rows of the same model, task,
length and seed score the *same* prompts (the task generators are seeded), so a comparison of two
methods is paired. The functions here take counts (or paired per-sample scores) and return plain
floats; nothing imports torch.

- :func:`wilson`: the Wilson score interval of a proportion (well behaved at 0 and 1, unlike p +- 1.96 se).
- :func:`paired_test`: the difference of two accuracies over the same prompts: McNemar's exact
  (binomial) test on the discordant pairs, and a Wald interval of the paired difference.
- :func:`two_proportion_test`: the same question for unpaired rows (different prompts): pooled z-test and
  Newcombe's hybrid score interval of the difference.
- :func:`holm`: Holm's step-down adjustment of a family of p-values (several comparisons per table).
- :func:`monotone_violations`: where a curve that should not rise (accuracy against compression ratio)
  rises beyond noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed over ``n`` samples (nan, nan when n == 0)."""
    if n <= 0 or p is None or math.isnan(p):
        return (float("nan"), float("nan"))
    p = min(1.0, max(0.0, float(p)))
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (doubling the smaller tail)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def _normal_sf(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2.0))


@dataclass(frozen=True)
class Comparison:
    """a - b with its 95% interval and the two-sided p-value of 'no difference'."""

    diff: float
    lo: float
    hi: float
    p: float
    n: int
    test: str

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p < alpha


def paired_test(a: Sequence[float], b: Sequence[float], z: float = Z95) -> Comparison:
    """Accuracy of ``a`` minus that of ``b``, scored on the same prompts in the same order (per-sample scores in
    [0, 1]; a partial score counts as its value in the difference and as 'correct' when >= 0.5 in McNemar's
    test). p: McNemar's exact test on the discordant pairs; interval: Wald on the mean paired difference."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same prompts: {len(a)} vs {len(b)} samples")
    n = len(a)
    if n == 0:
        return Comparison(float("nan"), float("nan"), float("nan"), 1.0, 0, "mcnemar")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    only_a = sum(1 for x, y in zip(a, b) if x >= 0.5 > y)
    only_b = sum(1 for x, y in zip(a, b) if y >= 0.5 > x)
    return Comparison(mean, max(-1.0, mean - half), min(1.0, mean + half),
                      _binom_two_sided(only_a, only_a + only_b), n, "mcnemar")


def two_proportion_test(p1: float, n1: int, p2: float, n2: int, z: float = Z95) -> Comparison:
    """p1 - p2 for unpaired samples: pooled two-sided z-test and Newcombe's hybrid score interval (method 10)."""
    if n1 <= 0 or n2 <= 0:
        return Comparison(float("nan"), float("nan"), float("nan"), 1.0, 0, "two-proportion")
    diff = p1 - p2
    pool = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    p = 1.0 if se == 0 else 2 * _normal_sf(abs(diff) / se)
    l1, u1 = wilson(p1, n1, z)
    l2, u2 = wilson(p2, n2, z)
    lo = diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return Comparison(diff, lo, hi, p, min(n1, n2), "two-proportion")


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order (compare each to alpha)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class Violation:
    """Accuracy at the higher ratio ``hi`` beats the lower ratio ``lo`` by ``diff`` (adjusted p ``p``)."""

    lo: float
    hi: float
    diff: float
    p: float


def monotone_violations(points: Sequence[tuple[float, float, int]], *, alpha: float = 0.05,
                        paired: dict[float, Sequence[float]] | None = None) -> list[Violation]:
    """Where accuracy rises with compression beyond noise. ``points``: (ratio, accuracy, n) of one task and
    method. Every pair r_i < r_j with acc(r_j) > acc(r_i) is tested (one-sided: the paired McNemar test when
    ``paired`` holds both ratios' per-sample scores on the same prompts, else the two-proportion z-test);
    the p-values of all pairs of the curve are Holm-adjusted together, so a long fine-grained curve is not
    called non-monotone by the sheer number of pairs. Returns the pairs below ``alpha``, lowest ratio first."""
    pts = sorted((float(r), float(a), int(n)) for r, a, n in points if n and a is not None and not math.isnan(a))
    pairs, ps = [], []
    for i, (ri, ai, ni) in enumerate(pts):
        for rj, aj, nj in pts[i + 1:]:
            if paired and ri in paired and rj in paired and len(paired[ri]) == len(paired[rj]):
                c = paired_test(paired[rj], paired[ri])
            else:
                c = two_proportion_test(aj, nj, ai, ni)
            p_one = c.p / 2 if c.diff > 0 else 1.0
            pairs.append((ri, rj, aj - ai))
            ps.append(p_one)
    adj = holm(ps)
    return [Violation(lo, hi, d, p) for (lo, hi, d), p in zip(pairs, adj) if p < alpha and d > 0]
