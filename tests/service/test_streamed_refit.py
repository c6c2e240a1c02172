"""A refit streams its training data in chunks into preallocated arrays: the same arrays (and
so the same model) whatever the chunk size, and the same as reading every row at once; a
per-user update writes exactly one θⁱ row."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.learning import refit as refit_module
from service.learning.kinds import kind_of
from service.learning.kinds.base import temporal_split
from service.learning.kinds.tabular import TabularData, gross_outliers
from service.learning.serving import Predictor
from service.learning.user_update import fit_user, write_user_fit
from service.storage import store
from service.storage.tables import Model, Observation, PersonParam, User, utcnow
from tests.service.factories import create_model, features, ingest, simulated_items

CHUNKS = (1, 3, 7, 10**6)


def odd_items() -> list[dict]:
    """Simulated labels whose user ids sort differently from their arrival order (u10 < u2),
    with one gross outlier the refit must leave out and a user with a single label."""
    items = simulated_items(n_users=5, n_days=9, seed=3)
    for item in items:
        item["user_id"] = {"u0001": "u2", "u0002": "u10", "u0003": "zoë"}.get(
            item["user_id"], item["user_id"]
        )
    items[4]["label"] = 1e6  # a mistyped label: the outlier rule drops it
    items.append({"user_id": "solo", "day": "2026-03-01", "features": features(), "label": 3.5})
    items.append({"user_id": "solo", "day": "2026-03-02", "features": features()})  # unlabelled
    return items


def whole_read_reference(session: Session, model: Model) -> TabularData:
    """The refit's data as it was read before streaming: every labelled row as one Python list
    of rows (features as JSON dicts), screened and split with the same rules."""
    rows = list(
        session.execute(
            select(User.external_id, Observation.user_id, Observation.day,
                   Observation.features, Observation.label)
            .join(User, User.id == Observation.user_id)
            .where(Observation.model_id == model.id, Observation.label.is_not(None))
            .order_by(User.external_id, Observation.day)
        )
    )
    label_dtype = kind_of(model).label_dtype
    if model.task == "regression":  # the outlier screen
        labels = np.array([row.label for row in rows], dtype=np.float64)
        outlier = gross_outliers(labels)[0]
        rows = [row for row, bad in zip(rows, outlier, strict=True) if not bad]
    persons = [row.external_id for row in rows]
    x = np.array([[row.features[n] for n in model.features] for row in rows], dtype=np.float32)
    y = np.asarray([row.label for row in rows], dtype=label_dtype)
    is_val = temporal_split(persons)
    return TabularData(
        x_train=x[~is_val], y_train=y[~is_val],
        persons_train=np.array([p for p, v in zip(persons, is_val, strict=True) if not v]),
        x_val=x[is_val], y_val=y[is_val],
        persons_val=np.array([p for p, v in zip(persons, is_val, strict=True) if v]),
        user_row_ids={row.external_id: row.user_id for row in rows},
        read_at=utcnow(),
    )


def assert_same_data(got: TabularData, want: TabularData) -> None:
    for name in ("x_train", "y_train", "x_val", "y_val"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)  # bit for bit
    assert got.persons_train.tolist() == want.persons_train.tolist()
    assert got.persons_val.tolist() == want.persons_val.tolist()
    assert got.user_row_ids == want.user_row_ids


@pytest.fixture
def odd_model(client: TestClient, auth: Callable, session_factory: sessionmaker) -> Model:
    create_model(client, auth)
    ingest(client, auth, odd_items())
    with session_factory() as session:
        return session.scalars(select(Model)).one()


def test_any_chunk_size_reads_the_whole_read_s_training_data(
    odd_model: Model, session_factory: sessionmaker
) -> None:
    kind = kind_of(odd_model)
    with session_factory() as session:
        want = whole_read_reference(session, odd_model)
        datas = [
            kind.load_training_data(session, model=odd_model, chunk_rows=chunk)
            for chunk in CHUNKS
        ]
    assert len(want.persons_train) + len(want.persons_val) == 5 * 9 - 1 + 1  # outlier out
    assert "zoë" in want.user_row_ids and "solo" in want.user_row_ids
    for data in datas:
        assert_same_data(data, want)
        [warning] = data.warnings  # the outlier, named with its user and day
        assert warning.kind == "labels_skipped" and warning.data["n_labels"] == 1
        assert warning.data["labels"][0] == {
            "user_id": odd_items()[4]["user_id"], "day": odd_items()[4]["day"], "label": 1e6
        }


def test_classification_labels_stream_like_the_whole_read(
    client: TestClient, auth: Callable, session_factory: sessionmaker
) -> None:
    create_model(client, auth, name="moodclass", task="classification")
    items = odd_items()
    for k, item in enumerate(items):
        if "label" in item:
            item["label"] = "high" if k % 3 else "low"
    ingest(client, auth, items, name="moodclass")
    with session_factory() as session:
        model = session.scalars(select(Model)).one()
        want = whole_read_reference(session, model)
        for chunk in CHUNKS:
            data = kind_of(model).load_training_data(session, model=model, chunk_rows=chunk)
            assert_same_data(data, want)
            assert data.y_train.dtype == object and set(data.y_train) == {"low", "high"}
            assert not data.warnings


def test_more_rows_than_counted_grow_the_arrays(
    odd_model: Model, session_factory: sessionmaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels that land between the count and the read: the arrays grow (and a short read is
    trimmed), the data is the same."""
    kind = kind_of(odd_model)
    with session_factory() as session:
        want = whole_read_reference(session, odd_model)
        monkeypatch.setattr(store, "count_labelled_observations", lambda *a, **k: 1)
        grown = kind.load_training_data(session, model=odd_model, chunk_rows=2)
        monkeypatch.setattr(store, "count_labelled_observations", lambda *a, **k: 10**4)
        trimmed = kind.load_training_data(session, model=odd_model, chunk_rows=5)
    assert_same_data(grown, want)
    assert_same_data(trimmed, want)


def test_chunk_size_does_not_change_the_model(
    odd_model: Model, session_factory: sessionmaker, settings: Settings
) -> None:
    fitted = [
        refit_module.train_version(
            session_factory, model_name="mood", artifact_dir=settings.artifact_dir / str(chunk),
            device="cpu", chunk_rows=chunk,
        )
        for chunk in (1, 10**6)
    ]
    one, whole = (trained.estimator for trained in fitted)
    assert list(one.person_ids_) == list(whole.person_ids_)
    np.testing.assert_array_equal(one.effects_matrix(), whole.effects_matrix())
    weights = [  # config.json differs (the history's seconds), θ̄ and the statistics do not
        (trained.artifact_dir / trained.artifact_path / "weights.safetensors").read_bytes()
        for trained in fitted
    ]
    assert weights[0] == weights[1]
    assert fitted[0].metrics["val_score"] == fitted[1].metrics["val_score"]


@pytest.fixture
def writes(engine: Engine) -> Iterator[list[str]]:
    """INSERT/UPDATE/DELETE/COPY statements on ``person_params`` while the test runs."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        head = statement.lstrip().split(None, 1)[0].upper()
        if "person_params" in statement and head in {"INSERT", "UPDATE", "DELETE", "COPY"}:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def test_a_user_update_writes_one_row(
    client: TestClient, auth: Callable, trained_mood: dict, session_factory: sessionmaker,
    settings: Settings, writes: list[str],
) -> None:
    predictor = Predictor(artifact_dir=settings.artifact_dir, device="cpu")
    with session_factory() as session:
        model_id = session.scalar(select(Model.id))
        user_id = session.scalar(select(User.id).where(User.external_id == "u0003"))
        before = dict(session.execute(select(PersonParam.user_id, PersonParam.updated_at)).all())
    fit = fit_user(session_factory, predictor, model_id=model_id, user_id=user_id)
    writes.clear()
    with session_factory() as session:
        assert "re-fitted" in write_user_fit(session, fit).reason
        session.commit()
    with session_factory() as session:
        after = dict(session.execute(select(PersonParam.user_id, PersonParam.updated_at)).all())
    assert len(writes) == 1 and writes[0].lstrip().upper().startswith("UPDATE")
    assert sorted(after) == sorted(before)  # no row added or removed
    assert [u for u in after if after[u] != before[u]] == [user_id]  # one row rewritten
