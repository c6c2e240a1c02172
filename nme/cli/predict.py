"""``nme predict``: one path for every task, from a model directory and a CSV file to a CSV file.

The person column (and, for sequences, the sequence and position columns) default to the ones
recorded in ``cli.json`` at fit time; an artifact saved from Python has none, so they must be
given, and the task is taken from the estimator class. Unknown persons get the generic model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nme.base import load_estimator
from nme.cli.inputs import (
    CLI_FILE,
    CLIError,
    check_device,
    read_cli_meta,
    read_csv,
    require_columns,
    require_complete,
    require_numeric,
)
from nme.cli.tasks import task_of


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``nme predict``."""
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


def run_predict(args: argparse.Namespace) -> int:
    """Predict for every row of ``--data`` and write them with the predictions to ``--out``."""
    device = check_device(args.device)
    est = load_estimator(args.model, device=device)
    meta = read_cli_meta(args.model)
    person_col = args.person_col or meta.get("person_col")
    if not person_col:
        raise CLIError(f"{args.model} has no {CLI_FILE}; pass --person-col")
    task = task_of(est)
    key_cols = [person_col, *task.predict_columns(args, meta)]
    path: Path = args.data
    df = read_csv(path, person_col)
    features = list(est.feature_names_)
    require_columns(df, [*key_cols, *features], path)
    require_numeric(df, features, path, "feature columns")
    require_complete(df, [*key_cols, *features], path)
    predictions = task.predict(est, df, person_col, features, args, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    predictions.frame.to_csv(args.out, index=False)
    generic = predictions.n_items - predictions.n_known
    print(f"wrote {predictions.what} to {args.out} "
          f"({predictions.n_known} {task.item} of known persons, {generic} generic)")
    return 0
