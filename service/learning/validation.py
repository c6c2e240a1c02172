"""Checks shared by every kind of model: feature names against the schema, batch size,
duplicate keys (label checks belong to each kind).

Each raises :class:`service.errors.InvalidInput` (422) with one entry per offending item, so
clients see exactly which features are unknown or missing where.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.errors import InvalidInput, PayloadTooLarge, invalid

MAX_REPORTED_ERRORS = 20
"""A 10 000-item batch with the same typo in every item still gets a readable answer."""


def check_batch_size(n_items: int, max_batch: int) -> None:
    """Refuse batches over the configured maximum (413)."""
    if n_items > max_batch:
        raise PayloadTooLarge(
            f"{n_items} items exceed the maximum batch size of {max_batch} (NME_MAX_BATCH)"
        )


def feature_matrix(
    features: Sequence[str],
    rows: Sequence[Mapping[str, float]],
    locs: Sequence[list[str | int]],
) -> np.ndarray:
    """Stack feature dicts into a float32 matrix in model order, naming any schema mismatch.

    Args:
        features: the model's feature names, in model order (F).
        rows: one feature dict per item (n).
        locs: the error location of each row's ``features`` (n).

    Returns:
        (n, F) float32 matrix.
    """
    expected = set(features)
    errors = []
    for row, loc in zip(rows, locs, strict=True):
        if row.keys() == expected:
            continue
        unknown = sorted(set(row) - expected)
        missing = [name for name in features if name not in row]
        parts = []
        if unknown:
            parts.append(f"unknown features: {', '.join(unknown)}")
        if missing:
            parts.append(f"missing features: {', '.join(missing)}")
        errors.append(invalid(loc, "; ".join(parts), "feature_schema"))
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if errors:
        raise InvalidInput(errors)
    matrix = np.empty((len(rows), len(features)), dtype=np.float32)
    with np.errstate(over="ignore"):  # overflow becomes inf, which is refused just below
        for i, row in enumerate(rows):
            matrix[i] = [row[name] for name in features]
    if not np.isfinite(matrix).all():
        # Finite float64 values can still overflow float32 (e.g. 1e300).
        bad = int(np.argwhere(~np.isfinite(matrix))[0][0])
        raise InvalidInput([invalid(locs[bad], "feature values overflow float32", "finite")])
    return matrix


def check_unique_keys(keys: Sequence[tuple[object, ...]], what: str) -> None:
    """One batch may not name the same row twice (the upsert could not tell which wins)."""
    first: dict[tuple[object, ...], int] = {}
    errors = []
    for i, key in enumerate(keys):
        if key in first:
            errors.append(
                invalid(["body", "items", i], f"duplicate {what} (same as item {first[key]})")
            )
        else:
            first[key] = i
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if errors:
        raise InvalidInput(errors)
