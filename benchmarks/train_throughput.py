"""Training throughput of NME vs the generic network as the number of persons grows.

MLP 20→64→64→1, 50 observations per person, batch 512, Adam (lazy row-wise Adam for θⁱ). For
each number of persons and each variant, the real fit loop (``nme.train.fit_loop``) runs one
epoch — E-step over every batch plus the M-step — in its own child process (after a warm-up
epoch on 20 persons), so the peak resident memory printed is that setting's own.
Ratios are against ``generic`` measured in the same run.

A naive baseline in the style of the paper's reference implementation (one model per person,
a Python loop over the persons of each batch) is timed on a few hundred batches at small sizes
and extrapolated to an epoch.

    .venv/bin/python benchmarks/train_throughput.py [--persons 100,1000,10000,100000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

FEATURES, HIDDEN, OBS_PER_PERSON, BATCH = 20, (64, 64), 50, 512
VARIANTS = {
    "generic": ("generic", "last", "random"),
    "nme-last": ("nme", "last", "random"),
    "nme-all": ("nme", "all", "random"),
    "nme-all/pb": ("nme", "all", "person"),
}
"""name -> (method, placement, batching); /pb = person batches (TrainConfig.batching)."""


def make_data(n_persons: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = n_persons * OBS_PER_PERSON
    x = torch.randn(n, FEATURES, generator=g)
    persons = torch.arange(n_persons).repeat_interleave(OBS_PER_PERSON)
    bias = torch.randn(n_persons, generator=g)
    y = x[:, 0] - 0.5 * x[:, 1] ** 2 + bias[persons] + 0.3 * torch.randn(n, generator=g)
    return x, y, persons


def run_one(n_persons: int, variant: str) -> dict:
    """One epoch of the real fit loop; returns seconds and this process's peak RSS."""
    from nme.mlp import MLP
    from nme.personalize import PersonalizedModule
    from nme.train import TrainConfig, fit_loop

    method, placement, batching = VARIANTS[variant]
    config = TrainConfig(
        lr=1e-3, batch_size=BATCH, max_epochs=1, patience=None, seed=0, batching=batching
    )

    def epoch(n: int) -> float:
        torch.manual_seed(0)
        x, y, persons = make_data(n)
        module = PersonalizedModule(MLP(FEATURES, HIDDEN, 1), placement, n, method)

        def item_loss(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out, rows = module(x[idx], persons[idx], gathered=True)
            return (out.squeeze(-1) - y[idx]) ** 2, rows

        return fit_loop(module, persons, item_loss, config).history[0]["seconds"]

    epoch(20)  # one-off warm-up costs (dispatcher, allocator) paid on a tiny problem
    seconds = epoch(n_persons)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak_mb, "n_obs": n_persons * OBS_PER_PERSON}


def run_loop_baseline(n_persons: int, batches: int = 100) -> dict:
    """Paper-style: one forward per person present in the batch (Python loop)."""
    from torch.func import functional_call

    from nme.mlp import MLP

    torch.manual_seed(0)
    x, y, persons = make_data(n_persons)
    base = MLP(FEATURES, HIDDEN, 1)
    names = ["layers.2.weight", "layers.2.bias"]
    params = dict(base.named_parameters())
    specific = {n: torch.zeros(n_persons, *params[n].shape, requires_grad=True) for n in names}
    opt = torch.optim.Adam([*base.parameters(), *specific.values()], lr=1e-3)
    order = torch.randperm(x.shape[0])
    steps = -(-x.shape[0] // BATCH)
    batches = min(batches, steps)
    t0 = time.perf_counter()
    for b in range(batches):
        idx = order[b * BATCH : (b + 1) * BATCH]
        loss = torch.zeros(())
        for p in persons[idx].unique().tolist():
            rows = idx[persons[idx] == p]
            own = {n: params[n] + specific[n][p] for n in names}
            out = functional_call(base, own, (x[rows],))
            loss = loss + ((out.squeeze(-1) - y[rows]) ** 2).sum()
        opt.zero_grad()
        (loss / idx.shape[0]).backward()
        opt.step()
    per_batch = (time.perf_counter() - t0) / batches
    return {"seconds": per_batch * steps, "peak_mb": float("nan"), "n_obs": x.shape[0]}


def child(n_persons: int, variant: str, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(threads), "--child", str(n_persons), variant],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--persons", default="100,1000,10000,100000")
    parser.add_argument("--loop-baseline-max", type=int, default=1000,
                        help="largest person count for the naive per-person loop baseline")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 keeps a shared machine's noise down)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        n, variant = int(args.child[0]), args.child[1]
        res = run_loop_baseline(n) if variant == "loop-last" else run_one(n, variant)
        print(json.dumps(res))
        return

    sizes = [int(s) for s in args.persons.split(",")]
    print(f"MLP {FEATURES}→{'→'.join(map(str, HIDDEN))}→1, {OBS_PER_PERSON} obs/person, "
          f"batch {BATCH}, warm epoch incl. M-step, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    header = (f"{'persons':>8} {'variant':>10} {'epoch s':>9} {'×generic':>9} "
              f"{'s/1k obs':>9} {'peak MB':>9}")
    print(header)
    print("  (/pb = person batches: each batch holds whole runs of a few persons' items)")
    print("-" * len(header))
    per_obs: dict[str, dict[int, float]] = {}
    for n in sizes:
        variants = list(VARIANTS) + (["loop-last"] if n <= args.loop_baseline_max else [])
        results = {v: child(n, v, args.threads) for v in variants}
        for v, r in results.items():
            ratio = r["seconds"] / results["generic"]["seconds"]
            k = r["seconds"] / r["n_obs"] * 1000
            per_obs.setdefault(v, {})[n] = k
            print(f"{n:>8} {v:>10} {r['seconds']:>9.2f} {ratio:>9.2f} {k:>9.4f} "
                  f"{r['peak_mb']:>9.0f}")
    if len(sizes) > 1:
        print("\ntime per observation, largest vs smallest person count ≥ 1000 (linear = 1.0):")
        for v, by_n in per_obs.items():
            ns = [n for n in by_n if n >= 1000] or list(by_n)
            if len(ns) > 1:
                print(f"  {v:>10}: {by_n[max(ns)] / by_n[min(ns)]:.2f}× "
                      f"({min(ns)} → {max(ns)} persons)")


if __name__ == "__main__":
    main()
