"""The tagger's exact E-step: the CRF Hessian against brute force over every path, Newton's
posterior mode against L-BFGS, and its Laplace variance against the brute-force precision."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from nme import NMESequenceTagger, crf
from nme.base import _Items
from nme.simulate import SEQUENCE_STATES, TRANSITION_COLUMNS, simulate_sequences

S = 4  # simulate_sequences' states
LENGTHS = (4, 2, 3)  # varied lengths: padding must not count


def sequences(data: pd.DataFrame) -> tuple[list, list]:
    features = [c for c in data.columns if c.startswith("f")]
    seqs, persons = [], []
    for (person, _), g in data.groupby(["person", "sequence_id"], sort=False):
        seqs.append((g[features].to_numpy(np.float32), g["label"].tolist()))
        persons.append(person)
    return seqs, persons


@pytest.fixture(scope="module", params=["T", "last+T"])
def tagger(request) -> NMESequenceTagger:  # type: ignore[no-untyped-def]
    """A briefly fitted NME tagger with linear emissions (d = 16 for T, 44 for last+T)."""
    data, _ = simulate_sequences(n_persons=5, n_sequences=6, length=6, seed=3)
    seqs, persons = sequences(data)
    return NMESequenceTagger(hidden=(), placement=request.param, max_epochs=3, patience=None,
                             lr=0.05, batch_size=8, random_state=0, device="cpu",
                             sigma2="nll").fit(seqs, persons)


def short_items(est: NMESequenceTagger) -> _Items:
    data, _ = simulate_sequences(n_persons=1, n_sequences=len(LENGTHS), length=max(LENGTHS),
                                 seed=11)
    seqs, _ = sequences(data)
    cut = [(x[:n], y[:n]) for (x, y), n in zip(seqs, LENGTHS, strict=True)]
    x, mask, y = est._labelled_tensors([x for x, _ in cut], [y for _, y in cut], "f", "l")
    return _Items(x=x, y=y, ids=[0] * len(cut), mask=mask)


def brute_nll(est: NMESequenceTagger, items: _Items, k: int, row: torch.Tensor) -> torch.Tensor:
    """NLL of sequence k with θⁱ ``row (d,)`` by enumerating all S^L paths (float64)."""
    n = int(items.mask[k].sum())
    em, _ = est.module_(items.x[k : k + 1, :n], effects=row[None].float())
    em = em[0].double() if row.dtype == torch.float64 else em[0]
    transitions, _, _ = est._crf_scores(row[None])
    trans = transitions.expand(1, S, S)[0].to(em.dtype)
    paths = torch.tensor(list(itertools.product(range(S), repeat=n)))  # (S^n, n)
    scores = em[torch.arange(n), paths].sum(-1)  # (S^n,)
    if n > 1:
        scores = scores + trans[paths[:, :-1], paths[:, 1:]].sum(-1)
    tags = items.y[k, :n]
    score = em[torch.arange(n), tags].sum() + trans[tags[:-1], tags[1:]].sum()
    return torch.logsumexp(scores, 0) - score


def test_exact_curvature_matches_brute_force_hessian(tagger: NMESequenceTagger) -> None:
    est = tagger
    items = short_items(est)
    d = est.n_effects_
    gen = torch.Generator().manual_seed(0)
    rows = 0.5 * torch.randn(len(LENGTHS), d, generator=gen)
    idx = torch.arange(len(LENGTHS))
    losses, grads, factors = est._item_curvature(items, idx, rows)
    assert factors.shape == (len(LENGTHS), d, d)
    for k in range(len(LENGTHS)):
        row = rows[k].double()
        nll = brute_nll(est, items, k, row.float())
        hess = torch.autograd.functional.hessian(
            lambda r, k=k: brute_nll(est, items, k, r.float()), row.float())
        grad = torch.autograd.functional.jacobian(
            lambda r, k=k: brute_nll(est, items, k, r.float()), row.float())
        np.testing.assert_allclose(float(losses[k]), float(nll.detach()), rtol=1e-5)
        np.testing.assert_allclose(grads[k].numpy(), grad.numpy(), atol=2e-5)
        # the factor is of *half* the Hessian (nme.estep.ItemCurvature)
        half = (factors[k].mT @ factors[k]).double().numpy()
        np.testing.assert_allclose(2 * half, hess.double().numpy(), atol=5e-5)


def test_transition_hessian_is_the_covariance_of_transition_counts() -> None:
    """For T alone, the Hessian of log Z is Cov(transition counts) under the CRF (enumerated
    without autograd): the curvature the E-step uses is the CRF's own, not an approximation."""
    data, _ = simulate_sequences(n_persons=3, n_sequences=4, length=5, seed=5)
    seqs, persons = sequences(data)
    est = NMESequenceTagger(hidden=(), placement="T", max_epochs=2, patience=None,
                            random_state=0, device="cpu").fit(seqs, persons)
    items = short_items(est)
    rows = torch.randn(len(LENGTHS), S * S, generator=torch.Generator().manual_seed(1))
    _, _, factors = est._item_curvature(items, torch.arange(len(LENGTHS)), rows)
    for k, n in enumerate(LENGTHS):
        with torch.no_grad():
            em, _ = est.module_(items.x[k : k + 1, :n], effects=rows[k : k + 1])
            trans = (est.module_.base.transitions + rows[k].view(S, S)).double()
        paths = torch.tensor(list(itertools.product(range(S), repeat=n)))
        scores = em[0].double()[torch.arange(n), paths].sum(-1) + trans[
            paths[:, :-1], paths[:, 1:]].sum(-1)
        p = torch.softmax(scores, 0)  # (S^n,)
        counts = torch.zeros(len(paths), S * S, dtype=torch.float64)
        counts.scatter_add_(1, paths[:, :-1] * S + paths[:, 1:],
                            torch.ones(len(paths), n - 1, dtype=torch.float64))
        mean = p @ counts
        cov = (counts - mean).T @ ((counts - mean) * p[:, None])
        half = (factors[k].mT @ factors[k]).double()
        np.testing.assert_allclose(2 * half.numpy(), cov.numpy(), atol=2e-5)


def test_newton_e_step_finds_the_posterior_mode(tagger: NMESequenceTagger) -> None:
    """fit_person's Newton steps land where L-BFGS does, the gradient of Jᵢ vanishes there, and
    the variance is the diagonal of (H/σ² + Σ⁻¹)⁻¹ with the brute-force Hessian."""
    est = tagger
    assert est._newton_e_step()
    items = short_items(est)
    feats = [items.x[k, : int(items.mask[k].sum())] for k in range(len(LENGTHS))]
    # fit_person takes raw features: undo the scaler on the normalised tensors
    raw = [f.numpy() * est.x_scaler_.std + est.x_scaler_.mean for f in feats]
    labels = [[est.states_[s] for s in items.y[k, : len(f)].tolist()]
              for k, f in enumerate(feats)]
    theta, variance = est.fit_person(raw, labels, return_variance=True)
    persons = torch.zeros(len(LENGTHS), dtype=torch.long)
    lbfgs = est._lbfgs_person(items, persons, est.fallback_effect_, max_iter=500)
    # L-BFGS (float32) stops near the mode along weakly determined directions; Newton is on it
    np.testing.assert_allclose(theta, lbfgs.numpy(), atol=2e-2)

    sigma_inv = (1.0 / est._Sigma_flat).double()
    theta_t = torch.as_tensor(theta, dtype=torch.float64)

    def objective(r: torch.Tensor) -> torch.Tensor:
        data = sum(brute_nll(est, items, k, r.float()).double() for k in range(len(LENGTHS)))
        return data / est.sigma2_ + (r * r * sigma_inv).sum()

    with torch.no_grad():
        value, other = float(objective(theta_t)), float(objective(lbfgs.double()))
    assert value <= other + 1e-6, (value, other)
    grad = torch.autograd.functional.jacobian(objective, theta_t)
    assert float(grad.abs().max()) < 1e-3, grad  # measured 4e-6 (last+T), float32 losses
    hess = sum(torch.autograd.functional.hessian(
        lambda r, k=k: brute_nll(est, items, k, r.float()), theta_t.float()).double()
        for k in range(len(LENGTHS)))
    precision = 0.5 * hess / est.sigma2_ + torch.diag(sigma_inv)
    np.testing.assert_allclose(variance, torch.linalg.inv(precision).diagonal().numpy(),
                               rtol=2e-3)


# --------------------------------------------------------------------------- fitted Σ and Tⁱ
# simulate_sequences draws each person's transition matrix as the group's times log-normal
# noise of sd person_noise = 0.5 per entry: a log-scale variance of 0.25 across persons.
RECOVERY = {"n_persons": 20, "n_sequences": 6, "length": 20, "seed": 0}
RECOVERY_FIT = {"hidden": (), "placement": "T", "max_epochs": 10, "patience": None,
                "lr": 0.05, "batch_size": 16, "random_state": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def recovered() -> tuple[NMESequenceTagger, pd.DataFrame]:
    data, truth = simulate_sequences(**RECOVERY)
    return NMESequenceTagger(**RECOVERY_FIT).fit(*sequences(data)), truth


def test_sigma_of_transitions_keeps_the_simulated_spread(recovered) -> None:  # type: ignore[no-untyped-def]
    est, _ = recovered
    assert est.sigma2_ == 0.5 and est._newton_e_step()
    sigma_t = float(est.Sigma_["transitions"].mean())
    # measured 0.205 (seed 1 of the simulation: 0.332); σ² = mean loss collapses it to 0.000
    # with the same exact E-step, and without the E-step left Tⁱ at a spread of 0.019
    assert 0.1 < sigma_t < 0.6, sigma_t


def test_person_transitions_correlate_with_the_simulated_ones(recovered) -> None:  # type: ignore[no-untyped-def]
    est, truth = recovered
    ids = est.person_ids_
    order = [SEQUENCE_STATES.index(s) for s in est.states_]
    true = truth.loc[ids, TRANSITION_COLUMNS].to_numpy().reshape(-1, S, S)
    true = true[:, order][:, :, order]
    learned = est.transition_matrices(ids)
    r = np.corrcoef((learned - learned.mean(0)).ravel(), (true - true.mean(0)).ravel())[0, 1]
    # measured 0.688 (simulation seed 1: 0.652); σ² = mean loss: 0.18 with the exact E-step,
    # 0.60 without it (but a spread of 0.019 against the true 0.122)
    assert r > 0.55, r


def test_label_chain_is_the_crf_label_distribution_away_from_the_ends() -> None:
    """p(y) ∝ exp Σₜ T(y_{t-1}, y_t), enumerated over 3¹¹ paths: in the middle of the
    sequence p(y₆ = j | y₅ = i) is the chain's P(i, j) (the ends' influence decays
    geometrically), and a forbidden transition has probability 0."""
    gen = torch.Generator().manual_seed(2)
    trans = 0.7 * torch.randn(3, 3, generator=gen, dtype=torch.float64)
    allowed = torch.ones(3, 3, dtype=torch.bool)
    allowed[0, 2] = False
    n = 11
    paths = torch.tensor(list(itertools.product(range(3), repeat=n)))  # (3¹¹, n)
    masked = trans.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(masked[paths[:, :-1], paths[:, 1:]].sum(-1), 0)  # (3¹¹,)
    pair = torch.zeros(3, 3, dtype=torch.float64).index_put_(
        (paths[:, 5], paths[:, 6]), p, accumulate=True)
    brute = pair / pair.sum(-1, keepdim=True)
    chain = crf.label_chain(trans, allowed)
    np.testing.assert_allclose(chain.numpy(), brute.numpy(), atol=2e-3)
    assert float(chain[0, 2]) == 0.0
    batched = crf.label_chain(torch.stack([trans, trans.T]), allowed)
    np.testing.assert_allclose(batched[0].numpy(), chain.numpy())
