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

M_STEPS = ("paper", "laplace")
"""``"paper"``: Σ = variance of the θⁱ modes across persons; ``"laplace"``: plus the mean
diagonal Laplace posterior variance of θⁱ (see :func:`laplace_posterior`)."""

SIGMA2_RULES = ("mean_loss", "nll")
"""How the M-step sets σ², the scale of the data term of Eq. 1.

``"mean_loss"`` (the paper, for every loss): σ² = mean training loss. For squared error this is
the Gaussian noise variance, the right weight. For a negative log-likelihood loss it is not a
noise variance: a CRF's per-sequence NLL of 10–27 divides the data term by that much, as if every
sequence counted for 1/20 of an observation against the prior.

``"nll"``: σ² fixed at ``NLL_SIGMA2`` = ½, for losses that are a negative log-likelihood
(cross-entropy, CRF NLL): Eq. 1 is then exactly twice the negative log posterior
2 Σ l + θᵀΣ⁻¹θ of the generalised mixed model, so the data keep their likelihood weight.
The tagger's default (issue 13): with the mean loss the tempered likelihood makes the
persons' differences look like noise, and the marginal-likelihood Σ of Tⁱ is 0
(``docs/decisions.md``).
"""

NLL_SIGMA2 = 0.5
"""σ² under ``sigma2="nll"``: (1/σ²) Σ l + θᵀΣ⁻¹θ = 2 · (Σ l + ½ θᵀΣ⁻¹θ)."""


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
    fixed_sigma2: float | None = None,
    fixed_point: bool = False,
    spread: tuple[int, torch.Tensor] | None = None,
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
        fixed_sigma2: keep σ² at this value instead of the mean loss (``sigma2="nll"``, see
            :data:`SIGMA2_RULES`); the posterior's σ² term is then ignored.
        fixed_point: with ``posterior``, solve the same equation Σ = S/(P − 1) + V̄ (S the
            sum of squares of the modes around their mean, V̄ the mean posterior variance) in
            its fixed-point form Σ = S / ((P − 1)(1 − V̄/Σ_old)) (MacKay 1992): the same
            stationary point, reached in a few iterations along parameters that each person's
            data barely determine (Vᵢ ≈ Σ), where the EM form keeps Σ ≈ Σ_old for many epochs
            — so the starting Σ would decide. For exact posteriors (the Newton E-step);
            ``anneal`` does not apply.
        spread: ``(P, var (dim,))`` the number of persons and the sample variance of their θⁱ
            when ``effects`` holds only some of them (a rank of a distributed fit,
            :meth:`nme.distributed.Comm.spread`); default computed from ``effects``.

    Returns:
        ``(sigma2, Sigma)``; Σ is the sample variance (ddof = 1) of θⁱ across persons, per
        parameter. With fewer than two persons there is no spread to measure and Σ is kept.
    """
    n_persons = effects.shape[0] if spread is None else spread[0]
    if n_persons < 2 or effects.shape[1] == 0:
        return float(mean_loss if fixed_sigma2 is None else fixed_sigma2), sigma_old
    var = effects.detach().var(dim=0, unbiased=True) if spread is None else spread[1]  # (dim,)
    if posterior is not None and fixed_point:
        # each person's share of information about a parameter, 1 − Vᵢ/Σ, averaged; at
        # least one person's worth so a parameter nobody's data determine shrinks, not blows up
        informed = (1.0 - posterior[0] / sigma_old).clamp_min(1.0 / n_persons)
        mean_loss = mean_loss + posterior[1]
        if fixed_sigma2 is not None:
            mean_loss = fixed_sigma2
        return float(mean_loss), (var / informed).clamp_min(SIGMA_FLOOR)
    if posterior is not None:
        var = var + posterior[0]
        mean_loss = mean_loss + posterior[1]
    if fixed_sigma2 is not None:
        mean_loss = fixed_sigma2
    if anneal is not None:
        var = torch.maximum(anneal * sigma_old, var)
    return float(mean_loss), var.clamp_min(SIGMA_FLOOR)


def laplace_posterior(
    curvature: torch.Tensor, sigma2: float, Sigma: torch.Tensor, n_items: int
) -> tuple[torch.Tensor, float]:
    """Diagonal Laplace posterior of θⁱ around its mode, for any downstream loss.

    Halving Eq. 1 gives the negative log posterior (1/(2σ²)) Σⱼ lᵢⱼ + ½ θᵀΣ⁻¹θ, whose
    precision for person i is Hᵢ/σ² + Σ⁻¹ with Hᵢ = ½ diag Σⱼ ∂²lᵢⱼ/∂θⁱ² (the *curvature*):

    * squared error l = (y − f)²: the Gauss–Newton Hᵢ = Σⱼ gᵢⱼ² with gᵢⱼ = ∂f(Xⁱⱼ)/∂θⁱ
      (exact for a linear model; :meth:`~nme.personalize.PersonalizedModule.squared_output_grads`);
    * a negative log-likelihood (cross-entropy, CRF NLL): the Fisher approximation
      ∂²l ≈ (∂l)², Hᵢ = ½ Σⱼ (∂lᵢⱼ/∂θⁱ)² (:func:`nme.train.empirical_fisher`).

    The plain M-step (variance of the posterior modes) ignores the posterior variance
    Vᵢ = 1/precision and therefore underestimates Σ, down to a collapse at zero when a person's
    data say little about a parameter (a random slope from four observations, a transition
    seen twice in a person's sequences); adding the mean Vᵢ is the EM update of a linear mixed
    model, and its Laplace approximation otherwise.

    Args:
        curvature: ``(n_persons, dim)`` Hᵢ per person (see above).
        sigma2: current σ².
        Sigma: ``(dim,)`` current diagonal of Σ.
        n_items: number of training items N.

    Returns:
        ``(mean over persons of Vᵢ (dim,), Σᵢ Σ_k Hᵢₖ Vᵢₖ / N)``: the second term is the mean
        expected excess loss E[l(θ)] − l(θ̂) ≈ ½ tr(∂²l V) under the posterior, which the σ²
        update (σ² = mean loss) adds to the loss at the modes — for squared error exactly the
        predictive variance E[(gᵀ(θ − θ̂))²] of the linear mixed model's σ² update.
    """
    V = 1.0 / (curvature / sigma2 + 1.0 / Sigma)  # (n_persons, dim)
    return V.mean(dim=0), float((curvature * V).sum()) / max(n_items, 1)


def laplace_posterior_sums(
    curvature: torch.Tensor, sigma2: float, Sigma: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The sums behind :func:`laplace_posterior` for some of the persons (one rank's), to be
    added over the ranks: ``(Σᵢ Vᵢ (dim,), Σᵢ Σ_k Hᵢₖ Vᵢₖ)``.

    Args:
        curvature: ``(P_r, dim)`` Hᵢ of these persons; sigma2, Sigma: as there.
    """
    V = 1.0 / (curvature / sigma2 + 1.0 / Sigma)  # (P_r, dim)
    return V.sum(dim=0), float((curvature * V).sum())


def fisher_curvature(
    grads: torch.Tensor, persons: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Accumulate ½ (∂lⱼ/∂θⁱ)² of items into their persons' rows of ``out`` (in place).

    Args:
        grads: ``(b, dim)`` per-item gradients of the item's loss w.r.t. its person's θⁱ.
        persons: ``(b,) long`` the item's person.
        out: ``(n_persons, dim)`` running curvature (see :func:`laplace_posterior`).
    """
    return out.index_add_(0, persons, 0.5 * grads * grads)
