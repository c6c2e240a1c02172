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
    Callback,
    ModelKind,
    Prediction,
    TrainingWarning,
    UserData,
    UserSummary,
    sent,
    split_persons,
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
    users' external ids ``(n,)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    persons_train: list[str]
    x_val: np.ndarray
    y_val: np.ndarray
    persons_val: list[str]
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

    def load_training_data(self, session: Session, *, model: Model) -> TabularData:
        """Every labelled observation, per user in day order, split per user in time."""
        read_at = utcnow()
        rows, warnings = self.screen_labels(
            model, store.load_labelled_observations(session, model_id=model.id)
        )
        if not rows:
            raise Conflict(f"model {model.name!r} has no labelled observations to train on")
        persons = [row.external_id for row in rows]
        x = np.array(
            [[row.features[name] for name in model.features] for row in rows], dtype=np.float32
        )
        y = np.asarray([row.label for row in rows], dtype=self.label_dtype)
        is_val = temporal_split(persons)
        persons_train, persons_val = split_persons(persons, is_val)
        return TabularData(
            x_train=x[~is_val],
            y_train=y[~is_val],
            persons_train=persons_train,
            x_val=x[is_val],
            y_val=y[is_val],
            persons_val=persons_val,
            user_row_ids={row.external_id: row.user_id for row in rows},
            read_at=read_at,
            warnings=warnings,
        )

    def screen_labels(
        self, model: Model, rows: list[Any]
    ) -> tuple[list[Any], list[TrainingWarning]]:
        """Leave out labelled rows a refit must not train on, saying why (default: none)."""
        return rows, []

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
        if not data.persons_val:
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
        if not data.persons_val:
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
        self, model: Model, rows: list[Any]
    ) -> tuple[list[Any], list[TrainingWarning]]:
        """Without a declared ``label_range``, leave out gross outliers (see
        :func:`gross_outliers`): one mistyped label of 1e30 must not wreck every user's model."""
        if model.label_range is not None or not rows:
            return rows, []
        labels = np.array([row.label for row in rows], dtype=np.float64)  # (n,)
        outlier, median, scale = gross_outliers(labels)
        if not outlier.any():
            return rows, []
        left_out = [row for row, bad in zip(rows, outlier, strict=True) if bad]
        shown = [
            {"user_id": row.external_id, "day": str(row.day), "label": float(row.label)}
            for row in left_out[:20]
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
        return [row for row, bad in zip(rows, outlier, strict=True) if not bad], [warning]

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
