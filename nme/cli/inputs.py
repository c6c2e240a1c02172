"""Reading and checking what a user passes to ``nme``: option values, CSV files, columns.

Every command reads its CSV through :func:`read_csv` and checks it with the ``require_*``
functions, so a problem a user can fix is reported the same way everywhere: a :class:`CLIError`
naming the file, the column and, for missing values, the first bad line. Person ids are always
read as strings, so ``007`` and ``7`` stay distinct and predictions look persons up exactly as
they were spelled at fit time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nme.artifact import CONFIG_FILE
from nme.sequence import SEQUENCE_PLACEMENTS

CLI_FILE = "cli.json"
"""Written by ``fit`` beside the artifact: the CLI-level metadata the artifact does not know."""
CLI_VERSION = 1


class CLIError(Exception):
    """A problem with the user's input; printed without a traceback, exit status 2."""


# --------------------------------------------------------------------------- option values
def layer_sizes(text: str) -> tuple[int, ...]:
    """``"64,64"`` -> ``(64, 64)``; ``""`` -> ``()`` (a linear model)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer sizes like 64,64 (or '' for linear), got {text!r}"
        ) from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer sizes must be positive, got {text!r}")
    return sizes


def placement(text: str) -> str | list[str]:
    """``last`` | ``all`` | ``none`` | a tagger placement | comma-separated parameter names."""
    if text in ("last", "all", "none", *SEQUENCE_PLACEMENTS):
        return text
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected last, all or parameter names like layers.0.bias")
    return names


def column_list(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated column names")
    return names


def forbidden_transitions(text: str) -> list[tuple[str, str]]:
    """``"a>b,c>d"`` -> ``[("a", "b"), ("c", "d")]``: forbidden transitions from a to b."""
    pairs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        a, sep, b = part.partition(">")
        if not sep or not a.strip() or not b.strip():
            raise argparse.ArgumentTypeError(
                f"expected forbidden transitions like aggressive>positive,positive>aggressive; "
                f"got {part!r}"
            )
        pairs.append((a.strip(), b.strip()))
    return pairs


def optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A converter that also accepts ``none`` (giving ``None``)."""

    def convert(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind.__name__} or none, got {text!r}"
            ) from None

    convert.__name__ = kind.__name__
    return convert


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """A converter that accepts only values > 0 of ``kind``."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    convert.__name__ = kind.__name__
    return convert


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def check_device(device: str) -> str:
    """``--device`` as given, once torch knows it and it exists on this machine."""
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CLIError(f"unknown --device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available on this machine")
    return device


def check_output_dir(out: Path) -> None:
    """Refuse to replace a file or a non-empty directory that is not a model artifact."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise CLIError(
            f"refusing to overwrite {out}: it is a non-empty directory and not a model artifact"
        )


def read_cli_meta(model: Path) -> dict[str, Any]:
    """The model directory's ``cli.json``; empty for an artifact saved from Python."""
    path = model / CLI_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CLIError(f"{path} is not valid JSON ({err})") from None
    return meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------- CSV files
def read_csv(path: Path, person_col: str | None = None) -> pd.DataFrame:
    """Read a CSV file with at least one row; the person column (if given) as strings."""
    if not path.exists():
        raise CLIError(f"no such file: {path}")
    if not path.is_file():
        raise CLIError(f"not a file: {path}")
    dtype = {person_col: str} if person_col else None
    try:
        df = pd.read_csv(path, dtype=dtype)
    except pd.errors.EmptyDataError:
        raise CLIError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot parse {path} as CSV: {err}") from None
    if df.empty:
        raise CLIError(f"{path} has a header but no data rows")
    return df


def require_columns(df: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    """Every column is in ``df``; the error lists the missing ones and the file's columns."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        listed = ", ".join(repr(c) for c in missing)
        raise CLIError(
            f"{path} has no column {listed} (columns: {', '.join(map(str, df.columns))})"
        )


def require_numeric(df: pd.DataFrame, columns: Sequence[str], path: Path, what: str) -> None:
    """Every column is numeric; ``what`` names them in the error (e.g. "feature columns")."""
    bad = [c for c in columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise CLIError(f"{path}: {what} must be numeric; non-numeric: {', '.join(bad)}")


def require_complete(df: pd.DataFrame, columns: Sequence[str], path: Path) -> None:
    """No NaN (and, for numeric columns, no inf); names the column and the first row."""
    for col in columns:
        values = df[col]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            bad = ~np.isfinite(values.to_numpy(dtype=np.float64, na_value=np.nan))
        else:
            bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CLIError(
                f"{path}: column {col!r} has {int(bad.sum())} missing or non-finite value(s), "
                f"first at data row {row} (line {row + 2} of the file)"
            )


def check_target(target: pd.Series, name: str, task: str, path: Path) -> None:
    """A regression target is numeric; a classification target is not continuous."""
    if task == "regression" and not pd.api.types.is_numeric_dtype(target):
        raise CLIError(
            f"{path}: target {name!r} is not numeric; for class labels use --task classification"
        )
    if task == "classification" and pd.api.types.is_float_dtype(target):
        values = target.to_numpy(dtype=np.float64)
        if not np.array_equal(values, np.round(values)):
            raise CLIError(
                f"{path}: target {name!r} has fractional values, not class labels; "
                "use --task regression"
            )


def default_features(df: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    """Every numeric column not in ``exclude``, in file order."""
    return [
        str(c) for c in df.columns
        if c not in exclude and pd.api.types.is_numeric_dtype(df[c])
    ]


def select_features(
    df: pd.DataFrame,
    given: Sequence[str] | None,
    key_cols: Sequence[str],
    path: Path,
    reserved: tuple[Sequence[str], str],
    report_ignored: bool,
) -> list[str]:
    """The feature columns of ``fit``: ``--features`` checked, else :func:`default_features`.

    Args:
        given: ``--features`` (None: every numeric column not in ``key_cols``).
        reserved: the columns ``--features`` must not name, and how the error calls them.
        report_ignored: tell on stderr which non-numeric columns the default leaves out.
    """
    if given is not None:
        columns, described = reserved
        clash = [c for c in given if c in columns]
        if clash:
            raise CLIError(f"--features must not include {described}: {clash}")
        features = list(dict.fromkeys(given))
        require_columns(df, features, path)
        require_numeric(df, features, path, "feature columns")
        return features
    features = default_features(df, key_cols)
    if not features:
        raise CLIError(f"{path} has no numeric feature columns; name them with --features")
    skipped = [str(c) for c in df.columns if c not in key_cols and c not in features]
    if report_ignored and skipped:
        print(f"nme: ignoring non-numeric columns: {', '.join(skipped)}", file=sys.stderr)
    return features


def time_order(df: pd.DataFrame, time_col: str, path: Path) -> pd.DataFrame:
    """Rows stably sorted by ``time_col`` (numeric, or parsed as dates)."""
    key = df[time_col]
    if not pd.api.types.is_numeric_dtype(key):
        try:
            key = pd.to_datetime(key)
        except (ValueError, TypeError):
            raise CLIError(
                f"{path}: time column {time_col!r} is neither numeric nor dates"
            ) from None
    order = np.argsort(key.to_numpy(), kind="stable")
    return df.iloc[order]


def sequence_order(
    df: pd.DataFrame, person_col: str, sequence_col: str, position_col: str | None, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Row order grouping each (person, sequence) together, by position within a sequence.

    Returns:
        ``(order (n_rows,), starts (n_sequences + 1,))``: ``df.iloc[order[starts[k]:
        starts[k + 1]]]`` are the segments of sequence k; sequences in order of first appearance.
    """
    # a sequence id may repeat across persons, so the pair identifies a sequence
    codes = df.groupby([person_col, sequence_col], sort=False).ngroup().to_numpy()
    if position_col is None:
        pos = np.arange(len(df))
    else:
        key = df[position_col]
        if not pd.api.types.is_numeric_dtype(key):
            raise CLIError(f"{path}: position column {position_col!r} must be numeric")
        pos = key.to_numpy()
    order = np.lexsort((pos, codes))
    counts = np.bincount(codes)
    if position_col is not None:
        sorted_pos = pos[order]
        same = codes[order][1:] == codes[order][:-1]
        if bool((same & (sorted_pos[1:] == sorted_pos[:-1])).any()):
            raise CLIError(f"{path}: a sequence has two rows with the same {position_col!r}")
    return order, np.concatenate([[0], np.cumsum(counts)])
