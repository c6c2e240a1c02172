"""The base every NME estimator shares: :class:`_NMEEstimator` and :func:`load_estimator`.

``_NMEEstimator`` owns the one fit skeleton (device, seeding, building the network, the loss and
validation closures for :func:`~nme.train.fit_loop`, the fallback row), the per-person E-step
behind ``fit_person``, the person effects and the artifacts. A subclass says how its inputs become
training items and how items are scored: ``nme.estimators._TabularEstimator`` for tables (one
item per row; :class:`~nme.estimators.NMERegressor`, :class:`~nme.estimators.NMEClassifier`),
:class:`nme.sequence.NMESequenceTagger` for sequences (one item per sequence).

Unknown persons (not seen in training) get θⁱ = 0, the generic model. Under ``method="specific"``
there is no generic part on the placed parameters, so unknown persons get the mean θⁱ of the
training persons instead (the closest thing to a generic model it has).

``anneal`` defaults to 0.8 (Σ ← max(0.8·Σ_old, var)): one epoch of Adam from θⁱ = 0 moves the
rows only a little, so the plain M-step would measure a tiny spread after the first epoch and
lock θⁱ near zero for good; annealing lets Σ shrink no faster than 20 % per epoch. Pass
``anneal=None`` for the plain EM update. Why 0.8: ``docs/decisions.md``.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

from nme.artifact import ArtifactError, read_artifact, write_artifact
from nme.data import PersonIndex, Standardizer
from nme.mlp import ACTIVATIONS
from nme.objective import M_STEPS
from nme.personalize import METHODS, EffectsLayout, PersonalizedModule
from nme.persons import Gathered
from nme.train import BATCHINGS, SquaredGrads, TrainConfig, fit_loop


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class _Items:
    """Training or validation items on the estimator's device: what the loss hooks read.

    An item is one row of a table (regression, classification) or one whole sequence (the
    tagger); it is the unit :func:`nme.train.fit_loop` batches and counts in nᵢ.

    Attributes:
        x: normalised inputs, ``(n, F)`` rows or ``(n, L, F)`` padded sequences.
        y: encoded targets, ``(n,)`` (regression values or class indices) or ``(n, L)`` state
            indices (0 at padding).
        ids: the person id of each item, length n.
        mask: ``(n, L) bool`` True at the real segments of padded sequences; None for rows.
    """

    x: torch.Tensor
    y: torch.Tensor
    ids: list[Hashable]
    mask: torch.Tensor | None = None


class NotFitted(NotFittedError, RuntimeError):
    """An estimator used before ``fit``: scikit-learn's ``NotFittedError`` (a ``ValueError``
    and ``AttributeError``), and a ``RuntimeError`` as this library raised before."""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_str_sequence(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, str) for v in value))


def _check_int_sequence(name: str, value: Any, low: int) -> None:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}")
    items = list(value)
    if not all(_is_int(v) and v >= low for v in items):
        raise ValueError(f"{name} must be a sequence of integers >= {low}, got {value!r}")


def _check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)) and np.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f" in {lo}, {hi}" if lo and hi else f" {'>' if low_open else '>='} {low:g}" \
            if lo else ""
        raise ValueError(f"{name} must be a number{where}, got {value!r}")


class _NMEEstimator(BaseEstimator, abc.ABC):
    """Shared machinery of every NME estimator: parameters, the one fit skeleton, fallback and
    person effects, the per-person E-step and artifacts.

    scikit-learn conventions: ``__init__`` only stores its arguments, ``get_params`` /
    ``set_params`` / ``sklearn.base.clone`` derive from its signature, and
    :meth:`_validate_params` (called by ``fit``) checks them.

    A subclass supplies its network (:meth:`_build`, :meth:`_n_outputs`), turns its inputs into
    :class:`_Items` (the callables it passes to :meth:`_fit`) and scores items
    (:meth:`_train_losses`, :meth:`_val_scores`); its public ``fit`` is a thin wrapper.
    """

    _registry: ClassVar[dict[str, type[_NMEEstimator]]] = {}

    # scikit-learn metadata routing (``sklearn.set_config(enable_metadata_routing=True)``):
    # ``persons`` is requested by default by fit, score and predict, so a meta-estimator
    # (GridSearchCV, cross_val_score) that receives ``persons`` passes each split's ids to
    # both fit and score, and selection scores the personalised predictions.
    __metadata_request__fit: ClassVar[dict] = {"persons": True}
    __metadata_request__score: ClassVar[dict] = {"persons": True}
    __metadata_request__predict: ClassVar[dict] = {"persons": True}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # private intermediate bases (``_TabularEstimator``) are abstract: no artifact names them
        if not cls.__name__.startswith("_"):
            _NMEEstimator._registry[cls.__name__] = cls

    def __init__(
        self,
        hidden: Sequence[int] = (64, 64),
        placement: str | Sequence[str] = "last",
        method: str = "nme",
        activation: str = "relu",
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 512,
        max_epochs: int = 100,
        patience: int | None = 10,
        anneal: float | None = 0.8,
        m_step: str = "paper",
        batching: str = "random",
        device: str = "auto",
        random_state: int | None = None,
        verbose: bool = False,
    ) -> None:
        # scikit-learn convention: __init__ only stores; _validate_params checks (fit calls it)
        self.hidden = hidden
        self.placement = placement
        self.method = method
        self.activation = activation
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.anneal = anneal
        self.m_step = m_step
        self.batching = batching
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ----------------------------------------------------------------- parameters
    def _validate_params(self) -> Self:
        """Check every constructor argument; raises ``ValueError`` naming the bad one.

        ``fit`` calls it first; call it yourself to refuse a bad definition before training
        (the service does when a model is created). Subclasses extend it.
        """
        _check_int_sequence("hidden", self.hidden, low=1)
        placement = self.placement
        if isinstance(placement, str):
            if not placement:
                raise ValueError("placement must not be empty")
        elif not _is_str_sequence(placement):
            raise ValueError(f"placement must be a string or a list of parameter names, "
                             f"got {placement!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        _check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _check_number("lr", self.lr, low=0.0, low_open=True)
        _check_number("weight_decay", self.weight_decay, low=0.0)
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (_is_int(self.max_epochs) and self.max_epochs >= 1):
            raise ValueError(f"max_epochs must be a positive integer, got {self.max_epochs!r}")
        if self.patience is not None and not (_is_int(self.patience) and self.patience >= 1):
            raise ValueError(f"patience must be a positive integer or None, "
                             f"got {self.patience!r}")
        if self.anneal is not None:
            _check_number("anneal", self.anneal, low=0.0, high=1.0, low_open=True,
                          high_open=True)
        if self.m_step not in M_STEPS:
            raise ValueError(f"m_step must be one of {M_STEPS}, got {self.m_step!r}")
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {self.batching!r}")
        if not isinstance(self.device, (str, torch.device)):
            raise ValueError(f"device must be a string such as 'auto', 'cpu' or 'cuda', "
                             f"got {self.device!r}")
        if self.random_state is not None and not _is_int(self.random_state):
            raise ValueError(f"random_state must be an integer or None, "
                             f"got {self.random_state!r}")
        return self

    # ----------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def _n_outputs(self) -> int:
        """Outputs of the network per row or segment: 1, the classes or the states."""

    @abc.abstractmethod
    def _build(self, n_features: int, n_persons: int) -> PersonalizedModule:
        """The untrained personalised network for ``n_features`` inputs and ``n_persons`` rows."""

    @abc.abstractmethod
    def _train_losses(
        self,
        items: _Items,
        persons: torch.Tensor,
        idx: torch.Tensor,
        effects: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | Gathered]:
        """The downstream loss of training items, in the module's current mode.

        Args:
            items: all training items.
            persons: ``(n,) long`` every item's row in the person table.
            idx: ``(b,) long`` the items of this batch.
            effects: ``(b, d)`` θⁱ rows to use instead of the table's, or None.

        Returns:
            ``(losses (b,), rows)``: see :data:`nme.train.ItemLoss`.
        """

    @abc.abstractmethod
    def _val_scores(self, items: _Items, rows: torch.Tensor) -> dict[str, float]:
        """``{"val_loss", "val_metric"}`` of validation items with θⁱ rows ``(n, d)``."""

    def _squared_grads(self, items: _Items, persons: torch.Tensor) -> SquaredGrads | None:
        """The exact Laplace curvature if the loss has one (see :data:`nme.train.SquaredGrads`);
        None lets the fit loop use the empirical Fisher."""
        return None

    def _train_config(self) -> TrainConfig:
        """The fit loop's hyper-parameters from the estimator's."""
        return TrainConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
            anneal=self.anneal,
            seed=self.random_state,
            verbose=self.verbose,
            m_step=self.m_step,
            batching=self.batching,
        )

    def _artifact_params(self) -> dict[str, Any]:
        """The constructor arguments as JSON-able values, for ``config.json``."""
        params = self.get_params(deep=False)
        params["hidden"] = [int(h) for h in self.hidden]
        if not isinstance(self.placement, str):
            params["placement"] = list(self.placement)
        params["device"] = "auto" if self.device == "auto" else str(self.device)
        return params

    def _extra_config(self) -> dict:
        """JSON-able ``config.json`` entries a subclass adds to the artifact."""
        return {}

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a subclass adds to the artifact's weights."""
        return {}

    def _restore_extra(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`_extra_config` and :meth:`_extra_tensors` saved (nothing here)."""
        return None

    def _set_feature_attributes(self, names: list[str] | None, n_features: int) -> None:
        """scikit-learn's ``n_features_in_`` and, for named columns, ``feature_names_in_``."""
        self.n_features_in_ = int(n_features)
        if names is not None and all(isinstance(n, str) for n in names):
            self.feature_names_in_ = np.asarray(names, dtype=object)
        elif hasattr(self, "feature_names_in_"):
            del self.feature_names_in_

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFitted(f"this {type(self).__name__} is not fitted yet; call fit first")

    # ----------------------------------------------------------------- fitting
    def _fit(
        self,
        training: Callable[[], _Items],
        validation: Callable[[], _Items] | None,
        callback: Callable[[dict], None] | None,
    ) -> Self:
        """The fit skeleton every estimator's ``fit`` runs.

        ``training()`` checks the training input, fits what is learned from it before training
        (feature names and scaler, target encoding or states) and returns the items;
        ``validation()`` returns the held-out items. They are callables so that the skeleton
        decides when they run: ``training`` once the device is known (its tensors go there),
        ``validation`` once the network is built (it is checked against the fitted model).
        """
        self._validate_params()
        self.device_ = resolve_device(self.device)
        items = training()
        self.persons_ = PersonIndex(items.ids)
        if self.random_state is not None:
            torch.manual_seed(self.random_state)
        self.module_ = self._build(items.x.shape[-1], len(self.persons_)).to(self.device_)
        persons = torch.from_numpy(self.persons_.encode(items.ids)).to(self.device_)  # (n,)

        def item_loss(
            idx: torch.Tensor, effects: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor | Gathered]:
            return self._train_losses(items, persons, idx, effects)

        validate = None
        if validation is not None:
            held_out = validation()

            def validate() -> dict[str, float]:
                self._set_fallback()  # the table moved during the epoch
                return self._val_scores(held_out, self._rows_for(held_out.ids))

        result = fit_loop(
            self.module_, persons, item_loss, self._train_config(), validate, callback,
            self._squared_grads(items, persons),
        )
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.sigma2_ = result.sigma2
        self._Sigma_flat = result.Sigma.detach().to(self.device_)
        self._set_fallback()
        return self

    def _set_fallback(self) -> None:
        """θⁱ used for unknown persons: zero, or the persons' mean under ``specific``."""
        table = self.module_.persons.weight.detach()
        if self.method == "specific" and table.shape[0] > 0:
            self.fallback_effect_ = table.mean(dim=0)
        else:
            self.fallback_effect_ = torch.zeros(table.shape[1], device=table.device)

    # ----------------------------------------------------------------- θⁱ rows
    def _rows_for(self, ids: list) -> torch.Tensor:
        """θⁱ rows ``(n, dim)`` for person ids; unknown persons get the fallback row."""
        idx = torch.from_numpy(self.persons_.encode(ids)).to(self.device_)
        table = self.module_.persons.weight.detach()
        if table.shape[0] == 0:  # loaded without effects: everyone is unknown
            return self.fallback_effect_.expand(len(ids), -1)
        rows = table[idx.clamp(min=0)]
        return torch.where((idx >= 0).unsqueeze(-1), rows, self.fallback_effect_)

    def _effects_tensor(self, effects: np.ndarray, known: np.ndarray | None) -> torch.Tensor:
        """``effects: (n, d)`` θⁱ rows as a tensor; rows where ``known: (n,) bool`` is False
        get the fallback row."""
        e = torch.as_tensor(np.asarray(effects, dtype=np.float32), device=self.device_)
        if e.ndim != 2 or e.shape[1] != self.n_effects_:
            raise ValueError(
                f"effects must have shape (n, {self.n_effects_}), got {tuple(e.shape)}"
            )
        if known is None:
            return e
        k = torch.as_tensor(np.asarray(known, dtype=bool), device=self.device_)
        return torch.where(k.unsqueeze(-1), e, self.fallback_effect_)

    # ----------------------------------------------------------------- person effects
    @property
    def n_effects_(self) -> int:
        """Length d of one flattened θⁱ vector."""
        self._check_fitted()
        return self.module_.effect_dim

    @property
    def effects_layout_(self) -> EffectsLayout:
        """Order and shapes of the parameters inside a flattened θⁱ vector."""
        self._check_fitted()
        return self.module_.layout

    @property
    def person_ids_(self) -> list:
        """Training persons, in the row order of :meth:`effects_matrix`."""
        self._check_fitted()
        return list(self.persons_.ids)

    @property
    def Sigma_(self) -> dict[str, torch.Tensor]:
        """Diagonal of Σ per placed parameter, each shaped like the parameter.

        Like ``sigma2_`` (the mean training loss), Σ lives on the scale the network trains on:
        z-normalised features and, for regression, z-normalised y (multiply σ² by
        ``y_scaler_.std**2`` for label units).
        """
        self._check_fitted()
        return {k: v.cpu() for k, v in self.effects_layout_.split(self._Sigma_flat).items()}

    def effects_matrix(self) -> np.ndarray:
        """``(n_persons, d) float32``: every training person's flattened θⁱ."""
        self._check_fitted()
        return self.module_.persons.weight.detach().cpu().numpy().copy()

    def person_effects(self, person: Hashable) -> dict[str, torch.Tensor]:
        """θⁱ of one person per placed parameter (zeros, or the fallback, if unknown)."""
        row = self._rows_for([person])[0]
        return {k: v.cpu().clone() for k, v in self.effects_layout_.split(row).items()}

    # ----------------------------------------------------------------- per-person E-step
    def _fit_person(
        self,
        person_losses: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None,
        init: np.ndarray | None,
        max_iter: int,
    ) -> np.ndarray:
        """The E-step behind every ``fit_person``: θ̄, σ², Σ fixed, one person's θⁱ optimised.

        Minimises (1/σ²) Σⱼ lⱼ(θ̄ + θ) + θᵀΣ⁻¹θ (the person's part of Eq. 1; no penalty and
        σ² = 1 for ``unme``/``specific``) with L-BFGS, starting from ``init`` or the fallback.

        Args:
            person_losses: the base module's parameters (θ̄, plus θ on the placed ones) ->
                ``(n,)`` the person's item losses; None when the person has no labelled items.
            init: ``(d,)`` starting θⁱ.

        Returns:
            ``(d,) float32`` the person's new θⁱ (``init``, or zeros, if there is nothing to fit).
        """
        if person_losses is None or self.n_effects_ == 0:
            return (np.zeros(self.n_effects_, np.float32) if init is None
                    else np.asarray(init, np.float32))
        start = self.fallback_effect_ if init is None else self._effects_tensor(
            np.asarray(init, np.float32)[None], None)[0]
        theta = start.detach().clone().requires_grad_(True)
        sigma_inv = 1.0 / self._Sigma_flat if self.method == "nme" else None
        sigma2 = self.sigma2_ if self.method == "nme" else 1.0
        module = self.module_
        module.eval()
        base = {n: p.detach() for n, p in module.base.named_parameters()}
        layout = module.layout
        opt = torch.optim.LBFGS(
            [theta], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
            tolerance_grad=1e-6, tolerance_change=1e-9,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            # One person: the same parameters for every item, so no per-sample vmap is needed.
            params = dict(base)
            for n, d in layout.split(theta).items():
                params[n] = base[n] + d
            loss = person_losses(params).sum() / sigma2
            if sigma_inv is not None:
                loss = loss + (theta * theta * sigma_inv).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return theta.detach().cpu().numpy().astype(np.float32)

    # ----------------------------------------------------------------- artifacts
    def save(self, path: str | os.PathLike, include_effects: bool = True) -> None:
        """Write the artifact directory (see :mod:`nme.artifact`).

        ``include_effects=False`` leaves out the person table (the service keeps θⁱ in its
        database); person ids are then not stored either.
        """
        self._check_fitted()
        ids = self.persons_.ids if include_effects else []
        bad = [p for p in ids if not isinstance(p, (str, int))]
        if bad:
            raise ValueError(f"person ids must be str or int to be saved, got e.g. {bad[0]!r}")
        params = self._artifact_params()
        config = {
            "estimator": type(self).__name__,
            "params": params,
            "architecture": {
                "in_features": len(self.feature_names_),
                "hidden": [int(h) for h in self.hidden],
                "out_features": self._n_outputs(),
                "activation": self.activation,
                "dropout": self.dropout,
            },
            "method": self.method,
            "placement": params["placement"],
            "feature_names": self.feature_names_,
            "feature_names_from_frame": self._names_from_frame,
            "sigma2": self.sigma2_,
            "effects_layout": self.effects_layout_.to_json(),
            "n_effects": self.n_effects_,
            "person_ids": ids,
            "history": self.history_,
            "best_epoch": self.best_epoch_,
            **self._extra_config(),
        }
        tensors = {f"theta.{k}": v for k, v in self.module_.base.state_dict().items()}
        tensors["x_mean"] = torch.from_numpy(self.x_scaler_.mean)
        tensors["x_std"] = torch.from_numpy(self.x_scaler_.std)
        tensors["Sigma"] = self._Sigma_flat
        tensors["fallback_effect"] = self.fallback_effect_
        if include_effects:
            tensors["effects"] = self.module_.persons.weight
        tensors.update(self._extra_tensors())
        write_artifact(path, config, tensors)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None) -> _NMEEstimator:
        """Load an artifact written by :meth:`save`; raises ``ArtifactError`` if it is bad."""
        est = load_estimator(path, device=device)
        if not isinstance(est, cls):
            raise ArtifactError(f"{path} holds a {type(est).__name__}, not a {cls.__name__}")
        return est


def load_estimator(path: str | os.PathLike, device: str | None = None) -> _NMEEstimator:
    """Load any estimator artifact, dispatching on the class recorded in ``config.json``."""
    config, tensors = read_artifact(path)
    name = config.get("estimator")
    cls = _NMEEstimator._registry.get(name)  # type: ignore[arg-type]
    if cls is None:
        raise ArtifactError(f"artifact {path} holds an unknown estimator {name!r}")
    try:
        params = dict(config["params"])
        if device is not None:
            params["device"] = device
        est = cls(**params)
        est.device_ = resolve_device(est.device)
        est.feature_names_ = list(config["feature_names"])
        est._names_from_frame = bool(config["feature_names_from_frame"])
        est._set_feature_attributes(est.feature_names_ if est._names_from_frame else None,
                                    len(est.feature_names_))
        est._restore_extra(config, tensors)
        arch = config["architecture"]
        # the network is built from the recorded architecture, so a mismatch with the weights
        # surfaces as a shape error below
        est.hidden = tuple(arch["hidden"])
        est.activation, est.dropout = arch["activation"], arch["dropout"]
        ids = list(config["person_ids"])
        est.persons_ = PersonIndex(ids)
        has_effects = "effects" in tensors
        est.module_ = est._build(arch["in_features"], len(ids) if has_effects else 0)
        theta = {k.removeprefix("theta."): v for k, v in tensors.items() if k.startswith("theta.")}
        est.module_.base.load_state_dict(theta, strict=True)
        layout = EffectsLayout.from_json(config["effects_layout"])
        if layout != est.module_.layout:
            raise ArtifactError(f"artifact {path}: effects layout does not match the network")
        dim = layout.dim
        if has_effects:
            if tuple(tensors["effects"].shape) != (len(ids), dim):
                raise ArtifactError(
                    f"artifact {path}: effects have shape {tuple(tensors['effects'].shape)}, "
                    f"expected ({len(ids)}, {dim})"
                )
            with torch.no_grad():
                est.module_.persons.weight.copy_(tensors["effects"])
        for key in ("Sigma", "fallback_effect"):
            if tuple(tensors[key].shape) != (dim,):
                raise ArtifactError(f"artifact {path}: {key} has the wrong shape")
        est.module_.to(est.device_).eval()
        est.x_scaler_ = Standardizer(tensors["x_mean"].numpy(), tensors["x_std"].numpy())
        est.sigma2_ = float(config["sigma2"])
        est._Sigma_flat = tensors["Sigma"].to(est.device_)
        est.fallback_effect_ = tensors["fallback_effect"].to(est.device_)
        est.history_ = list(config.get("history", []))
        est.best_epoch_ = int(config.get("best_epoch", 0))
    except ArtifactError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise ArtifactError(f"artifact {path} does not fit its config: {err}") from err
    return est
