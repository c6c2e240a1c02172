"""The MLP-LME baseline: an MLP whose last layer carries linear mixed effects, fitted by EM.

Model (on z-normalised features and target), for person i and observation j::

    yⁱⱼ = f(xⁱⱼ; θ̄) + zⁱⱼᵀ bᵢ + εⁱⱼ,   zⁱⱼ = [h(xⁱⱼ; θ̄), 1] ∈ R^q,
    bᵢ ~ N(0, D),   εⁱⱼ ~ N(0, σ²),

where h is the last hidden layer's output (the input itself when ``hidden=()``), so bᵢ is a
person-specific offset of the last layer's weight and bias, q = last hidden width + 1, and D is
a full q×q covariance. This is Xiong et al. (2019, MeNets) following Lindstrom & Bates (1988):
alternate

(a) ``epochs_per_step`` epochs of AdamW on θ̄ with the bᵢ held fixed, i.e. the network is
    trained on y minus the random-effect part (the gradient also flows through h, because
    zᵀbᵢ depends on the hidden layers);
(b) one EM step for the random effects with f and h fixed. With residuals rᵢ = yᵢ − f(Xᵢ):

    E:  Cᵢ = (ZᵢᵀZᵢ/σ² + D⁻¹)⁻¹,   bᵢ = Cᵢ Zᵢᵀ rᵢ / σ²        (posterior covariance, BLUP)
    M:  σ² = (1/N) Σᵢ [‖rᵢ − Zᵢbᵢ‖² + tr(Cᵢ ZᵢᵀZᵢ)],   D = (1/n) Σᵢ [bᵢbᵢᵀ + Cᵢ]

This is the maximum-likelihood EM (Laird & Ware 1982), not REML. ``solver="woodbury"`` (default)
inverts one q×q matrix per person, batched; ``solver="marginal"`` is MeNets' formulation, which
inverts the nᵢ×nᵢ marginal covariance Vᵢ = ZᵢDZᵢᵀ + σ²I per person in a Python loop — the same
numbers (the Woodbury identity), kept to show how the classic formulation scales with nᵢ
(``benchmarks/lme_vs_nme.py``).

With ``hidden=()`` the model is a linear mixed model with random intercept and slopes and a full
covariance D, and the alternation converges to its ML estimates (``tests/nme/test_lme.py``
compares with statsmodels MixedLM on sleepstudy).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from nme.data import ArrayLike, PersonIndex, Standardizer, as_id_list, feature_matrix
from nme.mlp import MLP
from nme.train import auto_batch_size

SOLVERS = ("woodbury", "marginal")


class MLPLMERegressor:
    """MLP with linear mixed effects on its last layer (regression only).

    Args:
        hidden: hidden layer widths; ``()`` gives a linear mixed model.
        activation, dropout: as in :class:`nme.mlp.MLP`.
        lr, weight_decay, batch_size: AdamW on θ̄ in step (a); ``batch_size="auto"`` as in
            the NME estimators (:func:`nme.train.auto_batch_size`).
        epochs_per_step: epochs of step (a) between two EM steps.
        max_iter: outer iterations (one (a) + one EM step each).
        patience: stop after this many iterations without a better validation RMSE (needs a
            validation set; ``None`` runs all ``max_iter``); the best iteration is kept.
        init_variance: D starts as ``init_variance · I`` (z-scale) and σ² as 1.
        min_sigma2: floor of σ² (a perfectly fitting network must not make 1/σ² infinite).
        solver: ``"woodbury"`` or ``"marginal"`` (see the module docstring).
        device, random_state, verbose: as in the NME estimators.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (64, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int | str = 512,
        epochs_per_step: int = 1,
        max_iter: int = 100,
        patience: int | None = 10,
        init_variance: float = 0.1,
        min_sigma2: float = 1e-6,
        solver: str = "woodbury",
        device: str = "cpu",
        random_state: int | None = None,
        verbose: bool = False,
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if epochs_per_step < 0 or max_iter < 1:
            raise ValueError("epochs_per_step must be >= 0 and max_iter >= 1")
        if init_variance <= 0:
            raise ValueError(f"init_variance must be positive, got {init_variance}")
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.epochs_per_step = epochs_per_step
        self.max_iter = max_iter
        self.patience = patience
        self.init_variance = init_variance
        self.min_sigma2 = min_sigma2
        self.solver = solver
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ----------------------------------------------------------------- network pieces
    def _design(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (n, F)`` normalised -> ``(n, q)`` random-effect design [h(x), 1]."""
        h = x
        for layer in self.module_.layers[:-1]:  # the MLP's forward without its last layer
            h = self.module_.drop(self.module_.act(layer(h)))
        return torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], 1)

    def _last(self) -> torch.Tensor:
        """``(q,)`` the fixed last-layer parameters [w̄, b̄] in the order of the design."""
        last = self.module_.layers[-1]
        return torch.cat([last.weight.reshape(-1), last.bias.reshape(-1)])

    def _outputs(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``x: (n, F)``, ``b: (n, q)`` random effects per row -> ``(n,)`` z-scale outputs."""
        z = self._design(x)  # (n, q)
        return (z * (self._last() + b)).sum(-1)

    # ----------------------------------------------------------------- EM
    def _group(self, p: torch.Tensor, n_persons: int) -> list[torch.Tensor]:
        order = torch.argsort(p, stable=True)
        counts = torch.bincount(p, minlength=n_persons).tolist()
        return list(torch.split(order, counts))

    @staticmethod
    def _padded(
        z: torch.Tensor, r: torch.Tensor, p: torch.Tensor, n_persons: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z: (n, q)``, ``r: (n,)`` -> ``(P, m, q)``, ``(P, m)`` per person, zero-padded to the
        largest person's m rows (padding rows add nothing to ZᵀZ or Zᵀr)."""
        counts = torch.bincount(p, minlength=n_persons)
        order = torch.argsort(p, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(p)
        rank[order] = torch.arange(p.shape[0], device=p.device) - starts.repeat_interleave(counts)
        m = int(counts.max())
        Zp = torch.zeros(n_persons, m, z.shape[1], dtype=z.dtype, device=z.device)
        Rp = torch.zeros(n_persons, m, dtype=r.dtype, device=r.device)
        Zp[p, rank] = z
        Rp[p, rank] = r
        return Zp, Rp

    @torch.no_grad()
    def _em_step(self, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor) -> dict[str, float]:
        """One E + M step with θ̄ fixed; updates ``random_effects_``, ``sigma2_``, ``D_``."""
        self.module_.eval()
        n_persons, q = len(self.persons_), self.q_
        z = self._design(x).double()  # (n, q)
        r = y.double() - (z * self._last().double()).sum(-1)  # (n,) residual of the fixed part
        D, s2 = self.D_, self.sigma2_
        eye = torch.eye(q, dtype=torch.float64, device=z.device)
        if self.solver == "woodbury":
            Zp, Rp = self._padded(z, r, p, n_persons)  # (P, m, q), (P, m): zero rows pad
            ztz = Zp.mT @ Zp  # (P, q, q) per-person ZᵢᵀZᵢ as one batched matmul
            ztr = (Zp.mT @ Rp[..., None]).squeeze(-1)  # (P, q)
            # C = (ZᵀZ/σ² + D⁻¹)⁻¹ = L (I + L ZᵀZ L/σ²)⁻¹ L with L = D^{1/2}: no D⁻¹, so a
            # singular D (e.g. a dead ReLU unit whose effect variance went to 0) is fine, and
            # the q×q matrix inverted per person is SPD, so Cholesky does it.
            evals, evecs = torch.linalg.eigh(D)
            L = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T  # (q, q)
            M = eye + L @ ztz @ L / s2  # (P, q, q)
            C = L @ torch.cholesky_inverse(torch.linalg.cholesky(M)) @ L
            b = (C @ ztr[..., None]).squeeze(-1) / s2  # (P, q)
        else:
            ztz = torch.empty(n_persons, q, q, dtype=torch.float64, device=z.device)
            C = torch.empty(n_persons, q, q, dtype=torch.float64, device=z.device)
            b = torch.empty(n_persons, q, dtype=torch.float64, device=z.device)
            for i, rows in enumerate(self._group(p, n_persons)):  # MeNets: one Vᵢ per person
                Zi, ri = z[rows], r[rows]  # (nᵢ, q), (nᵢ,)
                V = Zi @ D @ Zi.T + s2 * torch.eye(len(rows), dtype=torch.float64)
                V_inv = torch.linalg.inv(V)  # (nᵢ, nᵢ): the cubic cost
                DZt = D @ Zi.T  # (q, nᵢ)
                b[i] = DZt @ (V_inv @ ri)
                C[i] = D - DZt @ V_inv @ DZt.T
                ztz[i] = Zi.T @ Zi
        C = (C + C.mT) / 2
        resid = r - (z * b[p]).sum(-1)
        n = z.shape[0]
        sigma2 = float(((resid * resid).sum() + (C * ztz).sum()) / n)
        self.sigma2_ = max(sigma2, self.min_sigma2)
        D_new = (b.T @ b + C.sum(0)) / n_persons
        self.D_ = (D_new + D_new.T) / 2
        self.random_effects_ = b.to(torch.float32)
        return {"sigma2": self.sigma2_, "D_trace": float(self.D_.trace())}

    # ----------------------------------------------------------------- fitting
    def fit(
        self,
        X: ArrayLike,
        y: ArrayLike,
        persons: Sequence[Hashable] | np.ndarray,
        X_val: ArrayLike | None = None,
        y_val: ArrayLike | None = None,
        persons_val: Sequence[Hashable] | np.ndarray | None = None,
    ) -> MLPLMERegressor:
        """Fit on ``X: (n, F)``, ``y: (n,)``, ``persons: (n,)``; optional validation set.

        With a validation set, the iteration with the lowest validation RMSE is kept (and
        training stops after ``patience`` iterations without improvement).
        """
        x_np, names = feature_matrix(X)
        ids = as_id_list(persons)
        y_np = np.asarray(y, dtype=np.float64).ravel()
        if not (len(ids) == len(y_np) == x_np.shape[0]):
            raise ValueError(f"X has {x_np.shape[0]} rows, y {len(y_np)}, persons {len(ids)}")
        if x_np.shape[0] == 0:
            raise ValueError("cannot fit on an empty training set")
        if not np.isfinite(y_np).all():
            raise ValueError("y contains NaN or inf")
        dev = torch.device(self.device)
        self.feature_names_ = names or [f"x{k}" for k in range(x_np.shape[1])]
        self.x_scaler_ = Standardizer.fit(x_np)
        self.y_scaler_ = Standardizer.fit(y_np)
        self.persons_ = PersonIndex(ids)
        if self.random_state is not None:
            torch.manual_seed(self.random_state)
        self.module_ = MLP(x_np.shape[1], self.hidden, 1, self.activation, self.dropout).to(dev)
        self.q_ = (self.hidden[-1] if self.hidden else x_np.shape[1]) + 1
        n_persons = len(self.persons_)
        self.D_ = self.init_variance * torch.eye(self.q_, dtype=torch.float64, device=dev)
        self.sigma2_ = 1.0
        self.random_effects_ = torch.zeros(n_persons, self.q_, device=dev)

        x = torch.from_numpy(self.x_scaler_.transform(x_np)).to(dev)
        yt = torch.from_numpy(self.y_scaler_.transform(y_np)).to(dev)
        p = torch.from_numpy(self.persons_.encode(ids)).to(dev)
        validate = None
        if X_val is not None:
            if y_val is None or persons_val is None:
                raise ValueError("X_val needs y_val and persons_val")
            xv_np, _ = feature_matrix(X_val, name="X_val")
            yv = np.asarray(y_val, dtype=np.float64).ravel()
            ids_v = as_id_list(persons_val)

            def validate() -> float:
                pred = self.predict(xv_np, ids_v)
                return float(np.sqrt(np.mean((pred - yv) ** 2)))

        opt = torch.optim.AdamW(self.module_.parameters(), lr=self.lr,
                                weight_decay=self.weight_decay)
        batch_size = (auto_batch_size(x.shape[0]) if self.batch_size == "auto"
                      else int(self.batch_size))
        gen = torch.Generator()
        if self.random_state is not None:
            gen.manual_seed(self.random_state)
        self.history_: list[dict] = []
        best: tuple[float, dict] | None = None
        stale = 0
        steps = tqdm(range(self.max_iter), disable=not self.verbose, desc="EM", unit="it")
        for it in steps:
            self.module_.train()
            running = 0.0
            for _ in range(self.epochs_per_step):
                order = torch.randperm(x.shape[0], generator=gen).to(dev)
                for s in range(0, x.shape[0], batch_size):
                    idx = order[s : s + batch_size]
                    out = self._outputs(x[idx], self.random_effects_[p[idx]])
                    loss = ((out - yt[idx]) ** 2).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    running += float(loss.detach()) * idx.shape[0]
            record: dict = {"iter": it + 1,
                            "train_loss": running / max(x.shape[0] * self.epochs_per_step, 1)}
            record.update(self._em_step(x, yt, p))
            if validate is not None:
                record["val_rmse"] = validate()
            self.history_.append(record)
            if self.verbose:
                steps.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "iter"})
            if validate is None:
                continue
            if best is None or record["val_rmse"] < best[0]:
                best = (record["val_rmse"], self._state())
                stale = 0
            else:
                stale += 1
                if self.patience is not None and stale >= self.patience:
                    break
        if best is not None:
            self._restore(best[1])
        self.best_iter_ = (
            int(np.argmin([h["val_rmse"] for h in self.history_])) + 1
            if validate is not None else len(self.history_)
        )
        self.module_.eval()
        return self

    def _state(self) -> dict:
        return {"module": copy.deepcopy(self.module_.state_dict()), "D": self.D_.clone(),
                "sigma2": self.sigma2_, "b": self.random_effects_.clone()}

    def _restore(self, state: dict) -> None:
        self.module_.load_state_dict(state["module"])
        self.D_, self.sigma2_, self.random_effects_ = state["D"], state["sigma2"], state["b"]

    # ----------------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise RuntimeError("this MLPLMERegressor is not fitted yet; call fit first")

    def _rows(self, ids: list) -> torch.Tensor:
        """``(n, q)`` random effects of each row's person; zeros (the prior mean) if unknown."""
        idx = torch.from_numpy(self.persons_.encode(ids)).to(self.random_effects_.device)
        rows = self.random_effects_[idx.clamp(min=0)]
        return torch.where((idx >= 0)[:, None], rows, torch.zeros_like(rows))

    @torch.no_grad()
    def predict(self, X: ArrayLike, persons: Sequence[Hashable] | None = None) -> np.ndarray:
        """``X: (n, F)``, ``persons: (n,)`` -> ``(n,)`` predictions on the label's scale.

        Unknown persons (and ``persons=None``) get the fixed part f(x; θ̄).
        """
        self._check_fitted()
        x_np, _ = feature_matrix(X, expected=None)
        if x_np.shape[1] != len(self.feature_names_):
            raise ValueError(f"X has {x_np.shape[1]} features, the model expects "
                             f"{len(self.feature_names_)}")
        self.module_.eval()
        x = torch.from_numpy(self.x_scaler_.transform(x_np)).to(self.random_effects_.device)
        if persons is None:
            b = torch.zeros(x.shape[0], self.q_, device=x.device)
        else:
            ids = as_id_list(persons)
            if len(ids) != x.shape[0]:
                raise ValueError(f"got {len(ids)} persons for {x.shape[0]} rows of X")
            b = self._rows(ids)
        out = self._outputs(x, b).cpu().numpy().astype(np.float64)
        return self.y_scaler_.inverse(out)

    # ----------------------------------------------------------------- person effects
    @property
    def person_ids_(self) -> list:
        """Training persons, in the row order of :meth:`effects_matrix`."""
        self._check_fitted()
        return list(self.persons_.ids)

    def effects_matrix(self) -> np.ndarray:
        """``(n_persons, q) float32`` BLUPs bᵢ on the z-scale ([last-layer weights, bias])."""
        self._check_fitted()
        return self.random_effects_.cpu().numpy().copy()

    def person_bias(self, effects: np.ndarray) -> np.ndarray:
        """``effects: (n, q)`` -> ``(n,)`` each person's random intercept in label units."""
        e = np.asarray(effects, dtype=np.float64)
        return e[:, -1] * float(self.y_scaler_.std)

    @property
    def cov_re_(self) -> np.ndarray:
        """``(q, q)`` random-effect covariance D on the label scale (features stay z-scaled)."""
        self._check_fitted()
        return self.D_.cpu().numpy() * float(self.y_scaler_.std) ** 2

    @property
    def scale_(self) -> float:
        """Residual variance σ² on the label scale."""
        self._check_fitted()
        return self.sigma2_ * float(self.y_scaler_.std) ** 2
