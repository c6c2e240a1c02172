"""``nme fit``: one path for every task, from a CSV file to a saved model directory.

:func:`run_fit` reads the CSV, picks the feature columns (``--features``, else every numeric
column except the person, target, time and — for sequences — sequence and position columns),
checks the values, optionally holds out the last ``--val-fraction`` of each person's items (in
``--time-col`` order, else file order) for early stopping, fits the task's estimator and saves
its artifact (``config.json`` + ``weights.safetensors``) to ``--out``. Beside them it writes
``cli.json``: ``{"cli_version", "person_col", "target", "task", "features", "time_col"}`` (plus
``sequence_col`` and ``position_col`` for sequences), which ``predict`` reads for its defaults.
``--out`` must be a new path, an empty directory or an existing model artifact: ``fit`` never
replaces an unrelated directory.

What differs between rows and sequences is the task's (:mod:`nme.cli.tasks`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
from torch.distributed.elastic.multiprocessing.api import SignalException

from nme.base import _NMEEstimator, resolve_device
from nme.cli.inputs import (
    CLI_FILE,
    CLI_VERSION,
    CLIError,
    check_device,
    check_output_dir,
    column_list,
    forbidden_transitions,
    fraction,
    layer_sizes,
    optional,
    placement,
    positive,
    read_csv,
    require_columns,
    select_features,
    time_order,
)
from nme.cli.tasks import TASKS, Items, Task
from nme.data import temporal_split
from nme.distributed import RankFailed, current_comm, launch, launched_by_torchrun, shard_mask
from nme.personalize import METHODS


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``nme fit``."""
    d = TASKS["regression"].defaults()
    seq = TASKS["sequence"].defaults()
    p = commands.add_parser(
        "fit",
        help="fit an NME estimator on a CSV file and save the model directory",
        description="Fit an NME estimator on a CSV file (one row per observation).",
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True, help="CSV file")
    data.add_argument("--person-col", required=True, help="column with person ids")
    data.add_argument("--target", required=True, help="column to predict")
    data.add_argument("--features", type=column_list,
                      help="comma-separated feature columns (default: every numeric column "
                           "except the person, target and time columns)")
    data.add_argument("--time-col",
                      help="column giving time order within person (numeric or dates); "
                           "default: file order")
    data.add_argument("--val-fraction", type=fraction, default=0.2,
                      help="last share of each person's rows used for validation and early "
                           "stopping; 0 disables (default: 0.2)")
    data.add_argument("--sequence-col",
                      help="--task sequence: column with sequence ids (one row per segment)")
    data.add_argument("--position-col",
                      help="--task sequence: column ordering the segments of a sequence "
                           "(default: file order)")
    model = p.add_argument_group("model")
    model.add_argument("--task", choices=sorted(TASKS), default="regression",
                       help="default: regression; 'sequence' fits an NME-CRF tagger")
    model.add_argument("--hidden", type=layer_sizes, default=d["hidden"],
                       help="hidden layer sizes, e.g. 64,64; '' for a linear model "
                            f"(default: {','.join(map(str, d['hidden']))})")
    model.add_argument("--placement", type=placement, default=None,
                       help="person-specific parameters: last, all, none, or names like "
                            "layers.0.weight,layers.0.bias; for --task sequence also T, last+T, "
                            f"all+T (default: {d['placement']}; "
                            f"{seq['placement']} for --task sequence)")
    model.add_argument("--forbid", type=forbidden_transitions,
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
    model.add_argument("--anneal", type=optional(float), default=d["anneal"],
                       help=f"Σ annealing α in (0, 1), or none (default: {d['anneal']})")
    train = p.add_argument_group("training")
    train.add_argument("--lr", type=positive(float), default=d["lr"],
                       help=f"default: {d['lr']}")
    train.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                       help=f"default: {d['weight_decay']}")
    train.add_argument("--batch-size", type=positive(int), default=None,
                       help=f"default: {d['batch_size']} rows; {seq['batch_size']} "
                            "sequences for --task sequence")
    train.add_argument("--max-epochs", type=positive(int), default=d["max_epochs"],
                       help=f"default: {d['max_epochs']}")
    train.add_argument("--patience", type=optional(int), default=d["patience"],
                       help=f"early-stopping patience in epochs, or none "
                            f"(default: {d['patience']})")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    train.add_argument("--seed", type=int, default=0, help="random state (default: 0)")
    train.add_argument("--nproc", type=positive(int), default=1,
                       help="train with this many local processes (torch.distributed: persons "
                            "sharded across them, gloo on CPU, NCCL on CUDA); for several "
                            "machines start `nme fit` with torchrun instead, see "
                            "docs/distributed.md (default: 1)")
    train.add_argument("--verbose", action="store_true", help="show a progress bar")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.set_defaults(run=run_fit)


def run_fit(args: argparse.Namespace) -> int:
    """Fit on ``--data`` and save the artifact plus ``cli.json`` to ``--out``.

    ``--nproc N`` (N > 1) starts N ranks through torch's elastic launcher and returns once
    they finished; a failed rank fails the run (status 1, naming the rank). Inside a process
    started by ``torchrun`` this process is one rank of the fit (see :func:`_fit_and_save`).
    """
    if args.nproc > 1:
        if launched_by_torchrun():
            raise CLIError("--nproc starts its own processes; under torchrun every rank is "
                           "already one process (leave --nproc at 1)")
        check_output_dir(args.out)
        check_device(args.device)
        try:
            summaries = launch(_fit_rank, (args,), args.nproc)
        except RankFailed as err:
            print(f"nme: error: distributed fit over {args.nproc} processes: {err}",
                  file=sys.stderr)
            return EXIT_RANK_FAILED
        except SignalException as sig:  # the launcher stopped the ranks before re-raising
            print(f"nme: fit stopped by {signal.Signals(sig.sigval).name}; its "
                  f"{args.nproc} processes were stopped", file=sys.stderr)
            return 128 + int(sig.sigval)
        print(summaries[0], end="")
        return 0
    summary = _fit_and_save(args)
    if summary:
        print(summary, end="")
    return 0


EXIT_RANK_FAILED = 1
"""``nme fit --nproc N``'s exit status when a rank failed."""


def _fit_rank(args: argparse.Namespace) -> str:
    """One rank of ``nme fit --nproc N`` (started by :func:`nme.distributed.launch`)."""
    return _fit_and_save(args)


def _fit_and_save(args: argparse.Namespace) -> str:
    """Read, check, fit and (on rank 0, or without ranks) save; returns the summary to print.

    In a distributed fit every rank reads the whole CSV and runs every check on it (so they
    all agree on the features and fail alike on bad input), then keeps the rows of its own
    persons (:func:`nme.distributed.shard_mask`) before the validation split; only rank 0
    writes ``--out`` and returns the summary (the others return "").
    """
    task = TASKS[args.task]
    _fill_task_defaults(args, task)
    path: Path = args.data
    out: Path = args.out
    check_output_dir(out)
    device = check_device(args.device)
    comm = current_comm(resolve_device(device))
    key_cols = task.key_columns(args)
    df = read_csv(path, args.person_col)
    require_columns(df, key_cols, path)
    features = select_features(df, args.features, key_cols, path, task.reserved_columns(args),
                               task.reports_ignored_columns)
    task.check_frame(df, features, args, path)
    if args.time_col:
        # the validation split then holds out each person's latest rows or sequences
        df = time_order(df, args.time_col, path)
    items = task.items(df, features, args, path)
    if comm is not None:
        items = items.take(shard_mask(items.persons, comm))
    train, val = _split(items, args.val_fraction)
    n_train, n_val = len(train), len(val)
    if comm is not None:
        n_train, n_val = (int(v) for v in comm.sum_floats(n_train, n_val))
    if not n_train:
        raise CLIError(f"no training {task.item} left after the validation split; "
                       "lower --val-fraction")
    val = task.drop_unseen(train, val, args.target)
    est = task.estimator(_estimator_options(args, device), args)
    task.fit(est, train, val)
    if comm is not None and comm.rank != 0:
        return ""
    est.save(out)
    meta = {
        "cli_version": CLI_VERSION,
        "person_col": args.person_col,
        "target": args.target,
        "task": task.name,
        "features": features,
        "time_col": args.time_col,
        **task.meta(args),
    }
    (out / CLI_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return _summary(task, est, n_train, n_val, out, 1 if comm is None else comm.world_size)


def _fill_task_defaults(args: argparse.Namespace, task: Task) -> None:
    """Options whose default depends on ``--task`` (rows vs whole sequences): the estimator's."""
    defaults = task.defaults()
    for name in ("m_step", "placement", "batch_size"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])


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


def _split(items: Items, val_fraction: float) -> tuple[Items, Items]:
    """``(train, validation)``: the last ``val_fraction`` of each person's items validate."""
    if val_fraction > 0:
        part = temporal_split(items.persons, (1.0 - val_fraction, val_fraction))
    else:
        part = np.zeros(len(items), dtype=np.int64)
    return items.take(part == 0), items.take(part == 1)


def _summary(task: Task, est: _NMEEstimator, n_train: int, n_val: int, out: Path,
             world_size: int) -> str:
    """What ``nme fit`` prints when it is done (the world size of a distributed fit too)."""
    history, best = est.history_, est.best_epoch_
    record = history[best - 1] if 0 < best <= len(history) else {}
    metric = record.get("val_metric")
    shown = f"{metric:.4g}" if metric is not None else f"n/a (no validation {task.item})"
    lines = [f"persons:         {len(est.person_ids_)}",
             f"{task.item + ':':<17}{n_train} train, {n_val} validation"]
    lines += task.summary_lines(est)
    if world_size > 1:
        lines.append(f"world size:      {world_size} (persons sharded across processes)")
    lines += [f"epochs:          {len(history)} (best {best})",
              f"validation {task.metric}: {shown}{task.metric_note}",
              f"sigma2:          {est.sigma2_:.4g} ({task.sigma2_note})",
              f"model:           {out}"]
    return "".join(line + "\n" for line in lines)
