"""Peak memory of early stopping: the best epoch's person table in a file vs a full copy.

MLP 20→64→64→1 with ``placement="all"`` (d = 5 569, a 2.2 GB θⁱ table at 100 000 persons),
person batches, 5 observations per person, a validation set of one more observation per person
and a few epochs of the real fit loop (``nme.train.fit_loop``) with early stopping. Each
variant runs in its own child process, which reports its own peak resident memory
(``ru_maxrss``):

- ``full-copy``: ``snapshot_max_bytes=None``, the old behaviour — ``copy.deepcopy`` of the
  whole state, person table included, at every improving epoch;
- ``file``: the default — θ̄ copied, the table streamed to an unnamed temporary file.

Printed: MiB per variant, the ratio, seconds per fit and whether both restored the same table.

    .venv/bin/python benchmarks/early_stopping_memory.py [--persons 100000] [--epochs 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time

import torch

FEATURES, HIDDEN, OBS_PER_PERSON, BATCH = 20, (64, 64), 5, 512
VARIANTS = {"full-copy": None, "file": 64 << 20}
"""name -> ``TrainConfig.snapshot_max_bytes``."""


def make_data(n_persons: int, per_person: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    n = n_persons * per_person
    x = torch.randn(n, FEATURES, generator=g)
    persons = torch.arange(n_persons).repeat_interleave(per_person)
    bias = torch.randn(n_persons, generator=torch.Generator().manual_seed(1))
    y = x[:, 0] - 0.5 * x[:, 1] ** 2 + bias[persons] + 0.3 * torch.randn(n, generator=g)
    return x, y, persons


def run_one(n_persons: int, epochs: int, variant: str) -> dict:
    """The fit loop with early stopping; returns seconds, peak RSS and a hash of the table."""
    from nme.mlp import MLP
    from nme.personalize import PersonalizedModule
    from nme.train import TrainConfig, fit_loop

    torch.manual_seed(0)
    x, y, persons = make_data(n_persons, OBS_PER_PERSON, seed=0)
    xv, yv, pv = make_data(n_persons, 1, seed=2)
    module = PersonalizedModule(MLP(FEATURES, HIDDEN, 1), "all", n_persons, "nme")
    config = TrainConfig(lr=1e-3, batch_size=BATCH, max_epochs=epochs, patience=epochs,
                         seed=0, batching="person", snapshot_max_bytes=VARIANTS[variant])

    def item_loss(idx: torch.Tensor, effects: torch.Tensor | None = None) -> tuple:
        if effects is not None:
            out, rows = module(x[idx], effects=effects)
        else:
            out, rows = module(x[idx], persons[idx], gathered=True)
        return (out.squeeze(-1) - y[idx]) ** 2, rows

    @torch.no_grad()
    def validate() -> dict[str, float]:
        total = 0.0
        for s in range(0, xv.shape[0], 8192):
            out, _ = module(xv[s : s + 8192], pv[s : s + 8192])
            total += float(((out.squeeze(-1) - yv[s : s + 8192]) ** 2).sum())
        return {"val_loss": total / xv.shape[0]}

    t0 = time.perf_counter()
    result = fit_loop(module, persons, item_loss, config, validate)
    seconds = time.perf_counter() - t0
    table = module.persons.weight.detach().numpy()
    return {
        "seconds": seconds,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "table_mib": table.nbytes / 2**20,
        "best_epoch": result.best_epoch,
        "n_iter": result.n_iter,
        "improving": sum(1 for i, r in enumerate(result.history)
                         if r["val_loss"] < min([h["val_loss"] for h in result.history[:i]],
                                                default=float("inf"))),
        "sha256": hashlib.sha256(table.tobytes()).hexdigest()[:16],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(run_one(args.persons, args.epochs, args.child)))
        return
    results = {}
    for variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--persons", str(args.persons), "--epochs",
             str(args.epochs), "--child", variant],
            check=True, capture_output=True, text=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:>9}: peak RSS {r['peak_mib']:8.0f} MiB, {r['seconds']:6.1f} s, "
              f"table {r['table_mib']:.0f} MiB, best epoch {r['best_epoch']}/{r['n_iter']} "
              f"({r['improving']} improving), table sha256 {r['sha256']}", flush=True)
    before, after = results["full-copy"], results["file"]
    print(f"{args.persons} persons × d = 5 569: peak RSS {before['peak_mib']:.0f} MiB → "
          f"{after['peak_mib']:.0f} MiB ({before['peak_mib'] / after['peak_mib']:.2f}× less), "
          f"saved {before['peak_mib'] - after['peak_mib']:.0f} MiB; time "
          f"{after['seconds'] / before['seconds']:.2f}× the full copy's; "
          f"same restored table: {before['sha256'] == after['sha256']}")


if __name__ == "__main__":
    main()
