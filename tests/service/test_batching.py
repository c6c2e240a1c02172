"""The coalescer behind predictions: concurrent requests of one key share one call, every caller
gets its own outcome, and nobody waits for company or for ever."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.api.batching import Coalescer


class Recorder:
    """A ``run`` that records its batches; ``gate`` holds the first call until released."""

    def __init__(self, fail_on: str | None = None, raise_on: str | None = None) -> None:
        self.batches: list[tuple[str, list[str]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on
        self.raise_on = raise_on

    def __call__(self, key: str, requests: list[str]) -> list[str | BaseException]:
        self.gate.wait(5)
        self.batches.append((key, list(requests)))
        if self.raise_on in requests:
            raise RuntimeError("the whole batch failed")
        return [
            ValueError(r) if r == self.fail_on else f"{key}:{r.upper()}" for r in requests
        ]


def coalescer(run: Recorder, max_weight: int = 100) -> Coalescer[str, str, str]:
    return Coalescer(run, weight=len, max_weight=max_weight)


async def started(n: int, submit: object) -> list[asyncio.Task]:
    """``n`` tasks of ``submit(i)``, each given the chance to queue before the next."""
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(submit(i)))  # type: ignore[operator]
        await asyncio.sleep(0)
    return tasks


def test_an_idle_coalescer_answers_at_once() -> None:
    run = Recorder()

    async def main() -> None:
        c = coalescer(run)
        assert await c.submit("m", "a") == "m:A"
        assert await c.submit("m", "b") == "m:B"

    asyncio.run(main())
    assert run.batches == [("m", ["a"]), ("m", ["b"])]


def test_requests_queued_behind_a_batch_run_together_in_order() -> None:
    run = Recorder()
    run.gate.clear()

    async def main() -> list[str]:
        c = coalescer(run)
        tasks = await started(6, lambda i: c.submit("m", f"r{i}"))
        await asyncio.sleep(0.05)
        run.gate.set()
        return await asyncio.gather(*tasks)

    answers = asyncio.run(main())
    assert answers == [f"m:R{i}" for i in range(6)]
    # the first went alone (nothing to wait for); the five behind it as one batch
    assert run.batches == [("m", ["r0"]), ("m", ["r1", "r2", "r3", "r4", "r5"])]


def test_keys_never_share_a_batch() -> None:
    run = Recorder()
    run.gate.clear()

    async def main() -> list[str]:
        c = coalescer(run)
        tasks = await started(4, lambda i: c.submit("ab"[i % 2], f"r{i}"))
        await asyncio.sleep(0.05)
        run.gate.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == ["a:R0", "b:R1", "a:R2", "b:R3"]
    for key, requests in run.batches:
        assert {int(r[1:]) % 2 for r in requests} == {"ab".index(key)}


def test_an_error_for_one_request_stays_with_it() -> None:
    run = Recorder(fail_on="bad")
    run.gate.clear()

    async def main() -> list[object]:
        c = coalescer(run)
        tasks = await started(4, lambda i: c.submit("m", ["x", "bad", "y", "z"][i]))
        await asyncio.sleep(0.05)
        run.gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, bad, *rest = asyncio.run(main())
    assert first == "m:X" and rest == ["m:Y", "m:Z"]
    assert isinstance(bad, ValueError) and str(bad) == "bad"
    assert any(len(requests) > 1 for _, requests in run.batches)


def test_an_error_of_the_whole_batch_reaches_each_caller_and_the_next_batch_runs() -> None:
    run = Recorder(raise_on="boom")
    run.gate.clear()

    async def main() -> tuple[list[object], str]:
        c = coalescer(run)
        tasks = await started(3, lambda i: c.submit("m", ["first", "boom", "other"][i]))
        await asyncio.sleep(0.05)
        run.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes, await c.submit("m", "later")

    (first, boom, other), later = asyncio.run(main())
    assert first == "m:FIRST"
    assert isinstance(boom, RuntimeError) and isinstance(other, RuntimeError)
    assert later == "m:LATER"


def test_batches_respect_the_weight_limit_and_a_heavy_request_runs_alone() -> None:
    run = Recorder()
    run.gate.clear()
    requests = ["a" * 4, "b" * 4, "c" * 4, "d" * 20, "e"]

    async def main() -> list[str]:
        c = coalescer(run, max_weight=8)
        tasks = await started(len(requests), lambda i: c.submit("m", requests[i]))
        await asyncio.sleep(0.05)
        run.gate.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(main()) == [f"m:{r.upper()}" for r in requests]
    assert [batch for _, batch in run.batches] == [
        ["aaaa"], ["bbbb", "cccc"], ["d" * 20], ["e"]
    ]


def test_a_caller_that_left_is_dropped_from_the_next_batch() -> None:
    run = Recorder()
    run.gate.clear()

    async def main() -> list[object]:
        c = coalescer(run)
        tasks = await started(3, lambda i: c.submit("m", f"r{i}"))
        tasks[1].cancel()
        await asyncio.sleep(0.05)
        run.gate.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, cancelled, third = asyncio.run(main())
    assert (first, third) == ("m:R0", "m:R2")
    assert isinstance(cancelled, asyncio.CancelledError)
    assert ("m", ["r2"]) in run.batches
    assert all("r1" not in batch for _, batch in run.batches)


def test_closing_fails_waiting_callers_instead_of_leaving_them_hanging() -> None:
    run = Recorder()
    run.gate.clear()

    async def main() -> list[object]:
        c = coalescer(run)
        tasks = await started(3, lambda i: c.submit("m", f"r{i}"))
        await asyncio.sleep(0.01)
        started_at = time.monotonic()
        await c.aclose()
        run.gate.set()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), timeout=5
        )
        assert time.monotonic() - started_at < 5
        return outcomes

    outcomes = asyncio.run(main())
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)


@pytest.mark.parametrize("count", [1, 50])
def test_many_concurrent_callers_each_get_their_own_answer(count: int) -> None:
    run = Recorder()

    async def main() -> list[str]:
        c = coalescer(run, max_weight=10_000)
        return await asyncio.gather(*(c.submit("m", f"r{i}") for i in range(count)))

    assert asyncio.run(main()) == [f"m:R{i}" for i in range(count)]
    assert sum(len(batch) for _, batch in run.batches) == count
