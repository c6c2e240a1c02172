"""The ``nme`` command line: simulate data, fit an estimator on a CSV file, predict with it.

Usage::

    nme simulate mood --persons 200 --days 60 --out mood.csv
    nme fit --data mood.csv --person-col user --target mood --time-col day --out model/
    nme predict --model model/ --data new.csv --out preds.csv

``simulate`` has one sub-command per kind of data; each kind is added by one function in
``SIMULATORS`` (a kind takes the ``simulate`` sub-parsers and registers its own parser with
``set_defaults(run=...)``), so another kind (e.g. ``sequences``) plugs in next to ``mood``.
``simulate mood`` writes the data to ``--out`` and the ground-truth person effects to
``<out stem>.truth.csv`` beside it.

``fit`` reads the CSV, picks the feature columns (``--features``, else every numeric column
except the person, target and time columns), optionally holds out the last ``--val-fraction`` of
each person's rows (in ``--time-col`` order, else file order) for early stopping, trains an
:class:`~nme.estimators.NMERegressor` or :class:`~nme.estimators.NMEClassifier` and saves its
artifact (``config.json`` + ``weights.safetensors``) to ``--out``. Beside them it writes
``cli.json``: the CLI-level metadata the artifact itself does not know,
``{"cli_version", "person_col", "target", "task", "features", "time_col"}``. ``predict`` uses
it to default ``--person-col``; an artifact saved from Python (no ``cli.json``) works too when
``--person-col`` is given, and the task is then taken from the estimator class. ``--out`` must
be a new path, an empty directory or an existing model artifact: ``fit`` never replaces an
unrelated directory.

Person ids are always read as strings, so ``007`` and ``7`` stay distinct and predictions look
persons up exactly as they were spelled at fit time.

Errors a user can fix (missing or empty file, missing column, non-numeric feature, NaN, bad
option value, bad artifact) print ``nme: error: ...`` to stderr and exit with status 2, without a
traceback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from nme.artifact import CONFIG_FILE
from nme.data import temporal_split
from nme.estimators import NMEClassifier, NMERegressor, load_estimator
from nme.personalize import METHODS
from nme.simulate import simulate_mood

CLI_FILE = "cli.json"
CLI_VERSION = 1
EXIT_USAGE = 2
TASKS = {"regression": NMERegressor, "classification": NMEClassifier}

# The estimators' own defaults, so --help never drifts from the Python API.
_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(NMERegressor).parameters.items()
}


class CLIError(Exception):
    """A problem with the user's input; printed without a traceback, exit status 2."""


# --------------------------------------------------------------------------- option parsing
def _hidden(text: str) -> tuple[int, ...]:
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


def _placement(text: str) -> str | list[str]:
    """``last`` | ``all`` | ``none`` | comma-separated parameter names (``layers.0.weight``)."""
    if text in ("last", "all", "none"):
        return text
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected last, all or parameter names like layers.0.bias")
    return names


def _columns(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated column names")
    return names


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
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


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


# --------------------------------------------------------------------------- data checks
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
    missing = [c for c in columns if c not in df.columns]
    if missing:
        listed = ", ".join(repr(c) for c in missing)
        raise CLIError(
            f"{path} has no column {listed} (columns: {', '.join(map(str, df.columns))})"
        )


def require_numeric(df: pd.DataFrame, columns: Sequence[str], path: Path, what: str) -> None:
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


def _check_target(target: pd.Series, name: str, task: str, path: Path) -> None:
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


def _check_output_dir(out: Path) -> None:
    """Refuse to replace a file or a non-empty directory that is not a model artifact."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise CLIError(
            f"refusing to overwrite {out}: it is a non-empty directory and not a model artifact"
        )


def _resolve_device(device: str) -> str:
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CLIError(f"unknown --device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available on this machine")
    return device


# --------------------------------------------------------------------------- simulate
def _add_simulate_mood(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "mood",
        help="daily mood with person-specific baselines, weekly events and slopes",
        description="Daily mood shaped like the NME paper's Figure 1 (see nme.simulate).",
    )
    p.add_argument("--persons", type=_positive(int), default=200, help="default: 200")
    p.add_argument("--days", type=_positive(int), default=60, help="default: 60")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--person-effects", type=float, default=1.0,
                   help="scale of all person-specific effects; 0 gives none (default: 1.0)")
    p.add_argument("--noise", type=float, default=3.0, help="noise sd (default: 3.0)")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV file; the truth goes to <stem>.truth.csv beside it")
    p.set_defaults(run=run_simulate_mood)


def run_simulate_mood(args: argparse.Namespace) -> int:
    """Write simulated mood data and its ground truth."""
    data, truth = simulate_mood(
        n_persons=args.persons,
        n_days=args.days,
        seed=args.seed,
        person_effects=args.person_effects,
        noise=args.noise,
    )
    out: Path = args.out
    truth_path = out.with_name(f"{out.stem}.truth.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    data.to_csv(out, index=False, date_format="%Y-%m-%d")
    truth.to_csv(truth_path)
    print(f"wrote {len(data)} rows ({args.persons} persons x {args.days} days) to {out}")
    print(f"wrote ground-truth person effects to {truth_path}")
    return 0


# Each adds one kind of data under ``nme simulate``.
SIMULATORS: list[Callable[[argparse._SubParsersAction], None]] = [_add_simulate_mood]


# --------------------------------------------------------------------------- fit
def _add_fit(commands: argparse._SubParsersAction) -> None:
    d = _DEFAULTS
    p = commands.add_parser(
        "fit",
        help="fit an NME estimator on a CSV file and save the model directory",
        description="Fit an NME estimator on a CSV file (one row per observation).",
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="CSV file")
    data.add_argument("--person-col", required=True, help="column with person ids")
    data.add_argument("--target", required=True, help="column to predict")
    data.add_argument("--features", type=_columns,
                      help="comma-separated feature columns (default: every numeric column "
                           "except the person, target and time columns)")
    data.add_argument("--time-col",
                      help="column giving time order within person (numeric or dates); "
                           "default: file order")
    data.add_argument("--val-fraction", type=_fraction, default=0.2,
                      help="last share of each person's rows used for validation and early "
                           "stopping; 0 disables (default: 0.2)")
    model = p.add_argument_group("model")
    model.add_argument("--task", choices=sorted(TASKS), default="regression",
                       help="default: regression")
    model.add_argument("--hidden", type=_hidden, default=d["hidden"],
                       help="hidden layer sizes, e.g. 64,64; '' for a linear model "
                            f"(default: {','.join(map(str, d['hidden']))})")
    model.add_argument("--placement", type=_placement, default=d["placement"],
                       help="person-specific parameters: last, all, none, or names like "
                            f"layers.0.weight,layers.0.bias (default: {d['placement']})")
    model.add_argument("--method", choices=METHODS, default=d["method"],
                       help=f"default: {d['method']}")
    model.add_argument("--m-step", choices=("paper", "laplace"), default=d["m_step"],
                       help=f"laplace is for regression only (default: {d['m_step']})")
    model.add_argument("--anneal", type=_optional(float), default=d["anneal"],
                       help=f"Σ annealing α in (0, 1), or none (default: {d['anneal']})")
    train = p.add_argument_group("training")
    train.add_argument("--lr", type=_positive(float), default=d["lr"],
                       help=f"default: {d['lr']}")
    train.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                       help=f"default: {d['weight_decay']}")
    train.add_argument("--batch-size", type=_positive(int), default=d["batch_size"],
                       help=f"default: {d['batch_size']}")
    train.add_argument("--max-epochs", type=_positive(int), default=d["max_epochs"],
                       help=f"default: {d['max_epochs']}")
    train.add_argument("--patience", type=_optional(int), default=d["patience"],
                       help=f"early-stopping patience in epochs, or none "
                            f"(default: {d['patience']})")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    train.add_argument("--seed", type=int, default=0, help="random state (default: 0)")
    train.add_argument("--verbose", action="store_true", help="show a progress bar")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.set_defaults(run=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    """Fit on ``--data`` and save the artifact plus ``cli.json`` to ``--out``."""
    path: Path = args.data
    out: Path = args.out
    _check_output_dir(out)
    device = _resolve_device(args.device)
    df = read_csv(path, args.person_col)
    key_cols = [args.person_col, args.target] + ([args.time_col] if args.time_col else [])
    require_columns(df, key_cols, path)
    if args.features is not None:
        clash = [c for c in args.features if c in (args.person_col, args.target)]
        if clash:
            raise CLIError(f"--features must not include the person or target column: {clash}")
        features = list(dict.fromkeys(args.features))
        require_columns(df, features, path)
        require_numeric(df, features, path, "feature columns")
    else:
        features = default_features(df, key_cols)
        skipped = [str(c) for c in df.columns if c not in key_cols and c not in features]
        if not features:
            raise CLIError(f"{path} has no numeric feature columns; name them with --features")
        if skipped:
            print(f"nme: ignoring non-numeric columns: {', '.join(skipped)}", file=sys.stderr)
    if args.m_step == "laplace" and args.task != "regression":
        raise CLIError("--m-step laplace is implemented for --task regression only")
    require_complete(df, [args.person_col, args.target, *features, *key_cols[2:]], path)
    _check_target(df[args.target], args.target, args.task, path)

    if args.time_col:
        df = time_order(df, args.time_col, path)
    persons = df[args.person_col].to_numpy()
    if args.val_fraction > 0:
        part = temporal_split(persons, (1.0 - args.val_fraction, args.val_fraction))
    else:
        part = np.zeros(len(df), dtype=np.int64)
    train, val = df[part == 0], df[part == 1]
    if train.empty:
        raise CLIError("no training rows left after the validation split; lower --val-fraction")
    if args.task == "classification" and not val.empty:
        # the classifier knows only the classes of its training rows
        unseen = ~val[args.target].isin(set(train[args.target]))
        if unseen.any():
            print(f"nme: leaving {int(unseen.sum())} validation rows out: their {args.target!r} "
                  "classes do not occur in the training rows", file=sys.stderr)
            val = val[~unseen]

    est = TASKS[args.task](
        hidden=args.hidden,
        placement=args.placement,
        method=args.method,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        max_epochs=args.max_epochs,
        patience=args.patience,
        anneal=args.anneal,
        m_step=args.m_step,
        device=device,
        random_state=args.seed,
        verbose=args.verbose,
    )
    validation: dict[str, Any] = {}
    if not val.empty:
        validation = {
            "X_val": val[features],
            "y_val": val[args.target].to_numpy(),
            "persons_val": val[args.person_col].to_numpy(),
        }
    est.fit(train[features], train[args.target].to_numpy(), train[args.person_col].to_numpy(),
            **validation)
    est.save(out)
    meta = {
        "cli_version": CLI_VERSION,
        "person_col": args.person_col,
        "target": args.target,
        "task": args.task,
        "features": features,
        "time_col": args.time_col,
    }
    (out / CLI_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _print_fit_summary(est, args.task, len(train), len(val), out)
    return 0


def _print_fit_summary(
    est: NMERegressor | NMEClassifier, task: str, n_train: int, n_val: int, out: Path
) -> None:
    history = est.history_
    best = est.best_epoch_
    metric_name = "RMSE" if task == "regression" else "accuracy"
    record = history[best - 1] if 0 < best <= len(history) else {}
    metric = record.get("val_metric")
    shown = f"{metric:.4g}" if metric is not None else "n/a (no validation rows)"
    print(f"persons:         {len(est.person_ids_)}")
    print(f"rows:            {n_train} train, {n_val} validation")
    print(f"epochs:          {len(history)} (best {best})")
    print(f"validation {metric_name}: {shown}")
    scale = "z-scored target" if task == "regression" else "cross-entropy"
    print(f"sigma2:          {est.sigma2_:.4g} (mean training loss, {scale})")
    print(f"model:           {out}")


# --------------------------------------------------------------------------- predict
def _add_predict(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "predict",
        help="predict with a saved model; writes the input rows plus predictions",
        description="Predict with a model directory written by `nme fit` (or Estimator.save). "
                    "Unknown persons get the generic model.",
    )
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--data", type=Path, required=True, help="CSV file with the feature columns")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV file: the input rows plus 'prediction' (and 'proba_<class>' "
                        "columns for classification)")
    p.add_argument("--person-col", help="person id column (default: the one used at fit time)")
    p.add_argument("--device", default="cpu", help="default: cpu")
    p.set_defaults(run=run_predict)


def _read_cli_meta(model: Path) -> dict[str, Any]:
    path = model / CLI_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CLIError(f"{path} is not valid JSON ({err})") from None
    return meta if isinstance(meta, dict) else {}


def run_predict(args: argparse.Namespace) -> int:
    """Predict for every row of ``--data`` and write them with the predictions to ``--out``."""
    device = _resolve_device(args.device)
    est = load_estimator(args.model, device=device)
    meta = _read_cli_meta(args.model)
    person_col = args.person_col or meta.get("person_col")
    if not person_col:
        raise CLIError(f"{args.model} has no {CLI_FILE}; pass --person-col")
    path: Path = args.data
    df = read_csv(path, person_col)
    features = list(est.feature_names_)
    require_columns(df, [person_col, *features], path)
    require_numeric(df, features, path, "feature columns")
    require_complete(df, [person_col, *features], path)
    # a model fitted on a plain matrix calls its features x0, x1, ...: the CSV must too
    X = df[features]
    persons = df[person_col].to_numpy()
    result = df.copy()
    if isinstance(est, NMEClassifier):
        proba = est.predict_proba(X, persons)
        result["prediction"] = np.asarray(est.classes_, dtype=object)[proba.argmax(-1)]
        for k, label in enumerate(est.classes_):
            result[f"proba_{label}"] = proba[:, k]
    else:
        result["prediction"] = est.predict(X, persons)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(args.out, index=False)
    known = sum(p in est.persons_ for p in persons)
    print(f"wrote {len(result)} predictions to {args.out} "
          f"({known} rows of known persons, {len(result) - known} generic)")
    return 0


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    """The ``nme`` argument parser with its ``simulate``, ``fit`` and ``predict`` commands."""
    parser = argparse.ArgumentParser(
        prog="nme", description="Neural Mixed Effects: simulate data, fit, predict."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    simulate = commands.add_parser(
        "simulate", help="write simulated data with known person effects",
        description="Write simulated data with known generic and person-specific effects.",
    )
    kinds = simulate.add_subparsers(dest="kind", required=True, metavar="KIND")
    for add_kind in SIMULATORS:
        add_kind(kinds)
    _add_fit(commands)
    _add_predict(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``nme`` command; returns the exit status (2 for usage and input errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage and the message
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return int(args.run(args))
    except (CLIError, ValueError, OSError) as err:  # ArtifactError is a ValueError
        print(f"nme: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
