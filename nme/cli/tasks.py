"""What ``nme fit`` and ``nme predict`` do differently per task.

Both commands run one path for every task (:mod:`nme.cli.fit`, :mod:`nme.cli.predict`). A
:class:`Task` supplies only what differs: the columns it reads besides the features, how the
checked frame becomes training items (rows, or whole sequences), which estimator it fits, which
validation items that estimator cannot score, and how predictions become output columns.
"""

from __future__ import annotations

import abc
import argparse
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from nme.base import _NMEEstimator
from nme.cli.inputs import (
    CLI_FILE,
    CLIError,
    check_target,
    require_complete,
    sequence_order,
)
from nme.estimators import NMEClassifier, NMERegressor
from nme.sequence import NMESequenceTagger


@dataclass(frozen=True)
class Items:
    """Training input of a task: one entry per item (a row, or a whole sequence).

    Attributes:
        persons: ``(n,)`` the person of each item.
        features: the items' feature rows, one frame (rows) or one frame per sequence.
        labels: ``(n,)`` the rows' targets, or one ``(Lₖ,)`` array of states per sequence.
    """

    persons: np.ndarray
    features: pd.DataFrame | list[pd.DataFrame]
    labels: np.ndarray | list[np.ndarray]

    def __len__(self) -> int:
        return len(self.persons)

    def take(self, keep: np.ndarray) -> Items:
        """The items where ``keep: (n,) bool`` is True, in order."""
        if isinstance(self.features, pd.DataFrame):
            assert isinstance(self.labels, np.ndarray)
            return Items(self.persons[keep], self.features[keep], self.labels[keep])
        chosen = np.flatnonzero(keep)
        return Items(self.persons[keep], [self.features[k] for k in chosen],
                     [self.labels[k] for k in chosen])


@dataclass(frozen=True)
class Predictions:
    """What ``predict`` writes and reports.

    Attributes:
        frame: the input rows plus the prediction columns, in input order.
        what: how the summary counts them, e.g. ``"300 predictions"``.
        n_items: predicted items (rows or sequences); ``n_known`` of them of known persons.
    """

    frame: pd.DataFrame
    what: str
    n_items: int
    n_known: int


class Task(abc.ABC):
    """One value of ``--task``: the task-specific steps of ``fit`` and ``predict``."""

    name: ClassVar[str]
    estimator_class: ClassVar[type[_NMEEstimator]]
    item: ClassVar[str]
    """What one training item is, plural: ``"rows"`` or ``"sequences"``."""
    metric: ClassVar[str]
    """How the summary names the validation metric, e.g. ``"RMSE"``."""
    metric_note: ClassVar[str] = ""
    """Said after the validation metric in the summary."""
    sigma2_note: ClassVar[str]
    """What σ² is, in the summary."""
    reports_ignored_columns: ClassVar[bool] = True
    """Whether ``fit`` names the non-numeric columns its default feature choice leaves out."""

    def defaults(self) -> dict[str, Any]:
        """The estimator's own defaults, so ``--help`` never drifts from the Python API."""
        return {n: p.default for n, p in inspect.signature(self.estimator_class).parameters.items()}

    # ----------------------------------------------------------------- fit
    def key_columns(self, args: argparse.Namespace) -> list[str]:
        """Every non-feature column ``fit`` reads (person and target first)."""
        return [args.person_col, args.target, *([args.time_col] if args.time_col else [])]

    @abc.abstractmethod
    def reserved_columns(self, args: argparse.Namespace) -> tuple[list[str], str]:
        """The columns ``--features`` must not name, and how the error calls them."""

    @abc.abstractmethod
    def check_frame(
        self, df: pd.DataFrame, features: list[str], args: argparse.Namespace, path: Path
    ) -> None:
        """Check the columns' values (missing values, the target); raise :class:`CLIError`."""

    @abc.abstractmethod
    def items(
        self, df: pd.DataFrame, features: list[str], args: argparse.Namespace, path: Path
    ) -> Items:
        """The training items of the checked frame (rows already in time order)."""

    def drop_unseen(self, train: Items, val: Items, target: str) -> Items:
        """The validation items the estimator fitted on ``train`` can score (all here)."""
        return val

    @abc.abstractmethod
    def estimator(self, options: dict[str, Any], args: argparse.Namespace) -> _NMEEstimator:
        """The unfitted estimator from the options every task shares, plus its own."""

    @abc.abstractmethod
    def fit(self, est: _NMEEstimator, train: Items, val: Items) -> None:
        """Fit ``est`` on ``train``, validating on ``val`` unless it is empty."""

    def meta(self, args: argparse.Namespace) -> dict[str, Any]:
        """What ``cli.json`` records besides the columns every task has."""
        return {}

    def summary_lines(self, est: _NMEEstimator) -> list[str]:
        """Extra lines of the fit summary, after the item counts."""
        return []

    # ----------------------------------------------------------------- predict
    def predict_columns(self, args: argparse.Namespace, meta: dict[str, Any]) -> list[str]:
        """Columns besides the person and the features that ``predict`` reads."""
        return []

    @abc.abstractmethod
    def predict(
        self,
        est: _NMEEstimator,
        df: pd.DataFrame,
        person_col: str,
        features: list[str],
        args: argparse.Namespace,
        meta: dict[str, Any],
    ) -> Predictions:
        """Predict every row of the checked frame."""


class _RowTask(Task):
    """Regression and classification: one item per row, an MLP estimator."""

    item = "rows"

    def reserved_columns(self, args: argparse.Namespace) -> tuple[list[str], str]:
        return [args.person_col, args.target], "the person or target column"

    def check_frame(
        self, df: pd.DataFrame, features: list[str], args: argparse.Namespace, path: Path
    ) -> None:
        key_cols = self.key_columns(args)
        # reported in this order: person, target, the features, then the time column
        require_complete(df, [*key_cols[:2], *features, *key_cols[2:]], path)
        check_target(df[args.target], args.target, self.name, path)

    def items(
        self, df: pd.DataFrame, features: list[str], args: argparse.Namespace, path: Path
    ) -> Items:
        return Items(df[args.person_col].to_numpy(), df[features], df[args.target].to_numpy())

    def estimator(self, options: dict[str, Any], args: argparse.Namespace) -> _NMEEstimator:
        return self.estimator_class(**options)

    def fit(self, est: _NMEEstimator, train: Items, val: Items) -> None:
        assert isinstance(est, NMERegressor | NMEClassifier)
        validation: dict[str, Any] = {}
        if len(val):
            validation = {"X_val": val.features, "y_val": val.labels, "persons_val": val.persons}
        est.fit(train.features, train.labels, train.persons, **validation)

    def predict(
        self,
        est: _NMEEstimator,
        df: pd.DataFrame,
        person_col: str,
        features: list[str],
        args: argparse.Namespace,
        meta: dict[str, Any],
    ) -> Predictions:
        # a model fitted on a plain matrix calls its features x0, x1, ...: the CSV must too
        X = df[features]
        persons = df[person_col].to_numpy()
        result = df.copy()
        self.add_predictions(result, est, X, persons)
        known = sum(p in est.persons_ for p in persons)
        return Predictions(result, f"{len(result)} predictions", len(result), known)

    @abc.abstractmethod
    def add_predictions(
        self, result: pd.DataFrame, est: _NMEEstimator, X: pd.DataFrame, persons: np.ndarray
    ) -> None:
        """Add the prediction columns for ``X: (n, F)`` to ``result`` (n rows)."""


class RegressionTask(_RowTask):
    name = "regression"
    estimator_class = NMERegressor
    metric = "RMSE"
    sigma2_note = "mean training loss, z-scored target"

    def add_predictions(
        self, result: pd.DataFrame, est: _NMEEstimator, X: pd.DataFrame, persons: np.ndarray
    ) -> None:
        assert isinstance(est, NMERegressor)
        result["prediction"] = est.predict(X, persons)


class ClassificationTask(_RowTask):
    name = "classification"
    estimator_class = NMEClassifier
    metric = "accuracy"
    sigma2_note = "mean training loss, cross-entropy"

    def drop_unseen(self, train: Items, val: Items, target: str) -> Items:
        # the classifier knows only the classes of its training rows
        if not len(val):
            return val
        unseen = ~pd.Series(val.labels).isin(set(train.labels)).to_numpy()
        if unseen.any():
            print(f"nme: leaving {int(unseen.sum())} validation rows out: their {target!r} "
                  "classes do not occur in the training rows", file=sys.stderr)
        return val.take(~unseen)

    def add_predictions(
        self, result: pd.DataFrame, est: _NMEEstimator, X: pd.DataFrame, persons: np.ndarray
    ) -> None:
        assert isinstance(est, NMEClassifier)
        proba = est.predict_proba(X, persons)
        result["prediction"] = np.asarray(est.classes_, dtype=object)[proba.argmax(-1)]
        for k, label in enumerate(est.classes_):
            result[f"proba_{label}"] = proba[:, k]


class SequenceTask(Task):
    """One item per sequence of segment rows, an NME-CRF tagger."""

    name = "sequence"
    estimator_class = NMESequenceTagger
    item = "sequences"
    metric = "accuracy"
    metric_note = " (Viterbi, per segment)"
    sigma2_note = "mean training CRF NLL per sequence"
    reports_ignored_columns = False

    def key_columns(self, args: argparse.Namespace) -> list[str]:
        if not args.sequence_col:
            raise CLIError("--task sequence needs --sequence-col (the column with sequence ids)")
        order = [c for c in (args.position_col, args.time_col) if c]
        return [args.person_col, args.target, args.sequence_col, *order]

    def reserved_columns(self, args: argparse.Namespace) -> tuple[list[str], str]:
        return (self.key_columns(args),
                "the person, target, sequence, position or time column")

    def check_frame(
        self, df: pd.DataFrame, features: list[str], args: argparse.Namespace, path: Path
    ) -> None:
        require_complete(df, [*self.key_columns(args), *features], path)

    def items(
        self, df: pd.DataFrame, features: list[str], args: argparse.Namespace, path: Path
    ) -> Items:
        order, starts = sequence_order(df, args.person_col, args.sequence_col,
                                       args.position_col, path)
        rows = df.iloc[order]
        X, y = rows[features], rows[args.target].to_numpy()
        spans = list(zip(starts[:-1], starts[1:], strict=True))
        return Items(rows[args.person_col].to_numpy()[starts[:-1]],
                     [X.iloc[a:b] for a, b in spans], [y[a:b] for a, b in spans])

    def drop_unseen(self, train: Items, val: Items, target: str) -> Items:
        # the tagger knows only the states of its training sequences
        if not len(val):
            return val
        states = {s for labels in train.labels for s in labels}
        keep = np.array([all(s in states for s in labels) for labels in val.labels], dtype=bool)
        if not keep.all():
            print(f"nme: leaving {len(keep) - int(keep.sum())} validation sequences out: they "
                  f"have {target!r} states that do not occur in the training sequences",
                  file=sys.stderr)
        return val.take(keep)

    def estimator(self, options: dict[str, Any], args: argparse.Namespace) -> _NMEEstimator:
        return NMESequenceTagger(**options, learn_start_end=args.learn_start_end,
                                 allowed=args.forbid)

    def fit(self, est: _NMEEstimator, train: Items, val: Items) -> None:
        assert isinstance(est, NMESequenceTagger)
        validation: dict[str, Any] = {}
        if len(val):
            validation = {"sequences_val": list(zip(val.features, val.labels, strict=True)),
                          "persons_val": val.persons}
        est.fit(list(zip(train.features, train.labels, strict=True)), train.persons,
                **validation)

    def meta(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"sequence_col": args.sequence_col, "position_col": args.position_col}

    def summary_lines(self, est: _NMEEstimator) -> list[str]:
        assert isinstance(est, NMESequenceTagger)
        return [f"states:          {', '.join(map(str, est.states_))}"]

    # ----------------------------------------------------------------- predict
    def _columns(
        self, args: argparse.Namespace, meta: dict[str, Any]
    ) -> tuple[str, str | None]:
        """The sequence and position columns: given, else the ones used at fit time."""
        sequence_col = args.sequence_col or meta.get("sequence_col")
        if not sequence_col:
            raise CLIError(f"{args.model} has no {CLI_FILE}; pass --sequence-col")
        return sequence_col, args.position_col or meta.get("position_col")

    def predict_columns(self, args: argparse.Namespace, meta: dict[str, Any]) -> list[str]:
        sequence_col, position_col = self._columns(args, meta)
        return [sequence_col, *([position_col] if position_col else [])]

    def predict(
        self,
        est: _NMEEstimator,
        df: pd.DataFrame,
        person_col: str,
        features: list[str],
        args: argparse.Namespace,
        meta: dict[str, Any],
    ) -> Predictions:
        """The Viterbi state and the state marginals of every segment."""
        assert isinstance(est, NMESequenceTagger)
        sequence_col, position_col = self._columns(args, meta)
        order, starts = sequence_order(df, person_col, sequence_col, position_col, args.data)
        X = df.iloc[order][features]
        spans = list(zip(starts[:-1], starts[1:], strict=True))
        persons = df[person_col].to_numpy()[order][starts[:-1]]
        feats = [X.iloc[a:b] for a, b in spans]
        paths = est.predict(feats, persons)
        margs = np.concatenate(est.predict_marginals(feats, persons))  # (n_rows, S), sorted order
        result = df.copy()
        prediction = np.empty(len(df), dtype=object)
        prediction[order] = np.concatenate([np.asarray(p, dtype=object) for p in paths])
        result["prediction"] = prediction
        for k, state in enumerate(est.states_):
            column = np.empty(len(df))
            column[order] = margs[:, k]
            result[f"proba_{state}"] = column
        known = sum(p in est.persons_ for p in persons)
        return Predictions(result, f"{len(result)} segment predictions of {len(spans)} sequences",
                           len(spans), known)


TASKS: dict[str, Task] = {
    task.name: task for task in (RegressionTask(), ClassificationTask(), SequenceTask())
}


def task_of(est: _NMEEstimator) -> Task:
    """The task of a loaded estimator (an artifact saved from Python has no ``cli.json``)."""
    for task in TASKS.values():
        if isinstance(est, task.estimator_class):
            return task
    raise CLIError(f"no nme command handles a {type(est).__name__}")
