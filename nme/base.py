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

Parameters every estimator shares (the subclasses' docstrings add their own):

- ``hidden``, ``activation``, ``dropout``: the network; ``placement`` where θⁱ live;
  ``method``: ``generic``, ``specific``, ``unme`` or ``nme``.
- ``lr``, ``weight_decay``: AdamW on θ̄ (θⁱ: lazy Adam with the same ``lr``).
- ``batch_size``: items per step, or ``"auto"`` (default): ``clip(n // 16, 32, 512)``, about 16
  steps per epoch on small data and 512 on large (:func:`nme.train.auto_batch_size`).
- ``max_epochs`` (default 100): the budget. Training stops earlier when it has converged: the
  mean training loss, σ² and the mean of Σ each changed by at most ``tol`` (relative, default
  1e-4) for ``n_iter_no_change`` (10) epochs in a row — or, with a validation set, when the
  validation loss has not improved for ``patience`` (10) epochs (the best epoch is kept).
  ``n_iter_`` is the epochs run and ``converged_`` says whether a test ended training; when the
  budget ran out first, ``fit`` warns with scikit-learn's ``ConvergenceWarning``.
- ``e_step`` (default ``"newton"``, see :data:`E_STEPS`) and ``m_step`` (default
  ``"laplace"`` for every estimator; ``"paper"`` is the paper's): how θⁱ and σ², Σ are fitted.
  Where the E-step is exact in one Newton step (squared error on a linear placement) every
  epoch is a full EM iteration — Adam steps on θ̄, θⁱ ← posterior modes, their mean moved into
  θ̄, then σ², Σ by the Laplace M-step in fixed-point form — and the linear NME lands on the
  REML estimates of a linear mixed model with independent random effects in tens of epochs,
  whatever the batch size.
- ``anneal`` (default 0.8; Σ ← max(0.8·Σ_old, var)) for the M-steps after Adam-only E-steps:
  one epoch of Adam from θⁱ = 0 moves the rows only a little, so the plain M-step would measure
  a tiny spread after the first epoch and lock θⁱ near zero for good; annealing lets Σ shrink
  no faster than 20 % per epoch. ``anneal=None`` gives the plain update. After exact E-steps the
  spread of the modes is not too small, and the fixed-point M-step does not anneal.

Why these defaults, with the measurements: ``docs/decisions.md``.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning, NotFittedError

from nme.artifact import ArtifactError, read_artifact, write_artifact
from nme.data import PersonIndex, Standardizer
from nme.distributed import (
    Comm,
    check_injected_failure,
    current_comm,
    fit_standardizer,
    gather_rows,
    local_device,
    shard_mask,
    union_labels,
)
from nme.estep import FULL_MAX_DIM, Posterior, group_persons, posterior_modes
from nme.mlp import ACTIVATIONS
from nme.objective import M_STEPS
from nme.personalize import METHODS, EffectsLayout, PersonalizedModule
from nme.persons import Gathered, PersonTable
from nme.train import BATCHINGS, SquaredGrads, TrainConfig, auto_batch_size, fit_loop

logger = logging.getLogger(__name__)

E_STEPS = ("newton", "final", "sgd")
"""How θⁱ are fitted (``e_step=``), for ``method="nme"`` (the only variant with a posterior):

- ``"newton"`` (default): where the E-step is one exact step — squared error with θⁱ entering
  the output linearly (a last-layer placement, or a linear model) — every epoch ends with it
  (θⁱ ← posterior modes, their mean moved into θ̄) before the M-step, which is then the EM of a
  linear mixed model in the linear case; elsewhere the epochs' Adam steps fit θⁱ. The fit ends
  with the Newton E-step (:mod:`nme.estep`) in every case.
- ``"final"``: Adam steps only during training (the paper's E-step), then the final E-step.
- ``"sgd"``: the paper's procedure throughout: θⁱ are what the last (best) epoch left.
"""


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
        batch_size: int | str = "auto",
        max_epochs: int = 100,
        patience: int | None = 10,
        anneal: float | None = 0.8,
        m_step: str = "laplace",
        batching: str = "random",
        device: str = "auto",
        random_state: int | None = None,
        verbose: bool = False,
        e_step: str = "newton",
        tol: float | None = 1e-4,
        n_iter_no_change: int = 10,
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
        self.e_step = e_step
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change

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
        if self.batch_size != "auto" and not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer or 'auto', "
                             f"got {self.batch_size!r}")
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
        if self.e_step not in E_STEPS:
            raise ValueError(f"e_step must be one of {E_STEPS}, got {self.e_step!r}")
        if self.tol is not None:
            _check_number("tol", self.tol, low=0.0)
        if not (_is_int(self.n_iter_no_change) and self.n_iter_no_change >= 1):
            raise ValueError(f"n_iter_no_change must be a positive integer, "
                             f"got {self.n_iter_no_change!r}")
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

    def _item_curvature(
        self, items: _Items, idx: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per item: loss ``(b,)``, gradient w.r.t. its θⁱ row ``(b, d)`` and curvature factor
        ``(b, R, d)`` (see :data:`nme.estep.ItemCurvature`).

        The default is the empirical Fisher ½ ∂lⱼ ∂lⱼᵀ (factor ∂lⱼᵀ/√2), from one backward
        pass: every item gets its own copy of its row, so item b's gradient lands in row b.
        """
        persons = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)  # unused
        leaf = rows.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            losses, _ = self._train_losses(items, persons, idx, leaf)
            (grads,) = torch.autograd.grad(losses.sum(), leaf)
        return losses.detach(), grads, (grads * 0.5**0.5).unsqueeze(1)

    def _constant_curvature(self) -> bool:
        """True when :meth:`_item_curvature` does not depend on θⁱ (squared error with θⁱ
        entering the output linearly): one Newton step is then the exact E-step."""
        return False

    def _newton_e_step(self) -> bool:
        """Whether the final E-step sets θⁱ to their posterior modes by batched Newton steps
        (:mod:`nme.estep`); otherwise θⁱ stay as the epochs left them and only their posterior
        variance is computed. Needs the fitted network (the tagger decides by θⁱ's length)."""
        return True

    def _epoch_newton(self) -> bool:
        """Whether every epoch ends with the Newton E-step (θⁱ ← posterior modes) before the
        M-step, not only the fit. Where the E-step is one exact step (squared error with θⁱ
        entering the output linearly); a subclass with a cheap exact curvature (the tagger's
        transition Hessian) extends it."""
        return self._constant_curvature()

    _effects_covariance: torch.Tensor | None = None
    _comm: Comm | None = None
    """This rank's collectives while a distributed fit runs (None otherwise)."""
    _shard: tuple[int, int] | None = None
    """``(rank, world size)`` on the ranks other than 0 after a distributed fit: the estimator
    holds only that rank's persons (None: it holds every training person)."""

    COVARIANCE_MAX_FLOATS: ClassVar[int] = 1 << 25
    """Training persons keep their whole posterior covariance ``(P, d, d)`` (for the
    prediction intervals: a network's θⁱ are strongly correlated, and their diagonal alone
    over-covers) while P·d² stays under this many floats (128 MiB in float32), e.g. 7 900
    persons at the default regressor's d = 65; beyond it, only the diagonal."""

    NEWTON_STEPS: ClassVar[int] = 8
    """Newton steps at most of an E-step whose curvature depends on θⁱ (the steps stop
    earlier once every person's Newton decrement is negligible)."""

    NEWTON_TOL: ClassVar[float] = 1e-10
    """Newton steps stop once every person's decrement is below this fraction of 1 + Jᵢ (see
    :func:`nme.estep.posterior_modes`)."""

    NEWTON_STEPS_DIAGONAL: ClassVar[int] = 0
    """The same with a diagonal precision (d > :data:`nme.estep.FULL_MAX_DIM`, e.g.
    ``placement="all"`` of a wide network): none, the rows stay as the epochs left them and
    only their posterior variance is computed. A diagonal Newton step ignores how a network's
    parameters interact; on mood (``hidden=(64, 64)``, ``placement="all"``, d = 4 545) 1, 3
    and 8 such steps gave a held-out per-person RMSE of 4.718, 4.681 and 4.685 against 4.662
    without, at up to 10 s more per fit."""

    def _squared_grads(self, items: _Items, persons: torch.Tensor) -> SquaredGrads | None:
        """The exact Laplace curvature if the loss has one (see :data:`nme.train.SquaredGrads`);
        None lets the fit loop use the empirical Fisher."""
        return None

    def _train_config(self, n_items: int) -> TrainConfig:
        """The fit loop's hyper-parameters from the estimator's, for ``n_items`` training
        items (``batch_size="auto"`` resolves to :func:`nme.train.auto_batch_size`)."""
        return TrainConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=(auto_batch_size(n_items) if self.batch_size == "auto"
                        else int(self.batch_size)),
            max_epochs=self.max_epochs,
            patience=self.patience,
            anneal=self.anneal,
            seed=self.random_state,
            verbose=self.verbose,
            m_step=self.m_step,
            batching=self.batching,
            tol=self.tol,
            n_iter_no_change=self.n_iter_no_change,
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
        comm = current_comm(self.device_)
        if comm is not None:
            self.device_ = local_device(self.device_)
        self._comm = comm
        try:
            self._fit_with(training, validation, callback, comm)
        finally:
            self._comm = None
        return self

    def _fit_with(
        self,
        training: Callable[[], _Items],
        validation: Callable[[], _Items] | None,
        callback: Callable[[dict], None] | None,
        comm: Comm | None,
    ) -> None:
        """:meth:`_fit` once the device and the process group (``comm``, or None) are known."""
        check_injected_failure(comm, 0)
        self._shard = None
        items = training()
        self.persons_ = PersonIndex(items.ids)
        seed = self.random_state
        if comm is not None and seed is None:
            # the replicated θ̄ (and, under specific, every row's start) must be equal on all
            # ranks: one random seed, chosen by rank 0
            seed = comm.agree(int(torch.randint(0, 2**31 - 1, ())))
        if seed is not None:
            torch.manual_seed(seed)
        self.module_ = self._build(items.x.shape[-1], len(self.persons_)).to(self.device_)
        persons = torch.from_numpy(self.persons_.encode(items.ids)).to(self.device_)  # (n,)
        self.world_size_ = 1 if comm is None else comm.world_size
        self._n_persons_total = len(self.persons_)
        if comm is not None:
            comm.broadcast_parameters(self.module_.base)
            self._n_persons_total = int(comm.sum_floats(len(self.persons_))[0])
            if comm.rank == 0:
                logger.info("distributed fit: world size %d, %d persons", comm.world_size,
                            self._n_persons_total)

        def item_loss(
            idx: torch.Tensor, effects: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor | Gathered]:
            return self._train_losses(items, persons, idx, effects)

        validate = None
        if validation is not None:
            held_out = validation()

            def validate() -> dict[str, float]:
                self._set_fallback()  # the table moved during the epoch
                if comm is None:
                    return self._val_scores(held_out, self._rows_for(held_out.ids))
                return self._reduced_val_scores(held_out, comm)

        # every epoch only where the E-step is one exact step (squared error on a linear
        # placement): elsewhere several Newton passes per epoch would cost far more than the
        # epoch's Adam steps (measured: nme/all on mood 135 s instead of 3 s per fit)
        newton = (self.method == "nme" and self._newton_e_step() and self.e_step == "newton"
                  and self.module_.effect_dim > 0 and self._epoch_newton())
        n_items = len(items.ids) if comm is None else int(comm.sum_floats(len(items.ids))[0])
        config = self._train_config(n_items)
        if comm is not None:
            # the batch size is the global one: every rank takes its share per step
            config = dataclasses.replace(
                config, batch_size=max(1, -(-config.batch_size // comm.world_size)))
        result = fit_loop(
            self.module_, persons, item_loss, config, validate,
            callback, self._squared_grads(items, persons),
            self._e_step(items, persons) if newton else None, comm,
        )
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.n_iter_ = result.n_iter
        self.converged_ = result.converged
        if not result.converged and (comm is None or comm.rank == 0):
            warnings.warn(
                f"{type(self).__name__} used its whole budget of max_epochs={self.max_epochs} "
                f"epochs without converging (tol={self.tol}, patience={self.patience}); raise "
                "max_epochs, or check the learning rate and the history_",
                ConvergenceWarning, stacklevel=4,
            )
        self.sigma2_ = result.sigma2
        self._Sigma_flat = result.Sigma.detach().to(self.device_)
        self._final_e_step(items, persons)
        self._set_fallback()
        if comm is not None:
            self._gather_persons(comm)

    # ----------------------------------------------------------------- distributed fit
    def _own_rows(self, ids: list) -> np.ndarray | None:
        """Positions of the rows whose person this rank owns, or None when it owns all (one
        process): see :func:`nme.distributed.shard_mask`."""
        comm = getattr(self, "_comm", None)
        if comm is None:
            return None
        return np.flatnonzero(shard_mask(ids, comm))

    def _fit_scaler(self, values: np.ndarray) -> Standardizer:
        """z-normalisation statistics of the training values of every rank."""
        return fit_standardizer(values, getattr(self, "_comm", None))

    def _all_labels(self, labels: set) -> set:
        """The labels (classes, states) seen in the training data of any rank."""
        return union_labels(labels, getattr(self, "_comm", None))

    _VAL_RMS: ClassVar[frozenset[str]] = frozenset()
    """Validation scores that are root-mean-squares (RMSE): reduced over ranks as
    sqrt(Σ w·s² / Σ w); the others as weighted means Σ w·s / Σ w."""

    def _val_weights(self, items: _Items) -> dict[str, float]:
        """How much each validation score of ``items`` weighs when ranks are combined: the
        units it averages over (items here; segments for a per-segment accuracy)."""
        n = float(len(items.ids))
        return {"val_loss": n, "val_metric": n}

    def _reduced_val_scores(self, items: _Items, comm: Comm) -> dict[str, float]:
        """:meth:`_val_scores` over every rank's validation items, the same on every rank."""
        keys = ("val_loss", "val_metric")
        weights = self._val_weights(items) if len(items.ids) else dict.fromkeys(keys, 0.0)
        scores = (self._val_scores(items, self._rows_for(items.ids)) if len(items.ids)
                  else dict.fromkeys(keys, 0.0))
        parts = []
        for k in keys:
            value = scores[k] ** 2 if k in self._VAL_RMS else scores[k]
            parts += [weights[k] * value, weights[k]]
        sums = comm.sum_floats(*parts)
        out = {}
        for j, k in enumerate(keys):
            mean = sums[2 * j] / sums[2 * j + 1] if sums[2 * j + 1] else float("inf")
            out[k] = mean**0.5 if k in self._VAL_RMS else mean
        return out

    def _gather_persons(self, comm: Comm) -> None:
        """After a distributed fit: every rank's θⁱ rows, posterior variances (and whole
        covariances) and person ids onto rank 0, which then holds the complete estimator;
        the other ranks keep their own persons and refuse to :meth:`save`."""
        ids = [p for part in comm.all_gather_objects(list(self.persons_.ids)) for p in part]
        table = gather_rows(self.module_.persons.weight.detach(), comm)
        variance = gather_rows(self._effects_variance, comm)
        covariance = None
        if self._effects_covariance is not None:
            covariance = gather_rows(self._effects_covariance, comm)
        self._n_persons_local = len(self.persons_)
        if comm.rank != 0:
            self._shard = (comm.rank, comm.world_size)
            return
        assert table is not None and variance is not None
        self.persons_ = PersonIndex(ids)
        self.module_.persons = PersonTable(len(ids), table.shape[1]).to(self.device_)
        with torch.no_grad():
            self.module_.persons.weight.copy_(table)
        self._effects_variance = variance
        self._effects_covariance = covariance  # the fallback row is already every rank's

    def _e_step(
        self, items: _Items, persons: torch.Tensor
    ) -> Callable[..., Posterior]:
        """The batched E-step over the training items:
        ``run(σ², Σ (d,), max_iter=None, keep_variance=False)`` sets every θⁱ row of the table
        to its posterior mode in place (Newton steps from the current rows; ``max_iter=0``
        leaves the rows and only evaluates the posterior) and returns the
        :class:`~nme.estep.Posterior`.

        Args:
            items: the training items; persons: ``(n,) long`` their rows in the table.
        """
        module = self.module_
        dim = module.effect_dim
        full = dim <= FULL_MAX_DIM
        groups = group_persons(persons, module.persons.n_persons, dim, full)
        constant = self._constant_curvature()

        def item_losses(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self._train_losses(items, persons, idx, rows)[0]

        def item_curvature(idx: torch.Tensor, rows: torch.Tensor) -> tuple:
            return self._item_curvature(items, idx, rows)

        def run(
            sigma2: float,
            Sigma: torch.Tensor,
            max_iter: int | None = None,
            keep_variance: bool = False,
            keep_covariance: bool = False,
        ) -> Posterior:
            if max_iter is None:
                max_iter = (1 if constant else self.NEWTON_STEPS if full
                            else self.NEWTON_STEPS_DIAGONAL)
            training = module.training
            module.eval()
            try:
                # the table's rows are overwritten in place, chunk by chunk: no copy of it
                return posterior_modes(
                    module.persons.weight.data, groups, item_losses, item_curvature,
                    sigma2, 1.0 / Sigma, max_iter=max_iter, full=full, tol=self.NEWTON_TOL,
                    constant_curvature=constant, keep_variance=keep_variance,
                    keep_covariance=keep_covariance,
                )
            finally:
                module.train(training)

        return run

    def _final_e_step(self, items: _Items, persons: torch.Tensor) -> None:
        """Once θ̄, σ² and Σ are fitted: θⁱ ← posterior modes (``nme`` with
        :meth:`_newton_e_step`), and every person's diagonal posterior variance.

        Under ``unme``/``specific`` (no prior in their objective) and for estimators without a
        Newton E-step the rows stay as trained; their variance is the Laplace one around them
        with the reported σ² and Σ as if they were NME's.
        """
        dim = self.module_.effect_dim
        n_persons = self.module_.persons.n_persons
        self._effects_covariance = None
        if dim == 0 or n_persons == 0:
            self._effects_variance = torch.zeros(n_persons, dim, device=self.device_)
            return
        run = self._e_step(items, persons)
        final_newton = self.method == "nme" and self._newton_e_step() and self.e_step != "sgd"
        total = getattr(self, "_n_persons_total", n_persons)  # every rank's persons
        keep_covariance = (dim <= FULL_MAX_DIM
                           and total * dim * dim <= self.COVARIANCE_MAX_FLOATS)
        post = run(self.sigma2_, self._Sigma_flat, None if final_newton else 0,
                   keep_variance=True, keep_covariance=keep_covariance)
        assert post.variance is not None
        self._effects_variance = post.variance.detach()
        if post.covariance is not None:
            self._effects_covariance = post.covariance.detach()

    def _set_fallback(self) -> None:
        """θⁱ used for unknown persons: zero, or the persons' mean under ``specific`` (over
        every rank's persons during a distributed fit)."""
        table = self.module_.persons.weight.detach()
        comm = getattr(self, "_comm", None)
        if self.method == "specific" and comm is not None:
            self.fallback_effect_ = comm.mean_row(table)
        elif self.method == "specific" and table.shape[0] > 0:
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

    def _variance_for(self, ids: list) -> torch.Tensor:
        """Posterior variances of θⁱ ``(n, dim)`` (training scale) for person ids; unknown
        persons (and every person of an estimator loaded without effects) get the prior Σ."""
        idx = torch.from_numpy(self.persons_.encode(ids)).to(self.device_)
        prior = self._Sigma_flat.to(self.device_)
        table = self._effects_variance
        if table.shape[0] == 0:
            return prior.expand(len(ids), -1)
        rows = table[idx.clamp(min=0)]
        return torch.where((idx >= 0).unsqueeze(-1), rows, prior)

    def _covariance_index(self, ids: list) -> torch.Tensor | None:
        """``(n,) long`` the rows of :meth:`_covariance_rows` for person ids (-1: unknown), or
        None when the estimator keeps only the diagonal (see :attr:`COVARIANCE_MAX_FLOATS`).
        An index, not the ``(n, dim, dim)`` covariances: callers gather them chunk by chunk."""
        table = self._effects_covariance
        if table is None or table.shape[0] == 0:
            return None
        return torch.from_numpy(self.persons_.encode(ids)).to(self.device_)

    def _covariance_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx: (b,) long`` from :meth:`_covariance_index` -> ``(b, dim, dim)`` whole
        posterior covariances of θⁱ (training scale); diag(prior Σ) for unknown persons."""
        assert self._effects_covariance is not None
        prior = torch.diag(self._Sigma_flat.to(self.device_))  # (dim, dim)
        rows = self._effects_covariance[idx.clamp(min=0)]
        return torch.where((idx >= 0)[:, None, None], rows, prior)

    def _variance_tensor(
        self, variance: np.ndarray | None, known: np.ndarray | None, n: int
    ) -> torch.Tensor:
        """``variance: (n, d)`` posterior variances of θⁱ rows as a tensor; None, and rows
        where ``known: (n,) bool`` is False, get the prior Σ (what an unknown person has)."""
        prior = self._Sigma_flat.to(self.device_)
        if variance is None:
            return prior.expand(n, -1)
        v = torch.as_tensor(np.asarray(variance, dtype=np.float32), device=self.device_)
        if v.ndim != 2 or v.shape != (n, self.n_effects_):
            raise ValueError(f"effects_variance must have shape ({n}, {self.n_effects_}), "
                             f"got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
            raise ValueError("effects_variance must be finite and non-negative")
        if known is None:
            return v
        k = torch.as_tensor(np.asarray(known, dtype=bool), device=self.device_)
        return torch.where(k.unsqueeze(-1), v, prior)

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

    def effects_variance_matrix(self) -> np.ndarray:
        """``(n_persons, d) float32``: every training person's diagonal posterior variance of
        θⁱ, same rows and layout as :meth:`effects_matrix`.

        The marginal variances of the Laplace posterior N(θ̂ᵢ, Cᵢ) at the end of ``fit``,
        Cᵢ = (Hᵢ/σ² + Σ⁻¹)⁻¹ with Hᵢ the Gauss–Newton (squared error; exact for a linear
        placement), generalised Gauss–Newton (cross-entropy) or empirical-Fisher (CRF)
        curvature of the person's data (:mod:`nme.estep`); on the training scale, like Σ.
        ``fit_person(..., return_variance=True)`` gives the same for one person. Artifacts of
        schema version 1 (before this existed) load with the prior Σ in every row, which
        only widens intervals.
        """
        self._check_fitted()
        return self._effects_variance.detach().cpu().numpy().astype(np.float32).copy()

    def effects_covariance_matrix(self) -> np.ndarray | None:
        """``(n_persons, d, d) float32`` every training person's whole Laplace posterior
        covariance of θⁱ (training scale, rows in :attr:`person_ids_` order), or None where
        only the diagonal is kept (d > :data:`nme.estep.FULL_MAX_DIM` or more than
        :attr:`COVARIANCE_MAX_FLOATS` floats)."""
        self._check_fitted()
        if self._effects_covariance is None:
            return None
        return self._effects_covariance.detach().cpu().numpy().astype(np.float32).copy()

    def person_effects(self, person: Hashable) -> dict[str, torch.Tensor]:
        """θⁱ of one person per placed parameter (zeros, or the fallback, if unknown)."""
        row = self._rows_for([person])[0]
        return {k: v.cpu().clone() for k, v in self.effects_layout_.split(row).items()}

    # ----------------------------------------------------------------- per-person E-step
    def _fit_person(
        self,
        items: _Items | None,
        init: np.ndarray | None,
        max_iter: int,
        return_variance: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The E-step behind every ``fit_person``: θ̄, σ², Σ fixed, one person's θⁱ optimised.

        ``nme``: the posterior mode of (1/σ²) Σⱼ lⱼ(θ̄ + θ) + θᵀΣ⁻¹θ by the same batched Newton
        steps as the final E-step of ``fit`` (:mod:`nme.estep`), so refitting a person on
        their training items reproduces their row. ``unme``/``specific`` (and estimators
        without a Newton E-step): L-BFGS on their own objective (σ² = 1 and no penalty for
        ``unme``/``specific``, Eq. 1 otherwise). The start is ``init`` or the fallback row.

        Args:
            items: the person's labelled items (all of one person), or None when they have
                none.
            init: ``(d,)`` starting θⁱ.
            max_iter: Newton steps (nme) or L-BFGS iterations at most.
            return_variance: also return the diagonal Laplace posterior variance.

        Returns:
            ``(d,) float32`` the person's new θⁱ (``init``, or zeros, if there is nothing to
            fit); with ``return_variance``, ``(θⁱ (d,), variance (d,))`` float32 — the prior Σ
            for a person without items.
        """
        self._check_fitted()
        dim = self.n_effects_
        if items is None or dim == 0 or items.x.shape[0] == 0:
            theta = (np.zeros(dim, np.float32) if init is None
                     else np.asarray(init, np.float32).reshape(dim))
            if return_variance:
                return theta, self._Sigma_flat.detach().cpu().numpy().astype(np.float32)
            return theta
        start = self.fallback_effect_ if init is None else self._effects_tensor(
            np.asarray(init, np.float32).reshape(1, dim), None)[0]
        persons = torch.zeros(items.x.shape[0], dtype=torch.long, device=self.device_)
        module = self.module_
        module.eval()
        newton = self.method == "nme" and self._newton_e_step()
        full = dim <= FULL_MAX_DIM
        groups = group_persons(persons, 1, dim, full)

        def item_losses(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self._train_losses(items, persons, idx, rows)[0]

        def item_curvature(idx: torch.Tensor, rows: torch.Tensor) -> tuple:
            return self._item_curvature(items, idx, rows)

        sigma_inv = 1.0 / self._Sigma_flat
        if newton:
            constant = self._constant_curvature()
            post = posterior_modes(
                start.detach().clone()[None], groups, item_losses, item_curvature, self.sigma2_,
                sigma_inv, max_iter=1 if constant else max_iter, full=full, tol=self.NEWTON_TOL,
                constant_curvature=constant,
            )
            theta_t = post.modes[0]
        else:
            theta_t = self._lbfgs_person(items, persons, start, max_iter)
            post = posterior_modes(theta_t.clone()[None], groups, item_losses, item_curvature,
                                   self.sigma2_, sigma_inv, max_iter=0, full=full)
        theta = theta_t.detach().cpu().numpy().astype(np.float32)
        if return_variance:
            assert post.variance is not None
            return theta, post.variance[0].detach().cpu().numpy().astype(np.float32)
        return theta

    def _lbfgs_person(
        self, items: _Items, persons: torch.Tensor, start: torch.Tensor, max_iter: int
    ) -> torch.Tensor:
        """``(d,)`` one person's θⁱ by L-BFGS on their objective (see :meth:`_fit_person`)."""
        theta = start.detach().clone().requires_grad_(True)
        penalised = self.method == "nme"
        sigma_inv = 1.0 / self._Sigma_flat if penalised else None
        sigma2 = self.sigma2_ if penalised else 1.0
        idx = torch.arange(items.x.shape[0], device=self.device_)
        opt = torch.optim.LBFGS(
            [theta], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
            tolerance_grad=1e-6, tolerance_change=1e-9,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            rows = theta.expand(idx.shape[0], -1)  # (n, d): the same θ for every item
            loss = self._train_losses(items, persons, idx, rows)[0].sum() / sigma2
            if sigma_inv is not None:
                loss = loss + (theta * theta * sigma_inv).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return theta.detach()

    # ----------------------------------------------------------------- artifacts
    def save(self, path: str | os.PathLike, include_effects: bool = True) -> None:
        """Write the artifact directory (see :mod:`nme.artifact`).

        ``include_effects=False`` leaves out the person table (the service keeps θⁱ in its
        database); person ids are then not stored either.
        """
        self._check_fitted()
        shard = self._shard
        if shard is not None:
            raise ValueError(f"this estimator holds only the persons of rank {shard[0]} of a "
                             f"distributed fit over {shard[1]} ranks; rank 0 holds all of them "
                             "and saves the artifact")
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
            "n_iter": self.n_iter_,
            "converged": self.converged_,
            **self._extra_config(),
        }
        tensors = {f"theta.{k}": v for k, v in self.module_.base.state_dict().items()}
        tensors["x_mean"] = torch.from_numpy(self.x_scaler_.mean)
        tensors["x_std"] = torch.from_numpy(self.x_scaler_.std)
        tensors["Sigma"] = self._Sigma_flat
        tensors["fallback_effect"] = self.fallback_effect_
        if include_effects:
            tensors["effects"] = self.module_.persons.weight
            tensors["effects_variance"] = self._effects_variance
            if self._effects_covariance is not None:
                tensors["effects_covariance"] = self._effects_covariance
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
        est.n_iter_ = int(config.get("n_iter", len(est.history_)))
        est.converged_ = bool(config.get("converged", True))
        variance = tensors.get("effects_variance")
        n_rows = len(ids) if has_effects else 0
        if variance is None:  # schema version 1: no posterior variances, the prior instead
            variance = est._Sigma_flat.expand(n_rows, -1)
        elif tuple(variance.shape) != (n_rows, dim):
            raise ArtifactError(f"artifact {path}: effects_variance has shape "
                                f"{tuple(variance.shape)}, expected ({n_rows}, {dim})")
        est._effects_variance = variance.to(est.device_).clone()
        covariance = tensors.get("effects_covariance")  # optional: small tables only
        if covariance is not None and tuple(covariance.shape) != (n_rows, dim, dim):
            raise ArtifactError(f"artifact {path}: effects_covariance has shape "
                                f"{tuple(covariance.shape)}, expected ({n_rows}, {dim}, {dim})")
        est._effects_covariance = (None if covariance is None
                                   else covariance.to(est.device_).clone())
    except ArtifactError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise ArtifactError(f"artifact {path} does not fit its config: {err}") from err
    return est
