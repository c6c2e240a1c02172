"""scikit-learn conventions: parameters from the signature, clone, pickling, feature
attributes, score, metadata routing of ``persons`` through GridSearchCV and cross_val_score,
and the ``check_estimator`` checks that apply to a fit that also takes ``persons``."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import sklearn
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.utils.estimator_checks import estimator_checks_generator

from nme import NMEClassifier, NMERegressor, NMESequenceTagger
from nme.simulate import MOOD_FEATURES, simulate_mood

QUICK = {"hidden": (8,), "max_epochs": 8, "batch_size": 64, "lr": 1e-2, "random_state": 0,
         "device": "cpu"}


@pytest.fixture(scope="module")
def mood() -> pd.DataFrame:
    return simulate_mood(n_persons=24, n_days=20, seed=4)[0]


@pytest.mark.parametrize("cls", [NMERegressor, NMEClassifier, NMESequenceTagger])
def test_params_come_from_the_signature_and_clone_works(cls: type) -> None:
    est = cls(hidden=[16, 8], placement=["layers.0.bias"], lr=0.5)
    params = est.get_params(deep=True)
    assert params["hidden"] == [16, 8] and params["placement"] == ["layers.0.bias"]
    assert set(params) == set(cls().get_params())
    copy = clone(est)
    assert copy is not est and copy.get_params() == params
    assert copy.set_params(lr=0.1, max_epochs=3) is copy
    assert (copy.lr, copy.max_epochs, est.lr) == (0.1, 3, 0.5)
    with pytest.raises(ValueError, match="Invalid parameter"):
        copy.set_params(epochs=3)


def test_fitted_estimator_clones_unfitted_pickles_and_has_feature_attributes(mood) -> None:  # type: ignore[no-untyped-def]
    est = NMERegressor(**QUICK).fit(mood[MOOD_FEATURES], mood["mood"], mood["user"])
    assert est.n_features_in_ == 4
    assert list(est.feature_names_in_) == MOOD_FEATURES
    assert not hasattr(clone(est), "module_")
    again = pickle.loads(pickle.dumps(est))
    X, who = mood[MOOD_FEATURES].iloc[:30], mood["user"].iloc[:30]
    np.testing.assert_array_equal(again.predict(X, who), est.predict(X, who))
    bare = NMERegressor(**QUICK).fit(mood[MOOD_FEATURES].to_numpy(), mood["mood"], mood["user"])
    assert bare.n_features_in_ == 4 and not hasattr(bare, "feature_names_in_")


def test_score_is_r2_of_personalised_predictions(mood) -> None:  # type: ignore[no-untyped-def]
    X, y, who = mood[MOOD_FEATURES], mood["mood"].to_numpy(), mood["user"].to_numpy()
    est = NMERegressor(**{**QUICK, "max_epochs": 30}).fit(X, y, who)
    personal, generic = est.score(X, y, who), est.score(X, y)
    expected = 1 - ((y - est.predict(X, who)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert personal == pytest.approx(expected)
    assert personal > generic + 0.2  # strong person effects: θⁱ matter
    labels = np.where(y > np.median(y), "high", "low")
    clf = NMEClassifier(**{**QUICK, "max_epochs": 30}).fit(X, labels, who)
    assert clf.score(X, labels, who) == pytest.approx(np.mean(clf.predict(X, who) == labels))


def manual_cv_scores(est, X, y, persons, cv) -> list[float]:  # type: ignore[no-untyped-def]
    """What selection on personalised predictions must compute: fit and score each fold with
    that fold's person ids."""
    out = []
    for train, test in cv.split(X):
        fitted = clone(est).fit(X.iloc[train], y[train], persons[train])
        out.append(fitted.score(X.iloc[test], y[test], persons[test]))
    return out


def test_grid_search_and_cross_val_score_route_persons_to_fit_and_score(mood) -> None:  # type: ignore[no-untyped-def]
    X, y, who = mood[MOOD_FEATURES], mood["mood"].to_numpy(), mood["user"].to_numpy()
    cv = KFold(3, shuffle=True, random_state=0)  # every test person also trains
    est = NMERegressor(**QUICK)
    with sklearn.config_context(enable_metadata_routing=True):
        search = GridSearchCV(est, {"method": ["generic", "nme"]}, cv=cv, refit=False)
        search.fit(X, y, persons=who)
        scores = cross_val_score(est, X, y, cv=cv, params={"persons": who})
        # explicit requests work as well as the defaults
        explicit = clone(est).set_fit_request(persons=True).set_score_request(persons=True)
        scores_explicit = cross_val_score(explicit, X, y, cv=cv, params={"persons": who})
    expected = manual_cv_scores(est, X, y, who, cv)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    np.testing.assert_allclose(scores_explicit, expected, rtol=1e-6)
    nme = search.cv_results_["params"].index({"method": "nme"})
    got = [search.cv_results_[f"split{k}_test_score"][nme] for k in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # the personalised score is what chose: NME beats the generic network clearly here, and
    # scoring NME's generic predictions (no persons) would have told a different story
    assert search.best_params_ == {"method": "nme"}
    generic_scored = [clone(est).fit(X.iloc[a], y[a], who[a]).score(X.iloc[b], y[b])
                      for a, b in cv.split(X)]
    assert np.mean(expected) > np.mean(generic_scored) + 0.2


# --------------------------------------------------------------------------- check_estimator
def _n_rows(X) -> int:  # type: ignore[no-untyped-def]
    return X.shape[0] if scipy.sparse.issparse(X) else np.asarray(X).shape[0]


class _RowsByThree(NMERegressor):
    """scikit-learn's checks call ``fit(X, y)``: give every third row the same person."""

    def fit(self, X, y):  # type: ignore[no-untyped-def, override]
        return super().fit(X, y, np.arange(_n_rows(X)) % 3)


class _ClassifierRowsByThree(NMEClassifier):
    def fit(self, X, y):  # type: ignore[no-untyped-def, override]
        return super().fit(X, y, np.arange(_n_rows(X)) % 3)


SKIPPED = {
    # needs SCIPY_ARRAY_API and array-API inputs; the estimators take numpy, pandas and torch
    "check_array_api_input",
}


def _checks() -> list:
    out = []
    small = {"hidden": (16,), "max_epochs": 30, "lr": 1e-2, "device": "cpu", "random_state": 0}
    for est in (_RowsByThree(**small), _ClassifierRowsByThree(**small)):
        for instance, check in estimator_checks_generator(est, legacy=True, mark="skip"):
            name = getattr(check, "func", check).__name__
            if name not in SKIPPED:
                out.append(pytest.param(instance, check, id=f"{type(est).__name__}-{name}"))
    return out


@pytest.mark.parametrize(("estimator", "check"), _checks())
def test_scikit_learn_estimator_checks(estimator, check) -> None:  # type: ignore[no-untyped-def]
    """Every check of ``check_estimator`` except the array-API one, run through a fit that
    supplies ``persons`` (predictions on new X are for unknown persons: the generic model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)
