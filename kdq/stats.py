"""Paired statistics behind every accuracy-type gate of the certificate (`kdq.parity`).

Two models scored on the same test images are a *paired* comparison: per image, each is right or wrong, and
only the discordant images carry information (b: the reference right, the candidate wrong; c: the reverse).
A gate is a claim about an effect size that does not change with N ("int8 loses at most 1 pt"), decided by a
95% confidence interval, with three outcomes:
- PASS: the whole interval is within the bound (proven);
- FAIL: the whole interval is beyond it (proven worse);
- NOT_PROVEN: the interval straddles the bound. Too few images to tell: the record says how many would do.

The accuracy drop (b - c) / N is a product: the discordance rate r = (b + c) / N times 2π - 1, where π = b / (b + c)
is the share of discordant images the candidate lost. Each factor gets a Wilson interval at 1 - α/2, so the
product's interval covers at ≥ 1 - α (Bonferroni) without conditioning on b + c: zero discordant images on 360
test images still leave a bound of 1.4 pt, where an interval conditional on b + c = 0 would claim exactly 0.
A gate's p-value is the level at which its interval just touches the bound (the interval, inverted), so that
the p-value and the interval never disagree; per-class gates correct those p-values with Holm's step-down.
Exact McNemar (scipy's binomial test of b against b + c) says whether two models differ at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binomtest

ALPHA = 0.05  # every interval is a two-sided 95% interval
PASS, NOT_PROVEN, FAIL = "pass", "not proven", "fail"
_TINY = 1e-15  # the smallest level searched when inverting an interval (p-values below it are reported as it)
_MAX_IMAGES = 10**9


@dataclass(frozen=True)
class Paired:
    """Counts of a paired comparison on `n` images: `b` the reference right and the candidate wrong, `c` the reverse."""

    b: int
    c: int
    n: int

    @classmethod
    def of(cls, ref_ok: np.ndarray, cand_ok: np.ndarray) -> Paired:
        ref_ok, cand_ok = np.asarray(ref_ok, bool), np.asarray(cand_ok, bool)
        return cls(int((ref_ok & ~cand_ok).sum()), int((~ref_ok & cand_ok).sum()), len(ref_ok))

    @property
    def drop(self) -> float:
        return (self.b - self.c) / self.n if self.n else 0.0

    def scaled(self, n: int) -> Paired:
        """The same discordance at `n` images (what a larger test set would show if the rates held)."""
        k = n / self.n
        return Paired(round(self.b * k), round(self.c * k), n)


def wilson(k: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (scipy); [0, 1] when n = 0: nothing is known."""
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(k, n).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def drop_interval(p: Paired, alpha: float = ALPHA) -> tuple[float, float]:
    """Interval of the accuracy the candidate loses, (b - c) / n, at level 1 - alpha (see the module doc)."""
    if p.n == 0:
        return -1.0, 1.0
    r_lo, r_hi = wilson(p.b + p.c, p.n, 1 - alpha / 2)
    s_lo, s_hi = wilson(p.b, p.b + p.c, 1 - alpha / 2)
    hi = (r_hi if s_hi >= 0.5 else r_lo) * (2 * s_hi - 1)
    lo = (r_hi if s_lo <= 0.5 else r_lo) * (2 * s_lo - 1)
    return lo, hi


def rate_interval(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    return wilson(k, n, 1 - alpha)


def mcnemar_p(p: Paired) -> float:
    """Exact McNemar test: do the two models differ at all? (two-sided binomial test of b against b + c)."""
    return float(binomtest(p.b, p.b + p.c, 0.5).pvalue) if p.b + p.c else 1.0


def inverted_p(margin: Callable[[float], float]) -> float:
    """The smallest level alpha at which margin(alpha) <= 0, where margin(alpha) is how far the interval at level
    1 - alpha still reaches past the bound (it grows as alpha shrinks): the p-value of "within the bound"."""
    if margin(1 - 1e-9) > 0:
        return 1.0
    if margin(_TINY) <= 0:
        return _TINY
    return 10 ** brentq(lambda t: margin(10**t), math.log10(_TINY), math.log10(1 - 1e-9), xtol=1e-6)


def verdict(lo: float, hi: float, bound: float) -> str:
    return PASS if hi <= bound else FAIL if lo > bound else NOT_PROVEN


@dataclass(frozen=True)
class Result:
    """What a statistical gate records: the observed value, its 95% interval, the bound, N, the p-value of the
    claim "within the bound" (≤ α when it passes), the verdict, and the images that would settle a NOT_PROVEN."""

    value: float
    ci: tuple[float, float]
    bound: float
    n: int
    p: float
    verdict: str
    images_needed: int | None = None
    mcnemar_p: float | None = None


def drop_within(p: Paired, bound: float) -> Result:
    """Is the candidate's accuracy at most `bound` below the reference's (bound: accuracy fraction, 0.01 = 1 pt)?"""
    lo, hi = drop_interval(p)
    v = verdict(lo, hi, bound)
    needed = None
    if v == NOT_PROVEN and p.drop < bound:
        needed = images_needed(p.n, lambda m: drop_interval(p.scaled(m))[1] <= bound)
    return Result(p.drop, (lo, hi), bound, p.n, p_drop_within(p, bound), v, needed, mcnemar_p(p))


def p_drop_within(p: Paired, bound: float) -> float:
    return inverted_p(lambda a: drop_interval(p, a)[1] - bound)


def p_drop_beyond(p: Paired, bound: float) -> float:
    """The p-value of "the drop exceeds `bound`" (≤ α when the whole interval lies beyond it)."""
    return inverted_p(lambda a: bound - drop_interval(p, a)[0])


def difference_within(p: Paired, bound: float) -> Result:
    """Do two models' accuracies differ by at most `bound` either way (runtime vs runtime)? The value is signed:
    the reference's accuracy minus the candidate's."""
    lo, hi = drop_interval(p)
    worst = max(abs(lo), abs(hi))
    v = PASS if worst <= bound else FAIL if lo > bound or hi < -bound else NOT_PROVEN
    needed = None
    if v == NOT_PROVEN and abs(p.drop) < bound:
        needed = images_needed(p.n, lambda m: max(map(abs, drop_interval(p.scaled(m)))) <= bound)
    pval = inverted_p(lambda a: max(map(abs, drop_interval(p, a))) - bound)
    return Result(p.drop, (lo, hi), bound, p.n, pval, v, needed, mcnemar_p(p))


def rate_within(k: int, n: int, bound: float) -> Result:
    """Is a rate (flips of top-1 between two runtimes, k of n images) at most `bound`? No image: NOT_PROVEN."""
    lo, hi = rate_interval(k, n)
    v = verdict(lo, hi, bound) if n else NOT_PROVEN
    needed = None
    if v == NOT_PROVEN and (not n or k / n < bound):
        rate = k / n if n else 0.0
        needed = images_needed(max(n, 1), lambda m: rate_interval(round(rate * m), m)[1] <= bound)
    pval = inverted_p(lambda a: rate_interval(k, n, a)[1] - bound) if n else 1.0
    return Result(k / n if n else float("nan"), (lo, hi), bound, n, pval, v, needed)


def proportion_at_least(k: int, n: int, bound: float) -> Result:
    """Is an accuracy (k right of n) at least `bound`?"""
    lo, hi = rate_interval(k, n)
    v = PASS if lo >= bound else FAIL if hi < bound else NOT_PROVEN
    return Result(k / n, (lo, hi), bound, n, inverted_p(lambda a: bound - rate_interval(k, n, a)[0]), v)


def images_needed(n: int, proven_at: Callable[[int], bool]) -> int | None:
    """The fewest test images at which the claim would be proven if the observed rates held (None: not even 10^9)."""
    lo, hi = n, n
    while not proven_at(hi):
        lo, hi = hi, hi * 2
        if hi > _MAX_IMAGES:
            return None
    while hi - lo > max(1, lo // 100):  # 1% is precise enough for "how many images would it take"
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if proven_at(mid) else (mid, hi)
    return hi


def classes_within(pairs: list[Paired], bound: float) -> tuple[str, int, list[float]]:
    """Per-class drops against one bound, Holm-corrected over the classes (statsmodels): PASS when every class is
    proven within it, FAIL when some class is proven beyond it, else NOT_PROVEN. Returns the verdict, the class
    that decides it (the one proven worst; else the largest loss not proven small), and the Holm-adjusted p-values
    of "within the bound"."""
    from statsmodels.stats.multitest import multipletests  # imported here: only this gate needs statsmodels

    within = [p_drop_within(p, bound) for p in pairs]
    beyond = [p_drop_beyond(p, bound) for p in pairs]
    ok, adj_within, *_ = multipletests(within, alpha=ALPHA, method="holm")
    bad, adj_beyond, *_ = multipletests(beyond, alpha=ALPHA, method="holm")
    if bad.any():
        return FAIL, int(np.argmin(adj_beyond)), list(map(float, adj_within))
    open_classes = [i for i in range(len(pairs)) if not ok[i]] or list(range(len(pairs)))
    worst = max(open_classes, key=lambda i: (pairs[i].drop, adj_within[i]))  # the largest loss not proven small
    return (PASS if ok.all() else NOT_PROVEN), worst, list(map(float, adj_within))
