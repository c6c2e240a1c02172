"""The exact E-step: every person's θⁱ set to its posterior mode by batched Newton steps.

With θ̄, σ² and Σ fixed, person i's part of Eq. 1 is

    Jᵢ(θ) = (1/σ²) Σⱼ l(yⁱⱼ, f(Xⁱⱼ; θ̄ + θ)) + θᵀ Σ⁻¹ θ,

twice the negative log posterior of θⁱ (for squared error with σ² the noise variance; for a
likelihood loss up to the scale σ²). Its minimiser is the posterior mode. Persons are
independent given θ̄, σ², Σ, so every person takes a Newton step at once: per person the
precision

    Pᵢ = Hᵢ/σ² + Σ⁻¹,     Hᵢ = Σⱼ Hⱼ,   Hⱼ ≈ ½ ∂²lⱼ/∂θ²   (PSD, see :data:`ItemCurvature`),

the half-gradient gᵢ = (1/(2σ²)) Σⱼ ∂lⱼ/∂θ + Σ⁻¹θ, the step Δᵢ = Pᵢ⁻¹ gᵢ, and a backtracking
line search on Jᵢ per person (a step is taken only where it lowers Jᵢ). Pᵢ is a full ``(d, d)``
matrix when d is small (Cholesky solves, batched over persons) and its diagonal otherwise.

For squared error with θⁱ entering the output linearly (a last-layer placement, or a linear
model) the Gauss–Newton Hⱼ = gⱼgⱼᵀ (gⱼ = ∂f(Xⱼ)/∂θ) is exact and one full-matrix step lands on
the mode: the batched ridge solve of a linear mixed model's BLUP. Otherwise a few steps refine
the mode (cross-entropy on the last layer is convex and its generalised Gauss–Newton is its
exact Hessian; the CRF uses the empirical Fisher).

The Laplace posterior at the mode is N(θ̂ᵢ, Cᵢ) with Cᵢ = Pᵢ⁻¹; :class:`Posterior` keeps its
diagonal (the marginal variances), which the prediction intervals, the per-user update and the
Laplace M-step use.

The loop over *chunks of persons* bounds memory (a chunk's ``(persons, d, d)`` precisions and
``(items, d, d)`` curvatures stay under ``memory`` floats); within a chunk everything is one
batched tensor operation, never a Python loop over persons. :func:`newton_update` is the step
itself, reusable by any E-step that supplies gradients and precisions per person (e.g. an
exact CRF transition Hessian).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

FULL_MAX_DIM = 512
"""Largest θⁱ length d for which the E-step uses full ``(d, d)`` precisions; above it, their
diagonal (a diagonal Newton step: exact only when the curvature is diagonal)."""

MEMORY_FLOATS = 1 << 24
"""Default bound on the floats of one chunk's curvature tensors (64 MB in float32)."""

ItemLosses = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``item_losses(idx (b,) long, rows (b, d)) -> (b,)``: the downstream loss of training items
``idx`` when item b uses θⁱ row b (eval mode; called without gradients)."""

ItemCurvature = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
"""``item_curvature(idx (b,) long, rows (b, d)) -> (losses (b,), grads (b, d), factors (b, R, d))``:
each item's loss, its gradient w.r.t. its own θⁱ row, and a factor Fⱼ of a PSD approximation
Hⱼ = FⱼᵀFⱼ of half its Hessian: Gauss–Newton for squared error (Fⱼ = gⱼᵀ, the output
gradient, R = 1), generalised Gauss–Newton for cross-entropy (R = the classes), empirical Fisher
(Fⱼ = ∂lⱼᵀ/√2, R = 1) otherwise. Per person, Σⱼ FⱼᵀFⱼ is one batched matmul over their
items (or, for a diagonal precision, Σⱼ Σᵣ Fⱼᵣ²): no ``(items, d, d)`` tensor is formed."""


@dataclass(frozen=True)
class Posterior:
    """What an E-step found: modes, the diagonal of the Laplace posterior, and its sums.

    Attributes:
        modes: ``(P, d)`` the posterior modes θ̂ᵢ (the table that was updated in place).
        variance: ``(P, d)`` float32 diagonal of Cᵢ = Pᵢ⁻¹ (the posterior variances), or
            None when the caller did not keep them (``keep_variance=False``).
        variance_sum: ``(d,)`` float64 Σᵢ diag Cᵢ.
        n_persons: P.
        loss_sum: Σ over items of l at the modes (the M-step's σ² numerator).
        excess: Σᵢ tr(Hᵢ Cᵢ): Σ over items of the expected excess loss E[l(θ)] − l(θ̂) under
            the posterior (see :func:`nme.objective.laplace_posterior`).
        newton_steps: Newton iterations taken (the largest over chunks).
        covariance: ``(P, d, d)`` float32 the whole Cᵢ (``keep_covariance=True`` with full
            precisions), else None.
    """

    modes: torch.Tensor
    variance: torch.Tensor | None
    variance_sum: torch.Tensor
    n_persons: int
    loss_sum: float
    excess: float
    newton_steps: int
    covariance: torch.Tensor | None = None

    @property
    def mean_variance(self) -> torch.Tensor:
        """``(d,)`` the posterior variance averaged over persons (the Laplace M-step adds it
        to the spread of the modes)."""
        return (self.variance_sum / max(self.n_persons, 1)).to(self.modes.dtype)


@dataclass(frozen=True)
class PersonGroups:
    """Items sorted by person, cut into chunks of whole persons.

    Attributes:
        order: ``(n,) long`` item indices sorted by person (stable).
        persons: ``(n,) long`` the person of each item of ``order``.
        bounds: ``(first person, last person + 1, first item, last item + 1)`` per chunk,
            items as positions in ``order``.
    """

    order: torch.Tensor
    persons: torch.Tensor
    bounds: tuple[tuple[int, int, int, int], ...]


def group_persons(
    persons: torch.Tensor, n_persons: int, dim: int, full: bool, memory: int = MEMORY_FLOATS
) -> PersonGroups:
    """Sort items by person and cut them into chunks whose precisions fit ``memory`` floats.

    Args:
        persons: ``(n,) long`` every item's person (all ≥ 0).
        n_persons: P, the rows of the person table.
        dim: d, the length of θⁱ.
        full: whether the E-step keeps ``(d, d)`` precisions (else ``(d,)``).
    """
    per_person = dim * dim if full else dim
    step = max(1, memory // max(per_person * 3, 1))  # precision, its factor, the curvature sum
    order = torch.argsort(persons, stable=True)
    sorted_persons = persons[order]
    counts = torch.bincount(persons, minlength=n_persons).cpu()
    ends = torch.cumsum(counts, 0).tolist()
    bounds = []
    for p0 in range(0, n_persons, step):
        p1 = min(p0 + step, n_persons)
        i0 = ends[p0 - 1] if p0 else 0
        bounds.append((p0, p1, i0, ends[p1 - 1]))
    return PersonGroups(order, sorted_persons, tuple(bounds))


def _cholesky(precision: torch.Tensor) -> torch.Tensor:
    """``(p, d, d)`` SPD -> lower factors, adding jitter where round-off broke definiteness."""
    factor, info = torch.linalg.cholesky_ex(precision)
    jitter = 1e-10
    while bool((info > 0).any()) and jitter < 1.0:
        bad = info > 0
        scale = precision.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True)  # (p, 1)
        eye = torch.eye(precision.shape[-1], dtype=precision.dtype, device=precision.device)
        fixed = precision[bad] + jitter * scale[bad, :, None] * eye
        factor[bad], info[bad] = torch.linalg.cholesky_ex(fixed)
        jitter *= 100
    return factor


def newton_update(gradient: torch.Tensor, precision: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One batched Newton direction per person and the diagonal of the inverse precision.

    Args:
        gradient: ``(p, d)`` half-gradient gᵢ of Jᵢ.
        precision: ``(p, d, d)`` SPD precisions Pᵢ, or ``(p, d)`` their diagonals.

    Returns:
        ``(step (p, d), variance (p, d), decrement (p,))``: Δᵢ = Pᵢ⁻¹gᵢ, diag Pᵢ⁻¹ and the
        Newton decrement gᵢᵀΔᵢ (the predicted decrease of ½Jᵢ, ≥ 0).
    """
    if precision.dim() == 2:
        step = gradient / precision
        variance = 1.0 / precision
    else:
        factor = _cholesky(precision)  # (p, d, d)
        step = torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1)
        variance = torch.cholesky_inverse(factor).diagonal(dim1=-2, dim2=-1)
    return step, variance, (gradient * step).sum(-1)


class _Chunk:
    """One chunk of persons and their items: sums of losses, gradients and curvatures."""

    def __init__(self, groups: PersonGroups, bound: tuple[int, int, int, int], dim: int,
                 memory: int) -> None:
        self.p0, self.p1, i0, i1 = bound
        self.idx = groups.order[i0:i1]  # (m,) the chunk's items
        self.local = groups.persons[i0:i1] - self.p0  # (m,) their person within the chunk
        self.item_step = max(1, memory // max(dim * 8, 1))  # (b, R, d) factors and padding
        self.n = self.p1 - self.p0

    def losses(self, item_losses: ItemLosses, theta: torch.Tensor) -> torch.Tensor:
        """``(n,)`` float64 Σⱼ l per person at θ ``(n, d)``."""
        out = theta.new_zeros(self.n, dtype=torch.float64)
        for s in range(0, self.idx.shape[0], self.item_step):
            loc = self.local[s : s + self.item_step]
            with torch.no_grad():
                values = item_losses(self.idx[s : s + self.item_step], theta[loc])
            out.index_add_(0, loc, values.detach().to(torch.float64))
        return out

    def curvature(
        self, item_curvature: ItemCurvature, theta: torch.Tensor, full: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per person Σⱼ l ``(n,)``, Σⱼ ∂l ``(n, d)`` and Σⱼ Hⱼ ``(n, d[, d])``, float64."""
        d = theta.shape[1]
        loss = theta.new_zeros(self.n, dtype=torch.float64)
        grad = theta.new_zeros(self.n, d, dtype=torch.float64)
        curv = theta.new_zeros((self.n, d, d) if full else (self.n, d), dtype=torch.float64)
        for s in range(0, self.idx.shape[0], self.item_step):
            loc = self.local[s : s + self.item_step]  # (b,) sorted: items grouped by person
            values, g, factors = item_curvature(self.idx[s : s + self.item_step], theta[loc])
            loss.index_add_(0, loc, values.detach().to(torch.float64))
            grad.index_add_(0, loc, g.detach().to(torch.float64))
            factors = factors.detach()  # (b, R, d)
            if not full:
                curv.index_add_(0, loc, (factors * factors).sum(1).to(torch.float64))
                continue
            persons, gram = _person_gram(factors, loc)
            if gram is None:  # very uneven persons: per-item outer products instead
                gram = torch.einsum("brd,bre->bde", factors, factors).to(torch.float64)
                persons = loc
            curv.index_add_(0, persons, gram)
        return loss, grad, curv


def _person_gram(factors: torch.Tensor, persons: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Σⱼ FⱼᵀFⱼ per person, as one batched matmul over each person's items.

    Args:
        factors: ``(b, R, d)`` the items' curvature factors.
        persons: ``(b,) long`` their persons, sorted (items grouped by person).

    Returns:
        ``(persons (u,), gram (u, d, d) float64)`` for the u distinct persons; gram is None
        when padding every person to the largest one's items would take over 4× the factors.
    """
    unique, inverse, counts = torch.unique_consecutive(
        persons, return_inverse=True, return_counts=True)
    if unique.shape[0] * int(counts.max()) > 4 * persons.shape[0]:
        return persons, None
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(persons.shape[0], device=persons.device) - starts[inverse]  # (b,)
    b, r, d = factors.shape
    padded = factors.new_zeros(unique.shape[0], int(counts.max()), r, d)
    padded[inverse, slot] = factors  # (u, m, R, d), zero rows add nothing
    padded = padded.reshape(unique.shape[0], -1, d).to(torch.float64)  # (u, m·R, d)
    return unique, padded.mT @ padded


def posterior_modes(
    table: torch.Tensor,
    groups: PersonGroups,
    item_losses: ItemLosses,
    item_curvature: ItemCurvature,
    sigma2: float,
    sigma_inv: torch.Tensor,
    max_iter: int = 5,
    full: bool | None = None,
    memory: int = MEMORY_FLOATS,
    tol: float = 1e-10,
    constant_curvature: bool = False,
    keep_variance: bool = True,
    keep_covariance: bool = False,
) -> Posterior:
    """Newton steps on every person's Jᵢ from the rows of ``table`` to the posterior modes.

    Args:
        table: ``(P, d)`` θⁱ, the starting points; overwritten with the modes, one chunk of
            persons at a time (persons are independent given θ̄, σ², Σ, so no copy of the
            table is needed).
        groups: the training items by person (:func:`group_persons`, same ``full``).
        item_losses, item_curvature: see :data:`ItemLosses`, :data:`ItemCurvature`.
        sigma2: σ² of Eq. 1.
        sigma_inv: ``(d,)`` the diagonal of Σ⁻¹.
        max_iter: Newton steps at most (1 is exact for squared error linear in θⁱ; 0 only
            evaluates the posterior variance at ``init``).
        full: full ``(d, d)`` precisions; default when d ≤ :data:`FULL_MAX_DIM`.
        tol: stop once every person's Newton decrement is below ``tol · (1 + Jᵢ)``.
        constant_curvature: the curvature does not depend on θ (squared error linear in θⁱ):
            one full step is exact, and its curvature is reused instead of evaluated again.
        keep_variance: return every person's posterior variance ``(P, d)`` (else only their
            sum, which is all the M-step needs).
        keep_covariance: also return every person's whole posterior covariance ``(P, d, d)``
            (only with full precisions; ``P·d²`` floats: the caller bounds it).

    Returns:
        :class:`Posterior` at the final modes; its variance and ``excess`` use the curvature
        of the last evaluation (at the modes, or one step before them when ``max_iter`` ran
        out — exact for squared error linear in θⁱ, whose curvature does not depend on θ).
    """
    P, d = table.shape
    if full is None:
        full = d <= FULL_MAX_DIM
    sigma_inv = sigma_inv.to(torch.float64)
    modes = table.detach()
    variance = torch.empty_like(modes) if keep_variance else None
    covariance = modes.new_empty(P, d, d) if keep_covariance and full else None
    variance_sum = modes.new_zeros(d, dtype=torch.float64)
    loss_sum, excess, steps_taken = 0.0, 0.0, 0
    for bound in groups.bounds:
        chunk = _Chunk(groups, bound, d, memory)
        if chunk.n == 0:
            continue
        theta = modes[chunk.p0 : chunk.p1].to(torch.float64)  # (n, d)
        for it in range(max_iter + 1):
            loss, grad, curv = chunk.curvature(item_curvature, theta.to(modes.dtype), full)
            prior = sigma_inv if not full else torch.diag_embed(sigma_inv)
            precision = curv / sigma2 + prior  # (n, d, d) or (n, d)
            g = grad / (2 * sigma2) + sigma_inv * theta  # (n, d)
            step, var, decrement = newton_update(g, precision)
            objective = loss / sigma2 + (theta * theta * sigma_inv).sum(-1)  # (n,) Jᵢ
            if it == max_iter or bool((decrement <= tol * (1 + objective.abs())).all()):
                break
            steps_taken = max(steps_taken, it + 1)
            theta, loss = _line_search(chunk, item_losses, theta, step, 2 * decrement,
                                       objective, loss, sigma2, sigma_inv, modes.dtype)
            if constant_curvature:
                break
        if max_iter:
            modes[chunk.p0 : chunk.p1] = theta.to(modes.dtype)
        if variance is not None:
            variance[chunk.p0 : chunk.p1] = var.to(modes.dtype)
        variance_sum += var.sum(0)
        loss_sum += float(loss.sum())
        h_c = curv.diagonal(dim1=-2, dim2=-1) if full else curv  # (n, d)
        if full:
            # tr(Hᵢ Cᵢ) needs the whole Cᵢ: Σ_kl Hᵢ[k, l] Cᵢ[l, k]
            cov = torch.cholesky_inverse(_cholesky(precision))
            excess += float((curv * cov).sum())
            if covariance is not None:
                covariance[chunk.p0 : chunk.p1] = cov.to(modes.dtype)
        else:
            excess += float((h_c * var).sum())
    return Posterior(modes, variance, variance_sum, P, loss_sum, excess, steps_taken,
                     covariance)


def _line_search(
    chunk: _Chunk,
    item_losses: ItemLosses,
    theta: torch.Tensor,
    step: torch.Tensor,
    predicted: torch.Tensor,
    objective: torch.Tensor,
    loss: torch.Tensor,
    sigma2: float,
    sigma_inv: torch.Tensor,
    dtype: torch.dtype,
    halvings: int = 12,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backtracking per person: θ − αΔ with the largest α ∈ {1, ½, …} satisfying Armijo's
    condition Jᵢ(θ − αΔ) ≤ Jᵢ(θ) − 10⁻⁴ α ∇Jᵢᵀ Δ; persons where none does keep θ.

    Args:
        theta, step: ``(n, d)``; predicted: ``(n,)`` ∇Jᵢᵀ Δᵢ; objective: ``(n,)`` Jᵢ(θ);
        loss: ``(n,)`` Σⱼ l at θ.

    Returns:
        ``(θ (n, d), Σⱼ l at it (n,))``.
    """
    alpha = torch.ones_like(objective)  # (n,)
    pending = torch.ones_like(objective, dtype=torch.bool)
    out, out_loss = theta.clone(), loss.clone()
    for _ in range(halvings):
        trial = theta - alpha[:, None] * step
        trial_loss = chunk.losses(item_losses, trial.to(dtype))
        value = trial_loss / sigma2 + (trial * trial * sigma_inv).sum(-1)
        ok = pending & torch.isfinite(value) & (value <= objective - 1e-4 * alpha * predicted)
        out[ok] = trial[ok]
        out_loss[ok] = trial_loss[ok]
        pending &= ~ok
        if not bool(pending.any()):
            break
        alpha = torch.where(pending, alpha / 2, alpha)
    return out, out_loss
