"""A refit's θⁱ rows in bulk: COPY on PostgreSQL, executemany elsewhere; identical rows either
way, in the caller's transaction."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.storage import store
from service.storage.codec import decode_effects, encode_effects
from service.storage.tables import ModelVersion, PersonParam, utcnow


def add_version(session: Session, n_users: int) -> ModelVersion:
    """A regression model ``m`` and a version of it for ``n_users`` users (flushed)."""
    model = store.add_model(
        session, name="m", task="regression", features=["a"], classes=None, states=None,
        architecture={}, training={},
    )
    return store.add_version(
        session, model_id=model.id, metrics={}, artifact_path="m/x", artifact_sha256="0" * 64,
        n_users=n_users, n_observations=0, trained_until=utcnow(),
    )


@pytest.mark.parametrize("n_users", [3, store.COPY_MIN_ROWS + 7])
def test_bulk_rows_round_trip(session_factory: sessionmaker[Session], n_users: int) -> None:
    rng = np.random.default_rng(0)
    effects = rng.normal(size=(n_users, 17)).astype(np.float32)  # (n, d)
    with session_factory() as session:
        version = add_version(session, n_users)
        ids = store.ensure_users(session, external_ids=[f"u{k}" for k in range(n_users)])
        rows = [
            {"user_id": ids[f"u{k}"], "effects": encode_effects(effects[k]), "n_obs": k}
            for k in range(n_users)
        ]
        store.add_person_params(session, version_id=version.id, rows=rows)
        session.rollback()  # nothing escapes the caller's transaction
        assert session.scalar(select(func.count()).select_from(PersonParam)) == 0
    with session_factory() as session:
        version = add_version(session, n_users)
        ids = store.ensure_users(session, external_ids=[f"u{k}" for k in range(n_users)])
        rows = [
            {"user_id": ids[f"u{k}"], "effects": encode_effects(effects[k]), "n_obs": k}
            for k in range(n_users)
        ]
        store.add_person_params(session, version_id=version.id, rows=rows)
        session.commit()
        stored = store.fetch_person_params(
            session, version_id=version.id, external_ids=[f"u{k}" for k in range(n_users)]
        )
        n_obs = dict(session.execute(select(PersonParam.user_id, PersonParam.n_obs)).all())
    assert len(stored) == n_users
    for k in range(n_users):
        np.testing.assert_array_equal(decode_effects(stored[f"u{k}"]), effects[k])
        assert n_obs[ids[f"u{k}"]] == k


def test_many_users_are_looked_up_in_chunks(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "ID_CHUNK", 3)  # PostgreSQL allows 65 535 parameters a statement
    names = [f"u{k}" for k in range(10)]
    with session_factory() as session:
        first = store.ensure_users(session, external_ids=names[:4])
        ids = store.ensure_users(session, external_ids=names)
        session.commit()
    assert sorted(ids) == sorted(names) and len(set(ids.values())) == 10
    assert all(ids[name] == first[name] for name in names[:4])


def test_theta_rows_of_a_big_batch_come_back_whole(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The predict path's θⁱ query (driver SQL) returns exactly the stored users' rows, also
    past a chunk of ids, with unknown, repeated and odd ids (quotes, Unicode) in the batch."""
    monkeypatch.setattr(store, "ID_CHUNK", 4)
    names = ["u0", "o'brien", "zoë", "名前", "a\"b", "u5", "u6"]
    with session_factory() as session:
        version = add_version(session, len(names))
        ids = store.ensure_users(session, external_ids=names)
        store.add_person_params(session, version_id=version.id, rows=[
            {"user_id": ids[name], "effects": encode_effects(np.full(3, k, np.float32)),
             "n_obs": 1}
            for k, name in enumerate(names)
        ])
        session.commit()
        asked = [*names, "nobody", "u0", "' OR 1=1 --"]
        stored = store.fetch_person_params(session, version_id=version.id, external_ids=asked)
        other = store.fetch_person_params(session, version_id=version.id + 1, external_ids=asked)
    assert sorted(stored) == sorted(names) and other == {}
    for k, name in enumerate(names):
        np.testing.assert_array_equal(decode_effects(stored[name]), np.full(3, k, np.float32))


@pytest.mark.parametrize("n_users", [3, store.COPY_MIN_ROWS + 7])
def test_refit_rows_from_arrays_round_trip(
    session_factory: sessionmaker[Session], n_users: int
) -> None:
    """A refit's rows straight from its arrays (binary COPY on PostgreSQL): the same bytes as
    the per-row codec, the counts, a current timestamp, and nothing outside the transaction."""
    rng = np.random.default_rng(1)
    effects = rng.normal(size=(n_users, 5)).astype(np.float32)  # (n, d)
    variances = rng.uniform(size=(n_users, 5)).astype(np.float32)  # (n, d)
    n_obs = rng.integers(1, 99, size=n_users)  # (n,)
    names = [f"u{k}" for k in range(n_users)]
    for commit in (False, True):
        with session_factory() as session:
            version = add_version(session, n_users)
            ids = store.ensure_users(session, external_ids=names)
            before = utcnow()
            store.add_person_param_arrays(
                session, version_id=version.id,
                user_ids=np.array([ids[name] for name in names]),
                effects=effects, effects_var=variances, n_obs=n_obs,
            )
            if not commit:
                session.rollback()  # nothing escapes the caller's transaction
                assert session.scalar(select(func.count()).select_from(PersonParam)) == 0
                continue
            session.commit()
            stored = {
                row.user_id: row
                for row in session.scalars(
                    select(PersonParam).where(PersonParam.version_id == version.id)
                )
            }
    assert len(stored) == n_users
    for k, name in enumerate(names):
        row = stored[ids[name]]
        assert row.effects == encode_effects(effects[k])
        assert row.effects_var == encode_effects(variances[k])
        assert row.n_obs == n_obs[k]
        assert before <= row.updated_at <= utcnow()


def test_users_with_data_answers_the_same_for_many_ids(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ID_CHUNK ids (a refit's million users) one scan of the model replaces the IN
    list: same answer, also for ids without data and users of another model."""
    with session_factory() as session:
        version = add_version(session, 0)
        other = store.add_model(
            session, name="other", task="regression", features=["a"], classes=None,
            states=None, architecture={}, training={},
        )
        ids = store.ensure_users(session, external_ids=[f"u{k}" for k in range(9)])
        for model_id, names in ((version.model_id, ["u0", "u2", "u3", "u7"]), (other.id, ["u1"])):
            store.upsert_observations(session, model_id=model_id, rows=[
                {"user_id": ids[name], "day": utcnow().date(), "features": {"a": 1.0},
                 "label": 1.0} for name in names
            ])
        asked = [ids[f"u{k}"] for k in range(9)] + [10**6]
        few = store.users_with_data(session, model_id=version.model_id, user_ids=asked)
        monkeypatch.setattr(store, "ID_CHUNK", 3)
        many = store.users_with_data(session, model_id=version.model_id, user_ids=asked)
    assert few == many == {ids[name] for name in ("u0", "u2", "u3", "u7")}
