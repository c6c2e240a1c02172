"""Evaluation metrics, computed per person then averaged, and a paired person bootstrap.

Why per person: pooled metrics over all observations mix between-person and within-person
variation, so a model that only learns each person's mean already gets a high pooled
correlation (Simpson's paradox). The paper computes every metric within each person's test data
and averages over persons; :func:`per_person` does exactly that.

Degenerate persons: a metric that is undefined for a person's test data (e.g. NRMSE or Pearson
r when the person's ground truth is constant, Krippendorff's α when only one category occurs)
is NaN for that person. Averages skip NaN persons (:func:`summarise` reports how many), and the
paired bootstrap drops a person when either method's value is NaN.

All functions take plain arrays: ``y_true``/``y_pred``/``persons`` are ``(n,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

MetricFn = Callable[[np.ndarray, np.ndarray], float]


# --------------------------------------------------------------------------- regression
def nrmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """RMSE divided by the standard deviation (ddof 0) of ``y_true``; NaN if that is 0.

    1.0 is what predicting the person's test mean would score; lower is better.
    """
    t, p = _floats(y_true, y_pred)
    sd = t.std()
    if t.size == 0 or not sd > 0:
        return float("nan")
    return float(np.sqrt(np.mean((t - p) ** 2)) / sd)


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Root mean squared error; NaN for empty input."""
    t, p = _floats(y_true, y_pred)
    return float(np.sqrt(np.mean((t - p) ** 2))) if t.size else float("nan")


def ccc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Lin's concordance correlation 2·cov / (var_t + var_p + (mean_t − mean_p)²).

    Population (ddof 0) moments, as in Lin (1989). NaN if the denominator is 0 (both constant
    and equal). A constant prediction of a varying truth gives 0, not NaN.
    """
    t, p = _floats(y_true, y_pred)
    if t.size == 0:
        return float("nan")
    mt, mp = t.mean(), p.mean()
    cov = np.mean((t - mt) * (p - mp))
    denom = t.var() + p.var() + (mt - mp) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


def pearson_r(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Pearson's correlation; NaN when either side is constant or there are < 2 points."""
    t, p = _floats(y_true, y_pred)
    if t.size < 2:
        return float("nan")
    dt, dp = t - t.mean(), p - p.mean()
    denom = np.sqrt((dt * dt).sum() * (dp * dp).sum())
    return float((dt * dp).sum() / denom) if denom > 0 else float("nan")


# --------------------------------------------------------------------------- classification
def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of exact matches; NaN for empty input."""
    t, p = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {t.shape} vs {p.shape}")
    return float(np.mean(t == p)) if t.size else float("nan")


def coincidence_matrix(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Krippendorff's coincidence matrix of nominal reliability data.

    Args:
        data: ``(raters, units)``; NaN (or None) marks a missing value. Values may be any
            hashable labels.

    Returns:
        ``(o, values)``: ``o: (V, V)`` coincidences (units with fewer than two values are not
        pairable and contribute nothing) and the ``(V,)`` sorted distinct values.
    """
    arr = np.asarray(data, dtype=object)
    if arr.ndim != 2:
        raise ValueError(f"reliability data must be 2-D (raters, units), got shape {arr.shape}")
    missing = pd.isna(arr)
    present = arr[~missing]
    if present.size == 0:
        return np.zeros((0, 0)), np.asarray([], dtype=object)
    values, codes = np.unique(present.astype(str) if _mixed(present) else present,
                              return_inverse=True)
    unit = np.broadcast_to(np.arange(arr.shape[1]), arr.shape)[~missing]
    counts = np.zeros((arr.shape[1], len(values)))  # (units, V): n_uc
    np.add.at(counts, (unit, codes), 1.0)
    m = counts.sum(axis=1)  # (units,) values per unit
    counts, m = counts[m >= 2], m[m >= 2]
    # o_ck = Σ_u n_uc (n_uk − [c = k]) / (m_u − 1): every ordered pair of values within a unit
    weighted = counts / (m - 1)[:, None]
    o = weighted.T @ counts - np.diag(weighted.sum(axis=0))
    return o, values


def krippendorff_alpha(data: np.ndarray) -> float:
    """Krippendorff's α for nominal data, ``data: (raters, units)`` with NaN for missing.

    α = 1 − (n − 1) Σ_{c≠k} o_ck / Σ_{c≠k} n_c n_k, with ``o`` the coincidence matrix,
    n_c its marginals and n the number of pairable values. NaN when fewer than two categories
    (or no pairable units) occur, where α is undefined.
    """
    o, _ = coincidence_matrix(data)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    disagree_obs = o.sum() - np.trace(o)
    disagree_exp = n * n - (n_c * n_c).sum()
    if n <= 1 or disagree_exp <= 0:
        return float("nan")
    return float(1.0 - (n - 1) * disagree_obs / disagree_exp)


def alpha_nominal(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Krippendorff's α (nominal) between the ground truth and the predictions as two raters."""
    t = np.asarray(y_true, dtype=object)
    p = np.asarray(y_pred, dtype=object)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {t.shape} vs {p.shape}")
    return krippendorff_alpha(np.stack([t, p]))


REGRESSION_METRICS: dict[str, MetricFn] = {"nrmse": nrmse, "ccc": ccc, "pearson": pearson_r}
CLASSIFICATION_METRICS: dict[str, MetricFn] = {"accuracy": accuracy, "alpha": alpha_nominal}
LOWER_IS_BETTER = frozenset({"nrmse", "rmse"})
METRIC_LABELS = {"nrmse": "NRMSE", "ccc": "CCC", "pearson": "r", "accuracy": "Acc.",
                 "alpha": "α", "rmse": "RMSE"}


OPTIONAL_METRICS: dict[str, dict[str, MetricFn]] = {
    "regression": {"rmse": rmse}, "classification": {}}


def metrics_for(task: str, names: Sequence[str] | None = None) -> dict[str, MetricFn]:
    """The metrics of a task (``"regression"`` or ``"classification"``), in order.

    ``names=None`` gives the paper's set (NRMSE, CCC, r; accuracy, α); otherwise any of those
    plus ``"rmse"`` for regression.
    """
    if task == "sequence":  # decoded segments are scored like class labels
        task = "classification"
    if task not in OPTIONAL_METRICS:
        raise ValueError(f"task must be 'regression', 'classification' or 'sequence', "
                         f"got {task!r}")
    known = {**(REGRESSION_METRICS if task == "regression" else CLASSIFICATION_METRICS),
             **OPTIONAL_METRICS[task]}
    if names is None:
        return dict(REGRESSION_METRICS if task == "regression" else CLASSIFICATION_METRICS)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"unknown metrics for {task}: {bad}; choose from {sorted(known)}")
    return {n: known[n] for n in names}


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


# --------------------------------------------------------------------------- per person
def per_person(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    persons: Sequence[Hashable] | np.ndarray,
    metrics: dict[str, MetricFn],
) -> pd.DataFrame:
    """Every metric within each person's rows.

    Args:
        y_true, y_pred, persons: ``(n,)``.
        metrics: name -> function of ``(y_true, y_pred)``.

    Returns:
        DataFrame indexed by person (sorted), one column per metric plus ``n`` (rows of that
        person); NaN where the metric is undefined for the person.
    """
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    ids = pd.Series(np.asarray(persons, dtype=object))
    if not (len(t) == len(p) == len(ids)):
        raise ValueError(f"lengths differ: y_true {len(t)}, y_pred {len(p)}, persons {len(ids)}")
    rows = {}
    for person, idx in ids.groupby(ids, sort=True).indices.items():
        rows[person] = {name: fn(t[idx], p[idx]) for name, fn in metrics.items()}
        rows[person]["n"] = len(idx)
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "person"
    return frame


def summarise(table: pd.DataFrame, metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean over persons of each metric, skipping NaN persons: ``{metric: {mean, sd, n}}``."""
    out = {}
    for name in metrics:
        v = table[name].to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        out[name] = {
            "mean": float(v.mean()) if v.size else float("nan"),
            "sd": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
            "n": int(v.size),
        }
    return out


# --------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of the mean per-person difference ``a − b``."""

    diff: float  # observed mean difference over the persons used
    low: float  # percentile interval bounds
    high: float
    n_persons: int  # persons with finite values for both methods
    n_resamples: int
    level: float

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {"diff": self.diff, "low": self.low, "high": self.high,
                "n_persons": self.n_persons, "n_resamples": self.n_resamples,
                "level": self.level}


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int | None = 0,
    chunk_elements: int = 1 << 22,
) -> BootstrapResult:
    """Person-clustered paired bootstrap of the mean difference of per-person metrics.

    Persons are the resampling unit (their observations stay together, and the two methods
    are compared on the same resampled persons), which is what makes it paired and clustered.

    Args:
        a, b: ``(n_persons,)`` per-person metric of two methods, aligned by person; persons
            with a NaN in either are dropped.
        n_resamples: bootstrap resamples of persons (with replacement).
        level: coverage of the percentile interval.
        seed: seeds ``numpy.random.default_rng``; the same seed gives the same interval.
        chunk_elements: upper bound of one ``(resamples, persons)`` index block, to bound memory;
            resamples are drawn block-wise in one stream, so the result does not depend on it.

    Returns:
        :class:`BootstrapResult` with the observed mean of ``a − b`` and its interval.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must be aligned by person, got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = (a - b)[keep]  # (n,)
    n = d.size
    if n == 0:
        nan = float("nan")
        return BootstrapResult(nan, nan, nan, 0, n_resamples, level)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    step = max(1, chunk_elements // n)
    for start in range(0, n_resamples, step):  # blocks of resamples, vectorised within
        stop = min(start + step, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))  # (block, n) resampled persons
        means[start:stop] = d[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return BootstrapResult(float(d.mean()), float(low), float(high), n, n_resamples, level)


# --------------------------------------------------------------------------- helpers
def _floats(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {t.shape} vs {p.shape}")
    return t, p


def _mixed(values: np.ndarray) -> bool:
    """True when labels mix types that numpy cannot sort together (e.g. str and int)."""
    return len({type(v) for v in values.tolist()}) > 1 and not all(
        isinstance(v, (int, float, np.number)) for v in values.tolist()
    )


def group_difference_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    n_resamples: int = 10_000,
    level: float = 0.95,
    seed: int | None = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unpaired bootstrap of the difference of two groups' mean per-person arrays.

    For comparing per-person quantities of two disjoint groups of persons (e.g. each person's
    transition matrix, paper Table 5): persons are resampled with replacement within each group.

    Args:
        a: ``(n_a, ...)`` one array per person of group A; b: ``(n_b, ...)`` group B.

    Returns:
        ``(diff, low, high)``, each shaped like one person's array: mean(A) − mean(B) and its
        percentile interval.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape[1:] != b.shape[1:] or a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"need non-empty groups of equal item shape, got {a.shape}, {b.shape}")
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.shape[0], size=(n_resamples, a.shape[0]))  # (B, n_a)
    ib = rng.integers(0, b.shape[0], size=(n_resamples, b.shape[0]))  # (B, n_b)
    diffs = a[ia].mean(axis=1) - b[ib].mean(axis=1)  # (B, ...)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail], axis=0)
    return a.mean(axis=0) - b.mean(axis=0), low, high
