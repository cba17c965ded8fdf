"""Polling the generations the ledger is waiting on, without holding a worker between polls.

Each generation carries its own next poll time in the ledger (first poll near its expected processing
time, then a capped backoff from the client's `PollSchedule`), so one call polls only what is due,
concurrently, and within a time budget: a sensor tick stays well inside Dagster's 60 s limit whatever
the backlog, and an ad-hoc run can wait by calling it in a loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from wan_pipeline.api import ApiError, AsyncAimlApiClient, ClientConfig, GenerationNotFound, PollSchedule
from wan_pipeline.ledger import PENDING_REMOTE, Ledger, LedgerRow

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


async def _poll_one(
    ledger: Ledger, client: AsyncAimlApiClient, schedule: PollSchedule, row: LedgerRow, report: PollReport
) -> None:
    try:
        generation = await client.get(row.generation_id)
    except GenerationNotFound as exc:
        report.polled += 1
        age = _utcnow() - row.submitted_at if row.submitted_at else timedelta(0)
        if row.raw_status != NOT_FOUND or age < NOT_FOUND_GRACE:
            # A paid generation is not given up on one 404 (a replica that has not seen it yet, a
            # gateway hiccup): ask again, and remember that it was not found.
            retry_at = _utcnow() + timedelta(seconds=schedule.max_interval_s)
            ledger.postpone_poll(row.request_key, retry_at, raw_status=NOT_FOUND)
            report.still_pending += 1
            return
        # Still unknown well after it was created (expired after 24 h, or another API's id).
        ledger.record_poll(
            row.request_key,
            raw_status=NOT_FOUND,
            status="failed",
            video_url=None,
            video_expires_at=None,
            error=f"the provider does not know generation {row.generation_id}: {exc.message}",
            credits_used=None,
            usd_spent=None,
            next_poll_at=None,
        )
        report.failed += 1
        return
    except ApiError as exc:
        # Transient after the client's own retries: try again later, never mark it failed for this.
        retry_at = _utcnow() + timedelta(seconds=schedule.max_interval_s)
        ledger.postpone_poll(row.request_key, retry_at)
        report.errors.append(f"{row.request_key}: {exc}")
        return
    now = _utcnow()
    elapsed = (now - row.submitted_at).total_seconds() if row.submitted_at else 0.0
    delay = schedule.next_delay(elapsed, row.poll_count + 1, row.expected_seconds)
    status, error = generation.status, generation.error
    if status == "pending" and elapsed > MAX_PENDING.total_seconds():
        # The provider keeps results 24 h: a generation still running past that will not be delivered.
        status, error = "failed", f"still {generation.raw_status} {elapsed / 3600:.0f} h after submission"
    ledger.record_poll(
        row.request_key,
        raw_status=generation.raw_status,
        status=status,
        video_url=generation.video_url,
        video_expires_at=generation.video_expires_at,
        error=error,
        credits_used=generation.credits_used,
        usd_spent=generation.usd_spent,
        next_poll_at=None if status != "pending" else now + timedelta(seconds=delay),
    )
    report.polled += 1
    if status == "completed":
        report.completed += 1
    elif status == "failed":
        report.failed += 1
    else:
        report.still_pending += 1


async def poll_rows_async(
    ledger: Ledger, client: AsyncAimlApiClient, rows: Iterable[LedgerRow], *, time_budget_s: float
) -> PollReport:
    """Poll `rows` concurrently (the client bounds in-flight calls); stop starting new ones at the budget."""
    started = time.monotonic()
    report = PollReport()
    schedule = client.config.poll_schedule
    tasks = [asyncio.ensure_future(_poll_one(ledger, client, schedule, row, report)) for row in rows]
    if tasks:
        done, pending = await asyncio.wait(tasks, timeout=time_budget_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        report.unfinished += len(pending)
        for task in done:
            if task.exception() is not None:
                report.errors.append(repr(task.exception()))
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
