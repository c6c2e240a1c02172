"""The NME objective (paper Eq. 1 in its mini-batch form, Eq. 2) and the M-step.

Eq. 1: Σᵢ [ (1/σ²) Σⱼ l(yⁱⱼ, f(Xⁱⱼ; θ̄ + θⁱ)) ] + Σᵢ θⁱᵀ Σ⁻¹ θⁱ.
Eq. 2: in a batch B, person i's penalty is weighted by (#obs of i in B)/nᵢ, so one epoch
applies every person's penalty exactly once; the batch loss is divided by |B|.
"""

from __future__ import annotations

import torch

from nme.persons import Gathered

SIGMA_FLOOR = 1e-8
"""Lower bound of Σ's diagonal: a parameter with zero spread across persons must not divide by 0."""


def nme_batch_loss(
    losses: torch.Tensor,
    rows: torch.Tensor | Gathered,
    n_obs: torch.Tensor,
    sigma2: float,
    sigma_inv: torch.Tensor | None,
) -> torch.Tensor:
    """Mini-batch NME loss.

    Summing the penalty per *sample* with weight 1/nᵢ equals weighting each person's penalty by
    (count of i in B)/nᵢ, and needs no grouping by person.

    Args:
        losses: ``(batch,)`` downstream loss of each item (squared error, cross-entropy, CRF NLL).
        rows: ``(batch, dim)`` θⁱ of each item's person, or the same as a
            :class:`~nme.persons.Gathered` (one row per distinct person: the penalty is then
            summed per person with weight Σ 1/nᵢ over their items, i.e. count/nᵢ).
        n_obs: ``(batch,)`` float, nᵢ (training items of the item's person).
        sigma2: σ², the noise scale of the downstream loss.
        sigma_inv: ``(dim,)`` the diagonal of Σ⁻¹, or None for no penalty (unme, specific).

    Returns:
        scalar: (Σ_b l_b/σ² + Σ_b θᵀΣ⁻¹θ / nᵢ) / |B|.
    """
    data = losses.sum() / sigma2
    unique = rows.unique if isinstance(rows, Gathered) else rows
    if sigma_inv is None or unique.shape[-1] == 0:
        return data / losses.shape[0]
    weights = 1.0 / n_obs  # (batch,)
    if isinstance(rows, Gathered) and rows.inverse is not None:
        weights = weights.new_zeros(unique.shape[0]).index_add_(0, rows.inverse, weights)  # (u,)
    penalty = (weights * (unique * unique * sigma_inv).sum(-1)).sum()
    return (data + penalty) / losses.shape[0]


def m_step(
    mean_loss: float,
    effects: torch.Tensor,
    sigma_old: torch.Tensor,
    anneal: float | None = None,
    posterior: tuple[torch.Tensor, float] | None = None,
) -> tuple[float, torch.Tensor]:
    """The M-step after an epoch.

    Args:
        mean_loss: the downstream loss averaged over every training item (the new σ²).
        effects: ``(n_persons, dim)`` all θⁱ.
        sigma_old: ``(dim,)`` the previous diagonal of Σ.
        anneal: α of the SAEM-style annealing Σ ← max(α·Σ_old, var), or None.
        posterior: for the Laplace M-step, ``(mean posterior variance of θⁱ (dim,), mean
            predictive variance per item)``; they are added to Σ and σ² as in the exact EM
            for linear mixed models (see :func:`laplace_posterior`).

    Returns:
        ``(sigma2, Sigma)``; Σ is the sample variance (ddof = 1) of θⁱ across persons, per
        parameter. With fewer than two persons there is no spread to measure and Σ is kept.
    """
    if effects.shape[0] < 2 or effects.shape[1] == 0:
        return float(mean_loss), sigma_old
    var = effects.detach().var(dim=0, unbiased=True)  # (dim,)
    if posterior is not None:
        var = var + posterior[0]
        mean_loss = mean_loss + posterior[1]
    if anneal is not None:
        var = torch.maximum(anneal * sigma_old, var)
    return float(mean_loss), var.clamp_min(SIGMA_FLOOR)


def laplace_posterior(
    sq_grads: torch.Tensor, sigma2: float, Sigma: torch.Tensor, n_items: int
) -> tuple[torch.Tensor, float]:
    """Diagonal Laplace (Gauss–Newton) posterior of θⁱ for a squared-error loss.

    Halving Eq. 1 gives the negative log posterior, whose Gauss–Newton precision for person i
    is Σⱼ gᵢⱼ²/σ² + Σ⁻¹ with gᵢⱼ = ∂f(Xⁱⱼ)/∂θⁱ. The plain M-step (variance of the posterior
    modes) ignores the posterior variance Vᵢ = 1/precision and therefore underestimates Σ, down
    to a collapse at zero when a person's data say little about a parameter (e.g. a random
    slope from four observations); adding the mean Vᵢ is the EM update of a linear mixed model.

    Args:
        sq_grads: ``(n_persons, dim)`` Σⱼ gᵢⱼ² per person.
        sigma2: current σ².
        Sigma: ``(dim,)`` current diagonal of Σ.
        n_items: number of training items N.

    Returns:
        ``(mean over persons of Vᵢ (dim,), Σᵢ Σ_k sq_gradsᵢₖ Vᵢₖ / N)``: the second term is the
        mean predictive variance E[(gᵀ(θ − θ̂))²] that the exact σ² update adds to the residuals.
    """
    V = 1.0 / (sq_grads / sigma2 + 1.0 / Sigma)  # (n_persons, dim)
    return V.mean(dim=0), float((sq_grads * V).sum()) / max(n_items, 1)
