"""Fit time of the MLP-LME baseline against NME (placement ``last``) as persons get more data.

100 persons, 10 / 100 / 1 000 observations each, 20 features, MLP 20→64→64→1, batch 512, the same
number of epochs for every fit (NME: epochs of the fit loop with M-steps; MLP-LME: EM iterations
of one epoch plus one E/M step each), no validation or early stopping, so the time per epoch is
what is compared. Three fits per setting:

- ``nme``: :class:`nme.estimators.NMERegressor` (``method="nme"``, ``placement="last"``);
- ``mlp-lme``: :class:`nme.lme.MLPLMERegressor` with the batched Woodbury E-step (one q×q
  Cholesky per person, q = 65);
- ``mlp-lme (Vᵢ)``: the same EM in MeNets' formulation, inverting each person's nᵢ×nᵢ marginal
  covariance in a Python loop over persons — the classic implementation whose cost the paper
  contrasts NME with.

Ratios are against ``nme`` in the same setting; the last column is the growth of each fit's
time from the previous setting (10× more observations).

    .venv/bin/python benchmarks/lme_vs_nme.py [--per-person 10,100,1000] [--epochs 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from nme.estimators import NMERegressor
from nme.lme import MLPLMERegressor

FEATURES, HIDDEN, PERSONS, BATCH = 20, (64, 64), 100, 512


def make_data(per_person: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = PERSONS * per_person
    persons = np.repeat(np.arange(PERSONS), per_person)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    bias, slope = rng.normal(0, 1, PERSONS), rng.normal(0, 0.5, PERSONS)
    y = (x[:, 0] - 0.5 * x[:, 1] ** 2 + bias[persons] + slope[persons] * x[:, 2]
         + 0.3 * rng.normal(size=n))
    return x, y, persons


def time_fit(kind: str, per_person: int, epochs: int) -> float:
    x, y, persons = make_data(per_person)
    torch.manual_seed(0)
    if kind == "nme":
        est = NMERegressor(hidden=HIDDEN, placement="last", method="nme", batch_size=BATCH,
                           max_epochs=epochs, patience=None, device="cpu", random_state=0)
    else:
        solver = "marginal" if kind == "mlp-lme (Vᵢ)" else "woodbury"
        est = MLPLMERegressor(hidden=HIDDEN, batch_size=BATCH, max_iter=epochs,
                              patience=None, solver=solver, random_state=0)
    t0 = time.perf_counter()
    est.fit(x, y, persons)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-person", default="10,100,1000")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: comparable on a shared machine)")
    parser.add_argument("--skip-marginal-above", type=int, default=1000,
                        help="skip the nᵢ×nᵢ variant above this many observations per person")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.per_person.split(",")]
    for kind in ("nme", "mlp-lme"):  # warm-up: the first fit pays one-off set-up costs
        time_fit(kind, 10, 1)
    kinds = ["nme", "mlp-lme", "mlp-lme (Vᵢ)"]
    print(f"{PERSONS} persons, MLP {FEATURES}→{'→'.join(map(str, HIDDEN))}→1, {args.epochs} "
          f"epochs, batch {BATCH}, torch threads {args.threads}\n")
    header = f"{'obs/person':>10} | {'fit':<13} | {'seconds':>8} | {'× nme':>6} | {'growth':>6}"
    print(header)
    print("-" * len(header))
    previous: dict[str, float] = {}
    for n in sizes:
        base = None
        for kind in kinds:
            if kind == "mlp-lme (Vᵢ)" and n > args.skip_marginal_above:
                continue
            seconds = time_fit(kind, n, args.epochs)
            base = seconds if kind == "nme" else base
            growth = f"{seconds / previous[kind]:.1f}×" if kind in previous else ""
            previous[kind] = seconds
            print(f"{n:>10} | {kind:<13} | {seconds:>8.2f} | {seconds / base:>5.2f}× | "
                  f"{growth:>6}", flush=True)


if __name__ == "__main__":
    main()
