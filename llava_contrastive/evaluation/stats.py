"""Paired comparison of two training arms over seeds and questions (pure python + numpy).

Data model. For each arm, seed and benchmark there is one row of statistics per *unit* (the thing a
benchmark's score is an average over: a question; an MME image with its two questions; an MMBench
question with all its circular rotations). A benchmark's headline metric, on a 0-100 scale, is a
function of the column sums of those rows:

- ``"mean"``: rows ``[value]`` with value in [0, 1]  ->  100 * sum(value) / n_units
- ``"f1"``:   rows ``[tp, fp, fn]`` (POPE)            ->  100 * 2 tp / (2 tp + fp + fn)

With ``categories`` (one label per unit) the metric is macro-averaged: computed per category, then
averaged over categories (POPE's mean F1 over its three splits, MME's mean over its categories), and
the bootstrap resamples units within each category (stratified). Without, one pool.

An arm's score on a benchmark is the mean over seeds of its per-seed metric; the difference of two
arms is paired (same seeds, same questions). The 95% interval comes from a two-level bootstrap: each
draw resamples the seeds with replacement, then, for every drawn seed, the units of each benchmark
with replacement; both arms of a drawn seed use the same resampled units. The average over
benchmarks uses the same draws, so its interval accounts for the benchmarks' correlation through
the seeds. Everything is deterministic given ``seed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

METRICS = {"mean": 1, "f1": 3}  # metric name -> columns of a unit row


def metric_value(metric: str, sums: np.ndarray, n_units: int) -> np.ndarray:
    """Headline metric (0-100) from column sums ``sums[..., k]`` over ``n_units`` units."""
    if metric == "mean":
        return 100.0 * sums[..., 0] / n_units
    if metric == "f1":
        tp, fp, fn = sums[..., 0], sums[..., 1], sums[..., 2]
        den = 2 * tp + fp + fn
        return np.where(den > 0, 100.0 * 2 * tp / np.where(den > 0, den, 1), 0.0)
    raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")


@dataclass
class BenchmarkUnits:
    """One arm x seed x benchmark: unit ids and their statistic rows (``[n_units, k]``)."""

    metric: str
    ids: List[str]
    rows: np.ndarray
    categories: Optional[List[str]] = None  # per unit: macro average over categories, stratified resampling

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.float64).reshape(len(self.ids), -1)
        if self.categories is not None and len(self.categories) != len(self.ids):
            raise ValueError(f"{len(self.categories)} categories for {len(self.ids)} units")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; choose from {sorted(METRICS)}")
        if self.rows.shape[1] != METRICS[self.metric]:
            raise ValueError(f"metric {self.metric!r} needs {METRICS[self.metric]} column(s) per unit, "
                             f"got {self.rows.shape[1]}")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("duplicate unit ids")

    def aligned(self) -> Tuple[List[str], List[str], np.ndarray]:
        """(ids, categories, rows) sorted by id; categories are all "" without ``categories``."""
        order = sorted(range(len(self.ids)), key=lambda i: self.ids[i])
        cats = self.categories or [""] * len(self.ids)
        return [self.ids[i] for i in order], [cats[i] for i in order], self.rows[order]

    def score(self) -> float:
        _, cats, rows = self.aligned()
        return float(_value(self.metric, rows, strata(cats)))


def strata(categories: Sequence[str]) -> List[np.ndarray]:
    """Unit indices per category, categories sorted."""
    cats = np.asarray(categories, dtype=object)
    return [np.flatnonzero(cats == c) for c in sorted(set(categories))]


def _value(metric: str, rows: np.ndarray, groups: Sequence[np.ndarray]) -> np.ndarray:
    """Macro average over ``groups`` of the metric of ``rows[..., units, k]`` (leading axes kept)."""
    return np.mean([metric_value(metric, rows[..., g, :].sum(-2), len(g)) for g in groups], axis=0)


# results[arm][seed][benchmark] -> BenchmarkUnits
Results = Mapping[str, Mapping[int, Mapping[str, BenchmarkUnits]]]


@dataclass
class Interval:
    estimate: float
    low: float
    high: float

    def as_dict(self) -> Dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@dataclass
class Comparison:
    """Scores of arm ``a`` (baseline) and ``b``, and ``b - a``, per benchmark and averaged."""

    arm_a: str
    arm_b: str
    seeds: List[int]
    benchmarks: List[str]
    n_units: Dict[str, int]
    score_a: Dict[str, Interval] = field(default_factory=dict)
    score_b: Dict[str, Interval] = field(default_factory=dict)
    diff: Dict[str, Interval] = field(default_factory=dict)
    per_seed_a: Dict[str, List[float]] = field(default_factory=dict)
    per_seed_b: Dict[str, List[float]] = field(default_factory=dict)
    draws: int = 0
    level: float = 0.95
    bootstrap_seed: int = 0

    def as_dict(self) -> dict:
        def d(m):
            return {k: v.as_dict() for k, v in m.items()}

        return {"arm_a": self.arm_a, "arm_b": self.arm_b, "seeds": self.seeds, "benchmarks": self.benchmarks,
                "n_units": self.n_units, "score_a": d(self.score_a), "score_b": d(self.score_b),
                "diff": d(self.diff), "per_seed_a": self.per_seed_a, "per_seed_b": self.per_seed_b,
                "draws": self.draws, "level": self.level, "bootstrap_seed": self.bootstrap_seed,
                "average_key": AVERAGE}


AVERAGE = "average"


def _stack(results: Results, arm: str, seeds: Sequence[int], bench: str) -> Tuple[tuple, np.ndarray]:
    key, mats = None, []
    for s in seeds:
        u = results[arm][s][bench]
        i, c, r = u.aligned()
        if key is None:
            key = (u.metric, i, c)
        elif key != (u.metric, i, c):
            raise ValueError(f"{bench}: arm {arm!r} seed {s} has other questions or metric than seed {seeds[0]}")
        mats.append(r)
    return key, np.stack(mats)  # [S, U, k]


def compare(results: Results, arm_a: str, arm_b: str, *, draws: int = 2000, seed: int = 0,
            level: float = 0.95, chunk: int = 100) -> Comparison:
    """Paired two-level bootstrap comparison of ``arm_b`` against ``arm_a`` (see module docstring).

    Uses the seeds both arms have for every benchmark; benchmarks are those both arms have for all
    those seeds. Raises ValueError when nothing is paired or the questions differ between arms.
    """
    for arm in (arm_a, arm_b):
        if arm not in results:
            raise ValueError(f"no results for arm {arm!r}")
    seeds = sorted(set(results[arm_a]) & set(results[arm_b]))
    if not seeds:
        raise ValueError(f"arms {arm_a!r} and {arm_b!r} share no seed")
    benches = sorted(set.intersection(*[set(results[a][s]) for a in (arm_a, arm_b) for s in seeds]))
    if not benches:
        raise ValueError(f"arms {arm_a!r} and {arm_b!r} share no benchmark over seeds {seeds}")
    data = {}
    for b in benches:
        ka, xa = _stack(results, arm_a, seeds, b)
        kb, xb = _stack(results, arm_b, seeds, b)
        if ka != kb:
            raise ValueError(f"{b}: arms {arm_a!r} and {arm_b!r} were scored on different questions or metrics")
        data[b] = (ka[0], strata(ka[2]), xa, xb)
    n_seeds = len(seeds)
    cmp = Comparison(arm_a, arm_b, seeds, benches, {b: data[b][2].shape[1] for b in benches},
                     draws=draws, level=level, bootstrap_seed=seed)

    # point estimates: mean over seeds of each seed's metric
    pa, pb = {}, {}
    for b, (m, groups, xa, xb) in data.items():
        va, vb = _value(m, xa, groups), _value(m, xb, groups)  # [S]
        cmp.per_seed_a[b], cmp.per_seed_b[b] = va.tolist(), vb.tolist()
        pa[b], pb[b] = float(va.mean()), float(vb.mean())
    pa[AVERAGE] = float(np.mean([pa[b] for b in benches]))
    pb[AVERAGE] = float(np.mean([pb[b] for b in benches]))

    # bootstrap draws: [draws] per benchmark and arm
    rng = np.random.default_rng(seed)
    boot_a = {b: np.empty(draws) for b in benches}
    boot_b = {b: np.empty(draws) for b in benches}
    for start in range(0, draws, chunk):
        c = min(chunk, draws - start)
        s_idx = rng.integers(0, n_seeds, size=(c, n_seeds))  # resampled seeds
        for b in benches:
            m, groups, xa, xb = data[b]
            va, vb = [], []
            for g in groups:  # resample within each category; the same units for both arms
                n = len(g)
                counts = rng.multinomial(n, np.full(n, 1.0 / n), size=(c, n_seeds)).astype(np.float64)  # [c,S,n]
                ga, gb = xa[:, g][s_idx], xb[:, g][s_idx]  # [c,S,n,k]
                va.append(metric_value(m, np.einsum("csu,csuk->csk", counts, ga), n))
                vb.append(metric_value(m, np.einsum("csu,csuk->csk", counts, gb), n))
            boot_a[b][start:start + c] = np.mean(va, axis=0).mean(1)
            boot_b[b][start:start + c] = np.mean(vb, axis=0).mean(1)
    boot_a[AVERAGE] = np.mean([boot_a[b] for b in benches], axis=0)
    boot_b[AVERAGE] = np.mean([boot_b[b] for b in benches], axis=0)

    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    for b in [*benches, AVERAGE]:
        d = boot_b[b] - boot_a[b]
        cmp.score_a[b] = Interval(pa[b], *map(float, np.percentile(boot_a[b], q)))
        cmp.score_b[b] = Interval(pb[b], *map(float, np.percentile(boot_b[b], q)))
        cmp.diff[b] = Interval(pb[b] - pa[b], *map(float, np.percentile(d, q)))
    return cmp


# Student t 97.5% quantiles (two-sided 95%) by degrees of freedom; a df between entries uses the
# next lower one (a slightly wider interval).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[max(k for k in _T975 if k <= df)]


def t_interval(values: Sequence[float]) -> Tuple[float, float, float]:
    """(mean, low, high): the 95% Student-t interval of the mean of ``values`` (e.g. per-seed paired
    differences); low = high = nan for a single value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan")
    half = t_quantile_975(x.size - 1) * float(x.std(ddof=1)) / np.sqrt(x.size)
    return mean, mean - half, mean + half
