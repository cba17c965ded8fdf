"""The loop shared by the ledger's group-commit writers (`polling.PollWriter`, `submission.TryLog`).

One writer thread does every database write of a batch, so the event loop goes on sending and
receiving while the ledger commits; a task on the loop wakes when a batch is due (`_wake_now`, or
`_flush_soon`: after `flush_after_s`), takes what is queued (`_take`) and writes it (`_write`).
`close` writes what is queued, then stops. What a batch is, when it is due, how it is written and
how its waiters learn the outcome is each writer's own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

Batch = TypeVar("Batch")
T = TypeVar("T")


class WriterLoop(Generic[Batch]):
    def __init__(self, *, flush_after_s: float, thread_name: str):
        self._flush_after_s = flush_after_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._task = asyncio.ensure_future(self._run())

    @property
    def stopped(self) -> bool:
        return self._closing or self._task.done()

    def _wake_now(self) -> None:
        self._wake.set()

    def _flush_soon(self) -> None:
        """Write within `flush_after_s` even if no fuller batch comes."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_after_s, self._wake.set)

    async def _in_writer_thread(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(function, *args, **kwargs)
        )

    async def close(self) -> None:
        """Write what is queued, then stop."""
        self._closing = True
        self._wake.set()
        try:
            await asyncio.shield(self._task)
        finally:
            self._executor.shutdown(wait=False)

    def _take(self) -> Batch | None:
        """What to write now, taken off the queues; None when nothing is queued."""
        raise NotImplementedError

    async def _write(self, batch: Batch) -> None:
        """Write `batch` (its database part through `_in_writer_thread`) and answer its waiters."""
        raise NotImplementedError

    def _stopped_by(self, error: BaseException) -> None:
        """The loop itself failed (not one write): tell whoever still waits. Nothing by default."""

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                batch = self._take()
                if batch is None:
                    if self._closing:
                        return
                    continue
                await self._write(batch)
                if self._closing:
                    self._wake.set()  # what was queued meanwhile, then stop
        except BaseException as exc:
            self._stopped_by(exc)
            raise
