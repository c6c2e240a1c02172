"""``nme simulate``: write simulated data with known person effects, one sub-command per kind.

Each kind is added by one function in :data:`SIMULATORS` (it takes the ``simulate`` sub-parsers
and registers its own parser with ``set_defaults(run=...)``). A kind writes the data to ``--out``
and its ground truth to ``<out stem>.truth.csv`` beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from nme.cli.inputs import positive
from nme.simulate import simulate_mood, simulate_sequences


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``nme simulate`` and its kinds."""
    simulate = commands.add_parser(
        "simulate", help="write simulated data with known person effects",
        description="Write simulated data with known generic and person-specific effects.",
    )
    kinds = simulate.add_subparsers(dest="kind", required=True, metavar="KIND")
    for add_kind in SIMULATORS:
        add_kind(kinds)


def _truth_path(out: Path) -> Path:
    """Where the ground truth of data written to ``out`` goes."""
    return out.with_name(f"{out.stem}.truth.csv")


# --------------------------------------------------------------------------- mood
def _add_mood(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "mood",
        help="daily mood with person-specific baselines, weekly events and slopes",
        description="Daily mood shaped like the NME paper's Figure 1 (see nme.simulate).",
    )
    p.add_argument("--persons", type=positive(int), default=200, help="default: 200")
    p.add_argument("--days", type=positive(int), default=60, help="default: 60")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--person-effects", type=float, default=1.0,
                   help="scale of all person-specific effects; 0 gives none (default: 1.0)")
    p.add_argument("--noise", type=float, default=3.0, help="noise sd (default: 3.0)")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV file; the truth goes to <stem>.truth.csv beside it")
    p.set_defaults(run=run_mood)


def run_mood(args: argparse.Namespace) -> int:
    """Write simulated mood data and its ground truth."""
    data, truth = simulate_mood(
        n_persons=args.persons,
        n_days=args.days,
        seed=args.seed,
        person_effects=args.person_effects,
        noise=args.noise,
    )
    out: Path = args.out
    truth_path = _truth_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data.to_csv(out, index=False, date_format="%Y-%m-%d")
    truth.to_csv(truth_path)
    print(f"wrote {len(data)} rows ({args.persons} persons x {args.days} days) to {out}")
    print(f"wrote ground-truth person effects to {truth_path}")
    return 0


# --------------------------------------------------------------------------- sequences
def _add_sequences(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser(
        "sequences",
        help="labelled state sequences with group- and person-specific transitions",
        description="Sequences of segments labelled other/aggressive/dysphoric/positive; "
                    "'depressed' and 'control' persons differ in their transitions "
                    "(see nme.simulate.simulate_sequences).",
    )
    p.add_argument("--persons", type=positive(int), default=100, help="default: 100")
    p.add_argument("--sequences", type=positive(int), default=10,
                   help="sequences per person (default: 10)")
    p.add_argument("--length", type=positive(int), default=30,
                   help="segments per sequence (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--person-noise", type=float, default=0.5,
                   help="sd of the log-normal person noise on transitions (default: 0.5)")
    p.add_argument("--out", type=Path, required=True,
                   help="CSV file; the truth goes to <stem>.truth.csv beside it")
    p.set_defaults(run=run_sequences)


def run_sequences(args: argparse.Namespace) -> int:
    """Write simulated sequences and their ground truth (group, transition matrix)."""
    data, truth = simulate_sequences(
        n_persons=args.persons, n_sequences=args.sequences, length=args.length,
        seed=args.seed, person_noise=args.person_noise,
    )
    out: Path = args.out
    truth_path = _truth_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data.to_csv(out, index=False)
    truth.to_csv(truth_path)
    print(f"wrote {len(data)} segments ({args.persons} persons x {args.sequences} sequences x "
          f"{args.length}) to {out}")
    print(f"wrote ground-truth groups and transition matrices to {truth_path}")
    return 0


SIMULATORS: list[Callable[[argparse._SubParsersAction], None]] = [_add_mood, _add_sequences]
"""Each adds one kind of data under ``nme simulate``."""
