"""``nme-service demo``: a SQLite database, an admin key, a ``mood`` model trained on simulated
users, and ready-to-paste curl commands. Data goes through the same ingest code as the API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from nme.simulate import simulate_mood
from service import migrate
from service.api.schemas import ObservationCreate
from service.auth import SCOPES
from service.client import NMEClient
from service.config import Settings
from service.db import make_engine, make_session_factory
from service.jobs.tasks import refit_model
from service.learning.ingest import ingest_observations
from service.learning.kinds import kind_for
from service.storage import store
from service.storage.keys import create_key

MODEL_NAME = "mood"
FEATURES = ["weekday", "typing_speed", "screen_minutes", "gps_km"]


@dataclass(frozen=True)
class DemoResult:
    """What the demo made: the admin key, the trained version, a personalised user id."""

    key: str
    version: int
    metrics: dict
    known_user: str
    features: dict[str, float]


def observations_from_frame(frame: pd.DataFrame) -> list[ObservationCreate]:
    """Simulated rows as API ingest items."""
    return [
        ObservationCreate(
            user_id=row.user,
            day=row.day.date(),
            features={name: float(getattr(row, name)) for name in FEATURES},
            label=float(row.mood),
        )
        for row in frame.itertuples(index=False)
    ]


def prepare_demo(
    settings: Settings,
    *,
    n_users: int = 200,
    n_days: int = 60,
    max_epochs: int = 60,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Migrate, create a key and the model, ingest simulated data, refit."""
    migrate.upgrade(settings.database_url)
    engine = make_engine(settings.sqlalchemy_url)
    session_factory = make_session_factory(engine)
    try:
        frame, _truth = simulate_mood(n_persons=n_users, n_days=n_days, seed=seed)
        items = observations_from_frame(frame)
        with session_factory() as session:
            key = create_key(session, name="demo-admin", scopes=SCOPES)
            model = store.get_model(session, name=MODEL_NAME)
            if model is None:
                # Smaller batches and a higher rate than the defaults: 12 000 rows are only 24
                # steps per epoch at 512, and the demo should train in seconds.
                architecture, training = kind_for("regression").resolve_settings(
                    {"hidden": [64, 64]},
                    {"max_epochs": max_epochs, "lr": 3e-3, "batch_size": 256, "patience": 10},
                    n_features=len(FEATURES),
                    labels=None,
                )
                model = store.add_model(
                    session,
                    name=MODEL_NAME,
                    task="regression",
                    features=FEATURES,
                    classes=None,
                    states=None,
                    architecture=architecture,
                    training=training,
                )
            for start in range(0, len(items), settings.max_batch):
                ingest_observations(
                    session,
                    model=model,
                    items=items[start : start + settings.max_batch],
                    max_batch=settings.max_batch,
                )
            session.commit()
        log(f"ingested {len(items)} observations of {n_users} simulated users; training …")
        version = refit_model(
            session_factory,
            model_name=MODEL_NAME,
            artifact_dir=settings.artifact_dir,
            device=settings.device,
            keep_versions=settings.keep_versions,
            actor="demo",
        )
    finally:
        engine.dispose()
    sample = items[-1]
    return DemoResult(
        key=key,
        version=version.version,
        metrics=version.metrics,
        known_user=sample.user_id,
        features=sample.features,
    )


def check_through_client(settings: Settings, result: DemoResult) -> str:
    """Ask the freshly trained model for two predictions through :class:`NMEClient`, with the
    app running in-process: the demo's smoke test, and the client's first user."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    items = [
        {"user_id": result.known_user, "features": result.features},
        {"user_id": "someone-new", "features": result.features},
    ]
    with (
        TestClient(create_app(settings)) as http,
        NMEClient(str(http.base_url), result.key, http=http) as nme,
    ):
        answer = nme.predict("mood", items)
    return "; ".join(
        f"{p.user_id} → {p.prediction:.1f} ({'personalised' if p.personalized else 'generic'})"
        for p in answer.predictions
    )


def client_snippet(result: DemoResult, base_url: str) -> str:
    """The same prediction with the Python client."""
    return "\n".join(
        [
            "from service.client import NMEClient",
            f'with NMEClient("{base_url}", api_key="{result.key}") as nme:',
            f'    answer = nme.predict("mood", [{{"user_id": "{result.known_user}", '
            f'"features": {result.features!r}}}])',
            "    print(answer.version, answer.predictions[0])",
        ]
    )


def curl_commands(result: DemoResult, base_url: str) -> str:
    """Ready-to-paste curl commands against the demo server."""
    auth = '-H "Authorization: Bearer $NME_KEY"'
    json_header = '-H "Content-Type: application/json"'
    features = ", ".join(f'"{k}": {v}' for k, v in result.features.items())
    predict = (
        f'{{"items": [{{"user_id": "{result.known_user}", "features": {{{features}}}}}, '
        f'{{"user_id": "someone-new", "features": {{{features}}}}}]}}'
    )
    observation = (
        f'{{"items": [{{"user_id": "someone-new", "day": "2026-03-10", '
        f'"features": {{{features}}}, "label": 55.0}}]}}'
    )
    return "\n".join(
        [
            f"export NME_KEY={result.key}",
            "",
            "# a personalised user and an unknown user, same features:",
            f"curl -s {base_url}/v1/models/mood/predict {auth} {json_header} -d '{predict}'",
            "",
            "# what the model knows about a user:",
            f"curl -s {base_url}/v1/models/mood/users/{result.known_user} {auth}",
            "",
            "# send a labelled observation:",
            f"curl -s {base_url}/v1/models/mood/observations {auth} {json_header} "
            f"-d '{observation}'",
            "",
            "# learning runs in the background: start a worker in another terminal",
            "#   .venv/bin/nme-service worker     (from this directory: the same ./var database)",
            "# then the labels above personalise 'someone-new', and a refit is a job:",
            f"curl -s {base_url}/v1/models/mood/versions {auth}",
            f"curl -s -X POST {base_url}/v1/models/mood/refit {auth}   # 202 + the job",
            f"curl -s {base_url}/v1/models/mood/jobs {auth}",
            "",
            f"# interactive API docs: {base_url}/docs",
        ]
    )
