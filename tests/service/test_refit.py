"""The refit pipeline: temporal split, artifact + hash, θⁱ rows, one transaction, failures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from nme import load_estimator
from service.config import Settings
from service.errors import Conflict
from service.jobs.tasks import refit_model
from service.learning.kinds.base import temporal_split
from service.storage import store
from service.storage.artifacts import artifact_sha256
from service.storage.tables import ModelVersion, PersonParam, User
from tests.service.factories import features, ingest, simulated_items


def test_temporal_split_holds_out_each_users_last_fifth() -> None:
    persons = ["a"] * 10 + ["b"] * 4 + ["c"] * 5
    is_val = temporal_split(persons)
    assert is_val[:10].tolist() == [False] * 8 + [True] * 2
    assert not is_val[10:14].any()  # 4 labels: floor(0.8) = 0 held out
    assert is_val[14:].tolist() == [False] * 4 + [True]


def test_refit_writes_artifact_and_all_person_rows(
    client: TestClient,
    auth: Callable,
    trained_mood: dict,
    settings: Settings,
    session_factory: sessionmaker,
) -> None:
    answer = trained_mood["version"]
    assert answer["version"] == 1 and answer["status"] == "active"
    metrics = answer["metrics"]
    assert metrics["n_train"] == 12 * 16 and metrics["n_val"] == 12 * 4
    assert metrics["val_score"] < 0 and metrics["score_name"] == "neg_rmse"

    with session_factory() as session:
        version = session.scalars(select(ModelVersion)).one()
        params = session.execute(
            select(User.external_id, PersonParam.effects, PersonParam.n_obs)
            .join(User, User.id == PersonParam.user_id)
            .order_by(User.external_id)
        ).all()
    path = settings.artifact_dir / version.artifact_path
    assert artifact_sha256(path) == version.artifact_sha256
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    assert version.n_users == 12 and version.n_observations == 240

    estimator = load_estimator(path)
    assert [p[0] for p in params] == [f"u{k:04d}" for k in range(1, 13)]
    # The labels arrived just before the refit read them, so every user also got a follow-up
    # per-user update (see FOLLOW_UP_MARGIN), which fits θⁱ on all 20 of their labels.
    assert {p[2] for p in params} == {20}
    effects = np.stack([np.frombuffer(p[1], dtype="<f4") for p in params])
    assert effects.shape == (12, estimator.n_effects_)
    assert np.abs(effects).sum() > 0


def refit_now(
    settings: Settings, session_factory: sessionmaker, model_name: str = "mood"
) -> ModelVersion:
    return refit_model(
        session_factory,
        model_name=model_name,
        artifact_dir=settings.artifact_dir,
        device="cpu",
    )


def test_a_fit_out_of_epochs_says_so_in_the_metrics_not_on_stderr(
    client: TestClient, auth: Callable, mood_model: dict, recwarn: pytest.WarningsRecorder
) -> None:
    """The test models train 4 epochs: too few for the convergence test. The worker's log is
    JSON lines, so the estimator's ConvergenceWarning must not reach stderr as text."""
    from sklearn.exceptions import ConvergenceWarning

    from tests.service.factories import refit

    ingest(client, auth, simulated_items())
    version = refit(client, auth)
    assert version["metrics"]["converged"] is False
    assert version["metrics"]["epochs"] == 4
    assert not [w for w in recwarn if issubclass(w.category, ConvergenceWarning)]


def test_refit_without_labels_is_a_conflict(
    client: TestClient,
    auth: Callable,
    mood_model: dict,
    settings: Settings,
    session_factory: sessionmaker,
) -> None:
    with pytest.raises(Conflict, match="no labelled observations"):
        refit_now(settings, session_factory)
    response = client.post("/v1/models/mood/refit", headers=auth("admin"))
    assert response.status_code == 409


def test_refit_unknown_model_is_404(client: TestClient, auth: Callable) -> None:
    assert client.post("/v1/models/nope/refit", headers=auth("admin")).status_code == 404


def test_failed_write_leaves_no_version_and_no_artifact(
    client: TestClient,
    auth: Callable,
    mood_model: dict,
    settings: Settings,
    session_factory: sessionmaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest(client, auth, simulated_items(n_users=4, n_days=10))

    def crash(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "add_person_params", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        refit_now(settings, session_factory)
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(ModelVersion)) == 0
    assert list((settings.artifact_dir / "mood").iterdir()) == []


def test_users_forgotten_during_training_get_no_row(
    client: TestClient,
    auth: Callable,
    mood_model: dict,
    settings: Settings,
    session_factory: sessionmaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import service.learning.refit as refit_module

    ingest(client, auth, simulated_items(n_users=4, n_days=10))
    original = refit_module.fit_estimator

    def fit_then_forget(*args: Any, **kwargs: Any) -> tuple[Any, dict]:
        result = original(*args, **kwargs)
        client.delete("/v1/users/u0002", headers=auth("admin"))
        return result

    monkeypatch.setattr(refit_module, "fit_estimator", fit_then_forget)
    version = refit_now(settings, session_factory)
    with session_factory() as session:
        users = session.scalars(
            select(User.external_id).join(PersonParam, PersonParam.user_id == User.id)
        ).all()
    assert sorted(users) == ["u0001", "u0003", "u0004"]
    assert version.status == "active"


def test_refit_picks_up_new_labels(
    client: TestClient,
    auth: Callable,
    trained_mood: dict,
    settings: Settings,
    session_factory: sessionmaker,
) -> None:
    newcomer = [
        {"user_id": "newbie", "day": f"2026-02-{d:02d}", "features": features(), "label": 90.0}
        for d in range(1, 11)
    ]
    client.app.state.settings = settings.model_copy(update={"user_updates_on_ingest": False})
    ingest(client, auth, newcomer)
    item = {"user_id": "newbie", "features": features()}
    before = client.post("/v1/models/mood/predict", json={"items": [item]}, headers=auth("predict"))
    assert before.json()["predictions"][0]["personalized"] is False
    assert refit_now(settings, session_factory).version == 2  # activates unconditionally
    after = client.post("/v1/models/mood/predict", json={"items": [item]}, headers=auth("predict"))
    assert after.json()["version"] == 2
    prediction = after.json()["predictions"][0]
    assert prediction["personalized"] is True
    assert prediction["prediction"] > before.json()["predictions"][0]["prediction"]


def test_corrupt_artifact_is_refused(
    client: TestClient,
    auth: Callable,
    trained_mood: dict,
    settings: Settings,
    session_factory: sessionmaker,
) -> None:
    from service.storage.artifacts import ArtifactCorrupt, load_verified

    with session_factory() as session:
        version = session.scalars(select(ModelVersion)).one()
    config = Path(settings.artifact_dir / version.artifact_path / "config.json")
    config.write_text(config.read_text() + " ")
    with pytest.raises(ArtifactCorrupt, match="sha256"):
        load_verified(settings.artifact_dir, version.artifact_path, version.artifact_sha256, "cpu")
