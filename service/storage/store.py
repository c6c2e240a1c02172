"""Data-access functions. All are keyword-only, flush but never commit: the route or job that
calls them commits once, which is what makes e.g. "a new version and all its θⁱ rows" one
transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import (
    Float,
    Integer,
    Row,
    Table,
    bindparam,
    cast,
    delete,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.storage.codec import encode_matrix
from service.storage.tables import (
    ApiKey,
    Job,
    Model,
    ModelVersion,
    Observation,
    PersonParam,
    User,
    utcnow,
)
from service.storage.tables import Sequence as SequenceRow

# ---------------------------------------------------------------------------------- API keys


def add_api_key(
    session: Session,
    *,
    name: str,
    prefix: str,
    key_hash: str,
    scopes: Sequence[str],
    models: Sequence[str] | None = None,
) -> ApiKey:
    """Store a new API key (its hash only); ``models`` limits it to those model names."""
    key = ApiKey(
        name=name,
        prefix=prefix,
        key_hash=key_hash,
        scopes=list(scopes),
        models=sorted(set(models)) if models is not None else None,
    )
    session.add(key)
    session.flush()
    return key


def list_api_keys(session: Session) -> list[ApiKey]:
    """Every key, revoked or not, oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def get_api_key(session: Session, *, prefix: str) -> ApiKey | None:
    """The key with this public prefix, revoked or not."""
    return session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))


def revoke_api_key(session: Session, *, prefix: str) -> ApiKey | None:
    """Mark the key revoked (idempotent); None if there is no such key."""
    key = get_api_key(session, prefix=prefix)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


# ---------------------------------------------------------------------------------- models


def add_model(
    session: Session,
    *,
    name: str,
    task: str,
    features: Sequence[str],
    classes: Sequence[str] | None,
    states: Sequence[str] | None,
    architecture: Mapping[str, Any],
    training: Mapping[str, Any],
    label_range: Sequence[float] | None = None,
) -> Model:
    """Create a model definition (no versions yet)."""
    model = Model(
        label_range=list(label_range) if label_range is not None else None,
        name=name,
        task=task,
        features=list(features),
        classes=list(classes) if classes is not None else None,
        states=list(states) if states is not None else None,
        architecture=dict(architecture),
        training=dict(training),
    )
    session.add(model)
    session.flush()
    return model


def get_model(session: Session, *, name: str) -> Model | None:
    """The model called ``name``."""
    return session.scalar(select(Model).where(Model.name == name))


def list_models(
    session: Session,
    *,
    after_name: str | None = None,
    limit: int | None = None,
    names: Iterable[str] | None = None,
) -> list[Model]:
    """Models by name (names after ``after_name`` only, when given: the keyset page after it;
    only those in ``names``, when given)."""
    statement = select(Model).order_by(Model.name)
    if names is not None:
        statement = statement.where(Model.name.in_(sorted(names)))
    if after_name is not None:
        statement = statement.where(Model.name > after_name)
    if limit is not None:
        statement = statement.limit(limit)
    return list(session.scalars(statement))


def count_models(session: Session, *, names: Iterable[str] | None = None) -> int:
    """How many models exist (of ``names``, when given)."""
    statement = select(func.count()).select_from(Model)
    if names is not None:
        statement = statement.where(Model.name.in_(sorted(names)))
    return int(session.scalar(statement) or 0)


# Hot-path statements are built once: constructing a SELECT costs more Python time than
# SQLite takes to run it. Values go in as bound parameters.
_MODEL_WITH_ACTIVE_VERSION = (
    select(Model, ModelVersion)
    .outerjoin(
        ModelVersion,
        (ModelVersion.model_id == Model.id) & (ModelVersion.status == "active"),
    )
    .where(Model.name == bindparam("name"))
)


def get_model_with_active_version(
    session: Session, *, name: str
) -> tuple[Model, ModelVersion | None] | None:
    """The model and its active version in one round trip (the prediction hot path)."""
    row = session.execute(_MODEL_WITH_ACTIVE_VERSION, {"name": name}).first()
    return None if row is None else (row[0], row[1])


# ---------------------------------------------------------------------------------- versions


def get_active_version(session: Session, *, model_id: int) -> ModelVersion | None:
    """The version currently answering predictions for a model."""
    return session.scalar(
        select(ModelVersion).where(
            ModelVersion.model_id == model_id, ModelVersion.status == "active"
        )
    )


def active_version_numbers(session: Session, *, model_ids: Iterable[int]) -> dict[int, int]:
    """Map model id → active version number, for the models that have one."""
    rows = session.execute(
        select(ModelVersion.model_id, ModelVersion.version).where(
            ModelVersion.model_id.in_(list(model_ids)), ModelVersion.status == "active"
        )
    )
    return {model_id: version for model_id, version in rows}


def get_version(session: Session, *, model_id: int, version: int) -> ModelVersion | None:
    """One version of a model by its number."""
    return session.scalar(
        select(ModelVersion).where(
            ModelVersion.model_id == model_id, ModelVersion.version == version
        )
    )


def list_versions(
    session: Session,
    *,
    model_id: int,
    before_version: int | None = None,
    limit: int | None = None,
) -> list[ModelVersion]:
    """Versions of a model, newest first (numbers below ``before_version`` only, when given:
    the keyset page after it)."""
    statement = (
        select(ModelVersion)
        .where(ModelVersion.model_id == model_id)
        .order_by(ModelVersion.version.desc())
    )
    if before_version is not None:
        statement = statement.where(ModelVersion.version < before_version)
    if limit is not None:
        statement = statement.limit(limit)
    return list(session.scalars(statement))


def count_versions(session: Session, *, model_id: int) -> int:
    """How many versions a model has."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(ModelVersion)
            .where(ModelVersion.model_id == model_id)
        )
        or 0
    )


def add_version(
    session: Session,
    *,
    model_id: int,
    metrics: Mapping[str, Any],
    artifact_path: str,
    artifact_sha256: str,
    n_users: int,
    n_observations: int,
    trained_until: datetime,
) -> ModelVersion:
    """Add the model's next version (status ``ready``).

    The number is max + 1; two concurrent refits of one model collide on the unique
    (model_id, version) constraint at flush, and the loser's transaction rolls back whole.
    """
    latest = session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id)
    )
    row = ModelVersion(
        model_id=model_id,
        version=(latest or 0) + 1,
        status="ready",
        metrics=dict(metrics),
        artifact_path=artifact_path,
        artifact_sha256=artifact_sha256,
        n_users=n_users,
        n_observations=n_observations,
        trained_until=trained_until,
    )
    session.add(row)
    session.flush()
    return row


def lock_model(session: Session, *, model_id: int) -> None:
    """Hold the model's row lock until the transaction ends (``SELECT … FOR UPDATE`` on
    PostgreSQL; SQLite serialises writers anyway): activations of one model run one by one."""
    session.execute(select(Model.id).where(Model.id == model_id).with_for_update())


def activate_version(session: Session, *, version: ModelVersion) -> ModelVersion:
    """Make ``version`` the model's active one; the previously active one becomes ``ready``.

    Locks the model's row first (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite serialises
    writers anyway), so two concurrent activations of one model run one after the other and the
    second demotes what the first activated, instead of both passing the demotion and colliding
    on the one-active index.
    """
    lock_model(session, model_id=version.model_id)
    session.refresh(version)  # what the transaction that held the lock may have changed
    # Demote first and flush: the partial unique index allows one active row per model.
    session.execute(
        update(ModelVersion)
        .where(
            ModelVersion.model_id == version.model_id,
            ModelVersion.status == "active",
            ModelVersion.id != version.id,
        )
        .values(status="ready")
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    if version.status != "active":
        version.status = "active"
        version.activated_at = utcnow()
    session.flush()
    return version


# ---------------------------------------------------------------------------------- users


def get_user(session: Session, *, external_id: str) -> User | None:
    """The user with the app's id ``external_id``.

    Any string may be looked up, also one no database could store (a NUL on PostgreSQL, an
    unpaired surrogate anywhere): that user does not exist.
    """
    if not storable_text(session, external_id):
        return None
    return session.scalar(select(User).where(User.external_id == external_id))


def storable_text(session: Session, text: str) -> bool:
    """Whether the database could hold ``text`` (PostgreSQL refuses NUL; UTF-8 refuses
    unpaired surrogates). SQLite stores NUL, and ids stored that way stay reachable there."""
    if any("\ud800" <= char <= "\udfff" for char in text):
        return False
    return "\x00" not in text or session.get_bind().dialect.name != "postgresql"


def ensure_users(session: Session, *, external_ids: Iterable[str]) -> dict[str, int]:
    """Map each external id to its user row id, creating the missing users.

    Concurrent ingests may create the same user: the insert ignores conflicts and the ids are
    read back afterwards.
    """
    wanted = sorted(set(external_ids))
    if not wanted:
        return {}
    found = _user_ids(session, wanted)
    missing = [external_id for external_id in wanted if external_id not in found]
    if missing:
        now = utcnow()
        statement = dialect_insert(session, User.__table__).on_conflict_do_nothing(
            index_elements=["external_id"]
        )
        session.execute(statement, [{"external_id": e, "created_at": now} for e in missing])
        found.update(_user_ids(session, missing))
    return found


def _user_ids(session: Session, external_ids: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    # In chunks: PostgreSQL takes at most 65 535 bound parameters per statement.
    for start in range(0, len(external_ids), ID_CHUNK):
        chunk = external_ids[start : start + ID_CHUNK]
        rows = session.execute(
            select(User.external_id, User.id).where(User.external_id.in_(chunk))
        )
        found.update({external_id: user_id for external_id, user_id in rows})
    return found


ID_CHUNK = 10_000
"""Ids per statement when looking many users up."""


def delete_user(session: Session, *, user: User) -> None:
    """Forget a user: the database cascades to observations, sequences, θⁱ rows and jobs."""
    session.execute(delete(User).where(User.id == user.id))
    session.expunge(user)
    session.flush()


def forget_user_in_model(session: Session, *, model_id: int, user_id: int) -> None:
    """Forget a user in one model: their observations, sequences, θⁱ rows in every version of
    the model, and the model's queued jobs for them (flushes). The user row stays: other models
    may know them."""
    versions = select(ModelVersion.id).where(ModelVersion.model_id == model_id)
    session.execute(
        delete(PersonParam).where(
            PersonParam.user_id == user_id, PersonParam.version_id.in_(versions)
        )
    )
    for table in (Observation, SequenceRow):
        session.execute(delete(table).where(table.model_id == model_id, table.user_id == user_id))
    session.execute(
        delete(Job).where(
            Job.model_id == model_id, Job.user_id == user_id, Job.status == "queued"
        )
    )
    session.flush()


def users_with_data(session: Session, *, model_id: int, user_ids: Sequence[int]) -> set[int]:
    """Which of ``user_ids`` still have observations or sequences in the model."""
    wanted = list(user_ids)
    found: set[int] = set()
    if len(wanted) > ID_CHUNK:
        # A refit asks about every trained user (a million): one pass over the model's rows
        # (a hash aggregate) instead of an index probe per user in chunks, which also stays
        # under PostgreSQL's 65 535 bound parameters per statement.
        for table in (Observation, SequenceRow):
            found.update(
                session.scalars(select(table.user_id).where(table.model_id == model_id).distinct())
            )
        return found.intersection(wanted)
    for table in (Observation, SequenceRow):
        found.update(
            session.scalars(
                select(table.user_id)
                .where(table.model_id == model_id, table.user_id.in_(wanted))
                .distinct()
            )
        )
    return found


def count_labels(session: Session, *, model_id: int, user_id: int) -> int:
    """How many labelled observations (or labelled sequences) a user has for a model."""
    observations = session.scalar(
        select(func.count()).where(
            Observation.model_id == model_id,
            Observation.user_id == user_id,
            Observation.label.is_not(None),
        )
    )
    sequences = session.scalar(
        select(func.count()).where(
            SequenceRow.model_id == model_id,
            SequenceRow.user_id == user_id,
            SequenceRow.labels.is_not(None),
        )
    )
    return int(observations or 0) + int(sequences or 0)


# ---------------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class UpsertCounts:
    """How many rows an upsert inserted and how many it changed (unchanged rows count in
    neither, so resending a batch is visibly a no-op), and which users' labels that touched
    (row ids of users with an inserted or changed row that carries a label)."""

    inserted: int
    updated: int
    labelled_users: frozenset[int] = frozenset()


def upsert_observations(
    session: Session, *, model_id: int, rows: Sequence[Mapping[str, Any]]
) -> UpsertCounts:
    """Insert or update observations keyed on (model, user, day).

    Args:
        rows: dicts with ``user_id`` (row id), ``day``, ``features`` and optionally ``label``:
            a row without the ``label`` key keeps the stored label (a new row gets none); an
            explicit None clears it.
    """
    return _upsert_keeping(
        session,
        Observation.__table__,
        [{"model_id": model_id, **row} for row in rows],
        keys=("model_id", "user_id", "day"),
        values=("features",),
        label="label",
    )


def upsert_sequences(
    session: Session, *, model_id: int, rows: Sequence[Mapping[str, Any]]
) -> UpsertCounts:
    """Insert or update sequences keyed on (model, user, sequence_id).

    Args:
        rows: dicts with ``user_id`` (row id), ``sequence_id``, ``segments`` and optionally
            ``labels`` (absent: keep the stored labels; None: clear them).
    """
    return _upsert_keeping(
        session,
        SequenceRow.__table__,
        [{"model_id": model_id, **row} for row in rows],
        keys=("model_id", "user_id", "sequence_id"),
        values=("segments",),
        label="labels",
    )


def _upsert_keeping(
    session: Session,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    keys: tuple[str, ...],
    values: tuple[str, ...],
    label: str,
) -> UpsertCounts:
    """Upsert rows that carry the label column (it is overwritten) and rows that do not (the
    stored label stays; a new row is inserted unlabelled) as two statements."""
    with_label = [row for row in rows if label in row]
    keeping = [{**row, label: None} for row in rows if label not in row]
    first = _upsert(session, table, with_label, keys=keys, values=(*values, label), label=label)
    second = _upsert(session, table, keeping, keys=keys, values=values, label=label)
    return UpsertCounts(
        inserted=first.inserted + second.inserted,
        updated=first.updated + second.updated,
        labelled_users=first.labelled_users | second.labelled_users,
    )


def _upsert(
    session: Session,
    table: Table,
    rows: list[dict[str, Any]],
    *,
    keys: tuple[str, ...],
    values: tuple[str, ...],
    label: str,
) -> UpsertCounts:
    if not rows:
        return UpsertCounts(inserted=0, updated=0)
    now = utcnow()
    for row in rows:
        row["created_at"] = row["updated_at"] = now
    statement = dialect_insert(session, table)
    changed = [table.c[name].is_distinct_from(statement.excluded[name]) for name in values]
    statement = statement.on_conflict_do_update(
        index_elements=list(keys),
        set_={name: statement.excluded[name] for name in (*values, "updated_at")},
        # Only rows whose content differs are touched (and returned): a resend is a no-op.
        where=or_(*changed),
    # The label itself comes back, not ``label IS NOT NULL``: SQLite evaluates that expression
    # in RETURNING before the JSON NULL is stored and answers true for unlabelled rows.
    ).returning(table.c.created_at == table.c.updated_at, table.c.user_id, table.c[label])
    results = session.execute(statement, rows).all()
    session.flush()
    inserted = sum(1 for fresh, _, _ in results if fresh)
    return UpsertCounts(
        inserted=inserted,
        updated=len(results) - inserted,
        labelled_users=frozenset(user_id for _, user_id, value in results if value is not None),
    )


def dialect_insert(session: Session, table: Table) -> Any:
    """The dialect's INSERT (both SQLite and PostgreSQL support ON CONFLICT)."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def count_labelled_observations(session: Session, *, model_id: int) -> int:
    """How many labelled observations a model has (sizes a streamed refit's arrays)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Observation)
            .where(Observation.model_id == model_id, Observation.label.is_not(None))
        )
        or 0
    )


def stream_labelled_observations(
    session: Session,
    *,
    model_id: int,
    features: Sequence[str],
    chunk_rows: int,
    float_labels: bool = False,
) -> Iterator[Sequence[Row[Any]]]:
    """All labelled observations of a model in chunks of at most ``chunk_rows`` rows, ordered
    by user (external id) and day: the refit splits each user's labels in time order.

    Each row is ``(external id, user row id, day as days since 1970-01-01, label, value of
    features[0], …)``. The database does the per-value work a client would do in Python: it
    takes the features out of the JSON (``->>`` on PostgreSQL, ``json_extract`` on SQLite),
    counts the days, and with ``float_labels`` casts the JSON label to a float on PostgreSQL
    (correctly rounded there, like Python's JSON parser; SQLite's text-to-real conversion is
    not guaranteed to be, so there the driver's JSON decoding stays). One statement (one
    snapshot) on the session's connection, through Core (no ORM row processing); on PostgreSQL
    a server-side cursor (``yield_per``), so the client holds one chunk at a time; SQLite's
    cursor steps lazily.
    """
    connection = session.connection()
    postgres = connection.dialect.name == "postgresql"
    if postgres:  # date - date is an integer number of days
        day = literal_column("observations.day - DATE '1970-01-01'", Integer)
    else:  # dates are 'YYYY-MM-DD' text
        day = literal_column("CAST(julianday(observations.day) - 2440587.5 AS INTEGER)", Integer)
    label: Any = Observation.label
    if float_labels and postgres:
        label = cast(Observation.label, Float)
    statement = (
        select(
            User.external_id,
            Observation.user_id,
            day,
            label,
            *(Observation.features[name].as_float() for name in features),
        )
        .join(User, User.id == Observation.user_id)
        .where(Observation.model_id == model_id, Observation.label.is_not(None))
        .order_by(User.external_id, Observation.day)
    )
    result = connection.execute(statement, execution_options={"yield_per": chunk_rows})
    yield from result.partitions()


def load_labelled_sequences(
    session: Session, *, model_id: int
) -> list[Row[tuple[str, int, list[dict[str, float]], list[str]]]]:
    """All labelled sequences of a model as (external id, user row id, segments, labels),
    per user in arrival order (the refit holds out each user's latest ones)."""
    statement = (
        select(User.external_id, SequenceRow.user_id, SequenceRow.segments, SequenceRow.labels)
        .join(User, User.id == SequenceRow.user_id)
        .where(SequenceRow.model_id == model_id, SequenceRow.labels.is_not(None))
        .order_by(User.external_id, SequenceRow.created_at, SequenceRow.id)
    )
    return list(session.execute(statement))


# ---------------------------------------------------------------------------------- θⁱ rows


def add_person_params(
    session: Session, *, version_id: int, rows: Sequence[Mapping[str, Any]]
) -> None:
    """Bulk-insert θⁱ rows of a version, in the session's transaction.

    On PostgreSQL, ``COPY … FROM STDIN`` on the session's own connection streams the rows
    (several times faster than a multi-row INSERT for a refit's hundreds of thousands of rows);
    elsewhere, and for a few rows, an executemany INSERT.

    Args:
        rows: dicts with ``user_id`` (row id), ``effects`` (float32 bytes), ``n_obs`` and
            optionally ``effects_var`` (float32 bytes, the posterior variance), all with the
            same keys.
    """
    if not rows:
        return
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql" and len(rows) >= COPY_MIN_ROWS:
        session.flush()  # anything pending goes first, in order
        columns = ["version_id", "updated_at", *rows[0].keys()]
        driver = session.connection().connection.driver_connection
        statement = f"COPY person_params ({', '.join(columns)}) FROM STDIN"
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row((version_id, now, *row.values()))
        return
    session.execute(
        PersonParam.__table__.insert(),
        [{"version_id": version_id, "updated_at": now, **row} for row in rows],
    )
    session.flush()


COPY_MIN_ROWS = 500
"""From this many θⁱ rows on, PostgreSQL writes them with COPY."""


def add_person_param_arrays(
    session: Session,
    *,
    version_id: int,
    user_ids: np.ndarray,
    effects: np.ndarray,
    effects_var: np.ndarray,
    n_obs: np.ndarray,
) -> None:
    """Bulk-insert a refit's θⁱ rows from arrays, in the session's transaction (flushes).

    On PostgreSQL (from :data:`COPY_MIN_ROWS` rows) the whole ``COPY … (FORMAT binary)`` stream
    is one numpy structured array — every field of every row laid out by numpy, no Python
    object per user — written in slices of :data:`COPY_SLICE_ROWS` rows. Elsewhere (SQLite)
    and for a few rows, :func:`add_person_params`.

    Args:
        user_ids: ``(n,)`` user row ids.
        effects, effects_var: ``(n, d)`` θⁱ and their posterior variances, encoded here with
            :func:`codec.encode_matrix` (the bytes :func:`codec.encode_effects` gives per row).
        n_obs: ``(n,)`` each user's number of training labels.
    """
    n = len(user_ids)
    if n == 0:
        return
    effects, effects_var = encode_matrix(effects), encode_matrix(effects_var)
    use_copy = session.get_bind().dialect.name == "postgresql" and n >= COPY_MIN_ROWS
    if not use_copy or effects.shape[1] == 0:  # (numpy has no zero-width void field)
        add_person_params(session, version_id=version_id, rows=[
            {"user_id": int(user_id), "effects": effects[k].tobytes(),
             "effects_var": effects_var[k].tobytes(), "n_obs": int(count)}
            for k, (user_id, count) in enumerate(zip(user_ids, n_obs, strict=True))
        ])
        return
    width = effects.shape[1] * effects.itemsize
    # PostgreSQL's binary COPY row: a field count, then per field its byte length and value,
    # all big-endian (bytea is the raw bytes: our little-endian float32).
    record = np.dtype([
        ("fields", ">i2"),
        ("version_len", ">i4"), ("version_id", ">i4"),
        ("stamp_len", ">i4"), ("updated_at", ">i8"),
        ("user_len", ">i4"), ("user_id", ">i4"),
        ("effects_len", ">i4"), ("effects", f"V{width}"),
        ("var_len", ">i4"), ("effects_var", f"V{width}"),
        ("n_obs_len", ">i4"), ("n_obs", ">i4"),
    ])
    table = np.empty(n, dtype=record)  # (n,) packed rows
    table["fields"] = 6
    table["version_len"], table["stamp_len"], table["user_len"] = 4, 8, 4
    table["effects_len"] = table["var_len"] = width
    table["n_obs_len"] = 4
    table["version_id"] = version_id
    table["updated_at"] = (utcnow() - POSTGRES_EPOCH) // timedelta(microseconds=1)
    table["user_id"] = user_ids
    table["effects"] = effects.view(f"V{width}")[:, 0]
    table["effects_var"] = effects_var.view(f"V{width}")[:, 0]
    table["n_obs"] = n_obs
    session.flush()  # anything pending goes first, in order
    driver = session.connection().connection.driver_connection
    statement = (
        "COPY person_params (version_id, updated_at, user_id, effects, effects_var, n_obs) "
        "FROM STDIN (FORMAT binary)"
    )
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        copy.write(COPY_BINARY_HEADER)
        for start in range(0, n, COPY_SLICE_ROWS):
            copy.write(table[start : start + COPY_SLICE_ROWS].tobytes())
        copy.write(COPY_BINARY_TRAILER)


COPY_SLICE_ROWS = 65_536
"""Rows per write of a binary COPY (bounds the extra bytes object to a few tens of MB)."""
COPY_BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags 0, no extension
COPY_BINARY_TRAILER = b"\xff\xff"  # field count -1
POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
"""Binary timestamps count microseconds from here."""


def autocommit_reads(session: Session) -> None:
    """Run the session's statements without a transaction on PostgreSQL: for a route that only
    reads (a prediction), this saves the ``BEGIN`` and ``ROLLBACK`` round trips. Call it before
    the session's first statement; each statement then sees its own snapshot.

    Not on SQLite: its driver begins no transaction for a SELECT anyway, and switching the
    isolation level back when the connection returns to the pool runs a PRAGMA (a seventh of a
    prediction's time in the handler thread, measured with py-spy).
    """
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def fetch_person_params(
    session: Session, *, version_id: int, external_ids: Iterable[str]
) -> dict[str, bytes]:
    """θⁱ bytes of the given users in one version, in ONE query; absent users are omitted."""
    rows = _person_column(session, "effects", version_id, external_ids)
    return {external_id: bytes(effects) for external_id, effects in rows}


def fetch_person_variances(
    session: Session, *, version_id: int, external_ids: Iterable[str]
) -> dict[str, bytes | None]:
    """θⁱ posterior-variance bytes of the given users in one version, in ONE query (None for
    a row written before variances were stored; absent users are omitted)."""
    rows = _person_column(session, "effects_var", version_id, external_ids)
    return {external_id: None if raw is None else bytes(raw) for external_id, raw in rows}


def _person_column(
    session: Session,
    column: Literal["effects", "effects_var"],
    version_id: int,
    external_ids: Iterable[str],
) -> list[tuple[str, Any]]:
    """``(external_id, person_params.<column>)`` of the given users in one version.

    The hot query of every prediction, as driver SQL: SQLAlchemy's compile step for the
    expanding IN cost ten times the query itself on SQLite (0.25 vs 0.02 ms, cProfile).
    ``exec_driver_sql`` still runs through the connection's events (statement counts,
    timeouts). ``column`` comes from the fixed set above, never from a request.
    """
    wanted = list(set(external_ids))
    if not wanted:
        return []
    connection = session.connection()
    select_from = (
        f"SELECT users.external_id, person_params.{column} FROM users "
        "JOIN person_params ON person_params.user_id = users.id "
    )
    if connection.dialect.name == "postgresql":  # one array parameter, whatever the count
        sql = select_from + "WHERE person_params.version_id = %s AND users.external_id = ANY(%s)"
        return [tuple(row) for row in connection.exec_driver_sql(sql, (version_id, wanted))]
    rows: list[tuple[str, Any]] = []
    for start in range(0, len(wanted), ID_CHUNK):  # under SQLite's bound-parameter limit
        chunk = wanted[start : start + ID_CHUNK]
        sql = select_from + (
            "WHERE person_params.version_id = ? AND users.external_id IN "
            f"({','.join('?' * len(chunk))})"
        )
        rows.extend(tuple(row) for row in connection.exec_driver_sql(sql, (version_id, *chunk)))
    return rows


def get_person_param(session: Session, *, version_id: int, user_id: int) -> PersonParam | None:
    """One user's θⁱ row in one version."""
    return session.get(PersonParam, (version_id, user_id))


def upsert_person_param(
    session: Session, *, version_id: int, user_id: int, effects: bytes, n_obs: int
) -> None:
    """Insert or replace one user's θⁱ row in one version, unconditionally."""
    statement = dialect_insert(session, PersonParam.__table__).values(
        version_id=version_id, user_id=user_id, effects=effects, n_obs=n_obs, updated_at=utcnow()
    )
    statement = statement.on_conflict_do_update(
        index_elements=["version_id", "user_id"],
        set_={
            "effects": statement.excluded.effects,
            "n_obs": statement.excluded.n_obs,
            "updated_at": statement.excluded.updated_at,
        },
    )
    session.execute(statement)
    session.flush()


def replace_person_param(
    session: Session,
    *,
    version_id: int,
    user_id: int,
    effects: bytes,
    n_obs: int,
    expected_updated_at: datetime | None,
    effects_var: bytes | None = None,
) -> bool:
    """Write one user's θⁱ row only if it is still the row the fit started from.

    ``expected_updated_at`` is the row's ``updated_at`` when the fit read it (None: there was
    no row). If another update wrote the row meanwhile, nothing is written and False comes
    back: an older fit never overwrites a newer θⁱ (compare-and-set).
    """
    now = utcnow()
    if expected_updated_at is None:
        statement = (
            dialect_insert(session, PersonParam.__table__)
            .values(version_id=version_id, user_id=user_id, effects=effects, n_obs=n_obs,
                    effects_var=effects_var, updated_at=now)
            .on_conflict_do_nothing(index_elements=["version_id", "user_id"])
        )
    else:
        statement = (
            update(PersonParam)
            .where(
                PersonParam.version_id == version_id,
                PersonParam.user_id == user_id,
                PersonParam.updated_at == expected_updated_at,
            )
            .values(effects=effects, effects_var=effects_var, n_obs=n_obs, updated_at=now)
            .execution_options(synchronize_session=False)
        )
    written = session.execute(statement).rowcount == 1  # type: ignore[attr-defined]
    session.flush()
    return written


# ---------------------------------------------------------------------------------- learning


def load_user_observations(
    session: Session, *, model_id: int, user_id: int
) -> list[Row[tuple[dict[str, float], Any]]]:
    """One user's labelled observations of a model as (features, label), in day order."""
    statement = (
        select(Observation.features, Observation.label)
        .where(
            Observation.model_id == model_id,
            Observation.user_id == user_id,
            Observation.label.is_not(None),
        )
        .order_by(Observation.day)
    )
    return list(session.execute(statement))


def load_user_sequences(
    session: Session, *, model_id: int, user_id: int
) -> list[Row[tuple[list[dict[str, float]], list[str]]]]:
    """One user's labelled sequences of a model as (segments, labels), in arrival order."""
    statement = (
        select(SequenceRow.segments, SequenceRow.labels)
        .where(
            SequenceRow.model_id == model_id,
            SequenceRow.user_id == user_id,
            SequenceRow.labels.is_not(None),
        )
        .order_by(SequenceRow.created_at, SequenceRow.id)
    )
    return list(session.execute(statement))


def count_labels_since(session: Session, *, model_id: int, since: datetime | None) -> int:
    """Labelled observations and sequences of a model added or changed after ``since``
    (all of them when ``since`` is None)."""
    total = 0
    for table, label in ((Observation, Observation.label), (SequenceRow, SequenceRow.labels)):
        statement = select(func.count()).where(table.model_id == model_id, label.is_not(None))
        if since is not None:
            statement = statement.where(table.updated_at > since)
        total += int(session.scalar(statement) or 0)
    return total


def users_with_labels_since(session: Session, *, model_id: int, since: datetime) -> list[int]:
    """Row ids of users whose labels of a model were added or changed after ``since``."""
    users: set[int] = set()
    for table, label in ((Observation, Observation.label), (SequenceRow, SequenceRow.labels)):
        users.update(
            session.scalars(
                select(table.user_id)
                .where(table.model_id == model_id, label.is_not(None), table.updated_at > since)
                .distinct()
            )
        )
    return sorted(users)


def has_labels(session: Session, *, model_id: int) -> bool:
    """Whether a model has at least one labelled observation or sequence."""
    for table, label in ((Observation, Observation.label), (SequenceRow, SequenceRow.labels)):
        found = session.scalar(
            select(table.id).where(table.model_id == model_id, label.is_not(None)).limit(1)
        )
        if found is not None:
            return True
    return False


def get_user_by_id(session: Session, *, user_id: int) -> User | None:
    """A user by row id."""
    return session.get(User, user_id)


# ---------------------------------------------------------------------------------- jobs


def job_rows(
    session: Session,
    *,
    job_id: int | None = None,
    model_id: int | None = None,
    status: str | None = None,
    kind: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> list[Row[tuple[Job, str, str | None]]]:
    """Jobs with their model's name and user's external id, newest first (ids below
    ``before_id`` only, when given: the keyset page after it)."""
    conditions = _job_conditions(job_id=job_id, model_id=model_id, status=status, kind=kind)
    if before_id is not None:
        conditions.append(Job.id < before_id)
    statement = (
        select(Job, Model.name, User.external_id)
        .join(Model, Model.id == Job.model_id)
        .outerjoin(User, User.id == Job.user_id)
        .where(*conditions)
        .order_by(Job.id.desc())
        .limit(limit)
    )
    return list(session.execute(statement))


def count_jobs(
    session: Session,
    *,
    model_id: int | None = None,
    status: str | None = None,
    kind: str | None = None,
) -> int:
    """How many jobs match the filters (a list's total)."""
    conditions = _job_conditions(model_id=model_id, status=status, kind=kind)
    return int(session.scalar(select(func.count()).select_from(Job).where(*conditions)) or 0)


def _job_conditions(
    *,
    job_id: int | None = None,
    model_id: int | None = None,
    status: str | None = None,
    kind: str | None = None,
) -> list[Any]:
    conditions: list[Any] = []
    if job_id is not None:
        conditions.append(Job.id == job_id)
    if model_id is not None:
        conditions.append(Job.model_id == model_id)
    if status is not None:
        conditions.append(Job.status == status)
    if kind is not None:
        conditions.append(Job.kind == kind)
    return conditions
