"""The estimator API: fit/predict, unknown persons, inputs, artifacts, the per-person E-step."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from nme import ArtifactError, NMEClassifier, NMERegressor, load_estimator
from nme.train import auto_batch_size

FAST = {"hidden": (16,), "max_epochs": 15, "batch_size": 128, "lr": 3e-3, "random_state": 0}


@pytest.fixture(scope="module")
def fitted(mood_splits, features) -> NMERegressor:  # type: ignore[no-untyped-def]
    train, val, _ = mood_splits
    est = NMERegressor(placement="last", method="nme", **FAST)
    return est.fit(
        train[features], train["mood"], train["user"],
        val[features], val["mood"], val["user"],
    )


def test_fit_records_history_and_m_step(fitted: NMERegressor) -> None:
    record = fitted.history_[0]
    assert {"epoch", "train_loss", "val_loss", "val_metric", "sigma2", "Sigma_mean"} <= set(record)
    assert 1 <= fitted.best_epoch_ <= len(fitted.history_)
    assert fitted.sigma2_ > 0
    assert set(fitted.Sigma_) == {"layers.1.weight", "layers.1.bias"}
    assert fitted.Sigma_["layers.1.weight"].shape == (1, 16)


def test_unknown_person_gets_generic_model(fitted: NMERegressor, mood_splits, features) -> None:  # type: ignore[no-untyped-def]
    _, _, test = mood_splits
    X = test[features].iloc[:5]
    generic = fitted.predict(X)
    assert np.array_equal(fitted.predict(X, ["nobody"] * 5), generic)
    personal = fitted.predict(X, test["user"].iloc[:5])
    assert not np.allclose(personal, generic)
    assert all(v.abs().sum() == 0 for v in fitted.person_effects("nobody").values())


def test_predict_with_effects_equals_predict(fitted: NMERegressor, mood_splits, features) -> None:  # type: ignore[no-untyped-def]
    _, _, test = mood_splits
    X = test[features].iloc[:20]
    users = test["user"].iloc[:20].tolist()
    rows = fitted.effects_matrix()[[fitted.person_ids_.index(u) for u in users]]
    known = np.ones(20, dtype=bool)
    known[3] = False
    expected = fitted.predict(X, [u if k else "nobody" for u, k in zip(users, known, strict=True)])
    np.testing.assert_array_equal(fitted.predict_with_effects(X, rows, known), expected)


def test_feature_name_mismatch_is_an_error(fitted: NMERegressor, mood_splits, features) -> None:  # type: ignore[no-untyped-def]
    _, _, test = mood_splits
    with pytest.raises(ValueError, match="missing \\['gps_km'\\]"):
        fitted.predict(test[features].drop(columns="gps_km"), test["user"])
    renamed = test[features].rename(columns={"gps_km": "km"})
    with pytest.raises(ValueError, match="unexpected \\['km'\\]"):
        fitted.predict(renamed, test["user"])
    # reordered columns are fine: they are matched by name
    reordered = test[features[::-1]].iloc[:3]
    np.testing.assert_array_equal(
        fitted.predict(reordered, test["user"].iloc[:3]),
        fitted.predict(test[features].iloc[:3], test["user"].iloc[:3]),
    )


def test_nan_and_non_numeric_inputs_are_errors(mood_splits, features) -> None:  # type: ignore[no-untyped-def]
    train, _, _ = mood_splits
    bad = train[features].copy()
    bad.iloc[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        NMERegressor(**FAST).fit(bad, train["mood"], train["user"])
    text = train[features].astype({"gps_km": str})
    with pytest.raises(ValueError, match="non-numeric"):
        NMERegressor(**FAST).fit(text, train["mood"], train["user"])


def test_numpy_torch_and_int_persons(mood_splits, features) -> None:  # type: ignore[no-untyped-def]
    train, _, _ = mood_splits
    X = train[features].to_numpy()
    persons = pd.factorize(train["user"])[0]
    a = NMERegressor(**FAST).fit(X, train["mood"].to_numpy(), persons)
    b = NMERegressor(**FAST).fit(torch.tensor(X), torch.tensor(train["mood"].to_numpy()), persons)
    np.testing.assert_allclose(a.predict(X[:10], persons[:10]), b.predict(X[:10], persons[:10]))
    assert a.feature_names_ == ["x0", "x1", "x2", "x3"]


def test_fit_is_deterministic_on_cpu(mood_splits, features) -> None:  # type: ignore[no-untyped-def]
    train, _, test = mood_splits
    preds = [
        NMERegressor(**FAST).fit(train[features], train["mood"], train["user"])
        .predict(test[features], test["user"])
        for _ in range(2)
    ]
    np.testing.assert_array_equal(*preds)


def test_save_load_round_trip_is_bit_identical(
    fitted: NMERegressor, mood_splits, features, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    _, _, test = mood_splits
    fitted.save(tmp_path / "model")
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert files == {"config.json", "weights.safetensors"}
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["schema_version"] == 2
    assert config["effects_layout"] == [
        {"name": "layers.1.weight", "shape": [1, 16]},
        {"name": "layers.1.bias", "shape": [1]},
    ]
    loaded = NMERegressor.load(tmp_path / "model")
    users = list(test["user"]) + ["stranger"]
    X = pd.concat([test[features], test[features].iloc[:1]])
    np.testing.assert_array_equal(loaded.predict(X, users), fitted.predict(X, users))
    assert loaded.sigma2_ == fitted.sigma2_
    assert loaded.person_ids_ == fitted.person_ids_


def test_save_without_effects_serves_with_external_rows(
    fitted: NMERegressor, mood_splits, features, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    _, _, test = mood_splits
    fitted.save(tmp_path / "generic", include_effects=False)
    loaded = load_estimator(tmp_path / "generic")
    assert loaded.person_ids_ == []
    X = test[features].iloc[:8]
    users = test["user"].iloc[:8].tolist()
    rows = fitted.effects_matrix()[[fitted.person_ids_.index(u) for u in users]]
    np.testing.assert_array_equal(
        loaded.predict_with_effects(X, rows, np.ones(8, bool)), fitted.predict(X, users)
    )


def test_bad_artifacts_raise_clear_errors(fitted: NMERegressor, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no model artifact"):
        load_estimator(tmp_path / "missing")
    fitted.save(tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing weights.safetensors"):
        load_estimator(tmp_path / "m")
    fitted.save(tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    (tmp_path / "v" / "config.json").write_text(json.dumps({**cfg, "schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema version 99"):
        load_estimator(tmp_path / "v")
    fitted.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg["architecture"]["hidden"] = [32]
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="does not fit"):
        load_estimator(tmp_path / "s")


def test_fit_person_moves_a_new_person_toward_their_labels(
    fitted: NMERegressor, mood_splits, features  # type: ignore[no-untyped-def]
) -> None:
    _, _, test = mood_splits
    X = test[features].iloc[:20]
    y = fitted.predict(X) + 15.0  # a newcomer whose mood is 15 points above the generic model
    theta = fitted.fit_person(X, y)
    shifted = fitted.predict_with_effects(X, theta[None].repeat(20, 0), np.ones(20, bool))
    gain = (shifted - fitted.predict(X)).mean()
    assert 5.0 < gain < 15.0, "shrunk toward the prior, but clearly moved toward the labels"


def test_classifier_probabilities_and_save_load(mood_splits, features, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train, _, test = mood_splits
    label = lambda d: np.where(d["mood"] > 50, "good", "low")  # noqa: E731
    est = NMEClassifier(placement="last", **FAST).fit(train[features], label(train), train["user"])
    proba = est.predict_proba(test[features], test["user"])
    assert proba.shape == (len(test), 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert list(est.classes_) == ["good", "low"]
    assert est.score_per_person(test[features], label(test), test["user"]) > 0.6
    est.save(tmp_path / "clf")
    loaded = NMEClassifier.load(tmp_path / "clf")
    np.testing.assert_array_equal(loaded.predict_proba(test[features], test["user"]), proba)
    with pytest.raises(ArtifactError, match="not a NMERegressor"):
        NMERegressor.load(tmp_path / "clf")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"method": "lme"}, "method"),
        ({"anneal": 1.5}, "anneal"),
        ({"hidden": (0,)}, "hidden"),
        ({"hidden": "64"}, "hidden"),
        ({"placement": 3}, "placement"),
        ({"activation": "sigmoid"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"patience": 0}, "patience"),
        ({"m_step": "exact"}, "m_step"),
        ({"batching": "sorted"}, "batching"),
        ({"random_state": "zero"}, "random_state"),
    ],
)
def test_invalid_hyper_parameters_are_refused_by_validate_and_fit(
    params: dict, message: str, mood_splits, features  # type: ignore[no-untyped-def]
) -> None:
    est = NMERegressor(**params)  # scikit-learn convention: __init__ only stores
    assert est.get_params()[next(iter(params))] is params[next(iter(params))]
    with pytest.raises(ValueError, match=message):
        est._validate_params()
    train, _, _ = mood_splits
    with pytest.raises(ValueError, match=message):
        est.fit(train[features].iloc[:20], train["mood"].iloc[:20], train["user"].iloc[:20])


def test_budget_convergence_attributes_and_warning(mood_splits, features) -> None:  # type: ignore[no-untyped-def]
    train, val, _ = mood_splits
    X, y, who = train[features], train["mood"], train["user"]
    with pytest.warns(ConvergenceWarning, match="max_epochs=2"):
        short = NMERegressor(**{**FAST, "max_epochs": 2}).fit(X, y, who)
    assert (short.n_iter_, short.converged_) == (2, False)
    # early stopping on validation is a convergence test too
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = NMERegressor(**{**FAST, "max_epochs": 200, "patience": 3}).fit(
            X, y, who, val[features], val["mood"], val["user"])
    assert est.converged_ and est.n_iter_ == len(est.history_) < 200
    assert est.best_epoch_ == est.n_iter_ - 3


@pytest.mark.parametrize(("n", "expected"), [(10, 32), (180, 32), (3600, 225), (10**6, 512)])
def test_auto_batch_size(n: int, expected: int) -> None:
    assert auto_batch_size(n) == expected
