"""``nme evaluate``: the paper's evaluation protocol on a CSV file, written as a report.

Only the wiring: the CSV is checked like ``fit`` checks it, the protocol is
:mod:`nme.evaluation` and the files are :mod:`nme.report`'s (imported when the command runs, so
the other commands do not load the plotting stack).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nme.cli.inputs import (
    CLIError,
    check_device,
    check_target,
    column_list,
    default_features,
    optional,
    positive,
    read_csv,
    require_columns,
    require_complete,
    require_numeric,
    time_order,
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``nme evaluate``."""
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
    p.add_argument("--features", type=column_list, help="default: every other numeric column")
    p.add_argument("--task", choices=EVAL_TASKS, default="regression")
    p.add_argument("--sequence-col", help="--task sequence: column with sequence ids")
    p.add_argument("--position-col", help="--task sequence: order of segments in a sequence")
    p.add_argument("--group-col", help="--task sequence: per-person group (e.g. depressed/"
                                       "control) for mean transition matrices")
    p.add_argument("--methods", type=column_list, default=None,
                   help=f"comma-separated subset of {','.join(EVAL_METHODS)} (default: all; "
                        "mlp-lme only for regression)")
    p.add_argument("--placements", type=column_list, default=None,
                   help=f"comma-separated subset of {','.join(PLACEMENTS)} (sequences also "
                        f"{','.join(SEQUENCE_PLACEMENTS)}; default: {','.join(PLACEMENTS)}, "
                        f"sequences {','.join(SEQUENCE_PLACEMENTS)})")
    p.add_argument("--grid", choices=sorted(GRIDS), default="small", help="default: small")
    p.add_argument("--min-test", type=positive(int), default=10,
                   help="drop persons with fewer test rows (default: 10)")
    p.add_argument("--bootstrap", type=positive(int), default=10_000,
                   help="bootstrap resamples of persons (default: 10000)")
    p.add_argument("--max-epochs", type=positive(int), default=100, help="default: 100")
    p.add_argument("--patience", type=optional(int), default=10, help="default: 10")
    p.add_argument("--batch-size", type=positive(int), default=512, help="default: 512")
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
    device = check_device(args.device)
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
        check_target(df[args.target], args.target, args.task, path)
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
