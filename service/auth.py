"""API keys: generation, hashing at rest, and verification.

A key looks like ``nme_<prefix>_<secret>``. The prefix is public and indexes the row; only the
SHA-256 of the whole key is stored. The keys are 256-bit random, so a fast hash is enough (no
password-style stretching needed), and the comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

SCOPES = ("predict", "ingest", "admin")
KEY_MARKER = "nme"


@dataclass(frozen=True)
class NewKey:
    """A freshly generated key: ``plaintext`` is shown once and never stored."""

    plaintext: str
    prefix: str
    key_hash: str


def hash_key(plaintext: str) -> str:
    """The hex SHA-256 stored for a key."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key() -> NewKey:
    """A new random key with its public prefix and stored hash."""
    prefix = secrets.token_hex(6)
    plaintext = f"{KEY_MARKER}_{prefix}_{secrets.token_urlsafe(32)}"
    return NewKey(plaintext=plaintext, prefix=prefix, key_hash=hash_key(plaintext))


_PREFIX = re.compile(r"[0-9a-f]{1,16}")


def key_prefix(plaintext: str) -> str | None:
    """The prefix of a well-formed key (lowercase hex, as generated), or None for anything else
    (which then never reaches the database)."""
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_MARKER or not parts[2]:
        return None
    if _PREFIX.fullmatch(parts[1]) is None:
        return None
    return parts[1]


def key_matches(plaintext: str, stored_hash: str) -> bool:
    """Constant-time check of ``plaintext`` against a stored hash."""
    return hmac.compare_digest(hash_key(plaintext), stored_hash)


def parse_scopes(text: str) -> list[str]:
    """Parse ``"predict,ingest"`` into a list, refusing unknown scopes."""
    scopes = sorted({part.strip() for part in text.split(",") if part.strip()})
    unknown = [scope for scope in scopes if scope not in SCOPES]
    if unknown or not scopes:
        raise ValueError(
            f"scopes must be a comma-separated subset of {', '.join(SCOPES)}; got {text!r}"
        )
    return scopes
