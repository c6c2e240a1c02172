"""What every kind of model provides to the service, and what all kinds share.

A *kind* is one family of tasks that trains, scores and serves the same way: tabular (regression,
classification) or sequence. It is the only place that knows how they differ. The refit
pipeline, champion/challenger, the per-user update, ingest and serving ask the model's kind
(:func:`service.learning.kinds.kind_of`) instead of branching on ``model.task``.

A new kind of model is one new module here with a :class:`ModelKind` subclass, registered in
``kinds/__init__.py``, plus its request schema.

Defaults are not repeated in the service: whatever a client leaves out is read from the
estimator class's signature when the model is created, and the resolved settings are stored
with the model, so every refit of it trains the same way — also after a release changes the
estimators' defaults: models the service already stores keep the settings they were created
with, new models get the new defaults. That includes the fit procedure a client cannot choose
(:data:`PINNED_TRAINING_KEYS`); models stored before it was recorded train with the values of
that time (:data:`LEGACY_TRAINING`).
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sqlalchemy.orm import Session

from nme import NMEClassifier, NMERegressor, NMESequenceTagger
from service.errors import Conflict, InvalidInput, invalid
from service.storage import store
from service.storage.tables import Model

Estimator = NMERegressor | NMEClassifier | NMESequenceTagger
"""Every fitted estimator the service holds."""

REFIT_CHUNK_ROWS = 50_000
"""Labelled rows a refit reads per chunk (``NME_REFIT_CHUNK_ROWS``)."""

Callback = Callable[[dict[str, Any]], None]
"""Called with each training epoch's record (the job's progress)."""

ARCHITECTURE_KEYS = ("hidden", "placement", "method", "activation", "dropout")
TRAINING_KEYS = (
    "max_epochs",
    "lr",
    "weight_decay",
    "batch_size",
    "patience",
    "anneal",
    "random_state",
)
PINNED_TRAINING_KEYS = ("m_step", "e_step", "tol", "n_iter_no_change")
"""How the estimator fits, which the API does not let a client choose but which the stored
definition records like :data:`TRAINING_KEYS`, so that a change of these defaults (the exact
E-step, the Laplace M-step and the convergence test came that way) reaches new models only."""

LEGACY_TRAINING: dict[str, dict[str, Any]] = {
    task: {"m_step": "paper" if task == "regression" else "laplace", "e_step": "sgd",
           "tol": None, "n_iter_no_change": 10}
    for task in ("regression", "classification", "sequence")
}
LEGACY_TRAINING["sequence"]["sigma2"] = "mean_loss"
"""The fit procedure of models stored before :data:`PINNED_TRAINING_KEYS` were recorded: the
estimators' behaviour when those models were created (the paper's M-step for regression, the
Laplace one otherwise; θⁱ as the epochs left them, i.e. ``e_step="sgd"``; no convergence test,
``tol=None``; σ² = the mean loss for sequence models, the tagger's default until σ² = ½)."""

SERVICE_DEFAULTS = {"random_state": 0}
"""Where the service deliberately differs from the estimators: refits are reproducible."""

NULL_MEANS_NONE = frozenset({"anneal"})
"""Settings whose explicit null is a value of its own (``anneal: null`` is the plain M-step);
for every other setting null means "the default", like leaving it out."""


@dataclass(frozen=True)
class ParameterBudget:
    """The largest network a model definition may ask for (``NME_MAX_GENERIC_PARAMETERS``,
    ``NME_MAX_PERSON_PARAMETERS``)."""

    max_generic: int
    max_person: int

    def check(self, *, generic: int, person: int) -> None:
        """422 naming ``hidden`` (θ̄ too large) or ``placement`` (θⁱ per user too large)."""
        if generic > self.max_generic:
            raise InvalidInput(
                [
                    invalid(
                        ["body", "architecture", "hidden"],
                        f"the network has {generic:,} generic parameters (θ̄); at most "
                        f"{self.max_generic:,} are allowed (NME_MAX_GENERIC_PARAMETERS): use "
                        "fewer or narrower hidden layers, or fewer features",
                        "parameter_budget",
                    )
                ]
            )
        if person > self.max_person:
            raise InvalidInput(
                [
                    invalid(
                        ["body", "architecture", "placement"],
                        f"this placement gives every user {person:,} person-specific parameters "
                        f"(θⁱ, {person * 4:,} bytes per user); at most {self.max_person:,} are "
                        "allowed (NME_MAX_PERSON_PARAMETERS): place θⁱ on fewer layers "
                        "(e.g. last) or narrow them",
                        "parameter_budget",
                    )
                ]
            )


_SETTING_FIELDS = {
    **{key: "architecture" for key in ARCHITECTURE_KEYS},
    **{key: "training" for key in TRAINING_KEYS},
    "learn_start_end": "architecture",
}


def _field_of(message: str) -> list[str | int]:
    """The request field an estimator's ``ValueError`` is about (its messages start with the
    parameter's name; placement and transition problems are recognised by their wording)."""
    first = message.split(" ", 1)[0]
    if first in _SETTING_FIELDS:
        return ["body", _SETTING_FIELDS[first], first]
    if "placement" in message or "start/end" in message:
        return ["body", "architecture", "placement"]
    if "allowed" in message or "transition" in message:
        return ["body", "architecture", "forbidden_transitions"]
    return ["body", "architecture"]

VALIDATION_FRACTION = 0.2
"""Each user's last 20 % of labels (in time order) validate; the rest train."""


@dataclass(frozen=True)
class TrainingWarning:
    """Something a refit left out of training and says so in the model's event log."""

    kind: str
    """The event kind (``labels_skipped`` or ``sequences_skipped``)."""
    detail: str
    data: dict[str, Any]


class TrainingData(Protocol):
    """A model's labelled data split for one refit (each kind has its own concrete class).

    ``persons_*`` hold the users' external ids, one per training item, grouped by user in time
    order; ``user_row_ids`` maps them to user row ids; ``read_at`` is when the data was read.
    """

    persons_train: Sequence[str] | np.ndarray
    persons_val: Sequence[str] | np.ndarray
    user_row_ids: dict[str, int]
    read_at: datetime
    warnings: list[TrainingWarning]
    """What was left out of training and why (recorded as events)."""

    @property
    def n_observations(self) -> int:
        """Labelled items used in total (train + validation)."""
        ...


@dataclass(frozen=True)
class UserData:
    """All of one user's usable labels in the estimator's input form (``fit_person(*inputs)``)
    and how many labelled items they are."""

    inputs: tuple[Any, Any]
    n: int


@dataclass(frozen=True)
class Prediction:
    """One user's answer from ``/predict``: the value on the label's scale (a class name for
    classification, with every class's probability) and whether θⁱ was used."""

    user_id: str
    prediction: float | str
    personalized: bool
    probabilities: dict[str, float] | None = None
    lower: float | None = None
    upper: float | None = None


@dataclass(frozen=True)
class Decoded:
    """One sequence's Viterbi path (state names), its score and marginals ``(L, S)``."""

    path: list[str]
    score: float
    marginals: np.ndarray


@dataclass(frozen=True)
class UserSummary:
    """What ``GET …/users/{id}`` shows of a user's θⁱ: a baseline shift (tabular kinds) or a
    transition matrix (sequence kinds)."""

    bias: float | dict[str, float] | None = None
    transitions: list[list[float]] | None = None


def sent(item: Any, field: str) -> bool:
    """Whether a request item set ``field`` explicitly (even to null) rather than omitting it.

    Omitting a label keeps the stored one; an explicit null clears it. Items that do not track
    which fields were set (anything but a pydantic model) count as having sent every field.
    """
    fields_set = getattr(item, "model_fields_set", None)
    return fields_set is None or field in fields_set


def non_finite_parts(estimator: Any) -> list[str]:
    """Names of a fitted estimator's statistics and tensors that hold NaN or ±inf: the
    normalisation statistics, σ², every parameter and buffer of the network (θ̄, θⁱ, Σ)."""
    bad = []
    for name in ("x_scaler_", "y_scaler_"):
        scaler = getattr(estimator, name, None)
        if scaler is not None and not (
            np.isfinite(scaler.mean).all() and np.isfinite(scaler.std).all()
        ):
            bad.append(name.rstrip("_"))
    sigma2 = getattr(estimator, "sigma2_", None)
    if sigma2 is not None and not math.isfinite(float(sigma2)):
        bad.append("sigma2")
    module = getattr(estimator, "module_", None)
    if module is not None:
        for name, tensor in (*module.named_parameters(), *module.named_buffers()):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    return bad


def temporal_split(
    persons: Sequence[Any] | np.ndarray, fraction: float = VALIDATION_FRACTION
) -> np.ndarray:
    """Mark each user's last ``floor(fraction · nᵢ)`` rows as validation.

    Args:
        persons: ``(n,)`` user ids (or any per-user keys, e.g. row ids), grouped by user and
            in time order within a user.

    Returns:
        ``(n,) bool``: True for validation rows.
    """
    keys = np.asarray(persons)
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # (U,) first row of each user
    sizes = np.diff(np.r_[starts, n])  # (U,) nᵢ
    n_val = (sizes * fraction).astype(np.int64)  # (U,) floor, as int() of the product did
    position = np.arange(n) - np.repeat(starts, sizes)  # (n,) row's index within its user
    return position >= np.repeat(sizes - n_val, sizes)


def split_persons(persons: list[str], is_val: np.ndarray) -> tuple[list[str], list[str]]:
    """``(train persons, validation persons)`` of a :func:`temporal_split` mask."""
    train = [p for p, v in zip(persons, is_val, strict=True) if not v]
    val = [p for p, v in zip(persons, is_val, strict=True) if v]
    return train, val


ROUTE_ERRORS: dict[str, tuple[str, list[str | int]]] = {
    "observations": (
        "model {name!r} is a {task} model: send sequences to /sequences", ["body", "items"]
    ),
    "sequences": (
        "model {name!r} is a {task} model: send observations to /observations", ["body", "items"]
    ),
    "predict": ("{task} models answer /decode", ["path", "name"]),
    "decode": ("{name!r} is a {task} model: use /predict", ["path", "name"]),
}
"""The 422 for each route, sent to a model whose kind does not answer it."""


class ModelKind(ABC):
    """One family of tasks: its estimator, training data, fit, scores, user data and serving.

    Subclasses implement the abstract methods and the serving method of their route
    (``predict`` or ``decode``); :meth:`require_route` refuses the routes a kind does not answer
    with a 422 that names the right one.
    """

    task: ClassVar[str]
    """The ``model.task`` value this kind handles."""
    estimator_class: ClassVar[type[Estimator]]
    architecture_keys: ClassVar[tuple[str, ...]] = ARCHITECTURE_KEYS
    pinned_training_keys: ClassVar[tuple[str, ...]] = PINNED_TRAINING_KEYS
    """:data:`PINNED_TRAINING_KEYS` and this kind's own (the tagger's ``sigma2``)."""
    score_name: ClassVar[str]
    """What ``val_score`` measures (higher is better)."""
    supports_intervals: ClassVar[bool] = False
    """Whether ``/predict`` answers prediction intervals (``"interval": 0.9``)."""
    routes: ClassVar[frozenset[str]]
    """The routes that answer this kind: ``observations`` or ``sequences``, and ``predict`` or
    ``decode``."""

    # ------------------------------------------------------------------ definition

    def resolve_settings(
        self,
        architecture: dict[str, Any],
        training: dict[str, Any],
        *,
        n_features: int,
        labels: list[str] | None,
        budget: ParameterBudget | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Fill the settings a client left out with the estimator's defaults, then check them by
        building the network.

        Args:
            architecture, training: the settings the client *sent* (``model_fields_set``): an
                omitted key, or null for a key that has no null meaning, takes the default;
                an explicit null for a key in :data:`NULL_MEANS_NONE` (``anneal``) is kept.
            n_features: the model's number of features.
            labels: its classes (classification) or states (sequence); None for regression.
            budget: most generic and person-specific parameters allowed (None: no limit).

        Returns ``(architecture, training)`` with every key set. Raises a 422 naming the field
        when the estimator refuses a setting, a placement names no parameter of the network, or
        the network exceeds the budget. The network is built on PyTorch's ``meta`` device: its
        shapes are real, its memory is not allocated.
        """
        signature = inspect.signature(self.estimator_class.__init__)
        defaults = {
            name: parameter.default
            for name, parameter in signature.parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        defaults.update(SERVICE_DEFAULTS)
        defaults.update(self._extra_defaults())

        def fill(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
            out = {}
            for key in keys:
                value = values.get(key)
                keep_null = key in NULL_MEANS_NONE and key in values
                out[key] = defaults[key] if value is None and not keep_null else value
                if isinstance(out[key], tuple):
                    out[key] = list(out[key])  # JSON-friendly
            return out

        resolved = (fill(architecture, self.architecture_keys),
                    fill(training, TRAINING_KEYS + self.pinned_training_keys))
        states = labels if self.task == "sequence" else None
        try:
            estimator = self.estimator_class(**self._estimator_kwargs(*resolved, states=states))
            with torch.device("meta"):  # shapes only: no memory, however large the network
                self._set_outputs(estimator, labels)
                network = estimator._build(n_features, 1)
        except (TypeError, ValueError) as err:
            raise InvalidInput([invalid(_field_of(str(err)), str(err))]) from err
        if budget is not None:
            budget.check(
                generic=sum(p.numel() for p in network.base.parameters()),
                person=network.layout.dim,
            )
        return resolved

    def build_estimator(self, model: Model, *, device: str) -> Estimator:
        """An unfitted estimator configured from the model's stored settings (a model stored
        before the fit procedure was recorded gets :data:`LEGACY_TRAINING`, not today's
        defaults)."""
        training = {**LEGACY_TRAINING[self.task], **model.training}
        kwargs = self._estimator_kwargs(model.architecture, training, model.states)
        return self.estimator_class(**kwargs, device=device, verbose=False)

    def _set_outputs(self, estimator: Any, labels: list[str] | None) -> None:  # noqa: B027
        """Give an unfitted estimator what fitting would learn about its outputs (classes or
        states), so that its network can be built before any data exists."""

    def _extra_defaults(self) -> dict[str, Any]:
        """Defaults of settings the estimator's signature does not state as such."""
        return {}

    def _estimator_kwargs(
        self, architecture: dict[str, Any], training: dict[str, Any], states: list[str] | None
    ) -> dict[str, Any]:
        kwargs = {**architecture, **training}
        kwargs["hidden"] = tuple(kwargs["hidden"])
        return kwargs

    # ------------------------------------------------------------------ routes

    def require_route(self, model: Model, route: str) -> None:
        """422 naming the right route when this kind does not answer ``route``
        (``observations``, ``sequences``, ``predict`` or ``decode``)."""
        if route not in self.routes:
            message, loc = ROUTE_ERRORS[route]
            raise InvalidInput([invalid(loc, message.format(name=model.name, task=model.task))])

    # ------------------------------------------------------------------ ingest

    @abstractmethod
    def ingest(self, session: Session, *, model: Model, items: Sequence[Any]) -> store.UpsertCounts:
        """Validate a batch against the model's schema and upsert it (flushes; the caller
        commits). ``items`` are the route's request items (observations or sequences)."""

    # ------------------------------------------------------------------ training

    @abstractmethod
    def load_training_data(
        self, session: Session, *, model: Model, chunk_rows: int = REFIT_CHUNK_ROWS
    ) -> TrainingData:
        """Read the model's labels and split each user's in time order (409 when there are
        none); ``chunk_rows``: rows per chunk where the kind streams its reads."""

    def check_trainable(self, model: Model, data: TrainingData) -> None:  # noqa: B027
        """Refuse (409) data this kind cannot train on (every kind may override; by default
        anything labelled trains)."""

    @abstractmethod
    def _fit(
        self, model: Model, estimator: Any, data: Any, callback: Callback | None
    ) -> None:
        """Fit ``estimator`` on the training split, validating on the validation split."""

    def fit(
        self, model: Model, data: TrainingData, *, device: str, callback: Callback | None = None
    ) -> tuple[Estimator, dict[str, Any]]:
        """Fit on the training split; score per person on the validation split.

        Returns the fitted estimator and the version's metrics: ``val_score`` (per-person
        averaged, higher is better), the generic model's score on the same labels for
        comparison, and training bookkeeping.
        """
        self.check_trainable(model, data)
        estimator = self.build_estimator(model, device=device)
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # A fit that used its whole epoch budget says so in the version's metrics
                # (``converged``), not as text on stderr: the worker's log is JSON lines.
                warnings.simplefilter("ignore", ConvergenceWarning)
                self._fit(model, estimator, data, callback)
        except ValueError as err:  # e.g. a placement naming no parameter of the network
            raise Conflict(f"model {model.name!r} cannot be trained: {err}") from err
        metrics: dict[str, Any] = {
            "score_name": self.score_name,
            "val_score": None,
            "val_score_generic": None,
            "n_train": len(data.persons_train),
            "n_val": len(data.persons_val),
            "n_users": len(estimator.person_ids_),
            "epochs": len(estimator.history_),
            "best_epoch": int(estimator.best_epoch_),
            "converged": bool(getattr(estimator, "converged_", True)),
            "fit_seconds": round(time.perf_counter() - started, 3),
        }
        if len(data.persons_val) > 0:
            n_val = len(data.persons_val)
            metrics["val_score"] = self.score(estimator, data)
            metrics["val_score_generic"] = self.score(
                estimator,
                data,
                effects=np.zeros((n_val, estimator.n_effects_), dtype=np.float32),
                known=np.zeros(n_val, dtype=bool),
            )
        return estimator, metrics

    @abstractmethod
    def baseline_score(self, data: Any) -> float | None:
        """The trivial predictor's per-person validation score (the training labels' mean, or
        their most frequent class or state), on the same scale as :meth:`score`; None without
        validation labels. A first version must beat it to be activated."""

    @abstractmethod
    def score(
        self,
        estimator: Any,
        data: Any,
        *,
        effects: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> float:
        """Per-person averaged validation score (higher is better).

        Args:
            effects: ``(n_val, d)`` θⁱ per validation item (None: the estimator's own table);
            known: ``(n_val,) bool``, False where an item gets the generic model.
        """

    @abstractmethod
    def person_train_inputs(self, data: Any, index: list[int]) -> tuple[Any, Any]:
        """The training items ``index`` (one user's) as ``fit_person``'s ``(X, y)``."""

    # ------------------------------------------------------------------ per-user update

    @abstractmethod
    def user_data(
        self, session: Session, *, model: Model, user_id: int, estimator: Any
    ) -> UserData:
        """All of one user's labels that ``estimator`` can learn from (per-user update)."""

    # ------------------------------------------------------------------ serving

    @abstractmethod
    def serving_input(self, model: Model, items: Sequence[Any]) -> np.ndarray:
        """The feature matrix of a predict batch ``(n, F)`` or a decode request's segments
        ``(L, F)``, in model order (422 naming schema mismatches)."""

    def predict(
        self,
        model: Model,
        estimator: Any,
        *,
        x: np.ndarray,
        effects: np.ndarray,
        known: np.ndarray,
        user_ids: Sequence[str],
        coverage: float | None = None,
        variance: np.ndarray | None = None,
    ) -> list[Prediction]:
        """One forward pass for a batch ``x (n, F)`` with θⁱ ``effects (n, d)``, ``known (n,)``;
        with ``coverage``, also ``lower``/``upper`` from θⁱ posterior variances ``variance
        (n, d)`` (kinds with :attr:`supports_intervals`)."""
        raise NotImplementedError(f"{self.task} models do not answer /predict")

    def decode(
        self, estimator: Any, *, x: np.ndarray, effects: np.ndarray, known: np.ndarray
    ) -> Decoded:
        """Viterbi path of one sequence ``x (L, F)`` with θⁱ ``effects (1, d)``, ``known (1,)``."""
        raise NotImplementedError(f"{self.task} models do not answer /decode")

    @abstractmethod
    def user_summary(self, model: Model, estimator: Any, effects: np.ndarray | None) -> UserSummary:
        """What a user's θⁱ row ``(d,)`` (None: the generic model) means, for the user route."""
