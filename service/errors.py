"""Domain errors raised below the HTTP layer; ``app.py`` maps each to a status code.

Keeping them HTTP-free lets the refit pipeline and the CLI and the worker raise the same
errors the routes do.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: ``detail`` becomes the response's ``{"detail": ...}``."""

    status_code = 400

    def __init__(self, detail: Any) -> None:
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail


class NotFound(ServiceError):
    """An unknown model, version or user (404)."""

    status_code = 404


class Conflict(ServiceError):
    """The request is valid but the resource's state forbids it (409)."""

    status_code = 409


class InvalidInput(ServiceError):
    """Well-formed JSON that does not fit the model's schema (422).

    ``detail`` is a list in FastAPI's validation-error shape: ``{"loc", "msg", "type"}``.
    """

    status_code = 422

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)


class PayloadTooLarge(ServiceError):
    """More items than ``NME_MAX_BATCH`` (413)."""

    status_code = 413


def invalid(loc: list[str | int], msg: str, kind: str = "value_error") -> dict[str, Any]:
    """One entry of an :class:`InvalidInput` error list."""
    return {"loc": loc, "msg": msg, "type": kind}


class DatabaseUnavailable(ServiceError):
    """The database cannot be reached right now (503 with ``Retry-After``)."""

    status_code = 503


def public_message(error: BaseException) -> str:
    """A stable, human message for an error shown outside the process (a job's ``error``, an
    event's detail): our own errors say what went wrong in words we wrote; anything else
    (a driver's exception, a bug) is named by type only — its text may hold SQL or data, so it
    goes to the logs, never to the API."""
    if isinstance(error, ServiceError) and isinstance(error.detail, str):
        return error.detail
    if isinstance(error, ServiceError):
        return f"{type(error).__name__} (status {error.status_code})"
    return f"internal error ({type(error).__name__}); the worker's log has the details"
