"""The paper's evaluation protocol: temporal split, grid search, all variants, paired bootstrap.

Protocol (Wörtwein et al. 2023, §5):

1. Within-person temporal split: each person's first 60 % of observations (in time order) train,
   the next 20 % validate, the last 20 % test (:func:`nme.data.temporal_split`).
2. Persons with fewer than ``min_test`` test observations are dropped entirely (from train and
   validation too), so every reported person has a test set on which per-person metrics mean
   something.
3. Features — and for regression the target — are z-normalised on the training rows; the
   estimators do this themselves (:class:`~nme.estimators.NMERegressor`,
   :class:`~nme.lme.MLPLMERegressor`), predictions come back on the label's scale.
4. For each method × placement a small grid (learning rate × depth/width × weight decay) is
   fitted; early stopping and the grid choice both use the validation rows; the chosen model is
   scored once on the test rows.
5. Metrics are computed per person and averaged (:mod:`nme.metrics`); a paired,
   person-clustered bootstrap compares each baseline with NME at the same placement.

Methods: ``generic`` (θ̄ only; one run, shown under every placement), ``specific``, ``unme``,
``nme`` (under each placement), ``mlp-lme`` (regression; its random effects are always the
last layer, so it runs under placement ``last`` only).

Sequences (:func:`evaluate_sequence_frame`): the NME-CRF tagger
(:class:`nme.sequence.NMESequenceTagger`, looked up by :func:`sequence_tagger_class` so this
module imports without it) under the T placements :data:`SEQUENCE_PLACEMENTS`; sequences are the
split unit, decoded segments are scored like class labels, and per-group mean transition
matrices with bootstrap difference intervals are reported (paper Table 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from nme.data import temporal_split
from nme.estimators import NMEClassifier, NMERegressor
from nme.lme import MLPLMERegressor
from nme.metrics import (
    BootstrapResult,
    higher_is_better,
    metrics_for,
    paired_bootstrap,
    per_person,
    summarise,
)

METHODS = ("generic", "specific", "unme", "nme", "mlp-lme")
PLACEMENTS = ("last", "all")
SEQUENCE_PLACEMENTS = ("T", "last+T", "all+T")
TASKS = ("regression", "classification", "sequence")
REFERENCE = "nme"

_FULL = [
    {"lr": lr, "hidden": hidden, "weight_decay": wd}
    for lr in (1e-3, 1e-2)
    for hidden in ((32,), (64, 64))  # one layer, two layers
    for wd in (0.0, 1e-4)
]
GRIDS: dict[str, list[dict[str, Any]]] = {
    # the estimators' defaults
    "none": [{"lr": 1e-3, "hidden": (64, 64), "weight_decay": 0.0}],
    # half of the 2×2×2 design (a 2^(3-1) fraction, wd = lr × depth): every level of every
    # factor is tried twice at half the cost of "full", which matters with five methods × two
    # placements to fit per grid point
    "small": [_FULL[0], _FULL[3], _FULL[5], _FULL[6]],
    # learning rate {1e-3, 1e-2} × architecture {(32,), (64, 64)} × weight decay {0, 1e-4}
    "full": _FULL,
}


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation (everything the protocol leaves open)."""

    task: str = "regression"
    methods: tuple[str, ...] | None = None  # None: all that apply to the task
    placements: tuple[str, ...] | None = None  # None: last, all (sequences: T, last+T, all+T)
    grid: str = "small"
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    min_test: int = 10
    n_bootstrap: int = 10_000
    level: float = 0.95
    seed: int = 0
    max_epochs: int = 100
    patience: int | None = 10
    batch_size: int | str = 512
    sequence_batch_size: int = 32  # sequences per mini-batch (the tagger's default)
    m_step: str | None = None
    device: str = "cpu"
    progress: bool = True
    metrics: tuple[str, ...] | None = None  # None: the task's paper metrics; first = selection
    estimator_params: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments of every NME estimator (e.g. ``{"e_step": "sgd"}``)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        # resolve the task-dependent defaults (frozen dataclass: set once, here)
        if self.methods is None:
            object.__setattr__(self, "methods", tuple(
                m for m in METHODS if self.task == "regression" or m != "mlp-lme"))
        if self.placements is None:
            object.__setattr__(self, "placements",
                               SEQUENCE_PLACEMENTS if self.task == "sequence" else PLACEMENTS)
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "placements", tuple(self.placements))
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be among {METHODS}, got {list(self.methods)}")
        allowed = PLACEMENTS + SEQUENCE_PLACEMENTS if self.task == "sequence" else PLACEMENTS
        bad = [p for p in self.placements if p not in allowed]
        if bad or not self.placements:
            raise ValueError(f"placements must be among {allowed}, got {list(self.placements)}")
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {sorted(GRIDS)}, got {self.grid!r}")
        if self.task != "regression" and "mlp-lme" in self.methods:
            raise ValueError("mlp-lme is a regression baseline; drop it for classification")
        metrics_for(self.task, self.metrics)  # raises on unknown names
        if self.min_test < 1:
            raise ValueError(f"min_test must be at least 1, got {self.min_test}")
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1) > 1e-9:
            raise ValueError(f"fractions must be three shares summing to 1, got {self.fractions}")


def run_key(method: str, placement: str | None) -> str:
    """``"nme/last"``; ``"generic"`` has no placement."""
    return method if placement is None else f"{method}/{placement}"


def run_placements(method: str, placements: Sequence[str]) -> list[str | None]:
    """The placements a method is run under (see the module docstring)."""
    if method == "generic":
        return [None]
    if method == "mlp-lme":
        return ["last"]
    return list(placements)


# --------------------------------------------------------------------------- data
@dataclass
class Splits:
    """The three parts of the protocol's split, after dropping persons."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    dropped: list  # persons with fewer than min_test test rows


def split_frame(
    df: pd.DataFrame,
    person_col: str,
    time_col: str | None = None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    min_test: int = 10,
) -> Splits:
    """Within-person temporal split and the ``min_test`` filter.

    Args:
        df: one row per observation.
        person_col: person ids.
        time_col: time order within person (numeric or datetime); ``None`` keeps row order.
        fractions: train/validation/test shares.
        min_test: persons with fewer test rows are dropped from every part.

    Returns:
        :class:`Splits`; each part keeps ``df``'s columns plus ``__person`` (ids as str).
    """
    if person_col not in df.columns:
        raise ValueError(f"no column {person_col!r}")
    data = df.assign(__person=df[person_col].astype(str))
    if time_col is not None:
        data = data.iloc[np.argsort(data[time_col].to_numpy(), kind="stable")]
    part = temporal_split(data["__person"].to_numpy(), tuple(fractions))
    n_test = pd.Series(part == 2).groupby(data["__person"].to_numpy()).sum()
    dropped = sorted(n_test.index[n_test < min_test])
    keep = ~data["__person"].isin(dropped).to_numpy()
    if not keep.any():
        raise ValueError(
            f"no person has at least {min_test} test observations after the "
            f"{'/'.join(f'{f:.0%}' for f in fractions)} split (largest: {int(n_test.max())}); "
            "lower min_test"
        )
    data, part = data[keep], part[keep]
    return Splits(data[part == 0], data[part == 1], data[part == 2], dropped)


# --------------------------------------------------------------------------- results
@dataclass
class RunResult:
    """One (method, placement): the chosen grid point and its per-person test metrics."""

    method: str
    placement: str | None
    params: dict[str, Any]
    val_score: float
    grid: list[dict[str, Any]]  # every grid point with its validation score
    per_person: pd.DataFrame  # index person, columns metrics + n
    summary: dict[str, dict[str, float]]
    fit_seconds: float
    bias: pd.Series | None = None
    """Person -> shift of the prediction by personalisation (Figure 4; see
    :func:`prediction_shift`): label units (regression) or log-odds (binary); None for
    runs without person effects."""

    @property
    def key(self) -> str:
        return run_key(self.method, self.placement)


@dataclass
class Comparison:
    """Bootstrap of NME minus a baseline, oriented so positive = NME better."""

    method: str
    placement: str | None
    reference_placement: str
    metric: str
    boot: BootstrapResult

    @property
    def baseline_worse(self) -> bool:
        return self.boot.low > 0

    @property
    def baseline_better(self) -> bool:
        return self.boot.high < 0


@dataclass
class EvaluationResult:
    """Everything one evaluation produced; :mod:`nme.report` renders it."""

    config: EvalConfig
    data: dict[str, Any]
    metrics: list[str]
    runs: dict[str, RunResult]
    comparisons: list[Comparison]
    baseline: pd.Series  # person -> mean training target (regression) / share of classes[1]
    extras: dict[str, Any] = field(default_factory=dict)

    def run(self, method: str, placement: str) -> RunResult | None:
        """The run shown in the table cell (method, placement column), if any."""
        if method == "generic":
            return self.runs.get("generic")
        return self.runs.get(run_key(method, placement))

    def comparison(self, method: str, placement: str, metric: str) -> Comparison | None:
        for c in self.comparisons:
            if (c.method == method and c.reference_placement == placement
                    and c.metric == metric):
                return c
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes None, per-person values keyed by person id."""
        config = asdict(self.config)
        runs = {}
        for key, r in self.runs.items():
            runs[key] = {
                "method": r.method,
                "placement": r.placement,
                "params": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in r.params.items()},
                "val_score": r.val_score,
                "grid": [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
                         for g in r.grid],
                "summary": r.summary,
                "fit_seconds": r.fit_seconds,
                "per_person": {m: r.per_person[m].to_dict() for m in r.per_person.columns},
                "bias": None if r.bias is None else r.bias.to_dict(),
            }
        comparisons = [
            {"method": c.method, "placement": c.placement,
             "reference": run_key(REFERENCE, c.reference_placement), "metric": c.metric,
             "nme_minus_baseline_oriented": c.boot.to_dict(),
             "baseline_significantly_worse": c.baseline_worse,
             "baseline_significantly_better": c.baseline_better}
            for c in self.comparisons
        ]
        out = {"config": config, "data": self.data, "metrics": self.metrics, "runs": runs,
               "comparisons": comparisons, "training_baseline": self.baseline.to_dict(),
               "extras": self.extras}
        return _json_clean(out)


def _json_clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --------------------------------------------------------------------------- estimators
def make_estimator(
    method: str, placement: str | None, params: dict[str, Any], config: EvalConfig
) -> NMERegressor | NMEClassifier | MLPLMERegressor:
    """An unfitted estimator of one variant at one grid point."""
    if method == "mlp-lme":
        # one EM iteration per epoch, so the training budget matches the NME variants
        return MLPLMERegressor(
            hidden=params["hidden"], lr=params["lr"], weight_decay=params["weight_decay"],
            batch_size=config.batch_size, epochs_per_step=1, max_iter=config.max_epochs,
            patience=config.patience, device=config.device, random_state=config.seed,
        )
    cls = NMERegressor if config.task == "regression" else NMEClassifier
    # None keeps the estimator's own default M-step (Laplace); only the penalised variant uses
    # Σ at all
    extra = {"m_step": config.m_step} if config.m_step is not None and method == "nme" else {}
    return cls(
        hidden=params["hidden"], placement=placement or "last", method=method,
        lr=params["lr"], weight_decay=params["weight_decay"], batch_size=config.batch_size,
        max_epochs=config.max_epochs, patience=config.patience,
        device=config.device, random_state=config.seed,
        **{**config.estimator_params, **extra},
    )


def prediction_shift(
    est: Any, X: pd.DataFrame, persons: np.ndarray, task: str
) -> pd.Series | None:
    """Each person's shift of the prediction by personalisation (paper Figure 4).

    Per row, the personalised prediction minus the same model's prediction for an unknown
    person (θⁱ = 0 for NME and UNME, bᵢ = 0 for MLP-LME, the mean θⁱ under ``specific``),
    averaged over the person's rows. It is one quantity for every method and placement, in
    the label's units. The output-bias effect alone (what Figure 4 used to plot) is not: once
    the last layer's weights carry effects too, part of a person's shift runs through them, in
    a share that differs between methods — on mood NME's bias spanned ±0.6 label units and
    MLP-LME's random intercept ±15, and in ``tests/nme/test_evaluation.py`` MLP-LME's intercept
    is 20 for a person whose predictions it shifts by 36.

    Args:
        est: a fitted estimator with ``predict(X, persons)`` (and ``predict_proba`` for
            classification); ``persons=None`` gives its unknown-person prediction.
        X: ``(n, F)`` the rows to average over; persons: ``(n,)`` their person ids (str).
        task: ``"regression"``: label units; ``"classification"``: the log-odds of
            ``classes_[1]`` against ``classes_[0]`` (binary only, else None).

    Returns:
        person -> mean shift, or None when the variant has no person effects (all shifts 0)
        or the task has no single shift per person.
    """
    if task == "regression":
        shift = est.predict(X, persons) - est.predict(X)  # (n,) label units
    elif task == "classification":
        if not hasattr(est, "predict_proba") or len(est.classes_) != 2:
            return None  # multi-class: no single shift per person to plot
        tiny = np.finfo(np.float64).tiny

        def log_odds(p: np.ndarray) -> np.ndarray:  # (n, 2) -> (n,)
            p = np.asarray(p, np.float64).clip(tiny)
            return np.log(p[:, 1]) - np.log(p[:, 0])

        shift = log_odds(est.predict_proba(X, persons)) - log_odds(est.predict_proba(X))
    else:
        return None
    if not np.any(shift):
        return None
    ids = np.asarray([str(p) for p in persons])
    return pd.Series(shift, name="shift").groupby(ids).mean()


# --------------------------------------------------------------------------- the protocol
@dataclass
class _Adapter:
    """How one kind of data is fitted and predicted, so the grid search is shared.

    ``make(method, placement, params)`` builds an estimator, ``fit(est)`` fits it on the
    training part (validation part for early stopping), ``predict(est, part)`` returns
    ``(y_true, y_pred, persons)`` flat over the unit the metrics count (rows or segments) of
    ``part`` ∈ {"val", "test"}; ``has_val`` says whether the validation part is non-empty.
    """

    make: Callable[[str, str | None, dict[str, Any]], Any]
    fit: Callable[[Any], None]
    predict: Callable[[Any, str], tuple[np.ndarray, np.ndarray, np.ndarray]]
    has_val: bool
    shift: Callable[[Any], pd.Series | None] | None = None
    """Each person's prediction shift on the test part (:func:`prediction_shift`), if the
    data have one."""


def _search(adapter: _Adapter, config: EvalConfig, metric_fns: dict, name: str
            ) -> tuple[dict[str, RunResult], dict[str, Any]]:
    """Every (method, placement, grid point); the best on validation is scored on test.

    Returns the runs and the chosen fitted estimators (by run key).
    """
    primary = next(iter(metric_fns))  # chooses among grid points on the validation rows
    grid = GRIDS[config.grid]
    placed = [(m, p) for m in config.methods for p in run_placements(m, config.placements)]
    runs: dict[str, RunResult] = {}
    chosen: dict[str, Any] = {}
    bar = tqdm(total=len(placed) * len(grid), disable=not config.progress,
               desc=f"evaluate {name}", unit="fit")
    for method, placement in placed:
        bar.set_postfix_str(run_key(method, placement))
        scored = []
        best: tuple[float, Any, dict, float] | None = None
        for params in grid:
            t0 = time.perf_counter()
            est = adapter.make(method, placement, params)
            adapter.fit(est)
            seconds = time.perf_counter() - t0
            score = float("nan")
            if adapter.has_val:
                truth, pred, who = adapter.predict(est, "val")
                table = per_person(truth, pred, who, {primary: metric_fns[primary]})
                score = summarise(table, [primary])[primary]["mean"]
            scored.append({**params, "val_" + primary: score, "seconds": seconds})
            if best is None or _improves(score, best[0], primary):
                best = (score, est, params, seconds)
            bar.update(1)
        assert best is not None
        score, est, params, seconds = best
        truth, pred, who = adapter.predict(est, "test")
        table = per_person(truth, pred, who, metric_fns)
        key = run_key(method, placement)
        chosen[key] = est
        runs[key] = RunResult(
            method=method, placement=placement, params=dict(params), val_score=score,
            grid=scored, per_person=table, summary=summarise(table, list(metric_fns)),
            fit_seconds=seconds,
            bias=None if adapter.shift is None else adapter.shift(est),
        )
    bar.close()
    return runs, chosen


def evaluate_splits(
    splits: Splits,
    target: str,
    features: Sequence[str],
    config: EvalConfig = EvalConfig(),
    name: str = "data",
) -> EvaluationResult:
    """Run every (method, placement, grid point), choose on validation, score on test.

    Args:
        splits: from :func:`split_frame`.
        target: the target column.
        features: numeric feature columns.
        config: see :class:`EvalConfig` (task regression or classification).
        name: shown in reports.
    """
    if config.task == "sequence":
        raise ValueError("sequence data goes through evaluate_sequence_frame")
    features = list(features)
    metric_fns = metrics_for(config.task, config.metrics)
    train, val, test = splits.train, splits.val, splits.test
    if config.task == "classification":
        # a classifier knows only its training classes; unseen validation labels cannot be
        # scored by its loss (test rows stay: they simply count as errors)
        val = val[val[target].isin(set(train[target]))]
    parts = {"val": val, "test": test}

    def fit(est: Any) -> None:
        fit_val = {"X_val": val[features], "y_val": val[target].to_numpy(),
                   "persons_val": val["__person"].to_numpy()} if len(val) else {}
        est.fit(train[features], train[target].to_numpy(), train["__person"].to_numpy(),
                **fit_val)

    def predict(est: Any, part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        frame = parts[part]
        who = frame["__person"].to_numpy()
        return frame[target].to_numpy(), est.predict(frame[features], who), who

    def shift(est: Any) -> pd.Series | None:
        return prediction_shift(est, test[features], test["__person"].to_numpy(), config.task)

    adapter = _Adapter(lambda m, p, g: make_estimator(m, p, g, config), fit, predict,
                       has_val=len(val) > 0, shift=shift)
    runs, _ = _search(adapter, config, metric_fns, name)
    comparisons = _compare(runs, list(metric_fns), config)
    baseline = _training_baseline(train, target, config.task)
    sizes = test.groupby("__person").size()
    data = {
        "name": name,
        "target": target,
        "features": features,
        "task": config.task,
        "persons": int(test["__person"].nunique()),
        "dropped_persons": len(splits.dropped),
        "rows": {"train": len(train), "val": len(val), "test": len(test)},
        "test_rows_per_person": {"min": int(sizes.min()), "median": float(sizes.median())},
    }
    return EvaluationResult(config, data, list(metric_fns), runs, comparisons, baseline)


def _improves(score: float, best: float, metric: str) -> bool:
    """Strictly better (ties keep the earlier, simpler grid point); NaN never wins."""
    if not np.isfinite(score):
        return False
    if not np.isfinite(best):
        return True
    return score > best if higher_is_better(metric) else score < best


def _training_baseline(train: pd.DataFrame, target: str, task: str) -> pd.Series:
    """Each person's mean training target (regression) or share of the second class."""
    if task == "sequence":
        return pd.Series(dtype=float, name="baseline")
    y = train[target]
    if task == "classification":
        classes = sorted(y.unique(), key=lambda c: (str(type(c)), c))
        y = (y == classes[-1]).astype(float) if len(classes) == 2 else pd.Series(
            np.nan, index=y.index)
    return y.groupby(train["__person"].to_numpy()).mean().rename("baseline")


def _compare(runs: dict[str, RunResult], metrics: list[str], config: EvalConfig
             ) -> list[Comparison]:
    """Every baseline cell against NME in the same placement column, every metric."""
    out = []
    for placement in config.placements:
        ref = runs.get(run_key(REFERENCE, placement))
        if ref is None:
            continue
        for method in config.methods:
            if method == REFERENCE:
                continue
            run = runs.get("generic") if method == "generic" else runs.get(
                run_key(method, placement))
            if run is None:
                continue
            for metric in metrics:
                a, b = _aligned(ref.per_person[metric], run.per_person[metric])
                # orient so that positive means NME is better
                d_ref, d_run = (a, b) if higher_is_better(metric) else (b, a)
                boot = paired_bootstrap(d_ref, d_run, config.n_bootstrap, config.level,
                                        seed=config.seed)
                out.append(Comparison(method, run.placement, placement, metric, boot))
    return out


def _aligned(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    both = a.index.intersection(b.index)
    return a.loc[both].to_numpy(np.float64), b.loc[both].to_numpy(np.float64)


def evaluate_frame(
    df: pd.DataFrame,
    person_col: str,
    target: str,
    features: Sequence[str] | None = None,
    time_col: str | None = None,
    config: EvalConfig = EvalConfig(),
    name: str = "data",
) -> EvaluationResult:
    """The whole protocol on one table (one row per observation).

    ``features=None`` takes every numeric column except the person, target and time columns.
    """
    missing = [c for c in [person_col, target, *([time_col] if time_col else [])]
               if c not in df.columns]
    if missing:
        raise ValueError(f"data has no column(s) {missing}")
    if features is None:
        skip = {person_col, target, time_col}
        features = [c for c in df.columns
                    if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    if not features:
        raise ValueError("no numeric feature columns")
    splits = split_frame(df, person_col, time_col, config.fractions, config.min_test)
    result = evaluate_splits(splits, target, features, config, name)
    result.data["person_col"] = person_col
    result.data["time_col"] = time_col
    result.data["dropped"] = [str(p) for p in splits.dropped]
    return result


# --------------------------------------------------------------------------- sequences
def sequence_tagger_class() -> type | None:
    """:class:`nme.sequence.NMESequenceTagger` if this installation has it, else None."""
    try:
        from nme.sequence import NMESequenceTagger
    except ImportError:
        return None
    return NMESequenceTagger


def evaluate_sequence_frame(
    df: pd.DataFrame,
    person_col: str,
    sequence_col: str,
    label_col: str,
    features: Sequence[str] | None = None,
    position_col: str | None = None,
    group_col: str | None = None,
    config: EvalConfig = EvalConfig(task="sequence"),
    name: str = "data",
) -> EvaluationResult:
    """The protocol for labelled sequences (NME-CRF), one row per segment.

    The split unit is the sequence: each person's sequences, in the order they first appear
    in ``df``, are cut 60/20/20. ``min_test`` counts a person's test *segments*. Segments
    (in ``position_col`` order within a sequence, else row order) are scored like class labels
    (accuracy, α) per person. With ``group_col`` (one value per person, e.g. depressed /
    control), the chosen NME tagger's per-person transition matrices softmax(T̄ + Tⁱ) are
    averaged per group and the first two groups (sorted) compared by a person bootstrap
    (paper Table 5); the result is in ``extras["transitions"]``.
    """
    tagger = sequence_tagger_class()
    if tagger is None:
        raise ValueError("sequence evaluation needs nme.sequence.NMESequenceTagger, "
                         "which this installation lacks")
    if config.task != "sequence":
        raise ValueError("evaluate_sequence_frame needs EvalConfig(task='sequence')")
    needed = [person_col, sequence_col, label_col, *filter(None, [position_col, group_col])]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"data has no column(s) {missing}")
    if features is None:
        features = [c for c in df.columns
                    if c not in needed and pd.api.types.is_numeric_dtype(df[c])]
    features = list(features)
    if not features:
        raise ValueError("no numeric feature columns")
    data = df.assign(__person=df[person_col].astype(str), __seq=df[sequence_col].astype(str))
    if position_col is not None:
        data = data.iloc[np.argsort(data[position_col].to_numpy(), kind="stable")]
    seq_order = pd.unique(df[sequence_col].astype(str))  # file order of first appearance
    groups = data.groupby("__seq", sort=False)
    seqs = pd.DataFrame({"__seq": seq_order})
    owners = groups["__person"].agg(lambda v: v.iloc[0])
    if (groups["__person"].nunique() > 1).any():
        raise ValueError(f"a sequence in {sequence_col!r} spans several persons")
    seqs["__person"] = owners.loc[seq_order].to_numpy()
    seqs["part"] = temporal_split(seqs["__person"].to_numpy(), tuple(config.fractions))
    seqs["length"] = groups.size().loc[seq_order].to_numpy()
    test_segments = seqs[seqs["part"] == 2].groupby("__person")["length"].sum()
    test_segments = test_segments.reindex(pd.unique(seqs["__person"]), fill_value=0)
    dropped = sorted(test_segments.index[test_segments < config.min_test])
    seqs = seqs[~seqs["__person"].isin(dropped)]
    if seqs.empty:
        raise ValueError(f"no person has at least {config.min_test} test segments; "
                         "lower min_test")
    store = {k: (g[features].to_numpy(np.float32), g[label_col].to_numpy(object))
             for k, g in groups}
    parts = {}
    for idx, part in enumerate(("train", "val", "test")):
        rows = seqs[seqs["part"] == idx]
        parts[part] = ([store[k] for k in rows["__seq"]], rows["__person"].tolist())
    train_labels = {lab for _, y in parts["train"][0] for lab in y.tolist()}
    keep = [all(lab in train_labels for lab in y.tolist()) for _, y in parts["val"][0]]
    parts["val"] = ([s for s, k in zip(parts["val"][0], keep, strict=True) if k],
                    [p for p, k in zip(parts["val"][1], keep, strict=True) if k])

    def make(method: str, placement: str | None, params: dict[str, Any]) -> Any:
        return tagger(
            hidden=params["hidden"], placement=placement or "last", method=method,
            lr=params["lr"], weight_decay=params["weight_decay"],
            batch_size=config.sequence_batch_size, max_epochs=config.max_epochs,
            patience=config.patience, device=config.device, random_state=config.seed,
            **config.estimator_params,
        )

    def fit(est: Any) -> None:
        val = parts["val"] if parts["val"][0] else (None, None)
        est.fit(parts["train"][0], parts["train"][1], val[0], val[1])

    def predict(est: Any, part: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sequences, who = parts[part]
        paths = est.predict([x for x, _ in sequences], who)
        truth = np.concatenate([y for _, y in sequences])
        pred = np.asarray([s for path in paths for s in path], dtype=object)
        persons = np.repeat(np.asarray(who, dtype=object), [len(y) for _, y in sequences])
        return truth, pred, persons

    metric_fns = metrics_for("sequence", config.metrics)
    adapter = _Adapter(make, fit, predict, has_val=bool(parts["val"][0]))
    runs, chosen = _search(adapter, config, metric_fns, name)
    comparisons = _compare(runs, list(metric_fns), config)
    n_seg = {p: int(sum(len(y) for _, y in parts[p][0])) for p in parts}
    test_sizes = test_segments.drop(dropped)
    result = EvaluationResult(
        config,
        {"name": name, "target": label_col, "features": features, "task": "sequence",
         "persons": int(len(test_sizes)), "dropped_persons": len(dropped),
         "dropped": [str(p) for p in dropped], "person_col": person_col,
         "sequence_col": sequence_col, "rows": n_seg,
         "sequences": {p: len(parts[p][0]) for p in parts},
         "test_rows_per_person": {"min": int(test_sizes.min()),
                                  "median": float(test_sizes.median())}},
        list(metric_fns), runs, comparisons, pd.Series(dtype=float, name="baseline"),
    )
    if group_col is not None:
        result.extras["transitions"] = _group_transitions(
            data, group_col, chosen, runs, config)
    result.extras["person_transitions"] = _person_transitions(chosen)
    return result


def _person_transitions(chosen: dict[str, Any]) -> dict[str, Any]:
    """Every chosen tagger's per-person transition matrices softmax(T̄ + Tⁱ), for the runs
    whose placement personalises T: ``{run: {"states", "persons", "matrices" (n, S, S)}}``
    (what a comparison with the simulation's true matrices needs)."""
    out: dict[str, Any] = {}
    for key, est in chosen.items():
        if "transitions" not in est.effects_layout_.names:
            continue
        persons = list(est.person_ids_)
        out[key] = {"states": [str(s) for s in est.states_], "persons": persons,
                    "matrices": est.transition_matrices(persons).round(5).tolist()}
    return out


def _group_transitions(data: pd.DataFrame, group_col: str, chosen: dict[str, Any],
                       runs: dict[str, RunResult], config: EvalConfig) -> dict[str, Any] | None:
    """Per-group mean transition matrices of the chosen NME tagger and their difference."""
    from nme.metrics import group_difference_bootstrap

    key = next((run_key(REFERENCE, p) for p in ("last+T", "all+T", "T")
                if run_key(REFERENCE, p) in runs), None)
    if key is None:
        return None
    est = chosen[key]
    person_group = data.groupby("__person")[group_col].agg(lambda v: v.iloc[0])
    persons = [p for p in est.person_ids_ if p in person_group.index]
    mats = est.transition_matrices(persons)  # (n, S, S)
    labels = person_group.loc[persons].astype(str).to_numpy()
    names = sorted(set(labels))
    out: dict[str, Any] = {
        "run": key, "states": [str(s) for s in est.states_],
        "groups": {g: mats[labels == g].mean(axis=0).tolist() for g in names},
        "n": {g: int((labels == g).sum()) for g in names},
    }
    if len(names) >= 2:
        diff, low, high = group_difference_bootstrap(
            mats[labels == names[0]], mats[labels == names[1]], config.n_bootstrap,
            config.level, seed=config.seed)
        out["difference"] = {"groups": names[:2], "diff": diff.tolist(), "low": low.tolist(),
                             "high": high.tolist()}
    return out
