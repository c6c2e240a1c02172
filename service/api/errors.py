"""Error answers that never fail themselves and never echo more than a short excerpt.

FastAPI's own 422 handler echoes each offending input whole. That turned a NaN (which Python's
JSON parser accepts) or an unpaired surrogate (``"\\ud800"``, which cannot be encoded as UTF-8)
into a 500, and echoed an 80 MB body back in full. Here every error entry keeps ``loc``, ``msg``
and ``type``, and ``input`` becomes an excerpt of at most :data:`MAX_EXCERPT` characters
(numbers, booleans and null stay as they are); at most :data:`MAX_ERRORS` entries are listed.
"""

from __future__ import annotations

import json
import logging
import math
import reprlib
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from service.errors import ServiceError

log = logging.getLogger("service.api")

MAX_EXCERPT = 100
"""Characters of the input (or of a location key, or of a context value) an error quotes."""
MAX_MESSAGE = 500
"""Characters of an error message."""
MAX_ERRORS = 20
"""Error entries in one answer; the rest are counted in a last entry."""

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = MAX_EXCERPT
_repr.maxother = MAX_EXCERPT
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 5


class SafeJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: an unpaired surrogate that slipped into a
    message renders as ``\\ud800`` instead of failing to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False).encode()


def excerpt(value: Any) -> Any:
    """A JSON-safe stand-in for an input value: finite numbers, booleans and null as they are,
    anything else as a short string (strings cut to :data:`MAX_EXCERPT` characters, containers
    and bytes shown by a bounded repr)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**53 else _cut(str(value))
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _cut(value)
    return _cut(_repr.repr(value))


def _cut(text: str, limit: int = MAX_EXCERPT) -> str:
    text = text if len(text) <= limit else text[:limit] + "…"
    # an unpaired surrogate stays visible as its escape instead of breaking the encoder
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _entry(error: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "loc": [part if isinstance(part, int) else _cut(str(part)) for part in error["loc"]],
        "msg": _cut(str(error.get("msg", "")), MAX_MESSAGE),
        "type": _cut(str(error.get("type", "value_error"))),
    }
    if "input" in error:
        entry["input"] = excerpt(error["input"])
    ctx = error.get("ctx")
    if isinstance(ctx, dict):
        entry["ctx"] = {
            _cut(str(key)): excerpt(value) if _plain(value) else _cut(str(value))
            for key, value in ctx.items()
        }
    return entry


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def error_entries(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most :data:`MAX_ERRORS` safe entries; the count of the others in a last one."""
    entries = [_entry(error) for error in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        entries.append(
            {
                "loc": ["body"],
                "msg": f"… and {len(errors) - MAX_ERRORS} more errors",
                "type": "too_many_errors",
            }
        )
    return entries


async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """422 for a request FastAPI could not validate."""
    assert isinstance(exc, RequestValidationError)
    return SafeJSONResponse(status_code=422, content={"detail": error_entries(list(exc.errors()))})


async def service_error(_request: Request, exc: Exception) -> JSONResponse:
    """The status of a domain error (404, 409, 413, 422, …) with its detail."""
    assert isinstance(exc, ServiceError)
    detail = exc.detail
    if isinstance(detail, list):
        detail = error_entries(detail)
    elif isinstance(detail, str):
        detail = _cut(detail, MAX_MESSAGE)
    return SafeJSONResponse(status_code=exc.status_code, content={"detail": detail})


DATABASE_ERRORS = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
"""What an unreachable, restarting or overloaded database raises (and statement timeouts)."""
RETRY_AFTER_SECONDS = 5


async def database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """503 with ``Retry-After`` while the database cannot answer (never a 500)."""
    log.warning(f"database unavailable: {type(exc).__name__}", extra={"action": "503"})
    return SafeJSONResponse(
        status_code=503,
        content={"detail": "the database is unavailable; retry after a few seconds"},
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )

