"""Input handling shared by the estimators: feature matrices, person ids, normalisation, splits."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

ArrayLike = np.ndarray | pd.DataFrame | pd.Series | torch.Tensor | Sequence


class NonNumericError(ValueError, TypeError):
    """Features that are not numbers: a ``ValueError`` (what callers catch for bad input)
    and a ``TypeError`` (what scikit-learn's estimator checks expect)."""


def feature_matrix(
    X: ArrayLike, expected: Sequence[str] | None = None, name: str = "X"
) -> tuple[np.ndarray, list[str] | None]:
    """Convert features to a float32 matrix, checking names when both sides have them.

    Args:
        X: ``(n, F)`` numpy array, pandas DataFrame or torch tensor.
        expected: the feature names seen at fit time; a DataFrame is reordered to them and must
            contain all of them.

    Returns:
        ``(matrix (n, F) float32, column names or None)``.

    Raises:
        ValueError: non-numeric, NaN/inf, wrong width, or missing/unexpected feature names.
    """
    names: list[str] | None = None
    if sp.issparse(X):
        raise TypeError(f"{name}: sparse data was passed, but dense data is required; "
                        "use X.toarray() to convert to a dense numpy array")
    if isinstance(X, pd.DataFrame) and not all(isinstance(c, str) for c in X.columns):
        # non-string column labels are positions, not names (as in scikit-learn)
        X = X.set_axis(range(X.shape[1]), axis=1).to_numpy()
    if isinstance(X, pd.DataFrame):
        names = [str(c) for c in X.columns]
        if expected is not None:
            missing = [c for c in expected if c not in names]
            extra = [c for c in names if c not in expected]
            if missing or extra:
                raise ValueError(
                    f"{name} feature names do not match those seen at fit time: "
                    f"missing {missing}, unexpected {extra}"
                )
            X = X[list(expected)]
            names = list(expected)
        non_numeric = [c for c in X.columns if not pd.api.types.is_numeric_dtype(X[c])]
        if non_numeric:
            raise NonNumericError(f"{name} has non-numeric feature columns: {non_numeric}")
        arr = X.to_numpy(dtype=np.float32)
    elif isinstance(X, torch.Tensor):
        arr = X.detach().cpu().to(torch.float32).numpy()
    else:
        raw = np.asarray(X)
        if np.iscomplexobj(raw):
            raise ValueError(f"{name}: Complex data not supported")
        try:
            arr = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise NonNumericError(f"{name} must be numeric: {err}") from err
    if arr.ndim == 1:
        raise ValueError(f"{name} must be 2-D (n, features), got a 1-D array of shape "
                         f"{arr.shape}. Reshape your data with X.reshape(-1, 1) for one "
                         "feature or X.reshape(1, -1) for one sample")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, features), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has 0 feature(s) (shape={arr.shape}) while a minimum of 1 "
                         "is required.")
    if expected is not None and arr.shape[1] != len(expected):
        raise ValueError(f"{name} has {arr.shape[1]} features, the model expects {len(expected)}")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        col = names[bad[1]] if names else int(bad[1])
        raise ValueError(f"{name} contains NaN or inf (first at row {bad[0]}, feature {col!r})")
    return arr, names


def as_id_list(persons: Iterable[Hashable] | np.ndarray | pd.Series | torch.Tensor) -> list:
    """Person ids as a plain Python list (numpy scalars become int/str so they serialise)."""
    if isinstance(persons, torch.Tensor):
        persons = persons.cpu().numpy()
    out = []
    for p in np.asarray(persons, dtype=object).ravel():
        out.append(p.item() if isinstance(p, np.generic) else p)
    return out


class PersonIndex:
    """Maps hashable person ids to table rows 0..n-1; unknown ids map to -1."""

    def __init__(self, ids: Iterable[Hashable]) -> None:
        self.ids: list = list(dict.fromkeys(as_id_list(list(ids))))
        self._row = {p: k for k, p in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, person: Hashable) -> bool:
        return person in self._row

    def encode(self, persons: Iterable[Hashable]) -> np.ndarray:
        """``persons: (n,)`` ids -> ``(n,) int64`` rows, -1 where unknown."""
        return np.fromiter((self._row.get(p, -1) for p in as_id_list(persons)), dtype=np.int64)


@dataclass(frozen=True)
class Standardizer:
    """z-normalisation statistics; zero spreads become 1 so constant columns pass through."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> Standardizer:
        """``values: (n, F)`` or ``(n,)``; statistics in float64, stored as float32."""
        v = np.asarray(values, dtype=np.float64)
        mean = v.mean(axis=0)
        std = v.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        return cls(np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.std).astype(np.float32)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return values * self.std.astype(np.float64) + self.mean.astype(np.float64)


def temporal_split(
    persons: Sequence[Hashable] | np.ndarray,
    fractions: Sequence[float] = (0.8, 0.2),
) -> np.ndarray:
    """Within-person temporal split: each person's items (given in time order) are cut in order.

    Args:
        persons: ``(n,)`` the person of each item; items must already be sorted by time within
            each person (their relative order is what counts).
        fractions: shares of each part, summing to 1 (e.g. ``(0.6, 0.2, 0.2)``).

    Returns:
        ``(n,) int`` part index of each item. Part k of a person gets
        ``round(cumsum(fractions)[k] * nᵢ)`` of their items; the last part is never empty for
        a person with at least as many items as parts.
    """
    ids = np.asarray(as_id_list(persons), dtype=object)
    codes, inverse = np.unique(ids.astype(str), return_inverse=True)
    counts = np.bincount(inverse, minlength=len(codes))
    # rank of each item within its person, in the given order
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids)) - np.repeat(starts, counts)
    n_i = counts[inverse]
    bounds = np.cumsum(fractions)[:-1]
    cuts = np.stack([np.round(b * n_i).astype(np.int64) for b in bounds], axis=1)  # (n, parts-1)
    # keep at least one item in the last part when possible
    cuts = np.minimum(cuts, np.maximum(n_i - 1, 0)[:, None])
    return (rank[:, None] >= cuts).sum(axis=1)
