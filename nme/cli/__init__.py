"""The ``nme`` command line: simulate data, fit an estimator on a CSV file, predict, evaluate.

Usage::

    nme simulate mood --persons 200 --days 60 --out mood.csv
    nme fit --data mood.csv --person-col user --target mood --time-col day --out model/
    nme predict --model model/ --data new.csv --out preds.csv
    nme simulate sequences --persons 100 --out seq.csv
    nme fit --data seq.csv --task sequence --person-col person --target label
            --sequence-col sequence_id --position-col position --out tagger/
    nme evaluate --data mood.csv --person-col user --target mood --time-col day --out eval/

One module per command (:mod:`~nme.cli.simulate`, :mod:`~nme.cli.fit`, :mod:`~nme.cli.predict`,
:mod:`~nme.cli.evaluate`); CSV reading and every check of the user's input in
:mod:`~nme.cli.inputs`; what differs between regression, classification and sequences in
:mod:`~nme.cli.tasks`.

Errors a user can fix (missing or empty file, missing column, non-numeric feature, NaN, bad
option value, bad artifact) print ``nme: error: ...`` to stderr and exit with status 2, without a
traceback.
"""

from __future__ import annotations

import argparse
import sys

from nme.cli import evaluate, fit, predict, simulate
from nme.cli.inputs import CLIError

EXIT_USAGE = 2

__all__ = ["EXIT_USAGE", "CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``nme`` argument parser with its ``simulate``, ``fit``, ``predict`` and ``evaluate``
    commands."""
    parser = argparse.ArgumentParser(
        prog="nme", description="Neural Mixed Effects: simulate data, fit, predict."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (simulate, fit, predict, evaluate):
        command.add_parser(commands)
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
