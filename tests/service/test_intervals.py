"""Per-person prediction intervals through the API: stored posterior variances, the prior for
unknown users, refreshed by the per-user update; only for regression models."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.storage.tables import PersonParam, User
from tests.service.factories import (
    classification_items,
    create_model,
    features,
    ingest,
    refit,
    run_jobs,
    simulated_items,
)

Auth = Callable[[str], dict[str, str]]


def ask(client: TestClient, auth: Auth, items: list[dict], **extra: object) -> dict:
    response = client.post(
        "/v1/models/mood/predict", json={"items": items, **extra}, headers=auth("predict")
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_intervals_are_per_person_and_wider_for_strangers(
    client: TestClient, auth: Auth, trained_mood: dict
) -> None:
    items = [{"user_id": "u0001", "features": features()},
             {"user_id": "stranger", "features": features()}]
    plain = ask(client, auth, items)["predictions"]
    assert "lower" not in plain[0]  # nothing new unless asked
    known, unknown = ask(client, auth, items, interval=0.9)["predictions"]
    for p, q in zip((known, unknown), plain, strict=True):
        assert p["lower"] < p["prediction"] < p["upper"]
        assert abs(p["prediction"] - q["prediction"]) < 1e-6
    assert unknown["upper"] - unknown["lower"] > known["upper"] - known["lower"]
    wider = ask(client, auth, items[:1], interval=0.99)["predictions"][0]
    assert wider["upper"] - wider["lower"] > known["upper"] - known["lower"]


def test_bad_interval_is_422(client: TestClient, auth: Auth, trained_mood: dict) -> None:
    item = [{"user_id": "u0001", "features": features()}]
    for bad in (0, 1, 1.5, -0.1, "0.9", True, [0.9], {"coverage": 0.9}, None):
        body = {"items": item, "interval": bad}
        response = client.post("/v1/models/mood/predict", json=body, headers=auth("predict"))
        assert response.status_code == (200 if bad is None else 422), (bad, response.text)
        if bad is not None:
            assert response.json()["detail"][0]["loc"] == ["body", "interval"]
    # 1e-400 underflows to 0.0 and NaN is no coverage: both refused, never a 500
    headers = {**auth("predict"), "content-type": "application/json"}
    for raw in ("1e-400", "NaN", "1e400"):
        items = json.dumps([{"user_id": "u0001", "features": features()}])
        response = client.post(
            "/v1/models/mood/predict", headers=headers,
            content=f'{{"items": {items}, "interval": {raw}}}',
        )
        assert response.status_code == 422, (raw, response.text)


def test_classification_models_refuse_intervals(client: TestClient, auth: Auth) -> None:
    create_model(client, auth, name="moods", task="classification")
    ingest(client, auth, classification_items(simulated_items()), name="moods")
    refit(client, auth, name="moods")
    response = client.post(
        "/v1/models/moods/predict",
        json={"items": [{"user_id": "u0001", "features": features()}], "interval": 0.9},
        headers=auth("predict"),
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "interval"]


def test_refit_and_user_update_store_the_variance(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker[Session]
) -> None:
    run_jobs(client)
    with session_factory() as session:
        missing = session.scalar(
            select(func.count()).select_from(PersonParam).where(PersonParam.effects_var.is_(None))
        )
        assert missing == 0
    labels = [{"user_id": "newbie", "day": f"2026-05-{d:02d}", "features": features(),
               "label": 80.0} for d in range(1, 11)]
    ingest(client, auth, labels)
    run_jobs(client)
    with session_factory() as session:
        row = session.scalar(
            select(PersonParam).join(User, User.id == PersonParam.user_id)
            .where(User.external_id == "newbie")
        )
        assert row is not None and row.effects_var is not None
        assert len(row.effects_var) == len(row.effects)
    newbie = ask(client, auth, [{"user_id": "newbie", "features": features()}],
                 interval=0.9)["predictions"][0]
    assert newbie["personalized"] and newbie["lower"] < newbie["upper"]


def test_rows_without_a_stored_variance_use_the_prior(
    client: TestClient, auth: Auth, trained_mood: dict, session_factory: sessionmaker[Session]
) -> None:
    item = [{"user_id": "u0001", "features": features()}]
    before = ask(client, auth, item, interval=0.9)["predictions"][0]
    with session_factory() as session:  # a row written before variances were stored
        session.execute(PersonParam.__table__.update().values(effects_var=None))
        session.commit()
    after = ask(client, auth, item, interval=0.9)["predictions"][0]
    assert after["upper"] - after["lower"] >= before["upper"] - before["lower"] - 1e-6
