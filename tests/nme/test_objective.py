"""The NME objective (Eq. 1/2) and the M-step against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from nme.objective import laplace_posterior, m_step, nme_batch_loss


def test_batch_loss_matches_hand_computed_eq2() -> None:
    # Batch of 3 items: persons A, A, B with nA = 4, nB = 2 training items.
    losses = torch.tensor([1.0, 2.0, 4.0])
    rows = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.5, -1.0]])
    n_obs = torch.tensor([4.0, 4.0, 2.0])
    sigma2 = 2.0
    sigma_inv = torch.tensor([1.0, 0.5])
    # data: (1 + 2 + 4) / σ² = 3.5
    # penalty: person A appears twice of nA = 4 -> 2/4 · (1·1 + 0.5·4) = 1.5
    #          person B once of nB = 2        -> 1/2 · (1·0.25 + 0.5·1) = 0.375
    expected = (3.5 + 1.5 + 0.375) / 3
    got = nme_batch_loss(losses, rows, n_obs, sigma2, sigma_inv)
    assert float(got) == pytest.approx(expected)


def test_batch_loss_without_penalty_is_the_mean_loss() -> None:
    losses = torch.tensor([1.0, 2.0, 6.0])
    rows = torch.ones(3, 2)
    assert float(nme_batch_loss(losses, rows, torch.ones(3), 1.0, None)) == pytest.approx(3.0)


def test_one_epoch_applies_each_penalty_once() -> None:
    # Summed over batches that partition a person's items, the weights count/nᵢ add up to 1.
    rows = torch.tensor([[2.0]]).expand(5, 1)
    n_obs = torch.full((5,), 5.0)
    total = sum(
        float(nme_batch_loss(torch.zeros(len(b)), rows[b], n_obs[b], 1.0, torch.ones(1))) * len(b)
        for b in ([0, 1], [2], [3, 4])
    )
    assert total == pytest.approx(4.0)


def test_m_step_hand_computed() -> None:
    effects = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 0.0]])
    sigma2, Sigma = m_step(0.7, effects, torch.ones(2))
    assert sigma2 == pytest.approx(0.7)
    # sample variance (ddof 1) of 1, 3, 5 is 4; the constant column is floored, not 0
    assert Sigma[0].item() == pytest.approx(4.0)
    assert 0 < Sigma[1].item() <= 1e-8


def test_m_step_annealing_keeps_the_larger_value() -> None:
    effects = torch.tensor([[1.0, 0.0], [3.0, 0.2]])
    _, Sigma = m_step(1.0, effects, torch.tensor([1.0, 10.0]), anneal=0.9)
    assert Sigma.tolist() == pytest.approx([2.0, 9.0])


def test_laplace_posterior_hand_computed() -> None:
    sq = torch.tensor([[4.0], [0.0]])  # person 0: Σ g² = 4, person 1: no data
    V, trace = laplace_posterior(sq, sigma2=2.0, Sigma=torch.tensor([1.0]), n_items=4)
    # V0 = 1/(4/2 + 1) = 1/3, V1 = 1/(0 + 1) = 1
    assert V.item() == pytest.approx((1 / 3 + 1) / 2)
    assert trace == pytest.approx(4 * (1 / 3) / 4)
    _, Sigma = m_step(1.0, torch.tensor([[1.0], [3.0]]), torch.ones(1), posterior=(V, trace))
    assert Sigma.item() == pytest.approx(2.0 + 2 / 3)
    assert not math.isnan(Sigma.item())


def test_gathered_rows_give_the_same_loss_as_per_item_rows() -> None:
    from nme.persons import Gathered

    unique = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    inverse = torch.tensor([0, 0, 1])
    losses = torch.tensor([1.0, 2.0, 4.0])
    n_obs = torch.tensor([4.0, 4.0, 2.0])
    sigma_inv = torch.tensor([1.0, 0.5])
    per_item = nme_batch_loss(losses, unique[inverse], n_obs, 2.0, sigma_inv)
    gathered = nme_batch_loss(losses, Gathered(unique, inverse), n_obs, 2.0, sigma_inv)
    assert float(gathered) == pytest.approx(float(per_item))
