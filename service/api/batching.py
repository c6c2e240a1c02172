"""Coalescing concurrent calls into one: many single-user predictions, one thread hop, one
query, one forward pass.

An app backend sends one prediction per user and screen, so under load a model sees many small
requests at once. Each on its own costs a thread hop, a θⁱ query and a forward pass of about the
same price whether it holds one user or a hundred. :class:`Coalescer` runs the requests for the
same key (a model name) that arrive while an earlier batch is being answered as *one* call in a
worker thread, and hands every caller its own outcome.

It never waits for company: a request that finds nothing in flight starts at once, so an idle
service answers as fast as before; batches form only from requests that would otherwise have
queued. One batch per key is in flight at a time — the forward passes of one model were
serialised by its lock anyway — and a batch holds at most ``max_weight`` items (one request
over that runs alone).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import anyio.to_thread

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

Outcome = R | BaseException
"""A caller's answer: its result, or the exception to raise in that caller."""


class Coalescer(Generic[K, T, R]):
    """Runs concurrent :meth:`submit` calls of one key together.

    Args:
        run: ``run(key, requests) -> outcomes``, called in a worker thread with the requests of
            one batch in arrival order; returns one outcome per request, in the same order (a
            result, or an exception for that request alone). An exception raised by ``run``
            itself goes to every caller of the batch.
        weight: a request's size (its number of items).
        max_weight: the most items in one batch (a heavier request still runs, alone).
    """

    def __init__(
        self,
        run: Callable[[K, list[T]], list[Outcome[R]]],
        *,
        weight: Callable[[T], int],
        max_weight: int,
    ) -> None:
        self._run = run
        self._weight = weight
        self._max_weight = max_weight
        self._pending: dict[K, list[tuple[T, asyncio.Future[Outcome[R]]]]] = {}
        self._draining: dict[K, asyncio.Task[None]] = {}

    async def submit(self, key: K, request: T) -> R:
        """The outcome of ``request``, answered together with whatever else is queued for
        ``key``; raises the request's exception."""
        future: asyncio.Future[Outcome[R]] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((request, future))
        if key not in self._draining:
            self._draining[key] = asyncio.create_task(self._drain(key))
        outcome = await future
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _drain(self, key: K) -> None:
        """Answer ``key``'s queue batch by batch until it is empty."""
        batch: list[tuple[T, asyncio.Future[Outcome[R]]]] = []
        try:
            while self._pending.get(key):
                batch = self._take(key)
                requests = [request for request, _ in batch]
                try:
                    outcomes = await anyio.to_thread.run_sync(self._run, key, requests)
                    if len(outcomes) != len(batch):
                        raise RuntimeError(
                            f"{len(outcomes)} outcomes for a batch of {len(batch)} requests"
                        )
                except Exception as error:  # noqa: BLE001 — each caller re-raises it
                    outcomes = [error] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():  # its caller may have gone (disconnect, timeout)
                        future.set_result(outcome)
                batch = []
        except BaseException as stop:  # cancelled (shutdown): no caller waits for ever
            for _, future in batch + self._pending.pop(key, []):
                if not future.done():
                    future.set_exception(
                        stop if isinstance(stop, Exception) else asyncio.CancelledError()
                    )
            raise
        finally:
            # No await since the loop's last check: nothing can have been queued in between.
            self._draining.pop(key, None)

    def _take(self, key: K) -> list[tuple[T, asyncio.Future[Outcome[R]]]]:
        """The next batch of ``key``: queued requests in order, up to ``max_weight`` items
        (at least one request); requests whose callers left are dropped."""
        queue = [entry for entry in self._pending[key] if not entry[1].done()]
        batch: list[tuple[T, asyncio.Future[Outcome[R]]]] = []
        total = 0
        for entry in queue:
            size = self._weight(entry[0])
            if batch and total + size > self._max_weight:
                break
            batch.append(entry)
            total += size
        rest = queue[len(batch):]
        if rest:
            self._pending[key] = rest
        else:
            self._pending.pop(key, None)
        return batch

    async def aclose(self) -> None:
        """Cancel the batches in flight (their callers get ``CancelledError``)."""
        tasks = list(self._draining.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):  # shutting down: the outcome is moot
                await task
