"""Estimators on tables: :class:`NMERegressor` and :class:`NMEClassifier`.

Both wrap an :class:`~nme.mlp.MLP` in a :class:`~nme.personalize.PersonalizedModule` and train it
with the fit skeleton of :class:`nme.base._NMEEstimator`; one training item is one row. Features
are z-normalised on the training data; for regression so is y (predictions come back on the
original scale). Unknown persons get the generic model (see :mod:`nme.base`, also for
``anneal``).

``m_step`` (see :func:`nme.objective.laplace_posterior`): ``"paper"`` is the paper's M-step,
σ² = mean training loss and Σ = variance of the θⁱ modes across persons; ``"laplace"`` adds
each person's diagonal Laplace posterior variance of θⁱ — for regression with the exact
Gauss–Newton curvature (the EM of a linear mixed model: it lands on the REML estimates of
sleepstudy and Orthodont), for classification with the empirical Fisher of the cross-entropy.
``"laplace"`` is the default of both: the paper's M-step collapses Σ to 0
for classification once training runs long, and for regression, after the exact E-step, it
cost NME its lead over MLP-LME on simulated mood. Why these defaults, with the measurements:
``docs/decisions.md``.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from statistics import NormalDist
from typing import Self

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.exceptions import DataConversionWarning
from sklearn.metrics import r2_score
from sklearn.utils.multiclass import check_classification_targets

from nme.base import _check_number, _Items, _NMEEstimator, load_estimator, resolve_device
from nme.data import ArrayLike, Standardizer, as_id_list, feature_matrix
from nme.mlp import MLP
from nme.personalize import PersonalizedModule
from nme.persons import Gathered
from nme.train import SquaredGrads

__all__ = ["NMEClassifier", "NMERegressor", "load_estimator", "resolve_device"]


class _TabularEstimator(_NMEEstimator):
    """Estimators on a table: one item per row, an :class:`~nme.mlp.MLP` over its features.

    Subclasses define the target encoding, the per-row loss, the validation metric and the
    outputs.
    """

    # ----------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def _encode_target(self, y: ArrayLike, fitting: bool, name: str = "y") -> torch.Tensor:
        """``y: (n,)`` labels -> ``(n,)`` what :meth:`_item_losses` takes; ``fitting`` learns
        the encoding (scaler, classes) first."""

    @abc.abstractmethod
    def _item_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``out: (b, outputs)``, ``y: (b,)`` -> ``(b,)`` downstream loss."""

    @abc.abstractmethod
    def _val_metric(self, out: torch.Tensor, y: torch.Tensor) -> float:
        """The reported validation metric of outputs ``(n, outputs)`` for targets ``(n,)``."""

    @abc.abstractmethod
    def score_per_person(
        self,
        X: ArrayLike,
        y: ArrayLike,
        persons: Sequence[Hashable],
        effects: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> float:
        """Per-person averaged score, higher is better (see the subclass)."""

    # ----------------------------------------------------------------- fitting
    def _build(self, n_features: int, n_persons: int) -> PersonalizedModule:
        base = MLP(n_features, self.hidden, self._n_outputs(), self.activation, self.dropout)
        return PersonalizedModule(base, self.placement, n_persons, self.method)

    def fit(
        self,
        X: ArrayLike,
        y: ArrayLike,
        persons: Sequence[Hashable] | np.ndarray,
        X_val: ArrayLike | None = None,
        y_val: ArrayLike | None = None,
        persons_val: Sequence[Hashable] | np.ndarray | None = None,
        callback: Callable[[dict], None] | None = None,
    ) -> Self:
        """Fit on ``X: (n, F)``, ``y: (n,)``, ``persons: (n,)`` hashable ids.

        With a validation set, training stops after ``patience`` epochs without improvement of
        the validation loss and keeps the best epoch. ``callback(record)`` receives each
        epoch's history record.
        """
        validation = None
        if X_val is not None:
            validation = partial(self._validation_rows, X_val, y_val, persons_val)
        return self._fit(partial(self._training_rows, X, y, persons), validation, callback)

    def _training_rows(
        self, X: ArrayLike, y: ArrayLike, persons: Sequence[Hashable] | np.ndarray
    ) -> _Items:
        """Check the training table, learn the feature names, scaler and target encoding."""
        x, names = feature_matrix(X)
        ids = as_id_list(persons)
        if any(p is None or (isinstance(p, float) and p != p) for p in ids):
            raise ValueError("persons contains missing ids (None/NaN)")
        if len(ids) != x.shape[0]:
            raise ValueError(f"persons has {len(ids)} entries, X has {x.shape[0]} rows")
        if x.shape[0] == 0:
            raise ValueError("cannot fit on an empty training set")
        own = self._own_rows(ids)  # a distributed fit keeps this rank's persons' rows
        if own is not None:
            y = _target_1d(y, "y")
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has {y.shape[0]} entries, X has {x.shape[0]} rows")
            x, y, ids = x[own], y[own], [ids[k] for k in own]
        self.feature_names_ = names or [f"x{k}" for k in range(x.shape[1])]
        self._names_from_frame = names is not None
        self._set_feature_attributes(names, x.shape[1])
        self.x_scaler_ = self._fit_scaler(x)
        y_t = self._encode_target(y, fitting=True)
        if y_t.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y_t.shape[0]} entries, X has {x.shape[0]} rows")
        xt = torch.from_numpy(self.x_scaler_.transform(x)).to(self.device_)
        return _Items(x=xt, y=y_t.to(self.device_), ids=ids)

    def _validation_rows(
        self,
        X_val: ArrayLike,
        y_val: ArrayLike | None,
        persons_val: Sequence[Hashable] | np.ndarray | None,
    ) -> _Items:
        if y_val is None or persons_val is None:
            raise ValueError("X_val needs y_val and persons_val")
        x = self._input(X_val, "X_val")
        y = self._encode_target(y_val, fitting=False, name="y_val").to(self.device_)
        ids = as_id_list(persons_val)
        own = self._own_rows(ids)  # a distributed fit validates each rank's own persons
        if own is not None:
            index = torch.from_numpy(own).to(self.device_)
            x, y, ids = x[index], y[index], [ids[k] for k in own]
        return _Items(x=x, y=y, ids=ids)

    def _train_losses(
        self,
        items: _Items,
        persons: torch.Tensor,
        idx: torch.Tensor,
        effects: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | Gathered]:
        if effects is not None:
            out, rows = self.module_(items.x[idx], effects=effects)
        else:
            out, rows = self.module_(items.x[idx], persons[idx], gathered=True)
        return self._item_losses(out, items.y[idx]), rows

    def _val_scores(self, items: _Items, rows: torch.Tensor) -> dict[str, float]:
        out = self._forward(items.x, rows)
        return {
            "val_loss": float(self._item_losses(out, items.y).mean()),
            "val_metric": self._val_metric(out, items.y),
        }

    # ----------------------------------------------------------------- inference
    def _input(self, X: ArrayLike, name: str = "X") -> torch.Tensor:
        """``X: (n, F)`` checked against the fitted features -> ``(n, F)`` normalised."""
        self._check_fitted()
        expected = self.feature_names_ if self._names_from_frame else None
        x, _ = feature_matrix(X, expected=expected, name=name)
        if x.shape[1] != len(self.feature_names_):
            raise ValueError(f"{name} has {x.shape[1]} features, but {type(self).__name__} is "
                             f"expecting {len(self.feature_names_)} features as input")
        return torch.from_numpy(self.x_scaler_.transform(x)).to(self.device_)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, rows: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """``x: (n, F)`` normalised, ``rows: (n, dim)`` -> ``(n, outputs)`` raw outputs."""
        if self.module_.training:
            self.module_.eval()
        if x.shape[0] == 0:
            return torch.zeros(0, self._n_outputs(), device=self.device_)
        outs = [
            self.module_(x[s : s + chunk], effects=rows[s : s + chunk])[0]
            for s in range(0, x.shape[0], chunk)
        ]
        return torch.cat(outs)

    def _inputs_and_rows(
        self,
        X: ArrayLike,
        persons: Sequence[Hashable] | None = None,
        effects: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x (n, F) normalised, θⁱ rows (n, d))``: explicit ``effects`` (fallback where
        ``known`` is False), else the persons' own rows, else the fallback row for all."""
        x = self._input(X)
        if effects is not None:
            rows = self._effects_tensor(effects, known)
        elif persons is not None:
            rows = self._rows_for(as_id_list(persons))
        else:
            rows = self.fallback_effect_.expand(x.shape[0], -1)
        if rows.shape[0] != x.shape[0]:
            raise ValueError(f"got {rows.shape[0]} persons/effects for {x.shape[0]} rows of X")
        return x, rows

    def _raw(
        self,
        X: ArrayLike,
        persons: Sequence[Hashable] | None = None,
        effects: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> torch.Tensor:
        return self._forward(*self._inputs_and_rows(X, persons, effects, known))

    # ----------------------------------------------------------------- per-person E-step
    def fit_person(
        self,
        X: ArrayLike,
        y: ArrayLike,
        init: np.ndarray | None = None,
        max_iter: int = 100,
        return_variance: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """E-step for one person: θ̄, σ², Σ fixed, only this person's θⁱ optimised.

        Under ``nme`` θⁱ becomes the posterior mode of (1/σ²) Σⱼ l(yⱼ, f(Xⱼ; θ̄ + θ)) + θᵀΣ⁻¹θ
        (the person's part of Eq. 1) by the batched Newton steps of the final E-step of
        ``fit`` (exact in one step for squared error on a linear placement); ``unme`` and
        ``specific`` minimise their own loss (no penalty) with L-BFGS. The start is ``init``
        (their current row) or the fallback row.

        Args:
            X: ``(n, F)`` all of the person's labelled observations; ``y: (n,)``.
            init: ``(d,)`` float32 starting θⁱ.
            max_iter: Newton steps (``nme``) or L-BFGS iterations at most.
            return_variance: also return the person's diagonal Laplace posterior variance of
                θⁱ (what :meth:`effects_variance_matrix` holds for training persons).

        Returns:
            ``(d,) float32`` the person's new θⁱ; with ``return_variance=True`` the pair
            ``(theta (d,), variance (d,))``, both float32 (the prior Σ when ``X`` is empty).
        """
        x = self._input(X)
        yt = self._encode_target(y, fitting=False).to(self.device_)
        items = _Items(x=x, y=yt, ids=[0] * x.shape[0]) if x.shape[0] else None
        return self._fit_person(items, init, max_iter, return_variance)

    # ----------------------------------------------------------------- E-step curvature
    @abc.abstractmethod
    def _loss_terms(
        self, out: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``out: (b, K)``, ``y: (b,)`` -> per item the loss ``(b,)``, its gradient w.r.t. the
        outputs ``(b, K)`` and a factor A ``(b, K, K)`` of half its Hessian w.r.t. the outputs,
        ½ ∂²l/∂out² = A Aᵀ."""

    def _item_curvature(
        self, items: _Items, idx: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generalised Gauss–Newton: Hⱼ = Jⱼᵀ AⱼAⱼᵀ Jⱼ with Jⱼ = ∂f(Xⱼ)/∂θⁱ ``(K, d)`` (one
        backward pass per output), factor Fⱼ = AⱼᵀJⱼ — exact for squared error and for
        cross-entropy when θⁱ enters the outputs linearly."""
        leaf = rows.detach().clone().requires_grad_(True)  # (b, d)
        with torch.enable_grad():
            out, _ = self.module_(items.x[idx], effects=leaf)  # (b, K)
            k_out = out.shape[1]
            jac = torch.stack([
                torch.autograd.grad(out[:, k].sum(), leaf, retain_graph=k < k_out - 1)[0]
                for k in range(k_out)
            ], 1)  # (b, K, d)
        losses, dl, factor = self._loss_terms(out.detach(), items.y[idx])
        grads = torch.einsum("bk,bkd->bd", dl, jac)
        return losses, grads, factor.mT @ jac  # (b, K, d)

    def _output_bias(self, effects: np.ndarray) -> np.ndarray:
        """``effects: (n, d)`` -> ``(n, K)`` float64 each row's θⁱ part of the output bias
        (training scale; zeros when the output bias is not placed)."""
        e = torch.as_tensor(np.asarray(effects, dtype=np.float32))
        parts = self.effects_layout_.split(e)
        bias = parts.get(f"layers.{len(self.hidden)}.bias")
        if bias is None:
            return np.zeros((e.shape[0], self._n_outputs()))
        return bias.numpy().astype(np.float64)

    def _placed_on_last_layer(self) -> bool:
        """Every placed parameter belongs to the output layer, so the outputs are linear in θⁱ."""
        last = f"layers.{len(self.hidden)}."
        return all(n.startswith(last) for n in self.module_.layout.names)

    # ----------------------------------------------------------------- scoring
    def _predict_rows(
        self,
        X: ArrayLike,
        persons: Sequence[Hashable],
        effects: np.ndarray | None,
        known: np.ndarray | None,
    ) -> np.ndarray:
        """``(n,)`` predictions with explicit θⁱ rows if given, else the persons' own."""
        if effects is not None:
            return self.predict_with_effects(X, effects, known)
        return self.predict(X, persons)

    @abc.abstractmethod
    def predict(self, X: ArrayLike, persons: Sequence[Hashable] | None = None) -> np.ndarray:
        """``X: (n, F)``, ``persons: (n,)`` ids -> ``(n,)`` predictions."""

    @abc.abstractmethod
    def predict_with_effects(
        self, X: ArrayLike, effects: np.ndarray, known: np.ndarray | None = None
    ) -> np.ndarray:
        """``(n,)`` predictions with explicit θⁱ rows ``effects: (n, d)``."""


def _target_1d(y: ArrayLike, name: str) -> np.ndarray:
    """``y`` as a 1-D array; a column vector ``(n, 1)`` is flattened with scikit-learn's
    ``DataConversionWarning``."""
    if y is None:
        raise ValueError("this estimator requires y to be passed, but the target y is None")
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    values = np.asarray(y)
    if values.ndim == 2 and values.shape[1] == 1:
        warnings.warn(f"A column-vector {name} was passed when a 1d array was expected; "
                      "flattening it", DataConversionWarning, stacklevel=4)
        values = values.ravel()
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {values.shape}")
    return values


def _gaussian_quantile(coverage: float) -> float:
    """z with P(|N(0, 1)| ≤ z) = ``coverage``; ValueError unless 0 < coverage < 1."""
    _check_number("coverage", coverage, low=0.0, high=1.0, low_open=True, high_open=True)
    return NormalDist().inv_cdf(0.5 + 0.5 * float(coverage))


def _label_array(classes: list) -> np.ndarray:
    """Class labels as an array of their own type (object when the types are mixed)."""
    same = len({type(c) for c in classes}) == 1
    return np.asarray(classes) if same else np.asarray(classes, dtype=object)


def _per_person_mean(values: np.ndarray, persons: Sequence[Hashable]) -> np.ndarray:
    """``values: (n,)`` -> ``(n_persons,)`` each person's mean, persons in sorted id order."""
    ids = np.asarray([str(p) for p in as_id_list(persons)])
    _, inv = np.unique(ids, return_inverse=True)
    return np.bincount(inv, weights=values) / np.bincount(inv)


class NMERegressor(RegressorMixin, _TabularEstimator):
    """NME regression: squared-error loss on z-normalised y.

    ``hidden=()`` is a linear model, so ``placement="all"`` is a random intercept and slope model.
    """

    def _n_outputs(self) -> int:
        return 1

    def _encode_target(self, y: ArrayLike, fitting: bool, name: str = "y") -> torch.Tensor:
        try:
            yv = np.asarray(_target_1d(y, name), dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be numeric for regression: {err}") from err
        if not np.isfinite(yv).all():
            raise ValueError(f"{name} contains NaN or inf")
        if fitting:
            self.y_scaler_ = self._fit_scaler(yv)
        return torch.from_numpy(self.y_scaler_.transform(yv))

    def _item_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out.squeeze(-1) - y) ** 2

    def _loss_terms(
        self, out: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        resid = out - y.unsqueeze(-1)  # (b, 1)
        # l = r², ½ ∂²l/∂out² = 1
        return (resid.squeeze(-1) ** 2, 2 * resid,
                torch.ones(out.shape[0], 1, 1, dtype=out.dtype, device=out.device))

    _VAL_RMS = frozenset({"val_metric"})  # the RMSE combines over ranks as a root mean square

    def _constant_curvature(self) -> bool:
        # squared error: the Gauss–Newton curvature is exact and constant when the output is
        # linear in θⁱ, and one Newton step is the ridge solve of a linear mixed model's BLUP
        return self._placed_on_last_layer()

    def _val_metric(self, out: torch.Tensor, y: torch.Tensor) -> float:
        # RMSE on the label's original scale
        return float(((out.squeeze(-1) - y) ** 2).mean().sqrt()) * float(self.y_scaler_.std)

    def _squared_grads(self, items: _Items, persons: torch.Tensor) -> SquaredGrads | None:
        if self.m_step != "laplace":
            return None
        module = self.module_

        # squared error has an exact Gauss–Newton curvature (REML in the linear case), so the
        # Laplace M-step does not need fit_loop's empirical Fisher
        def squared_grads() -> torch.Tensor:
            return module.squared_output_grads(items.x, persons)

        return squared_grads

    def _extra_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "y_mean": torch.from_numpy(self.y_scaler_.mean.reshape(1)),
            "y_std": torch.from_numpy(self.y_scaler_.std.reshape(1)),
        }

    def _restore_extra(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.y_scaler_ = Standardizer(tensors["y_mean"].numpy()[0], tensors["y_std"].numpy()[0])

    def _to_label_scale(self, out: torch.Tensor) -> np.ndarray:
        return self.y_scaler_.inverse(out.squeeze(-1).cpu().numpy().astype(np.float64))

    def predict(
        self,
        X: ArrayLike,
        persons: Sequence[Hashable] | None = None,
        return_std: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """``X: (n, F)``, ``persons: (n,)`` ids -> ``(n,)`` predictions on the label's scale.

        Unknown persons (and ``persons=None``) get the generic model (the fallback row).

        With ``return_std=True`` also the ``(n,)`` standard deviation of a *new* observation
        y of that person at that X, in label units: √(σ² + Jᵀ Cᵢ J) · std(y), where σ² is
        the noise variance, Cᵢ ``(d, d)`` the person's Laplace posterior covariance of θⁱ
        (diag(Σ), the prior, for unknown persons) and J = ∂f(x; θ̄ + θⁱ)/∂θⁱ at their
        posterior mode (delta method; exact when θⁱ enters the output linearly, e.g.
        ``placement="last"`` or ``hidden=()``). Training persons keep their whole Cᵢ while
        P·d² fits in :attr:`COVARIANCE_MAX_FLOATS` (the default network's last-layer
        parameters are strongly correlated: on simulated mood, 90 % intervals cover 89 % of
        held-out days with the whole Cᵢ and 96 % with its diagonal); beyond that, and in
        :meth:`predict_with_effects` (the service stores the diagonal), Cᵢ is taken diagonal,
        which errs on the wide side. θ̄, σ² and Σ are treated as known: their own
        estimation error is not in the std.
        """
        x, rows = self._inputs_and_rows(X, persons=persons)
        if not return_std:
            return self._to_label_scale(self._forward(x, rows))
        ids = as_id_list(persons) if persons is not None else None
        variance = (self._variance_for(ids) if ids is not None
                    else self._Sigma_flat.expand(x.shape[0], -1))
        covariance = self._covariance_index(ids) if ids is not None else None
        return self._mean_and_std(x, rows, variance, covariance)

    def predict_interval(
        self,
        X: ArrayLike,
        persons: Sequence[Hashable] | None = None,
        coverage: float = 0.9,
    ) -> np.ndarray:
        """``(n, 2)`` lower and upper bounds (label units) of a Gaussian prediction interval
        for a new observation: mean ∓ z·std with z the (1 + coverage)/2 quantile of N(0, 1)
        and the std of :meth:`predict` with ``return_std=True``.

        Args:
            X: ``(n, F)``; persons: ``(n,)`` ids (unknown ones and None: generic model and
                prior Σ, so their intervals are the widest).
            coverage: the intended probability that y falls inside, strictly in (0, 1).
        """
        z = _gaussian_quantile(coverage)
        mean, std = self.predict(X, persons, return_std=True)
        return np.stack([mean - z * std, mean + z * std], axis=1)

    def predict_with_effects(
        self,
        X: ArrayLike,
        effects: np.ndarray,
        known: np.ndarray | None = None,
        effects_variance: np.ndarray | None = None,
        return_std: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predict with explicit θⁱ rows (as the service fetches them from its database).

        Args:
            X: ``(n, F)``.
            effects: ``(n, d) float32`` θⁱ rows.
            known: ``(n,) bool``; False rows get the generic model and the prior Σ as their
                variance, whatever ``effects`` and ``effects_variance`` hold there.
            effects_variance: ``(n, d) float32`` each row's diagonal posterior variance of θⁱ
                on the training scale (a row of :meth:`effects_variance_matrix` or the
                variance of ``fit_person(..., return_variance=True)``); None with
                ``return_std=True`` uses the prior Σ for every row (the widest, conservative).
            return_std: also return the ``(n,)`` std of a new observation in label units (see
                :meth:`predict`).

        Returns:
            ``(n,)`` predictions in label units, or ``(mean (n,), std (n,))``.
        """
        x, rows = self._inputs_and_rows(X, effects=effects, known=known)
        if not return_std:
            return self._to_label_scale(self._forward(x, rows))
        variance = self._variance_tensor(effects_variance, known, x.shape[0])
        return self._mean_and_std(x, rows, variance)

    def _mean_and_std(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        variance: torch.Tensor,
        covariance_index: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std of a new observation, in label units.

        Args:
            x: ``(n, F)`` normalised inputs; rows: ``(n, d)`` θⁱ; variance: ``(n, d)`` their
                diagonal posterior variances (training scale).
            covariance_index: ``(n,) long`` rows of the persons' whole posterior covariances
                (:meth:`_covariance_index`), used instead of ``variance`` when given (JᵀCJ);
                gathered per chunk, so no ``(n, d, d)`` tensor is ever formed.

        Returns:
            ``(mean (n,), std (n,))`` float64, label units.
        """
        module = self.module_
        if module.training:
            module.eval()
        n, d = rows.shape
        # J is one backward pass per chunk: row b's output depends on row b's θⁱ only, so the
        # gradient of the summed outputs w.r.t. a per-row leaf is every row's own J. The chunk
        # keeps the per-row (b, d) tensors of the graph to ~4M floats whatever d is.
        per_row = d * d if covariance_index is not None else d
        chunk = max(1, min(8192, (1 << 22) // max(per_row, 1)))
        means, variances = [], []
        for s in range(0, n, chunk):
            # clones made with grad mode on: a caller's inference tensors cannot join a graph
            with torch.inference_mode(False), torch.enable_grad():
                leaf = rows[s : s + chunk].detach().clone().requires_grad_(d > 0)  # (b, d)
                out = module(x[s : s + chunk].clone(), effects=leaf)[0].squeeze(-1)  # (b,)
                if d > 0:
                    (jac,) = torch.autograd.grad(out.sum(), leaf)  # (b, d)
                    if covariance_index is not None:  # JᵀCJ per row
                        cov = self._covariance_rows(covariance_index[s : s + chunk])
                        spread = torch.einsum("bd,bde,be->b", jac, cov, jac)
                    else:
                        spread = (jac * jac * variance[s : s + chunk]).sum(-1)  # (b,)
                else:
                    spread = torch.zeros_like(out)
            means.append(out.detach())
            variances.append(spread.detach())
        if n == 0:
            empty = np.zeros(0)
            return empty, empty
        mean = self._to_label_scale(torch.cat(means).unsqueeze(-1))
        var = torch.cat(variances).to(torch.float64).cpu().numpy() + float(self.sigma2_)
        return mean, np.sqrt(var) * float(self.y_scaler_.std)

    def person_bias(self, effects: np.ndarray) -> np.ndarray:
        """``effects: (n, d)`` -> ``(n,)`` each person's shift of the output bias, label units.

        Zero when the output bias is not among the placed parameters.
        """
        return self._output_bias(effects)[:, 0] * float(self.y_scaler_.std)

    def score(
        self,
        X: ArrayLike,
        y: ArrayLike,
        persons: Sequence[Hashable] | np.ndarray | None = None,
        sample_weight: ArrayLike | None = None,
    ) -> float:
        """R² of the personalised predictions (scikit-learn's regressor score).

        ``persons: (n,)`` ids select each row's θⁱ; without them every row gets the generic
        model. With metadata routing enabled, GridSearchCV and cross_val_score pass each
        split's ``persons`` here (see the class docstring).
        """
        return float(r2_score(y, self.predict(X, persons), sample_weight=sample_weight))

    def score_per_person(
        self,
        X: ArrayLike,
        y: ArrayLike,
        persons: Sequence[Hashable],
        effects: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> float:
        """Negative RMSE computed per person, then averaged over persons (higher is better)."""
        pred = self._predict_rows(X, persons, effects, known)
        err = (pred - np.asarray(y, dtype=np.float64)) ** 2
        return -float(np.sqrt(_per_person_mean(err, persons)).mean())


class NMEClassifier(ClassifierMixin, _TabularEstimator):
    """NME classification: cross-entropy loss; ``classes_`` are the sorted distinct labels.

    Same parameters and defaults as :class:`NMERegressor` (for the M-step see the module
    docstring).
    """

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
        super().__init__(
            hidden=hidden, placement=placement, method=method, activation=activation,
            dropout=dropout, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
            max_epochs=max_epochs, patience=patience, anneal=anneal, m_step=m_step,
            batching=batching, device=device, random_state=random_state, verbose=verbose,
            e_step=e_step, tol=tol, n_iter_no_change=n_iter_no_change,
        )

    def _n_outputs(self) -> int:
        return len(self.classes_)

    def _encode_target(self, y: ArrayLike, fitting: bool, name: str = "y") -> torch.Tensor:
        values = _target_1d(y, name)
        labels = as_id_list(values)
        if fitting:
            check_classification_targets(values)  # "Unknown label type" for continuous y
            classes = sorted(self._all_labels(set(labels)), key=lambda c: (str(type(c)), c))
            if len(classes) < 2:
                raise ValueError(f"classification needs at least two classes in y; got one "
                                 f"class: {classes}")
            self.classes_ = _label_array(classes)
        index = {c: k for k, c in enumerate(self.classes_)}
        unknown = sorted({str(c) for c in labels if c not in index})
        if unknown:
            raise ValueError(f"{name} has labels not seen at fit time: {unknown[:10]}")
        return torch.tensor([index[c] for c in labels], dtype=torch.long)

    def _item_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    def _loss_terms(
        self, out: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(out, -1)  # (b, K)
        p = logp.exp()
        losses = -logp.gather(1, y[:, None]).squeeze(1)
        dl = p - F.one_hot(y, out.shape[1]).to(p.dtype)
        # ½(diag p − ppᵀ) = A Aᵀ with A = diag(√p)(I − √p√pᵀ)/√2 (I − √p√pᵀ is a projector)
        root = p.sqrt()  # (b, K)
        eye = torch.eye(out.shape[1], dtype=p.dtype, device=p.device)
        projector = eye - root[:, :, None] * root[:, None, :]  # (b, K, K)
        factor = root[:, :, None] * projector * 0.5**0.5
        return losses, dl, factor

    def _val_metric(self, out: torch.Tensor, y: torch.Tensor) -> float:
        return float((out.argmax(-1) == y).float().mean())

    def _extra_config(self) -> dict:
        return {"classes": as_id_list(self.classes_)}

    def _restore_extra(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.classes_ = _label_array(list(config["classes"]))

    def predict_proba(self, X: ArrayLike, persons: Sequence[Hashable] | None = None) -> np.ndarray:
        """``(n, n_classes)`` class probabilities, columns in the order of ``classes_``.

        A plug-in estimate: the softmax of the logits at θ̄ + θ̂ⁱ, the posterior mode of the
        person's θⁱ (the fallback row, θⁱ = 0, for unknown persons). The posterior
        uncertainty of θⁱ (:meth:`effects_variance_matrix`) is not integrated over, so the
        probabilities of a person with few observations are not pulled towards the
        population's beyond what the prior's shrinkage of their mode already does; they are
        not per-person calibrated the way :meth:`NMERegressor.predict_interval` is.
        """
        return torch.softmax(self._raw(X, persons=persons), -1).cpu().numpy()

    def predict_proba_with_effects(
        self, X: ArrayLike, effects: np.ndarray, known: np.ndarray | None = None
    ) -> np.ndarray:
        """Like :meth:`predict_proba` (the same plug-in of the given rows) with explicit θⁱ
        rows ``(n, d)`` (see the regressor)."""
        return torch.softmax(self._raw(X, effects=effects, known=known), -1).cpu().numpy()

    def predict(self, X: ArrayLike, persons: Sequence[Hashable] | None = None) -> np.ndarray:
        """``(n,)`` the most probable class label of each row."""
        proba = self.predict_proba(X, persons)
        return self.classes_[proba.argmax(-1)]

    def predict_with_effects(
        self, X: ArrayLike, effects: np.ndarray, known: np.ndarray | None = None
    ) -> np.ndarray:
        proba = self.predict_proba_with_effects(X, effects, known)
        return self.classes_[proba.argmax(-1)]

    def person_bias(self, effects: np.ndarray) -> np.ndarray:
        """``effects: (n, d)`` -> ``(n, n_classes)`` each person's shift of the output logits."""
        return self._output_bias(effects)

    def score(
        self,
        X: ArrayLike,
        y: ArrayLike,
        persons: Sequence[Hashable] | np.ndarray | None = None,
        sample_weight: ArrayLike | None = None,
    ) -> float:
        """Accuracy of the personalised predictions (scikit-learn's classifier score); see
        :meth:`NMERegressor.score`."""
        pred = as_id_list(self.predict(X, persons))
        hits = np.asarray([a == b for a, b in zip(pred, as_id_list(y), strict=True)], float)
        return float(np.average(hits, weights=sample_weight))

    def score_per_person(
        self,
        X: ArrayLike,
        y: ArrayLike,
        persons: Sequence[Hashable],
        effects: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> float:
        """Accuracy computed per person, then averaged over persons (higher is better)."""
        pred = self._predict_rows(X, persons, effects, known)
        hit = np.asarray([a == b for a, b in zip(pred, as_id_list(y), strict=True)], dtype=float)
        return float(_per_person_mean(hit, persons).mean())
