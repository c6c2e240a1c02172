"""The batched E-step (nme.estep): the ridge solve by hand, Newton on a convex loss, chunking,
the line search, and the estimators' final E-step and fit_person using it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nme import NMEClassifier, NMERegressor
from nme.estep import group_persons, newton_update, posterior_modes
from nme.simulate import MOOD_FEATURES, simulate_mood


def linear_problem(seed: int = 0, n_persons: int = 7, d: int = 3):  # type: ignore[no-untyped-def]
    """y = z·θᵢ + noise with persons of 1–9 items: squared error, linear in θ."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 10, (n_persons,), generator=g)
    persons = torch.repeat_interleave(torch.arange(n_persons), counts)
    persons = persons[torch.randperm(persons.shape[0], generator=g)]  # unsorted on purpose
    z = torch.randn(persons.shape[0], d, generator=g, dtype=torch.float64)
    y = z @ torch.tensor([0.5, -1.0, 2.0][:d], dtype=torch.float64) + torch.randn(
        persons.shape[0], generator=g, dtype=torch.float64)

    def losses(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return ((z[idx] * rows).sum(-1) - y[idx]) ** 2

    def curvature(idx: torch.Tensor, rows: torch.Tensor):  # type: ignore[no-untyped-def]
        resid = (z[idx] * rows).sum(-1) - y[idx]
        jac = z[idx]
        return resid**2, 2 * resid[:, None] * jac, jac[:, None, :]

    return persons, z, y, losses, curvature


def test_one_newton_step_is_the_ridge_solve_of_each_person() -> None:
    persons, z, y, losses, curvature = linear_problem()
    sigma2, sigma = 0.7, torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    table = torch.randn(7, 3, dtype=torch.float64)  # any start: one step is exact
    groups = group_persons(persons, 7, 3, full=True)
    post = posterior_modes(table, groups, losses, curvature, sigma2, 1 / sigma, max_iter=1,
                           full=True, constant_curvature=True)
    assert post.modes.data_ptr() == table.data_ptr()  # updated in place
    for i in range(7):
        zi, yi = z[persons == i].numpy(), y[persons == i].numpy()
        precision = zi.T @ zi / sigma2 + np.diag(1 / sigma.numpy())
        mode = np.linalg.solve(precision, zi.T @ yi / sigma2)
        np.testing.assert_allclose(table[i].numpy(), mode, rtol=1e-8)
        np.testing.assert_allclose(post.variance[i].numpy(), np.diag(np.linalg.inv(precision)),
                                   rtol=1e-8)
    # the M-step's sums: Σᵢ diag Cᵢ and Σᵢ tr(HᵢCᵢ) with Hᵢ = ZᵢᵀZᵢ
    np.testing.assert_allclose(post.variance_sum.numpy(), post.variance.sum(0).numpy())
    expected_loss = float(losses(torch.arange(len(y)), table[persons]).sum())
    assert post.loss_sum == pytest.approx(expected_loss)


def test_chunks_of_persons_give_the_same_posterior() -> None:
    persons, _, _, losses, curvature = linear_problem(seed=1, n_persons=20)
    sigma_inv = torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    results = []
    for memory in (1 << 20, 40):  # one chunk, or a few persons per chunk
        groups = group_persons(persons, 20, 3, full=True, memory=memory)
        table = torch.zeros(20, 3, dtype=torch.float64)
        results.append(posterior_modes(table, groups, losses, curvature, 1.0, sigma_inv,
                                       max_iter=1, full=True, memory=memory,
                                       constant_curvature=True))
    assert len(group_persons(persons, 20, 3, full=True, memory=40).bounds) > 3
    torch.testing.assert_close(results[0].modes, results[1].modes)
    torch.testing.assert_close(results[0].variance, results[1].variance)
    assert results[0].excess == pytest.approx(results[1].excess)


def test_diagonal_precision_is_exact_for_a_diagonal_curvature() -> None:
    gradient = torch.tensor([[1.0, -2.0]])
    step, variance, decrement = newton_update(gradient, torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(step, torch.tensor([[0.5, -0.5]]))
    torch.testing.assert_close(variance, torch.tensor([[0.5, 0.25]]))
    full = newton_update(gradient, torch.diag_embed(torch.tensor([[2.0, 4.0]])))
    torch.testing.assert_close(full[0], step)
    assert float(decrement) == pytest.approx(1.5)


def test_newton_with_line_search_finds_the_logistic_posterior_mode() -> None:
    """Cross-entropy: the curvature depends on θ; the damped steps converge to the mode that
    L-BFGS finds on the same objective, person by person."""
    g = torch.Generator().manual_seed(3)
    n_persons, d = 5, 2
    persons = torch.arange(n_persons).repeat_interleave(12)
    x = torch.randn(persons.shape[0], d, generator=g, dtype=torch.float64) * 3
    yb = (torch.rand(persons.shape[0], generator=g) < 0.8).long()  # separable-ish: far mode

    def losses(idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([torch.zeros_like(idx, dtype=x.dtype), (x[idx] * rows).sum(-1)], 1)
        return F.cross_entropy(logits, yb[idx], reduction="none")

    def curvature(idx: torch.Tensor, rows: torch.Tensor):  # type: ignore[no-untyped-def]
        p = torch.sigmoid((x[idx] * rows).sum(-1))
        jac = x[idx]
        w = 0.5 * p * (1 - p)
        return losses(idx, rows), (p - yb[idx])[:, None] * jac, (w.sqrt()[:, None] * jac)[:, None]

    sigma_inv = torch.tensor([0.25, 0.25], dtype=torch.float64)
    table = torch.zeros(n_persons, d, dtype=torch.float64)
    groups = group_persons(persons, n_persons, d, full=True)
    objective_before = float(losses(torch.arange(len(persons)), table[persons]).sum())
    post = posterior_modes(table, groups, losses, curvature, 1.0, sigma_inv, max_iter=20)
    assert 1 <= post.newton_steps <= 20
    assert post.loss_sum < objective_before
    for i in range(n_persons):
        idx = torch.nonzero(persons == i).squeeze(1)
        torch.testing.assert_close(table[i], lbfgs_mode(losses, idx, sigma_inv, d),
                                   rtol=1e-5, atol=1e-6)


def lbfgs_mode(losses, idx: torch.Tensor, sigma_inv: torch.Tensor, d: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """One person's mode of Σⱼ lⱼ(θ) + θᵀΣ⁻¹θ by L-BFGS, for comparison."""
    theta = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = losses(idx, theta.expand(idx.shape[0], -1)).sum() + (
            theta * theta * sigma_inv).sum()
        value.backward()
        return value

    opt.step(closure)
    return theta.detach()


@pytest.fixture(scope="module")
def mood():  # type: ignore[no-untyped-def]
    return simulate_mood(n_persons=20, n_days=15, seed=2)[0]


@pytest.mark.parametrize("cls", [NMERegressor, NMEClassifier])
def test_fit_person_reproduces_the_final_e_step(cls, mood) -> None:  # type: ignore[no-untyped-def]
    """Refitting a training person on their own items gives back their row and variance."""
    y = mood["mood"] if cls is NMERegressor else np.where(mood["mood"] > 50, "high", "low")
    est = cls(hidden=(8,), max_epochs=10, lr=1e-2, random_state=0, device="cpu").fit(
        mood[MOOD_FEATURES], y, mood["user"])
    rows, variance = est.effects_matrix(), est.effects_variance_matrix()
    assert variance.shape == rows.shape and variance.dtype == np.float32
    assert (variance > 0).all() and (variance < est._Sigma_flat.cpu().numpy() + 1e-6).all()
    k = 4
    mine = (mood["user"] == est.person_ids_[k]).to_numpy()
    theta, var = est.fit_person(mood[MOOD_FEATURES][mine], np.asarray(y)[mine],
                                return_variance=True)
    np.testing.assert_allclose(theta, rows[k], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(var, variance[k], rtol=1e-3, atol=1e-6)
    # nobody's data: the prior
    empty_theta, empty_var = est.fit_person(mood[MOOD_FEATURES].iloc[:0], np.asarray(y)[:0],
                                            return_variance=True)
    assert not empty_theta.any()
    np.testing.assert_allclose(empty_var, est._Sigma_flat.cpu().numpy())
