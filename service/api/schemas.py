"""Request and response bodies (the wire contract). Per entity: XCreate, XPublic, XsPublic.

Schema-independent checks live here (types, finiteness, non-empty batches); checks that need
the model's feature schema live in ``service.validation``.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: models compute in float32, so larger numbers become inf."""

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_ID = 2**31 - 1
"""Largest job id or version number: both are 32-bit integer columns."""
MAX_USER_ID_LENGTH = 128

_CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _printable(value: str) -> str:
    """Refuse control characters (Unicode category Cc, NUL included) and unpaired surrogates:
    PostgreSQL cannot store NUL, no database can store a lone surrogate, and neither belongs in
    a name."""
    found = _CONTROL_OR_SURROGATE.search(value)
    if found is not None:
        kind = "an unpaired surrogate" if found.group() >= "\ud800" else "a control character"
        raise ValueError(
            f"must not contain {kind} (U+{ord(found.group()):04X} at position {found.start()})"
        )
    return value


def _not_blank(value: str) -> str:
    if value.isspace():
        raise ValueError("must not be only whitespace")
    return value


def _user_id(value: str) -> str:
    """The user-id rule (docs/service.md, "User ids"); length is checked before this."""
    _printable(value)
    _not_blank(value)
    if "/" in value:
        raise ValueError("must not contain '/' (a user id is one segment of a URL path)")
    if value in (".", ".."):
        raise ValueError("must not be '.' or '..' (URL clients rewrite such path segments)")
    return value


ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN, examples=["mood"])]
UserId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=MAX_USER_ID_LENGTH,
        description="The app's user id: 1–128 characters, no control characters, no unpaired "
        "surrogates, not only whitespace, no `/`, not `.` or `..`; compared exactly (case and "
        "Unicode form matter).",
        examples=["u1"],
    ),
    AfterValidator(_user_id),
]
Name = Annotated[
    str, Field(min_length=1, max_length=64), AfterValidator(_printable), AfterValidator(_not_blank)
]
SequenceId = Annotated[
    str,
    Field(min_length=1, max_length=128),
    AfterValidator(_printable),
    AfterValidator(_not_blank),
]
PLACEMENTS = ("last", "all", "none", "T", "last+T", "all+T")
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_.]{1,100}")
MAX_PLACEMENT_NAMES = 64


def _placement(value: Any) -> str | list[str]:
    """A placement keyword, or 1–64 parameter names (exact, or a dotted suffix): names only,
    never regular expressions, so a definition cannot make the server backtrack for ever."""
    if isinstance(value, str):
        if value in PLACEMENTS:
            return value
        raise ValueError(
            f"must be one of {', '.join(PLACEMENTS)} or a list of parameter names"
        )
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PLACEMENT_NAMES:
        raise ValueError(f"must be a keyword or a list of 1–{MAX_PLACEMENT_NAMES} parameter names")
    for name in value:
        if not isinstance(name, str) or _PARAMETER_NAME.fullmatch(name) is None:
            raise ValueError(
                "parameter names are 1–100 characters of letters, digits, '_' and '.' "
                "(e.g. layers.0.weight or 0.weight)"
            )
    return list(value)


Placement = Annotated[
    str | list[str],
    PlainValidator(_placement),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "enum": list(PLACEMENTS)},
                {
                    "type": "array",
                    "items": {"type": "string", "pattern": "^[A-Za-z0-9_.]{1,100}$"},
                    "minItems": 1,
                    "maxItems": MAX_PLACEMENT_NAMES,
                },
            ]
        }
    ),
]
# strict: "1.5" and true are type errors, not silently coerced; NaN and ±inf are refused.
FeatureValue = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Features = Annotated[
    dict[str, FeatureValue],
    Field(examples=[{"typing_speed": 1.2, "screen_minutes": 310.0, "km": 4.5}]),
]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Strict(BaseModel):
    """Request bodies refuse unknown keys, so a typo is a 422 rather than silently ignored."""

    model_config = ConfigDict(extra="forbid")


def _unique(values: list[str] | None, what: str) -> None:
    if values is not None and len(set(values)) != len(values):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"{what} must be unique; repeated: {', '.join(duplicates)}")


# ---------------------------------------------------------------------------------- models


class ArchitectureSpec(Strict):
    """Network shape and where person-specific parameters θⁱ live.

    Omitted fields take the estimator's defaults at creation time (``nme.NMERegressor``,
    ``NMEClassifier`` or ``NMESequenceTagger``); the resolved values are stored with the model,
    so every refit of it trains the same way.
    """

    hidden: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        default=None, max_length=8, description="Hidden layer sizes."
    )
    placement: Placement | None = Field(
        default=None,
        description="`last`, `all`, or a list of parameter names (exact, or a dotted suffix "
        "such as `0.weight`); sequence models also `T`, `last+T`, `all+T`, `none`. Checked "
        "against the network when the model is created.",
    )
    method: Literal["generic", "specific", "unme", "nme"] | None = Field(
        default=None,
        description="`nme` (θ̄ + θⁱ with the prior), `unme` (no prior), `generic` (θ̄ only), "
        "`specific` (θⁱ only). The library's `mlp-lme` baseline is not served.",
    )
    activation: Literal["relu", "tanh", "gelu"] | None = None
    dropout: Finite | None = Field(default=None, ge=0.0, lt=1.0)
    learn_start_end: bool | None = Field(
        default=None, description="Sequence models: learn start/end scores (else uniform)."
    )
    forbidden_transitions: list[tuple[Name, Name]] | None = Field(
        default=None,
        max_length=10_000,
        description="Sequence models: `[from_state, to_state]` pairs that never occur; training "
        "and decoding respect them.",
    )


class TrainingSpec(Strict):
    """Optimiser and stopping hyper-parameters (omitted: the estimator's defaults)."""

    max_epochs: int | None = Field(default=None, ge=1, le=10_000)
    lr: Finite | None = Field(default=None, gt=0.0, le=1.0)
    weight_decay: Finite | None = Field(default=None, ge=0.0, le=1.0)
    batch_size: int | None = Field(default=None, ge=1, le=1_000_000)
    patience: int | None = Field(default=None, ge=1, le=10_000)
    anneal: Finite | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="Σ annealing factor α in (0, 1); an explicit null is the plain M-step "
        "(no annealing); omitted: the estimator's default (0.8).",
    )
    random_state: int | None = Field(
        default=None, ge=0, le=2**32 - 1, description="Seed (omitted or null: 0)."
    )


class ModelCreate(Strict):
    """A new model: its task, ordered feature names, classes or states, and how to train it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "mood",
                    "task": "regression",
                    "features": ["typing_speed", "screen_minutes", "km"],
                    "classes": None,
                    "states": None,
                    "architecture": {"hidden": [64, 64], "placement": "last", "method": "nme"},
                    "training": {"max_epochs": 200, "lr": 0.001},
                }
            ]
        },
    )

    name: ModelName
    task: Literal["regression", "classification", "sequence"]
    features: list[Name] = Field(min_length=1, max_length=10_000)
    classes: list[Name] | None = Field(default=None, max_length=1_000)
    states: list[Name] | None = Field(default=None, max_length=1_000)
    architecture: ArchitectureSpec = Field(default_factory=ArchitectureSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    label_range: tuple[FeatureValue, FeatureValue] | None = Field(
        default=None,
        description="Regression only: `[low, high]`, the range every label must lie in; labels "
        "outside it are refused at ingest (422). Without it, refits leave out gross outliers "
        "against the labels' median and MAD (see docs/service.md, Learning in the background).",
        examples=[[0.0, 100.0]],
    )

    @model_validator(mode="after")
    def _labels_fit_task(self) -> ModelCreate:
        _unique(self.features, "features")
        _unique(self.classes, "classes")
        _unique(self.states, "states")
        needs = {"classification": "classes", "sequence": "states"}.get(self.task)
        for field in ("classes", "states"):
            values = getattr(self, field)
            if field == needs and (values is None or len(values) < 2):
                raise ValueError(f"a {self.task} model needs at least two {field}")
            if field != needs and values is not None:
                raise ValueError(f"{field} must be null for a {self.task} model")
        if self.label_range is not None:
            low, high = self.label_range
            if self.task != "regression":
                raise ValueError("label_range is for regression models only")
            if not low < high:
                raise ValueError("label_range must be [low, high] with low < high")
            if max(abs(low), abs(high)) > FLOAT32_MAX:
                raise ValueError("label_range must lie within float32's finite range")
        sequence_only = ("learn_start_end", "forbidden_transitions")
        if self.task != "sequence" and any(getattr(self.architecture, f) for f in sequence_only):
            raise ValueError("learn_start_end and forbidden_transitions are for sequence models")
        unknown = sorted(
            {s for pair in self.architecture.forbidden_transitions or [] for s in pair}
            - set(self.states or [])
        )
        if unknown:
            raise ValueError(f"forbidden_transitions name unknown states: {', '.join(unknown)}")
        return self


class ModelPublic(BaseModel):
    """A model as the API shows it."""

    name: str
    task: str
    features: list[str]
    classes: list[str] | None
    states: list[str] | None
    architecture: dict[str, Any]
    training: dict[str, Any]
    label_range: list[float] | None = None
    active_version: int | None
    created_at: datetime


class ModelsPublic(BaseModel):
    """A page of models, by name.

    ``count`` is the total; ``next_cursor`` fetches the next page (null: this is the last).
    """

    data: list[ModelPublic]
    count: int
    next_cursor: str | None = None


class VersionPublic(BaseModel):
    """One trained version of a model."""

    version: int
    status: Literal["ready", "active"]
    metrics: dict[str, Any]
    artifact_sha256: str
    n_users: int
    n_observations: int
    trained_until: datetime
    created_at: datetime
    activated_at: datetime | None


class VersionsPublic(BaseModel):
    """A page of a model's versions, newest first.

    ``count`` is the total; ``next_cursor`` fetches the next page (null: this is the last).
    """

    data: list[VersionPublic]
    count: int
    next_cursor: str | None = None


# ---------------------------------------------------------------------------------- events


class EventPublic(BaseModel):
    """One entry of a model's history. ``actor`` is ``system``, ``trigger``, ``worker``,
    ``cli`` or ``key:<name>`` (a manual action); ``detail`` is a human message; ``data`` holds
    the numbers behind it (scores, counts), when there are any."""

    id: int
    at: datetime
    kind: str
    version: int | None
    job_id: int | None
    actor: str
    detail: str
    data: dict[str, Any] | None = None


class EventsPublic(BaseModel):
    """A page of a model's events, newest first.

    ``count`` is the total; ``next_cursor`` fetches the next page (null: this is the last).
    """

    data: list[EventPublic]
    count: int
    next_cursor: str | None = None


# ---------------------------------------------------------------------------------- jobs


class JobCreate(Strict):
    """A job to queue: a full ``refit`` of the model, or a ``user_update`` of one user's θⁱ."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"kind": "user_update", "user_id": "u1"}]},
    )

    kind: Literal["refit", "user_update"]
    user_id: UserId | None = Field(default=None, description="Required for `user_update` only.")

    @model_validator(mode="after")
    def _user_fits_kind(self) -> JobCreate:
        if self.kind == "user_update" and self.user_id is None:
            raise ValueError("a user_update job needs a user_id")
        if self.kind == "refit" and self.user_id is not None:
            raise ValueError("a refit job takes no user_id")
        return self


class JobPublic(BaseModel):
    """A background job. ``progress`` is e.g. ``{"stage": "training", "message": "epoch 7/50",
    "epoch": 7, "max_epochs": 50, "val_loss": …, "val_metric": …}`` while running, and says what
    happened when done (for a refit: whether the new version was activated, and why)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 7,
                    "kind": "refit",
                    "model": "mood",
                    "user_id": None,
                    "status": "running",
                    "attempts": 1,
                    "progress": {"stage": "training", "message": "epoch 7/50", "epoch": 7},
                    "result_version": None,
                    "error": None,
                    "created_at": "2026-11-25T09:00:00Z",
                    "started_at": "2026-11-25T09:00:01Z",
                    "finished_at": None,
                }
            ]
        }
    )

    id: int
    kind: Literal["refit", "user_update"]
    model: str
    user_id: str | None
    status: Literal["queued", "running", "succeeded", "failed"]
    attempts: int
    progress: dict[str, Any] | None
    result_version: int | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobEnvelope(BaseModel):
    """The answer to an enqueue: ``{"job": {...}}`` (202)."""

    job: JobPublic


class JobsPublic(BaseModel):
    """A page of a model's jobs, newest first.

    ``count`` is the total; ``next_cursor`` fetches the next page (null: this is the last).
    """

    data: list[JobPublic]
    count: int
    next_cursor: str | None = None


# ---------------------------------------------------------------------------------- ingest


class ObservationCreate(Strict):
    """One user-day: features and, when the user rated their mood, the label."""

    user_id: UserId
    day: date
    features: Features
    label: FeatureValue | Name | None = Field(
        default=None,
        description="A number (regression) or a class name (classification). Omit it to keep "
        "the label stored for this day (if any); send null to clear it.",
    )


class ObservationsCreate(Strict):
    """A batch of observations (at most ``NME_MAX_BATCH``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "user_id": "u1",
                            "day": "2026-11-01",
                            "features": {"typing_speed": 1.2, "screen_minutes": 310.0, "km": 4.5},
                            "label": 62.0,
                        }
                    ]
                }
            ]
        },
    )

    items: list[ObservationCreate] = Field(min_length=1)


class IngestPublic(BaseModel):
    """What an upsert did: new rows, and existing rows whose content changed."""

    inserted: int
    updated: int


class SegmentIn(Strict):
    """One segment of a sequence."""

    features: Features


class SequenceCreate(Strict):
    """One sequence of segments with optional per-segment state labels."""

    user_id: UserId
    sequence_id: SequenceId
    segments: list[SegmentIn] = Field(min_length=1)
    labels: list[Name] | None = Field(
        default=None,
        description="One state per segment. Omit to keep the stored labels; null clears them.",
    )

    @model_validator(mode="after")
    def _one_label_per_segment(self) -> SequenceCreate:
        if self.labels is not None and len(self.labels) != len(self.segments):
            raise ValueError(
                f"labels has {len(self.labels)} entries but segments has {len(self.segments)}"
            )
        return self


class SequencesCreate(Strict):
    """A batch of sequences."""

    items: list[SequenceCreate] = Field(min_length=1)


# ---------------------------------------------------------------------------------- serving


class PredictItem(Strict):
    """One user's features for today."""

    user_id: UserId
    features: Features


class PredictRequest(Strict):
    """A batch of users to predict for, answered with one forward pass."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {
                            "user_id": "u1",
                            "features": {"typing_speed": 1.2, "screen_minutes": 310.0, "km": 4.5},
                        }
                    ]
                }
            ]
        },
    )

    items: list[PredictItem] = Field(min_length=1)
    interval: float | None = Field(
        default=None,
        strict=True,  # "0.9" and true are mistakes, not coverages
        allow_inf_nan=False,
        gt=0.0,
        lt=1.0,
        description="Regression models: also answer a per-person prediction interval of this "
        "coverage (e.g. 0.9) as `lower` and `upper`, from σ² and the user's posterior variance "
        "of θⁱ (the prior Σ for unknown users: their intervals are wider).",
        examples=[0.9],
    )


class PredictionPublic(BaseModel):
    """One prediction; ``probabilities`` only for classification models."""

    user_id: str
    prediction: float | str
    personalized: bool
    probabilities: dict[str, float] | None = None
    lower: float | None = None
    upper: float | None = None


class PredictionsPublic(BaseModel):
    """Predictions and the version that made them."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "mood",
                    "version": 3,
                    "predictions": [{"user_id": "u1", "prediction": 61.2, "personalized": True}],
                }
            ]
        }
    )

    model: str
    version: int
    predictions: list[PredictionPublic]


class DecodeRequest(Strict):
    """A sequence to decode for one user."""

    user_id: UserId
    segments: list[SegmentIn] = Field(min_length=1)
    marginals: bool = False


class DecodePublic(BaseModel):
    """The Viterbi path as state names, its score, optionally per-segment marginals."""

    model: str
    version: int
    personalized: bool
    path: list[str]
    score: float
    marginals: list[dict[str, float]] | None


class UserModelPublic(BaseModel):
    """What one model knows about one user."""

    model: str
    user_id: str
    n_labels: int
    personalized: bool
    version: int | None = Field(description="The active version these numbers come from.")
    bias: float | dict[str, float] | None = Field(
        description="The user's baseline shift: label scale (regression) or per-class logits "
        "(classification); 0 for a user without θⁱ; null without an active version and for "
        "sequence models (see transitions)."
    )
    transitions: list[list[float]] | None = Field(
        default=None, description="Sequence models: the user's state-transition probabilities."
    )


# ---------------------------------------------------------------------------------- health


class HealthPublic(BaseModel):
    """Liveness."""

    status: Literal["ok"] = "ok"


class ReadyPublic(BaseModel):
    """Readiness: the database answers and its schema is at the packaged head."""

    status: Literal["ready", "unavailable"]
    database: bool
    schema_revision: str | None
    expected_revision: str
