"""Tabular models: one feature vector per user and day, a number (regression) or a class name
(classification) as its label. Trained with ``nme.NMERegressor`` / ``nme.NMEClassifier``;
ingested at ``/observations``; served at ``/predict``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd
import scipy.stats
from sqlalchemy.orm import Session

from nme import NMEClassifier, NMERegressor
from service.errors import Conflict, InvalidInput, invalid
from service.learning.kinds.base import (
    REFIT_CHUNK_ROWS,
    Callback,
    ModelKind,
    Prediction,
    TrainingWarning,
    UserData,
    UserSummary,
    sent,
    temporal_split,
)
from service.learning.validation import (
    MAX_REPORTED_ERRORS,
    check_unique_keys,
    feature_matrix,
)
from service.storage import store
from service.storage.tables import Model, utcnow

FLOAT32_MAX = float(np.finfo(np.float32).max)

OUTLIER_SCALES = 10.0
"""A regression label further than this many robust standard deviations from the median of
the model's labels is a gross outlier that refits leave out (unless a label_range is set)."""


def gross_outliers(labels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Which labels ``(n,)`` are gross outliers, with the median and scale used.

    The scale is the normal-consistent MAD (1.4826 · median |y − median|); when more than half
    the labels are equal (MAD = 0) it falls back to the 1 %–99 % quantile span / 4.65 (the same
    σ for normal data); when that is 0 too, nothing is an outlier. A few poisoned labels move
    neither statistic, and 10 robust SDs is far beyond what honest data reaches.

    Returns:
        ``(mask (n,) bool, median, scale)``.
    """
    median = float(np.median(labels))
    deviation = np.abs(labels - median)
    scale = 1.4826 * float(np.median(deviation))
    if scale == 0.0:
        low, high = np.quantile(labels, [0.01, 0.99])
        scale = float(high - low) / 4.65
    if not np.isfinite(scale) or scale == 0.0:
        return np.zeros(len(labels), dtype=bool), median, scale
    return deviation > OUTLIER_SCALES * scale, median, scale


@dataclass(frozen=True)
class LabelledTable:
    """A model's labelled observations as arrays, rows grouped by user in day order.

    ``x (n, F) float32`` in model feature order; ``y (n,)`` labels; ``user (n,) int64`` each
    row's position in ``external_ids (U,) object`` and ``row_ids (U,) int64`` (users in the
    order they appear); ``days (n,) datetime64[D]``.
    """

    x: np.ndarray
    y: np.ndarray
    user: np.ndarray
    days: np.ndarray
    external_ids: np.ndarray
    row_ids: np.ndarray

    @property
    def n(self) -> int:
        """Number of rows."""
        return int(self.x.shape[0])

    def user_row_ids(self) -> dict[str, int]:
        """External id → user row id of every user with at least one row."""
        present = np.bincount(self.user, minlength=len(self.row_ids)) > 0  # (U,)
        return dict(
            zip(self.external_ids[present].tolist(), self.row_ids[present].tolist(), strict=True)
        )

    def take(self, keep: np.ndarray) -> LabelledTable:
        """The rows where ``keep (n,) bool`` is True (users without rows left stay listed)."""
        return LabelledTable(
            x=self.x[keep], y=self.y[keep], user=self.user[keep], days=self.days[keep],
            external_ids=self.external_ids, row_ids=self.row_ids,
        )


def read_labelled(
    session: Session, *, model: Model, label_dtype: type, chunk_rows: int = REFIT_CHUNK_ROWS
) -> LabelledTable:
    """Stream a model's labelled observations into preallocated arrays, ``chunk_rows`` rows at
    a time (see :func:`store.stream_labelled_observations`).

    The arrays are sized by a count taken just before the read; if the read sees more rows
    (labels that arrived in between), they grow by doubling, and a shorter read is trimmed.
    Peak memory is the arrays plus one chunk of driver rows: no Python object per observation
    outlives its chunk, except one shared string per user (and per class label).
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    n_features = len(model.features)
    capacity = max(store.count_labelled_observations(session, model_id=model.id), 1)
    x = np.empty((capacity, n_features), dtype=np.float32)  # (capacity, F)
    y = np.empty(capacity, dtype=label_dtype)  # (capacity,)
    user = np.empty(capacity, dtype=np.int64)  # (capacity,)
    days = np.empty(capacity, dtype="datetime64[D]")  # (capacity,)
    external_ids: list[str] = []  # (U,), one per user
    row_ids: list[int] = []  # (U,)
    shared_labels: dict[Any, Any] = {}  # class name → one str object for all its rows
    n, previous = 0, -1
    for rows in store.stream_labelled_observations(
        session, model_id=model.id, features=model.features, chunk_rows=chunk_rows,
        float_labels=label_dtype is not object,
    ):
        m = len(rows)
        if n + m > capacity:
            capacity = max(2 * capacity, n + m)
            x, y, user, days = (_grown(a, n, capacity) for a in (x, y, user, days))
        columns = list(zip(*rows, strict=True))  # one tuple per column of the chunk
        ids = np.asarray(columns[1], dtype=np.int64)  # (m,) user row ids
        # Rows come grouped by user: a user starts where the row id changes.
        starts = np.empty(m, dtype=bool)
        starts[0] = ids[0] != previous
        np.not_equal(ids[1:], ids[:-1], out=starts[1:])
        first = len(external_ids)
        new = np.flatnonzero(starts)
        external_ids.extend(np.asarray(columns[0], dtype=object)[new].tolist())
        row_ids.extend(ids[new].tolist())
        user[n : n + m] = first - 1 + np.cumsum(starts)
        # Python floats to float32 in one conversion, as np.array(list of rows) did.
        x[n : n + m] = np.array(columns[4:], dtype=np.float32).reshape(n_features, m).T
        labels = columns[3]
        if label_dtype is object:
            labels = tuple(shared_labels.setdefault(label, label) for label in labels)
        y[n : n + m] = np.asarray(labels, dtype=label_dtype)
        days[n : n + m] = np.asarray(columns[2], dtype=np.int64).view("datetime64[D]")
        n, previous = n + m, int(ids[-1])
    return LabelledTable(
        x=x[:n], y=y[:n], user=user[:n], days=days[:n],
        external_ids=np.array(external_ids, dtype=object),
        row_ids=np.asarray(row_ids, dtype=np.int64),
    )


def _grown(array: np.ndarray, n: int, capacity: int) -> np.ndarray:
    """A ``(capacity, …)`` array of ``array``'s dtype holding its first ``n`` rows."""
    out = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    out[:n] = array[:n]
    return out


class ObservationItem(Protocol):
    """One day of one user, as the ingest route receives it."""

    user_id: str
    day: Any
    features: dict[str, float]
    label: float | str | None


class PredictItem(Protocol):
    """One user's features, as the predict route receives them."""

    user_id: str
    features: dict[str, float]


@dataclass(frozen=True)
class TabularData:
    """A model's labelled observations split for one refit.

    ``x_*`` are ``(n, F)`` float32 in model feature order, ``y_*`` ``(n,)``, ``persons_*`` the
    users' external ids ``(n,) object`` (one shared str per user).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    persons_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    persons_val: np.ndarray
    user_row_ids: dict[str, int]
    read_at: datetime
    warnings: list[TrainingWarning] = field(default_factory=list)

    @property
    def n_observations(self) -> int:
        """Labels used in total (train + validation)."""
        return len(self.persons_train) + len(self.persons_val)


class TabularKind(ModelKind):
    """What regression and classification share: observations in, ``/predict`` out."""

    routes: ClassVar[frozenset[str]] = frozenset({"observations", "predict"})
    label_dtype: ClassVar[type] = object
    """numpy dtype of the label array the estimator is fitted on."""

    # ------------------------------------------------------------------ labels

    @abstractmethod
    def label_error(self, model: Model, label: float | str) -> str | None:
        """Why ``label`` is unusable for this model, or None when it is fine."""

    def check_labels(
        self, model: Model, labels: Sequence[float | str | None], locs: Sequence[list[str | int]]
    ) -> None:
        """422 with one entry per unusable label (None, meaning unlabelled, is fine)."""
        errors = []
        for label, loc in zip(labels, locs, strict=True):
            if label is None:
                continue
            message = self.label_error(model, label)
            if message is not None:
                errors.append(invalid(loc, message, "label"))
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        if errors:
            raise InvalidInput(errors)

    # ------------------------------------------------------------------ ingest

    def ingest(
        self, session: Session, *, model: Model, items: Sequence[ObservationItem]
    ) -> store.UpsertCounts:
        """Validate daily observations against the model's schema and upsert them."""
        feature_matrix(
            model.features,
            [item.features for item in items],
            [["body", "items", i, "features"] for i in range(len(items))],
        )
        self.check_labels(
            model,
            [item.label for item in items],
            [["body", "items", i, "label"] for i in range(len(items))],
        )
        check_unique_keys([(item.user_id, item.day) for item in items], "(user_id, day)")
        user_ids = store.ensure_users(session, external_ids=[item.user_id for item in items])
        rows = [
            {
                "user_id": user_ids[item.user_id],
                "day": item.day,
                # Canonical key order: identical content serialises identically (SQLite compares
                # JSON as text when deciding whether a resend changed anything).
                "features": {name: item.features[name] for name in model.features},
                **({"label": item.label} if sent(item, "label") else {}),
            }
            for item in items
        ]
        return store.upsert_observations(session, model_id=model.id, rows=rows)

    # ------------------------------------------------------------------ training

    def load_training_data(
        self, session: Session, *, model: Model, chunk_rows: int = REFIT_CHUNK_ROWS
    ) -> TabularData:
        """Every labelled observation, per user in day order, split per user in time.

        Streamed: the rows arrive ``chunk_rows`` at a time straight into preallocated arrays
        (:func:`read_labelled`), so a refit never holds a Python object per observation.
        """
        read_at = utcnow()
        table = read_labelled(
            session, model=model, label_dtype=self.label_dtype, chunk_rows=chunk_rows
        )
        keep, warnings = self.screen_labels(model, table)
        if keep is not None:
            table = table.take(keep)
        if table.n == 0:
            raise Conflict(f"model {model.name!r} has no labelled observations to train on")
        is_val = temporal_split(table.user)
        # One str object per user, shared by that user's rows: 8 bytes per row, not a string.
        persons = table.external_ids[table.user]  # (n,) object
        return TabularData(
            x_train=table.x[~is_val],
            y_train=table.y[~is_val],
            persons_train=persons[~is_val],
            x_val=table.x[is_val],
            y_val=table.y[is_val],
            persons_val=persons[is_val],
            user_row_ids=table.user_row_ids(),
            read_at=read_at,
            warnings=warnings,
        )

    def screen_labels(
        self, model: Model, table: LabelledTable
    ) -> tuple[np.ndarray | None, list[TrainingWarning]]:
        """Which labelled rows a refit may train on (``(n,) bool``; None: all), and warnings
        saying why the others were left out (default: all are kept)."""
        return None, []

    def _fit(
        self, model: Model, estimator: Any, data: TabularData, callback: Callback | None
    ) -> None:
        features = model.features
        has_val = len(data.persons_val) > 0
        estimator.fit(
            pd.DataFrame(data.x_train, columns=features),
            data.y_train,
            data.persons_train,
            X_val=pd.DataFrame(data.x_val, columns=features) if has_val else None,
            y_val=data.y_val if has_val else None,
            persons_val=data.persons_val if has_val else None,
            callback=callback,
        )

    def score(
        self,
        estimator: Any,
        data: TabularData,
        *,
        effects: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> float:
        return float(
            estimator.score_per_person(
                data.x_val, data.y_val, data.persons_val, effects=effects, known=known
            )
        )

    def baseline_score(self, data: TabularData) -> float | None:
        if len(data.persons_val) == 0:
            return None
        return per_person_mean(self.trivial_scores(data), data.persons_val)

    @abstractmethod
    def trivial_scores(self, data: TabularData) -> np.ndarray:
        """Per validation item ``(n_val,)``: the trivial predictor's loss or hit."""

    def person_train_inputs(self, data: TabularData, index: list[int]) -> tuple[Any, Any]:
        return data.x_train[index], data.y_train[index]

    # ------------------------------------------------------------------ per-user update

    def user_data(
        self, session: Session, *, model: Model, user_id: int, estimator: Any
    ) -> UserData:
        rows = [
            row
            for row in store.load_user_observations(session, model_id=model.id, user_id=user_id)
            if self.learnable(estimator, row.label)
        ]
        x = np.array([[row.features[name] for name in model.features] for row in rows], np.float32)
        x = x.reshape(len(rows), len(model.features))  # (n, F), also when n = 0
        y = np.asarray([row.label for row in rows], dtype=self.label_dtype)
        return UserData(inputs=(x, y), n=len(rows))

    def learnable(self, estimator: Any, label: float | str) -> bool:
        """Whether a per-user update of ``estimator`` can learn from ``label``."""
        return True

    # ------------------------------------------------------------------ serving

    def serving_input(self, model: Model, items: Sequence[PredictItem]) -> np.ndarray:
        return feature_matrix(
            model.features,
            [item.features for item in items],
            [["body", "items", i, "features"] for i in range(len(items))],
        )


class RegressionKind(TabularKind):
    """A real-valued label per day (e.g. a mood rating); scored by negative RMSE."""

    task = "regression"
    estimator_class = NMERegressor
    score_name = "neg_rmse"
    label_dtype = np.float64
    supports_intervals = True

    def label_error(self, model: Model, label: float | str) -> str | None:
        if not isinstance(label, float):
            return "a regression label must be a number"
        if not abs(label) <= FLOAT32_MAX:
            return f"label {label:g} overflows float32 (|label| must be at most {FLOAT32_MAX:.4g})"
        if model.label_range is not None:
            low, high = model.label_range
            if not low <= label <= high:
                return f"label {label:g} is outside the model's label_range [{low:g}, {high:g}]"
        return None

    def trivial_scores(self, data: TabularData) -> np.ndarray:
        mean = float(np.mean(data.y_train.astype(np.float64)))
        return (data.y_val.astype(np.float64) - mean) ** 2  # squared errors (n_val,)

    def baseline_score(self, data: TabularData) -> float | None:
        # negative per-person RMSE, like NMERegressor.score_per_person
        if len(data.persons_val) == 0:
            return None
        squared = self.trivial_scores(data)
        persons = np.asarray(data.persons_val)
        users, index = np.unique(persons, return_inverse=True)
        mse = np.bincount(index, weights=squared) / np.bincount(index)
        return -float(np.mean(np.sqrt(mse)))

    def learnable(self, estimator: Any, label: float | str) -> bool:
        """A per-user update leaves out a label the refit would have screened out: one further
        than twice the outlier threshold from the version's training mean, in its training SDs
        (the training labels were screened, so their SD is an honest scale)."""
        scaler = estimator.y_scaler_
        mean, std = float(scaler.mean), float(scaler.std)
        return abs(float(label) - mean) <= 2 * OUTLIER_SCALES * std

    def screen_labels(
        self, model: Model, table: LabelledTable
    ) -> tuple[np.ndarray | None, list[TrainingWarning]]:
        """Without a declared ``label_range``, leave out gross outliers (see
        :func:`gross_outliers`): one mistyped label of 1e30 must not wreck every user's model."""
        if model.label_range is not None or table.n == 0:
            return None, []
        outlier, median, scale = gross_outliers(table.y.astype(np.float64, copy=False))
        if not outlier.any():
            return None, []
        left_out = np.flatnonzero(outlier)  # (k,) row positions, in user and day order
        shown = [
            {
                "user_id": str(table.external_ids[table.user[i]]),
                "day": str(table.days[i]),
                "label": float(table.y[i]),
            }
            for i in left_out[:20]
        ]
        examples = ", ".join(f"{s['label']:g} ({s['user_id']!r}, {s['day']})" for s in shown[:5])
        warning = TrainingWarning(
            kind="labels_skipped",
            detail=f"{len(left_out)} label(s) lie more than {OUTLIER_SCALES:g} robust standard "
            f"deviations from the median {median:.4g} (scale {scale:.4g}) and were left out of "
            f"training: {examples}{' …' if len(left_out) > 5 else ''}. Declare the model's "
            "label_range to refuse such labels at ingest instead.",
            data={
                "n_labels": len(left_out),
                "median": median,
                "scale": scale,
                "threshold": OUTLIER_SCALES,
                "labels": shown,
            },
        )
        return ~outlier, [warning]

    def predict(
        self,
        model: Model,
        estimator: NMERegressor,
        *,
        x: np.ndarray,
        effects: np.ndarray,
        known: np.ndarray,
        user_ids: Sequence[str],
        coverage: float | None = None,
        variance: np.ndarray | None = None,
    ) -> list[Prediction]:
        if coverage is None:
            values = estimator.predict_with_effects(x, effects, known)  # (n,)
            return [
                Prediction(
                    user_id=user_id, prediction=float(values[i]), personalized=bool(known[i])
                )
                for i, user_id in enumerate(user_ids)
            ]
        mean, std = estimator.predict_with_effects(  # (n,) each, label scale
            x, effects, known, effects_variance=variance, return_std=True
        )
        z = float(scipy.stats.norm.ppf(0.5 + coverage / 2))
        return [
            Prediction(
                user_id=user_id,
                prediction=float(mean[i]),
                personalized=bool(known[i]),
                lower=float(mean[i] - z * std[i]),
                upper=float(mean[i] + z * std[i]),
            )
            for i, user_id in enumerate(user_ids)
        ]

    def prior_variance(self, estimator: NMERegressor, n_features: int) -> np.ndarray:
        """``(d,)`` the prior Σ: the posterior variance of a user with no labels (stands in
        for rows stored before variances were)."""
        _, variance = estimator.fit_person(
            np.zeros((0, n_features), np.float32), np.zeros(0), return_variance=True
        )
        return np.asarray(variance, dtype=np.float32)

    def user_summary(
        self, model: Model, estimator: NMERegressor, effects: np.ndarray | None
    ) -> UserSummary:
        row = _row(estimator, effects)
        return UserSummary(bias=float(estimator.person_bias(row)[0]))


class ClassificationKind(TabularKind):
    """One of the model's classes per day; scored by accuracy."""

    task = "classification"
    estimator_class = NMEClassifier
    score_name = "accuracy"

    def _set_outputs(self, estimator: Any, labels: list[str] | None) -> None:
        estimator.classes_ = list(labels or [])

    def label_error(self, model: Model, label: float | str) -> str | None:
        if label in (model.classes or []):
            return None
        return f"unknown class {label!r}; expected one of {', '.join(model.classes or [])}"

    def check_trainable(self, model: Model, data: Any) -> None:
        if len(set(data.y_train.tolist())) < 2:
            raise Conflict(f"model {model.name!r} needs labels of at least two classes to train")

    def trivial_scores(self, data: TabularData) -> np.ndarray:
        values, counts = np.unique(data.y_train.astype(str), return_counts=True)
        return (data.y_val.astype(str) == values[np.argmax(counts)]).astype(np.float64)

    def learnable(self, estimator: Any, label: float | str) -> bool:
        # Only a refit can learn a class the version never saw.
        return label in {str(c) for c in estimator.classes_}

    def predict(
        self,
        model: Model,
        estimator: NMEClassifier,
        *,
        x: np.ndarray,
        effects: np.ndarray,
        known: np.ndarray,
        user_ids: Sequence[str],
        coverage: float | None = None,
        variance: np.ndarray | None = None,
    ) -> list[Prediction]:
        # The route refuses intervals here: the probabilities are this kind's uncertainty.
        assert coverage is None, "classification models answer no intervals"
        proba = estimator.predict_proba_with_effects(x, effects, known)  # (n, n_classes)
        classes = [str(c) for c in estimator.classes_]
        best = proba.argmax(axis=1)
        return [
            Prediction(
                user_id=user_id,
                prediction=classes[best[i]],
                personalized=bool(known[i]),
                probabilities=_class_map(model, classes, proba[i]),
            )
            for i, user_id in enumerate(user_ids)
        ]

    def user_summary(
        self, model: Model, estimator: NMEClassifier, effects: np.ndarray | None
    ) -> UserSummary:
        bias = estimator.person_bias(_row(estimator, effects))  # (1, n_classes)
        classes = [str(c) for c in estimator.classes_]
        return UserSummary(
            bias={name: float(value) for name, value in zip(classes, bias[0], strict=True)}
        )


def per_person_mean(values: np.ndarray, persons: list[str]) -> float:
    """Mean over persons of each person's mean of ``values (n,)``."""
    _, index = np.unique(np.asarray(persons), return_inverse=True)
    return float(np.mean(np.bincount(index, weights=values) / np.bincount(index)))


def _row(estimator: Any, effects: np.ndarray | None) -> np.ndarray:
    """A user's θⁱ as a ``(1, d)`` batch (zeros: the generic model)."""
    if effects is None:
        return np.zeros((1, estimator.n_effects_), dtype=np.float32)
    return effects[None]


def _class_map(model: Model, trained: list[str], proba: np.ndarray) -> dict[str, float]:
    # A class with no training labels is absent from the estimator: probability 0.
    by_name = dict(zip(trained, proba.tolist(), strict=True))
    return {name: float(by_name.get(name, 0.0)) for name in model.classes or trained}
