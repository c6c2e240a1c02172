"""One paging contract for every list the API answers (models, versions, jobs, events).

Request: ``?limit=<1..1000, default 100>&cursor=<opaque string from the previous page>``.
Answer: ``{"data": [...], "count": <total matching items>, "next_cursor": <str | null>}``;
``next_cursor`` is null on the last page. Pages are keyset pages (the cursor carries the sort key
of the last item shown), so paging stays fast at any depth and an item inserted meanwhile never
shifts or repeats the items that follow. A cursor is opaque: clients send back exactly what they
got; a malformed or tampered one is a 422 naming ``cursor``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Sequence
from typing import Annotated, TypeVar

from fastapi import Query

from service.errors import InvalidInput, invalid

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_CURSOR_LENGTH = 256

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page (at most 1000).")]
Cursor = Annotated[
    str | None,
    Query(
        max_length=MAX_CURSOR_LENGTH,
        description="`next_cursor` of the previous page; omit for the first page.",
    ),
]

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

Key = TypeVar("Key", int, str)
Item = TypeVar("Item")


def encode_cursor(key: int | str) -> str:
    """The opaque cursor that resumes after the item whose sort key is ``key``."""
    raw = json.dumps({"after": key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, key_type: type[Key]) -> Key | None:
    """The sort key a cursor resumes after (None for the first page); 422 if it is not one of
    ours or carries a key of the wrong type for this list."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)["after"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        key = None
    # bool is an int subclass, and keys beyond 64 bits match no row: both are tampering.
    valid = isinstance(key, key_type) and not isinstance(key, bool)
    if valid and isinstance(key, int) and not -(2**63) <= key < 2**63:
        valid = False
    # a forged string key no database can compare (NUL on PostgreSQL, unpaired surrogates)
    if valid and isinstance(key, str) and (len(key) > 256 or _UNSTORABLE.search(key)):
        valid = False
    if not valid:
        raise InvalidInput(
            [invalid(["query", "cursor"], "not a cursor from this list: send back next_cursor")]
        )
    return key  # type: ignore[return-value]


def split_page(
    rows: Sequence[Item], limit: int, key: Callable[[Item], int | str]
) -> tuple[list[Item], str | None]:
    """Cut a fetch of ``limit + 1`` rows into the page and the cursor of the next one (None when
    this page is the last)."""
    page = list(rows[:limit])
    more = len(rows) > limit and page
    return page, encode_cursor(key(page[-1])) if more else None
