"""Early stopping keeps the best epoch without a second person table in memory: the table goes
to a temporary file, and what comes back is exactly what the old full copy gave."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

import nme.base
from nme import NMERegressor
from nme.simulate import MOOD_FEATURES, simulate_mood
from nme.train import BestEpoch, fit_loop


def _fit_with_snapshot(monkeypatch, max_bytes: int | None, splits) -> dict:  # type: ignore[no-untyped-def]
    """Fit with ``snapshot_max_bytes=max_bytes``; returns what fit_loop restored (before the
    final E-step), the per-epoch tables and the fitted estimator."""
    seen: dict = {"tables": []}

    def patched(module, persons, item_loss, config, validate, callback, *args):  # type: ignore[no-untyped-def]
        def record(rec: dict) -> None:
            seen["tables"].append(module.persons.weight.detach().clone())
            if callback is not None:
                callback(rec)

        config = dataclasses.replace(config, snapshot_max_bytes=max_bytes)
        result = fit_loop(module, persons, item_loss, config, validate, record, *args)
        seen["table"] = module.persons.weight.detach().clone()
        seen["base"] = {k: v.clone() for k, v in module.base.state_dict().items()}
        seen["result"] = result
        return result

    monkeypatch.setattr(nme.base, "fit_loop", patched)
    train, val, _ = splits
    est = NMERegressor(hidden=(8,), placement="all", method="unme", lr=0.05, batch_size=64,
                       patience=3, max_epochs=40, tol=None, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(train[MOOD_FEATURES], train["mood"], train["user"],
                val[MOOD_FEATURES], val["mood"], val["user"])
    seen["est"] = est
    return seen


@pytest.fixture(scope="module")
def splits(splitter):  # type: ignore[no-untyped-def]
    return splitter(simulate_mood(n_persons=30, n_days=20, seed=2)[0])


def test_best_epoch_from_disk_equals_the_full_copy(monkeypatch, splits) -> None:  # type: ignore[no-untyped-def]
    old = _fit_with_snapshot(monkeypatch, None, splits)  # the old deepcopy of the whole state
    disk = _fit_with_snapshot(monkeypatch, 0, splits)  # every table goes to the file
    result = old["result"]
    # validation stopped early and the best epoch is not the last one: a real restore
    assert result.stop_reason == "validation"
    assert result.best_epoch < result.n_iter
    best = old["tables"][result.best_epoch - 1]
    assert not torch.equal(best, old["tables"][-1])
    torch.testing.assert_close(old["table"], best, rtol=0, atol=0)
    # the disk snapshot restores bit-identical θⁱ, θ̄, σ², Σ and so the same fitted model
    assert disk["result"].best_epoch == result.best_epoch
    assert disk["result"].n_iter == result.n_iter
    torch.testing.assert_close(disk["table"], old["table"], rtol=0, atol=0)
    for k, v in old["base"].items():
        torch.testing.assert_close(disk["base"][k], v, rtol=0, atol=0)
    assert disk["result"].sigma2 == result.sigma2
    torch.testing.assert_close(disk["result"].Sigma, result.Sigma, rtol=0, atol=0)
    np.testing.assert_array_equal(disk["est"].effects_matrix(), old["est"].effects_matrix())


def test_best_epoch_file_round_trip(tmp_path) -> None:
    """Chunked writes and reads of a table whose rows do not divide into the chunks."""
    from nme.mlp import MLP
    from nme.personalize import PersonalizedModule

    module = PersonalizedModule(MLP(3, (4,), 1), "all", n_persons=37)
    with torch.no_grad():
        module.persons.weight.normal_()
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    snap = BestEpoch(max_bytes=0, directory=str(tmp_path), chunk_bytes=5 * 4 * 21)
    snap.save(module, 0.5, torch.ones(module.effect_dim))
    assert list(tmp_path.iterdir()) == []  # unnamed file: nothing to clean up
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    sigma2, _ = snap.restore(module)
    snap.close()
    assert sigma2 == 0.5
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
