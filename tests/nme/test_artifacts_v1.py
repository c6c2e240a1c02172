"""Artifacts written before schema version 2 (the service stores such models) still load and
predict exactly as they did; their persons' posterior variance is the prior Σ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nme import NMEClassifier, NMERegressor, NMESequenceTagger, load_estimator
from nme.simulate import MOOD_FEATURES, simulate_mood, simulate_sequences

V1 = Path(__file__).parent / "data" / "v1_artifacts"


def test_version_1_tabular_artifacts_load_and_predict_the_same() -> None:
    assert json.loads((V1 / "regressor" / "config.json").read_text())["schema_version"] == 1
    df, _ = simulate_mood(n_persons=6, n_days=12, seed=1)
    X, who = df[MOOD_FEATURES], df["user"]
    reg = NMERegressor.load(V1 / "regressor")
    np.testing.assert_allclose(reg.predict(X, who), np.load(V1 / "regressor_pred.npy"),
                               rtol=1e-6)
    sigma = reg._Sigma_flat.cpu().numpy()
    np.testing.assert_array_equal(reg.effects_variance_matrix(),
                                  np.broadcast_to(sigma, reg.effects_matrix().shape))
    assert reg.e_step == "newton" and reg.n_iter_ == len(reg.history_) and reg.converged_
    clf = NMEClassifier.load(V1 / "classifier")
    np.testing.assert_allclose(clf.predict_proba(X, who), np.load(V1 / "classifier_proba.npy"),
                               rtol=1e-6)
    generic = load_estimator(V1 / "regressor_generic")
    assert generic.person_ids_ == [] and generic.effects_variance_matrix().shape == (0, 5)


def test_version_1_tagger_artifact_decodes_the_same() -> None:
    data, _ = simulate_sequences(n_persons=4, n_sequences=3, length=5, seed=0)
    groups = list(data.groupby("sequence_id"))
    feats = [g[[f"f{k}" for k in range(6)]].to_numpy() for _, g in groups]
    persons = [g["person"].iloc[0] for _, g in groups]
    tagger = NMESequenceTagger.load(V1 / "tagger")
    assert tagger.predict(feats, persons) == json.loads((V1 / "tagger_paths.json").read_text())
    assert tagger.effects_variance_matrix().shape == tagger.effects_matrix().shape
