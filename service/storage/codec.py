"""The θⁱ byte codec: how one user's person-specific parameters are stored in a row.

A row holds the flattened θⁱ vector ``(d,)`` as little-endian float32 bytes, in the order the
version's artifact lists (``config.json``: ``effects_layout``). Every module that writes or reads
``person_params.effects`` goes through these functions, so the format lives in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EFFECTS_DTYPE = np.dtype("<f4")
"""Little-endian float32, whatever the machine's byte order."""


def encode_effects(row: np.ndarray) -> bytes:
    """The stored form of one θⁱ row ``(d,)``."""
    return np.ascontiguousarray(row, dtype=EFFECTS_DTYPE).tobytes()


def encode_matrix(rows: np.ndarray) -> np.ndarray:
    """The stored form of many θⁱ rows at once: ``(n, d)`` as a C-contiguous little-endian
    float32 matrix whose row ``k`` holds exactly the bytes of ``encode_effects(rows[k])``."""
    return np.ascontiguousarray(rows, dtype=EFFECTS_DTYPE)


def decode_effects(raw: bytes) -> np.ndarray:
    """One stored row back as a writable ``(d,) float32`` array.

    A copy on purpose: ``frombuffer`` views are read-only, and torch warns on (and must never
    write into) a read-only buffer.
    """
    return np.frombuffer(raw, dtype=EFFECTS_DTYPE).astype(np.float32)


def decode_rows(raws: Sequence[bytes], d: int) -> np.ndarray:
    """Several stored rows as one ``(len(raws), d) float32`` matrix, from one joined buffer.

    Raises:
        ValueError: a row does not hold exactly ``d`` values (a row of another version's layout).
    """
    flat = np.frombuffer(b"".join(raws), dtype=EFFECTS_DTYPE)
    if flat.size != len(raws) * d:  # rows of one version all share its layout
        raise ValueError(f"θⁱ rows do not have {d} float32 values each")
    return flat.reshape(len(raws), d).astype(np.float32)
