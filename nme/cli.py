"""The ``nme`` command line: simulate data, fit an estimator on a CSV file, predict with it.

Usage::

    nme simulate mood --persons 200 --days 60 --out mood.csv
    nme fit --data mood.csv --person-col user --target mood --time-col day --out model/
    nme predict --model model/ --data new.csv --out preds.csv
    nme simulate sequences --persons 100 --out seq.csv
    nme fit --data seq.csv --task sequence --person-col person --target label
            --sequence-col sequence_id --position-col position --out tagger/
    nme evaluate --data mood.csv --person-col user --target mood --time-col day --out eval/

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
from nme.sequence import SEQUENCE_PLACEMENTS, NMESequenceTagger
from nme.simulate import simulate_mood, simulate_sequences

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
    if text in ("last", "all", "none", *SEQUENCE_PLACEMENTS):
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
    data.add_argument("--sequence-col",
                      help="--task sequence: column with sequence ids (one row per segment)")
    data.add_argument("--position-col",
                      help="--task sequence: column ordering the segments of a sequence "
                           "(default: file order)")
    model = p.add_argument_group("model")
    model.add_argument("--task", choices=sorted([*TASKS, SEQUENCE_TASK]), default="regression",
                       help="default: regression; 'sequence' fits an NME-CRF tagger")
    model.add_argument("--hidden", type=_hidden, default=d["hidden"],
                       help="hidden layer sizes, e.g. 64,64; '' for a linear model "
                            f"(default: {','.join(map(str, d['hidden']))})")
    model.add_argument("--placement", type=_placement, default=None,
                       help="person-specific parameters: last, all, none, or names like "
                            "layers.0.weight,layers.0.bias; for --task sequence also T, last+T, "
                            f"all+T (default: {d['placement']}; "
                            f"{_SEQ_DEFAULTS['placement']} for --task sequence)")
    model.add_argument("--forbid", type=_forbidden,
                       help="--task sequence: forbidden transitions, e.g. "
                            "aggressive>positive,positive>aggressive")
    model.add_argument("--learn-start-end", action="store_true",
                       help="--task sequence: learn start/end scores (default: uniform)")
    model.add_argument("--method", choices=METHODS, default=d["method"],
                       help=f"default: {d['method']}")
    model.add_argument("--m-step", choices=("paper", "laplace"), default=None,
                       help=f"paper: Σ = variance of θⁱ; laplace adds the posterior variance "
                            f"(default: {d['m_step']} for regression, laplace for "
                            "classification and sequences)")
    model.add_argument("--anneal", type=_optional(float), default=d["anneal"],
                       help=f"Σ annealing α in (0, 1), or none (default: {d['anneal']})")
    train = p.add_argument_group("training")
    train.add_argument("--lr", type=_positive(float), default=d["lr"],
                       help=f"default: {d['lr']}")
    train.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                       help=f"default: {d['weight_decay']}")
    train.add_argument("--batch-size", type=_positive(int), default=None,
                       help=f"default: {d['batch_size']} rows; {_SEQ_DEFAULTS['batch_size']} "
                            "sequences for --task sequence")
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
    _fill_task_defaults(args)
    if args.task == SEQUENCE_TASK:
        return run_fit_sequences(args)
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

    est = TASKS[args.task](**_estimator_options(args, device))
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
    p.add_argument("--sequence-col", help="sequence models: sequence id column (default: the "
                                          "one used at fit time)")
    p.add_argument("--position-col", help="sequence models: position column (default: the one "
                                          "used at fit time)")
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
    if isinstance(est, NMESequenceTagger):
        return run_predict_sequences(args, est, meta, person_col)
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


# --------------------------------------------------------------------------- evaluate
def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    """Only the wiring: the protocol is :mod:`nme.evaluation`, the files :mod:`nme.report`."""
    from nme.evaluation import GRIDS, PLACEMENTS, SEQUENCE_PLACEMENTS
    from nme.evaluation import METHODS as EVAL_METHODS
    from nme.evaluation import TASKS as EVAL_TASKS

    p = commands.add_parser(
        "evaluate",
        help="run the paper's evaluation protocol and write a report (table, JSON, plots)",
        description="Within-person temporal 60/20/20 split, grid search on validation, "
                    "generic/specific/unme/nme/mlp-lme x placements, per-person metrics and "
                    "a paired person bootstrap against NME (see nme.evaluation).",
    )
    p.add_argument("--data", type=Path, required=True, help="CSV file")
    p.add_argument("--person-col", required=True, help="column with person ids")
    p.add_argument("--target", required=True, help="column to predict")
    p.add_argument("--time-col", help="time order within person (default: file order)")
    p.add_argument("--features", type=_columns, help="default: every other numeric column")
    p.add_argument("--task", choices=EVAL_TASKS, default="regression")
    p.add_argument("--sequence-col", help="--task sequence: column with sequence ids")
    p.add_argument("--position-col", help="--task sequence: order of segments in a sequence")
    p.add_argument("--group-col", help="--task sequence: per-person group (e.g. depressed/"
                                       "control) for mean transition matrices")
    p.add_argument("--methods", type=_columns, default=None,
                   help=f"comma-separated subset of {','.join(EVAL_METHODS)} (default: all; "
                        "mlp-lme only for regression)")
    p.add_argument("--placements", type=_columns, default=None,
                   help=f"comma-separated subset of {','.join(PLACEMENTS)} (sequences also "
                        f"{','.join(SEQUENCE_PLACEMENTS)}; default: {','.join(PLACEMENTS)}, "
                        f"sequences {','.join(SEQUENCE_PLACEMENTS)})")
    p.add_argument("--grid", choices=sorted(GRIDS), default="small", help="default: small")
    p.add_argument("--min-test", type=_positive(int), default=10,
                   help="drop persons with fewer test rows (default: 10)")
    p.add_argument("--bootstrap", type=_positive(int), default=10_000,
                   help="bootstrap resamples of persons (default: 10000)")
    p.add_argument("--max-epochs", type=_positive(int), default=100, help="default: 100")
    p.add_argument("--patience", type=_optional(int), default=10, help="default: 10")
    p.add_argument("--batch-size", type=_positive(int), default=512, help="default: 512")
    p.add_argument("--device", default="cpu", help="default: cpu")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, required=True,
                   help="directory for results.md, results.json and the PNG plots")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Check the CSV like ``fit`` does, then hand it to :mod:`nme.evaluation`."""
    from nme.evaluation import EvalConfig, evaluate_frame, evaluate_sequence_frame
    from nme.report import write_report

    path: Path = args.data
    if args.out.exists() and not args.out.is_dir():
        raise CLIError(f"--out {args.out} exists and is not a directory")
    sequence = args.task == "sequence"
    if sequence and not args.sequence_col:
        raise CLIError("--task sequence needs --sequence-col")
    device = _resolve_device(args.device)
    df = read_csv(path, args.person_col)
    extra = [args.sequence_col, args.position_col, args.group_col] if sequence else []
    key_cols = [args.person_col, args.target, *filter(None, [args.time_col, *extra])]
    require_columns(df, key_cols, path)
    features = args.features if args.features is not None else default_features(df, key_cols)
    if not features:
        raise CLIError(f"{path} has no numeric feature columns; name them with --features")
    require_columns(df, features, path)
    require_numeric(df, features, path, "feature columns")
    require_complete(df, [*key_cols, *features], path)
    if not sequence:
        _check_target(df[args.target], args.target, args.task, path)
    if args.time_col:
        df = time_order(df, args.time_col, path)
    config = EvalConfig(
        task=args.task, methods=None if args.methods is None else tuple(args.methods),
        placements=None if args.placements is None else tuple(args.placements),
        grid=args.grid, min_test=args.min_test, n_bootstrap=args.bootstrap, seed=args.seed,
        max_epochs=args.max_epochs, patience=args.patience, batch_size=args.batch_size,
        device=device, progress=not args.quiet,
    )
    # the rows are already in time order, so the split needs no time column
    if sequence:
        result = evaluate_sequence_frame(
            df, args.person_col, args.sequence_col, args.target, features,
            args.position_col, args.group_col, config, name=path.stem)
    else:
        result = evaluate_frame(df, args.person_col, args.target, features, None, config,
                                name=path.stem)
    result.data["time_col"] = args.time_col
    paths = write_report(result, args.out)
    for name, p in paths.items():
        print(f"wrote {name}: {p}")
    return 0


# --------------------------------------------------------------------------- sequences
SEQUENCE_TASK = "sequence"
_SEQ_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(NMESequenceTagger).parameters.items()
}


def _add_simulate_sequences(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "sequences",
        help="labelled state sequences with group- and person-specific transitions",
        description="Sequences of segments labelled other/aggressive/dysphoric/positive; "
                    "'depressed' and 'control' persons differ in their transitions "
                    "(see nme.simulate.simulate_sequences).",
    )
    p.add_argument("--persons", type=_positive(int), default=100, help="default: 100")
    p.add_argument("--sequences", type=_positive(int), default=10,
                   help="sequences per person (default: 10)")
    p.add_argument("--length", type=_positive(int), default=30,
                   help="segments per sequence (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--person-noise", type=float, default=0.5,
                   help="sd of the log-normal person noise on transitions (default: 0.5)")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV file; the truth goes to <stem>.truth.csv beside it")
    p.set_defaults(run=run_simulate_sequences)


SIMULATORS.append(_add_simulate_sequences)


def run_simulate_sequences(args: argparse.Namespace) -> int:
    """Write simulated sequences and their ground truth (group, transition matrix)."""
    data, truth = simulate_sequences(
        n_persons=args.persons, n_sequences=args.sequences, length=args.length,
        seed=args.seed, person_noise=args.person_noise,
    )
    out: Path = args.out
    truth_path = out.with_name(f"{out.stem}.truth.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    data.to_csv(out, index=False)
    truth.to_csv(truth_path)
    print(f"wrote {len(data)} segments ({args.persons} persons x {args.sequences} sequences x "
          f"{args.length}) to {out}")
    print(f"wrote ground-truth groups and transition matrices to {truth_path}")
    return 0


def _forbidden(text: str) -> list[tuple[str, str]]:
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


def _estimator_options(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The constructor arguments every estimator shares, from ``nme fit``'s options."""
    return {
        "hidden": args.hidden,
        "placement": args.placement,
        "method": args.method,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "max_epochs": args.max_epochs,
        "patience": args.patience,
        "anneal": args.anneal,
        "m_step": args.m_step,
        "device": device,
        "random_state": args.seed,
        "verbose": args.verbose,
    }


def _fill_task_defaults(args: argparse.Namespace) -> None:
    """Options whose sensible default depends on ``--task`` (rows vs whole sequences)."""
    defaults = _SEQ_DEFAULTS if args.task == SEQUENCE_TASK else _DEFAULTS
    if getattr(args, "m_step", None) is None and "m_step" in defaults:
        cls = NMEClassifier if args.task == "classification" else None
        args.m_step = (
            inspect.signature(cls).parameters["m_step"].default if cls else defaults["m_step"]
        )
    if args.placement is None:
        args.placement = defaults["placement"]
    if args.batch_size is None:
        args.batch_size = defaults["batch_size"]


def _sequence_order(
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


def run_fit_sequences(args: argparse.Namespace) -> int:
    """``fit --task sequence``: one row per segment, grouped into sequences, an NME-CRF."""
    path: Path = args.data
    out: Path = args.out
    _check_output_dir(out)
    device = _resolve_device(args.device)
    if not args.sequence_col:
        raise CLIError("--task sequence needs --sequence-col (the column with sequence ids)")
    df = read_csv(path, args.person_col)
    key_cols = [args.person_col, args.target, args.sequence_col]
    key_cols += [c for c in (args.position_col, args.time_col) if c]
    require_columns(df, key_cols, path)
    if args.features is not None:
        clash = [c for c in args.features if c in key_cols]
        if clash:
            raise CLIError(f"--features must not include the person, target, sequence, "
                           f"position or time column: {clash}")
        features = list(dict.fromkeys(args.features))
        require_columns(df, features, path)
        require_numeric(df, features, path, "feature columns")
    else:
        features = default_features(df, key_cols)
        if not features:
            raise CLIError(f"{path} has no numeric feature columns; name them with --features")
    require_complete(df, [*key_cols, *features], path)
    if args.time_col:
        # sequences then appear (and are split for validation) in time order within person
        df = time_order(df, args.time_col, path)
    order, starts = _sequence_order(df, args.person_col, args.sequence_col, args.position_col,
                                    path)
    rows = df.iloc[order]
    X, y = rows[features], rows[args.target].to_numpy()
    sequences = [(X.iloc[a:b], y[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    persons = rows[args.person_col].to_numpy()[starts[:-1]]
    if args.val_fraction > 0:
        part = temporal_split(persons, (1.0 - args.val_fraction, args.val_fraction))
    else:
        part = np.zeros(len(sequences), dtype=np.int64)
    train = [s for s, k in zip(sequences, part, strict=True) if k == 0]
    val = [s for s, k in zip(sequences, part, strict=True) if k == 1]
    if not train:
        raise CLIError("no training sequences left after the validation split; "
                       "lower --val-fraction")
    if val:
        # the tagger knows only the states of its training sequences
        states = {s for _, lab in train for s in lab}
        keep = [all(s in states for s in lab) for _, lab in val]
        if not all(keep):
            print(f"nme: leaving {len(keep) - sum(keep)} validation sequences out: they have "
                  f"{args.target!r} states that do not occur in the training sequences",
                  file=sys.stderr)
        val_persons = [p for p, k in zip(persons[part == 1], keep, strict=True) if k]
        val = [s for s, k in zip(val, keep, strict=True) if k]

    est = NMESequenceTagger(
        **_estimator_options(args, device),
        learn_start_end=args.learn_start_end,
        allowed=args.forbid,
    )
    validation: dict[str, Any] = {}
    if val:
        validation = {"sequences_val": val, "persons_val": val_persons}
    est.fit(train, persons[part == 0], **validation)
    est.save(out)
    meta = {
        "cli_version": CLI_VERSION,
        "person_col": args.person_col,
        "target": args.target,
        "task": SEQUENCE_TASK,
        "features": features,
        "time_col": args.time_col,
        "sequence_col": args.sequence_col,
        "position_col": args.position_col,
    }
    (out / CLI_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    history, best = est.history_, est.best_epoch_
    record = history[best - 1] if 0 < best <= len(history) else {}
    metric = record.get("val_metric")
    shown = f"{metric:.4g}" if metric is not None else "n/a (no validation sequences)"
    print(f"persons:         {len(est.person_ids_)}")
    print(f"sequences:       {len(train)} train, {len(val)} validation")
    print(f"states:          {', '.join(map(str, est.states_))}")
    print(f"epochs:          {len(history)} (best {best})")
    print(f"validation accuracy: {shown} (Viterbi, per segment)")
    print(f"sigma2:          {est.sigma2_:.4g} (mean training CRF NLL per sequence)")
    print(f"model:           {out}")
    return 0


def run_predict_sequences(
    args: argparse.Namespace, est: NMESequenceTagger, meta: dict[str, Any], person_col: str
) -> int:
    """``predict`` with a sequence model: Viterbi state and marginals for every segment."""
    sequence_col = args.sequence_col or meta.get("sequence_col")
    position_col = args.position_col or meta.get("position_col")
    if not sequence_col:
        raise CLIError(f"{args.model} has no {CLI_FILE}; pass --sequence-col")
    path: Path = args.data
    df = read_csv(path, person_col)
    features = list(est.feature_names_)
    key_cols = [person_col, sequence_col, *([position_col] if position_col else [])]
    require_columns(df, [*key_cols, *features], path)
    require_numeric(df, features, path, "feature columns")
    require_complete(df, [*key_cols, *features], path)
    order, starts = _sequence_order(df, person_col, sequence_col, position_col, path)
    X = df.iloc[order][features]
    spans = list(zip(starts[:-1], starts[1:], strict=True))
    persons = df[person_col].to_numpy()[order][starts[:-1]]
    feats = [X.iloc[a:b] for a, b in spans]
    paths = est.predict(feats, persons)
    margs = np.concatenate(est.predict_marginals(feats, persons))  # (n_rows, S), sorted order
    result = df.copy()
    prediction = np.empty(len(df), dtype=object)
    prediction[order] = np.concatenate([np.asarray(p, dtype=object) for p in paths])
    result["prediction"] = prediction
    for k, state in enumerate(est.states_):
        column = np.empty(len(df))
        column[order] = margs[:, k]
        result[f"proba_{state}"] = column
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(args.out, index=False)
    known = sum(p in est.persons_ for p in persons)
    print(f"wrote {len(result)} segment predictions of {len(spans)} sequences to {args.out} "
          f"({known} sequences of known persons, {len(spans) - known} generic)")
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
    _add_evaluate(commands)
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
