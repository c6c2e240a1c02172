"""Request payloads and setup steps shared by the service tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from nme.simulate import simulate_mood
from service.demo import FEATURES, observations_from_frame
from service.jobs.worker import Worker

Auth = Callable[[str], dict[str, str]]

TINY_ARCHITECTURE = {"hidden": [8], "placement": "last", "method": "nme"}
TINY_TRAINING = {"max_epochs": 4, "patience": 2, "batch_size": 64, "lr": 0.01}


def model_payload(name: str = "mood", task: str = "regression", **overrides: Any) -> dict:
    """A ``POST /v1/models`` body: the simulated mood features and a tiny network."""
    payload: dict[str, Any] = {
        "name": name,
        "task": task,
        "features": list(FEATURES),
        "classes": ["low", "high"] if task == "classification" else None,
        "states": ["calm", "tense", "upbeat"] if task == "sequence" else None,
        "architecture": TINY_ARCHITECTURE,
        "training": TINY_TRAINING,
    }
    payload.update(overrides)
    return payload


def features(**overrides: float) -> dict[str, float]:
    """A valid feature dict for the mood model."""
    values = {"weekday": 2.0, "typing_speed": 4.0, "screen_minutes": 180.0, "gps_km": 6.0}
    values.update(overrides)
    return values


def create_model(client: TestClient, auth: Auth, **kwargs: Any) -> dict:
    """Create a model through the API and return its JSON."""
    response = client.post("/v1/models", json=model_payload(**kwargs), headers=auth("admin"))
    assert response.status_code == 201, response.text
    return response.json()


def simulated_items(n_users: int = 12, n_days: int = 20, seed: int = 0) -> list[dict]:
    """Simulated labelled observations as JSON ingest items."""
    frame, _ = simulate_mood(n_persons=n_users, n_days=n_days, seed=seed)
    return [item.model_dump(mode="json") for item in observations_from_frame(frame)]


def ingest(client: TestClient, auth: Auth, items: list[dict], name: str = "mood") -> dict:
    """Post observations and return the counts."""
    response = client.post(
        f"/v1/models/{name}/observations", json={"items": items}, headers=auth("ingest")
    )
    assert response.status_code == 200, response.text
    return response.json()


def run_jobs(client: TestClient) -> int:
    """Run every due job in-process (a burst worker on the app's settings); returns how many."""
    worker = Worker(client.app.state.settings, name="test")
    try:
        return worker.run(burst=True)
    finally:
        worker.close()


def get_job(client: TestClient, auth: Auth, job_id: int) -> dict:
    """``GET /v1/jobs/{job_id}``."""
    response = client.get(f"/v1/jobs/{job_id}", headers=auth("admin"))
    assert response.status_code == 200, response.text
    return response.json()


def refit(client: TestClient, auth: Auth, name: str = "mood") -> dict:
    """Queue a refit, run the worker until idle, and return the new version's JSON."""
    response = client.post(f"/v1/models/{name}/refit", headers=auth("admin"))
    assert response.status_code == 202, response.text
    run_jobs(client)
    job = get_job(client, auth, response.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    versions = client.get(f"/v1/models/{name}/versions", headers=auth("admin")).json()["data"]
    return next(v for v in versions if v["version"] == job["result_version"])


def predict(client: TestClient, auth: Auth, items: list[dict], name: str = "mood") -> dict:
    """Predict and return the JSON body."""
    response = client.post(
        f"/v1/models/{name}/predict", json={"items": items}, headers=auth("predict")
    )
    assert response.status_code == 200, response.text
    return response.json()


def classification_items(items: list[dict]) -> list[dict]:
    """The regression items relabelled as ``low``/``high`` mood."""
    return [{**item, "label": "high" if item["label"] >= 50 else "low"} for item in items]


STATES = ["calm", "tense", "upbeat"]
FORBIDDEN = [["calm", "upbeat"]]


def sequence_model_payload(name: str = "affect") -> dict:
    """A sequence model over two segment features, with one forbidden transition."""
    return model_payload(
        name,
        "sequence",
        features=["pitch", "energy"],
        states=STATES,
        architecture={"hidden": [8], "forbidden_transitions": FORBIDDEN},
        training={"max_epochs": 5, "batch_size": 8, "lr": 0.05},
    )


def simulated_sequences(
    n_users: int = 6, n_sequences: int = 10, length: int = 6, seed: int = 0
) -> list[dict]:
    """Labelled sequences whose states follow the features plus a per-user offset; a calm
    segment is never followed by an upbeat one (the forbidden transition)."""
    rng = np.random.default_rng(seed)
    items = []
    for u in range(n_users):
        offset = rng.normal(0, 1, 3)
        for k in range(n_sequences):
            x = rng.normal(0, 1, (length, 2))
            scores = np.stack([-x[:, 0], x[:, 1], x[:, 0]], axis=1) + offset  # (L, 3)
            labels = [STATES[i] for i in scores.argmax(axis=1)]
            for t in range(1, length):
                if labels[t - 1] == "calm" and labels[t] == "upbeat":
                    labels[t] = "tense"
            items.append(
                {
                    "user_id": f"s{u + 1:03d}",
                    "sequence_id": f"seq{k}",
                    "segments": [
                        {"features": {"pitch": float(a), "energy": float(b)}} for a, b in x
                    ],
                    "labels": labels,
                }
            )
    return items
