"""Creating and revoking API keys (used by the CLI, the demo and tests)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from service.auth import generate_key, key_prefix
from service.storage import store


def create_key(
    session: Session,
    *,
    name: str,
    scopes: Sequence[str],
    models: Sequence[str] | None = None,
) -> str:
    """Store a new key's hash and return the plaintext (the only time it exists).

    ``models``: the model names the key may reach (None: every model). A scoped key sees only
    those models, gets 404 for any other one, and even with the admin scope cannot create
    models, read ``/metrics`` or forget a user everywhere (403).
    """
    new = generate_key()
    store.add_api_key(
        session, name=name, prefix=new.prefix, key_hash=new.key_hash, scopes=scopes,
        models=models,
    )
    return new.plaintext


def revoke_key(session: Session, *, key_or_prefix: str) -> bool:
    """Revoke by the full key or its public prefix; False if no such key exists."""
    prefix = key_prefix(key_or_prefix) or key_or_prefix
    return store.revoke_api_key(session, prefix=prefix) is not None
