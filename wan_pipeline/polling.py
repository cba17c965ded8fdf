"""Polling the generations the ledger is waiting on, without holding a worker between polls.

Each generation carries its own next poll time in the ledger (first poll near its expected processing
time, then a capped backoff from the client's `PollSchedule`), so one call polls only what is due,
concurrently, and within a time budget: a sensor tick stays well inside Dagster's 60 s limit whatever
the backlog, and an ad-hoc run can wait by calling it in a loop. The answers' ledger writes go in
batches (one transaction each) on a writer thread (`PollWriter`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from wan_pipeline.api import ApiError, AsyncAimlApiClient, ClientConfig, GenerationNotFound, PollSchedule
from wan_pipeline.ledger import PENDING_REMOTE, Ledger, LedgerRow, State
from wan_pipeline.ledger.store import PollAnswer
from wan_pipeline.ledger.writer import WriterLoop

log = logging.getLogger(__name__)

NOT_FOUND = "not_found"
# A generation the provider answers 404 for is failed only when it still does this long after its
# create, and after more than one 404 (see `_poll_one`).
NOT_FOUND_GRACE = timedelta(minutes=15)
MAX_PENDING = timedelta(hours=24)


@dataclass
class PollReport:
    polled: int = 0
    completed: int = 0
    failed: int = 0
    still_pending: int = 0
    errors: list[str] = field(default_factory=list)
    unfinished: int = 0  # due rows left for the next call (time budget or bound reached)
    elapsed_s: float = 0.0

    def add(self, other: PollReport) -> None:
        for name in ("polled", "completed", "failed", "still_pending", "unfinished"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)
        self.elapsed_s += other.elapsed_s


def _utcnow() -> datetime:
    return datetime.now(UTC)


# Poll results are written in batches of at most this many rows, or after this long, whichever first.
WRITE_BATCH = 250
WRITE_FLUSH_AFTER_S = 0.05


class PollWriter(WriterLoop[list[tuple[PollAnswer, Callable[[State | Exception], None]]]]):
    """Writes poll results to the ledger in batches (`Ledger.record_polls`: one transaction each), on
    one writer thread, so the event loop keeps polling while the database commits.

    A result is applied as `record_poll` / `postpone_poll` would apply it (the move checked, a row
    another writer moved refused); `done(outcome)` then runs on the loop with the row's new state or
    the exception the one-row call would have raised. A result not yet written when the process dies
    is lost, which is safe: the row is still due and is polled again.
    """

    def __init__(self, ledger: Ledger, *, batch: int = WRITE_BATCH, flush_after_s: float = WRITE_FLUSH_AFTER_S):
        self._ledger = ledger
        self._batch = batch
        self._queue: list[tuple[PollAnswer, Callable[[State | Exception], None]]] = []
        self.transactions = 0
        super().__init__(flush_after_s=flush_after_s, thread_name="wan-poll-writer")

    def add(self, answer: PollAnswer, done: Callable[[State | Exception], None]) -> None:
        if self.stopped:
            raise RuntimeError("the poll writer has stopped")
        self._queue.append((answer, done))
        if len(self._queue) >= self._batch:
            self._wake_now()
        else:
            self._flush_soon()

    def _take(self) -> list[tuple[PollAnswer, Callable[[State | Exception], None]]] | None:
        queued, self._queue = self._queue[: self._batch], self._queue[self._batch :]
        if self._queue:
            self._wake_now()  # more than a batch waiting: another transaction right after
        return queued or None

    async def _write(self, queued: list[tuple[PollAnswer, Callable[[State | Exception], None]]]) -> None:
        try:
            outcomes: list[State | Exception] = await self._in_writer_thread(
                self._ledger.record_polls, [answer for answer, _ in queued]
            )
            self.transactions += 1
        except Exception as exc:  # the database itself: every result of the batch is unwritten
            outcomes = [exc] * len(queued)
        for (_, done), outcome in zip(queued, outcomes, strict=True):
            done(outcome)


async def _poll_one(
    writer: PollWriter, client: AsyncAimlApiClient, schedule: PollSchedule, row: LedgerRow, report: PollReport
) -> None:
    """Poll one generation and queue what its answer means for the ledger (counted once written)."""

    def counted(*names: str) -> Callable[[State | Exception], None]:
        def done(outcome: State | Exception) -> None:
            if isinstance(outcome, Exception):
                report.errors.append(repr(outcome))
                return
            for name in names:
                setattr(report, name, getattr(report, name) + 1)

        return done

    try:
        generation = await client.get(row.generation_id)
    except GenerationNotFound as exc:
        report.polled += 1
        age = _utcnow() - row.submitted_at if row.submitted_at else timedelta(0)
        if row.raw_status != NOT_FOUND or age < NOT_FOUND_GRACE:
            # A paid generation is not given up on one 404 (a replica that has not seen it yet, a
            # gateway hiccup): ask again, and remember that it was not found.
            retry_at = _utcnow() + timedelta(seconds=schedule.max_interval_s)
            writer.add(PollAnswer(row.request_key, raw_status=NOT_FOUND, next_poll_at=retry_at, postpone=True),
                       counted("still_pending"))  # fmt: skip
            return
        # Still unknown well after it was created (expired after 24 h, or another API's id).
        error = f"the provider does not know generation {row.generation_id}: {exc.message}"
        writer.add(PollAnswer(row.request_key, "failed", NOT_FOUND, error=error), counted("failed"))
        return
    except ApiError as exc:
        # Transient after the client's own retries: try again later, never mark it failed for this.
        retry_at = _utcnow() + timedelta(seconds=schedule.max_interval_s)
        writer.add(PollAnswer(row.request_key, next_poll_at=retry_at, postpone=True), counted())
        report.errors.append(f"{row.request_key}: {exc}")
        return
    now = _utcnow()
    elapsed = (now - row.submitted_at).total_seconds() if row.submitted_at else 0.0
    delay = schedule.next_delay(elapsed, row.poll_count + 1, row.expected_seconds)
    status, error = generation.status, generation.error
    if status == "pending" and elapsed > MAX_PENDING.total_seconds():
        # The provider keeps results 24 h: a generation still running past that will not be delivered.
        status, error = "failed", f"still {generation.raw_status} {elapsed / 3600:.0f} h after submission"
    answer = PollAnswer(
        row.request_key,
        status,
        generation.raw_status,
        video_url=generation.video_url,
        video_expires_at=generation.video_expires_at,
        error=error,
        credits_used=generation.credits_used,
        usd_spent=generation.usd_spent,
        next_poll_at=None if status != "pending" else now + timedelta(seconds=delay),
    )
    outcome = {"completed": "completed", "failed": "failed"}.get(status, "still_pending")
    writer.add(answer, counted("polled", outcome))


async def poll_rows_async(
    ledger: Ledger, client: AsyncAimlApiClient, rows: Iterable[LedgerRow], *, time_budget_s: float
) -> PollReport:
    """Poll `rows` concurrently (the client bounds in-flight calls); stop starting new ones at the budget.

    The results are written in batches off the event loop (`PollWriter`); all are written when this returns.
    """
    started = time.monotonic()
    report = PollReport()
    schedule = client.config.poll_schedule
    writer = PollWriter(ledger)
    try:
        tasks = [asyncio.ensure_future(_poll_one(writer, client, schedule, row, report)) for row in rows]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=time_budget_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            report.unfinished += len(pending)
            for task in done:
                if task.exception() is not None:
                    report.errors.append(repr(task.exception()))
    finally:
        await writer.close()
    report.elapsed_s = time.monotonic() - started
    return report


ClientFactory = Callable[[], AsyncAimlApiClient]


def _factory(client: ClientConfig | ClientFactory) -> ClientFactory:
    """The caller's client factory (a Dagster resource's, say); a bare config is for scripts and tests.
    A factory, not a client: an httpx async client belongs to one event loop, and each call runs its own."""
    if isinstance(client, ClientConfig):
        return lambda: AsyncAimlApiClient(client)
    return client


def poll_due(
    ledger: Ledger,
    client: ClientConfig | ClientFactory,
    *,
    limit: int,
    time_budget_s: float,
    now: datetime | None = None,
) -> PollReport:
    """One bounded batch: the `limit` generations whose next poll time has come, within the budget."""
    due = ledger.due_for_poll(now or _utcnow(), limit + 1)  # one more, to know whether any is left over
    rows = due[:limit]
    make_client = _factory(client)

    async def run() -> PollReport:
        async with make_client() as client:
            return await poll_rows_async(ledger, client, rows, time_budget_s=time_budget_s)

    report = asyncio.run(run()) if rows else PollReport()
    report.unfinished += len(due) - len(rows)
    return report


def wait_until_terminal(
    ledger: Ledger,
    client: ClientConfig | ClientFactory,
    request_keys: Iterable[str],
    *,
    deadline_s: float,
    on_progress: Callable[[PollReport, int], None] | None = None,
) -> list[LedgerRow]:
    """Poll `request_keys` at their own next poll times until none is pending at the provider.

    Returns the rows still pending when the deadline passed (empty when everything finished).
    """
    keys = set(request_keys)
    give_up_at = time.monotonic() + deadline_s
    make_client = _factory(client)

    async def run() -> list[LedgerRow]:
        async with make_client() as client:
            while True:
                pending = [row for row in ledger.rows_for_keys(keys) if row.state in PENDING_REMOTE]
                if not pending or time.monotonic() >= give_up_at:
                    return pending
                now = _utcnow()
                due = [row for row in pending if row.next_poll_at is None or row.next_poll_at <= now]
                if due:
                    remaining = give_up_at - time.monotonic()
                    report = await poll_rows_async(ledger, client, due, time_budget_s=max(remaining, 1.0))
                    if on_progress:
                        on_progress(report, len(pending))
                    continue
                next_at = min(row.next_poll_at for row in pending)
                sleep_s = (next_at - now).total_seconds()
                if time.monotonic() + sleep_s > give_up_at:
                    return pending
                await asyncio.sleep(max(sleep_s, 0.05))

    return asyncio.run(run())
