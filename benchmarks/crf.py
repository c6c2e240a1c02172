"""Speed of the nme.crf kernels against pytorch-crf (torchcrf.CRF) on the same inputs.

Times the log-likelihood forward + backward and Viterbi decoding at batch 256, length 100,
states 4 and 32, and prints the median times and the ratio pytorch-crf time / nme.crf time
(> 1 means nme.crf is faster). pytorch-crf supports one transition matrix shared by the batch
only, so both are timed on a shared matrix; rows marked "per-seq" time nme.crf with one
(batch, states, states) matrix per sequence against pytorch-crf's shared-matrix time.

Run: .venv/bin/python benchmarks/crf.py [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchcrf

from nme import crf

BATCH = 256
LENGTH = 100
STATES = (4, 32)


@dataclass(frozen=True)
class Row:
    states: int
    operation: str
    transitions: str
    lengths: str
    reference_ms: float
    ours_ms: float


def median_times(functions: list[Callable[[], object]], repeats: int, warmup: int) -> list[float]:
    """Median wall time of each function in ms; runs are interleaved so load hits all alike."""
    for _ in range(warmup):
        for function in functions:
            function()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, spent in zip(functions, times, strict=True):
            begin = time.perf_counter()
            function()
            spent.append(time.perf_counter() - begin)
    return [1e3 * statistics.median(spent) for spent in times]


def benchmark_states(states: int, repeats: int, warmup: int, seed: int) -> list[Row]:
    generator = torch.Generator().manual_seed(seed)
    emissions = torch.randn(BATCH, LENGTH, states, generator=generator).requires_grad_()
    tags = torch.randint(states, (BATCH, LENGTH), generator=generator)
    full = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (BATCH,), generator=generator)
    lengths[0] = LENGTH
    variable = torch.arange(LENGTH) < lengths.unsqueeze(1)

    reference = torchcrf.CRF(states, batch_first=True)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(generator=generator)
    shared = reference.transitions.detach().clone().requires_grad_()
    start = reference.start_transitions.detach().clone().requires_grad_()
    end = reference.end_transitions.detach().clone().requires_grad_()
    # One matrix per sequence, as NME-CRF uses (T̄ + Tⁱ of each sequence's person).
    per_sequence = (
        shared.detach() + 0.5 * torch.randn(BATCH, states, states, generator=generator)
    ).requires_grad_()
    leaves = [emissions, shared, start, end, per_sequence, *reference.parameters()]

    def check_agreement(mask: torch.Tensor) -> None:
        """The comparison only means something if both compute the same thing."""
        with torch.no_grad():
            expected = reference(emissions, tags, mask, reduction="none")
            ours = crf.log_likelihood(emissions, tags, mask, shared, start, end)
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-3)
            paths, _ = crf.viterbi_decode(emissions, mask, shared, start, end)
            decoded = reference.decode(emissions, mask)
            assert [row[row >= 0].tolist() for row in paths] == decoded

    def reference_likelihood(mask: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            for leaf in leaves:
                leaf.grad = None
            reference(emissions, tags, mask, reduction="sum").backward()

        return run

    def our_likelihood(mask: torch.Tensor, transitions: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            for leaf in leaves:
                leaf.grad = None
            crf.log_likelihood(emissions, tags, mask, transitions, start, end).sum().backward()

        return run

    def reference_viterbi(mask: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                reference.decode(emissions, mask)

        return run

    def our_viterbi(mask: torch.Tensor, transitions: torch.Tensor) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                crf.viterbi_decode(emissions, mask, transitions, start, end)

        return run

    rows = []
    for mask, lengths_name in ((full, "full"), (variable, "50-100")):
        check_agreement(mask)
        for operation, reference_run, our_run in (
            ("log-likelihood fwd+bwd", reference_likelihood, our_likelihood),
            ("viterbi", reference_viterbi, our_viterbi),
        ):
            timed = [reference_run(mask), our_run(mask, shared)]
            if lengths_name == "full":
                timed.append(our_run(mask, per_sequence))
            times = median_times(timed, repeats, warmup)
            rows.append(Row(states, operation, "shared", lengths_name, times[0], times[1]))
            if lengths_name == "full":
                rows.append(Row(states, operation, "per-seq", lengths_name, times[0], times[2]))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    # One thread by default: at these sizes the kernels are bound by per-operation latency, and
    # on a shared machine intra-op threads make every timing hostage to the other processes.
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    rows = [
        row
        for states in STATES
        for row in benchmark_states(states, args.repeats, args.warmup, args.seed)
    ]
    print(
        f"CRF kernels, batch {BATCH}, length {LENGTH}, float32, CPU, torch {torch.__version__} "
        f"(intra-op threads: {torch.get_num_threads()}); median of {args.repeats} interleaved runs"
    )
    header = (
        f"{'states':>6}  {'operation':<23} {'transitions':<11} {'lengths':<7} "
        f"{'pytorch-crf ms':>14} {'nme.crf ms':>10} {'ratio':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.states:>6}  {row.operation:<23} {row.transitions:<11} {row.lengths:<7} "
            f"{row.reference_ms:>14.2f} {row.ours_ms:>10.2f} "
            f"{row.reference_ms / row.ours_ms:>6.2f}x"
        )
    print(
        "ratio = pytorch-crf time / nme.crf time (> 1: nme.crf faster). per-seq rows: nme.crf "
        "with one transition matrix per sequence vs pytorch-crf with its shared matrix."
    )


if __name__ == "__main__":
    main()
