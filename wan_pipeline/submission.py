"""Write-ahead submission of a prompt set: buy each request at most once from the API in use.

`plan_submission` decides what to create: only requests this API scope has never bought (`planned`,
or unknown), plus, on explicit request, `in_doubt` rows (the answer was lost: they may be paid for)
or `failed` ones. A dry run plans from a read of the ledger and writes nothing.

`submit_planned` sends each create through the client, which reports every HTTP try (`CreateTry`)
before it is sent and when its answer arrives; the ledger records each one (see
`wan_pipeline.ledger.store`), so two processes never send the same create, a definite refusal frees
the claim before any retry wait, and only a try that was sent and never answered is in doubt. What
a failure means for the money is the one answer the client gives: `exc.created` (True, False, None).
The records go through a group commit (`TryLog`): one transaction for the claims waiting at once,
each create sent only after its own try row is committed; at most `max_concurrency` tries are ever on
record as sent and unanswered, so that is what a crash can leave in doubt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

from wan_pipeline.api import (
    AsyncAimlApiClient,
    AuthenticationError,
    CreateTry,
    OutOfCredits,
    RequestRejected,
)
from wan_pipeline.api.pacing import PacerStop
from wan_pipeline.catalog import allowed_roots_for
from wan_pipeline.ledger import (
    DEFAULT_STALE_AFTER_S,
    AttemptClaim,
    AttemptOutcome,
    AttemptReason,
    ClaimLost,
    KnownRequest,
    Ledger,
    PlannedRequest,
    State,
    TryAnswer,
    utcnow,
)
from wan_pipeline.ledger.store import AcceptedTry, TrySending
from wan_pipeline.ledger.writer import WriterLoop
from wan_pipeline.models import VideoRequest
from wan_pipeline.safe_text import printable

log = logging.getLogger(__name__)
T = TypeVar("T")

ALL = "all"  # resubmit every in-doubt request of the set
# What `exc.created` reads as for an exception that does not say (a bug, a cancellation): the client
# never judged it, so nothing is known about the money.
UNJUDGED = object()


class CatalogRequestLike(Protocol):
    """What submission reads from a catalog request (`wan_pipeline.catalog.CatalogRequest`)."""

    request_key: str
    request: VideoRequest
    estimated_usd: float
    image_sha256: str | None
    audio_sha256: str | None
    source_file: str

    def provenance_request(self) -> dict[str, Any]: ...


class BudgetExceeded(RuntimeError):
    """What a run would newly buy is estimated above its `max_usd`: nothing was created."""


@dataclass(frozen=True)
class InDoubtSelection:
    """Which in-doubt requests the user explicitly asked to buy again: "all", set names or request keys."""

    names: frozenset[str] = frozenset()

    @classmethod
    def of(cls, value: bool | str | Iterable[str] | None) -> InDoubtSelection:
        if value is True:
            return cls(frozenset({ALL}))
        if not value:
            return cls()
        items = value.split(",") if isinstance(value, str) else value
        return cls(frozenset(item.strip() for item in items if item.strip()))

    def __bool__(self) -> bool:
        return bool(self.names)

    def selects(self, request_key: str, prompt_set: str) -> bool:
        return bool(self.names & {ALL, prompt_set, request_key})


@dataclass(frozen=True)
class PlannedCreate:
    request: CatalogRequestLike
    attempt: int  # the attempt number the create will be sent as
    reason: AttemptReason
    requeue_from: State | None = None  # the state an explicit resubmit/retry takes it from


@dataclass
class SubmissionPlan:
    prompt_set: str
    to_submit: list[PlannedCreate]  # to create now: never bought here, or explicitly requeued
    reused: list[tuple[str, State]]  # bought or being bought already: never created again
    in_doubt: list[str]  # left alone (resubmitted only when selected)
    rejected: list[str]  # the API refused them (400): the request must change
    failed: list[str]  # the provider failed them (retried only with retry_failed)
    dry_run: bool = False
    # Claimed by another process right now, or left mid-create by one that died (a real run settles
    # those first; a dry run does not write, so it can only say so): not bought here, not reused.
    claimed: list[str] = field(default_factory=list)

    @property
    def estimated_usd(self) -> float:
        """Estimated cost of what this plan would newly create."""
        return sum(item.request.estimated_usd or 0.0 for item in self.to_submit)

    @property
    def total(self) -> int:
        parts = (self.to_submit, self.reused, self.in_doubt, self.rejected, self.failed, self.claimed)
        return sum(len(part) for part in parts)

    def describe(self) -> str:
        """One line: what a run would buy, reuse and leave alone, and its cost."""
        parts = [
            f"{self.prompt_set}: {self.total} generation(s); would newly buy {len(self.to_submit)} "
            f"(estimated ${self.estimated_usd:.4f}), reuse {len(self.reused)} ($0)"
        ]
        labels = (
            ("in doubt, left alone", self.in_doubt),
            ("rejected", self.rejected),
            ("failed", self.failed),
            ("being created by another process or left mid-create", self.claimed),
        )
        for label, keys in labels:
            if keys:
                parts.append(f"{len(keys)} {label}")
        return ", ".join(parts)


@dataclass
class SubmissionReport:
    plan: SubmissionPlan
    new: int = 0  # creates accepted now
    reused: int = 0  # requests already bought, or claimed by another process meanwhile
    in_doubt: list[str] = field(default_factory=list)  # every in-doubt key of the set after this run
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, message), rejected by this run
    failed_to_submit: list[tuple[str, str]] = field(default_factory=list)  # (key, why); still planned
    credits_used: float = 0.0
    usd_spent: float = 0.0
    stopped_by: str | None = None  # why creating stopped early (401, 403, a quota), with what was bought before
    auth_failed: bool = False
    out_of_credits: bool = False
    # The provider's rate limit asked for a longer wait than the client makes (a quota): creating
    # stopped, the rest stays planned (a 429 is a definite "not created"); creates resume after this (UTC).
    rate_limited: bool = False
    rate_limited_until: datetime | None = None  # None with rate_limited: the provider did not say
    rate_limited_429s: int = 0  # 429 answers to this run's creates, waited out or not

    @classmethod
    def of_plan(cls, plan: SubmissionPlan) -> SubmissionReport:
        return cls(plan=plan, reused=len(plan.reused), in_doubt=list(plan.in_doubt))


def learned_expectation(ledger: Ledger, override_s: float | None) -> Callable[[VideoRequest], float | None]:
    """Expected processing time per request shape: the configured override, else what the ledger has
    observed for that model, resolution and duration, else None (the poll schedule then probes)."""
    if override_s is not None:
        return lambda request: override_s
    learned: dict[tuple[str, str, int], float | None] = {}

    def expected(request: VideoRequest) -> float | None:
        shape = (request.model, request.resolution, request.duration)
        if shape not in learned:
            learned[shape] = ledger.observed_processing_seconds(*shape)
        return learned[shape]

    return expected


def planned_request(request: CatalogRequestLike) -> PlannedRequest:
    video = request.request
    return PlannedRequest(
        request_key=request.request_key,
        model=video.model,
        request_json=request.provenance_request(),
        estimated_usd=request.estimated_usd,
        expected_seconds=None,  # set at submit time, from what the ledger has observed
    )


def _decide(
    prompt_set: str,
    unique: dict[str, CatalogRequestLike],
    known: dict[str, KnownRequest],
    resubmit_in_doubt: InDoubtSelection,
    retry_failed: bool,
    dry_run: bool,
) -> SubmissionPlan:
    plan = SubmissionPlan(prompt_set, [], [], [], [], [], dry_run=dry_run)
    for key, request in unique.items():
        found = known.get(key)
        state = found.state if found else State.PLANNED
        attempt = (found.attempts if found else 0) + 1
        if state is State.PLANNED:
            plan.to_submit.append(PlannedCreate(request, attempt, AttemptReason.FIRST))
        elif state is State.IN_DOUBT and resubmit_in_doubt.selects(key, prompt_set):
            plan.to_submit.append(PlannedCreate(request, attempt, AttemptReason.RESUBMIT_IN_DOUBT, State.IN_DOUBT))
        elif state is State.FAILED and retry_failed:
            plan.to_submit.append(PlannedCreate(request, attempt, AttemptReason.RETRY_FAILED, State.FAILED))
        elif state is State.IN_DOUBT:
            plan.in_doubt.append(key)
        elif state is State.REJECTED:
            plan.rejected.append(key)
        elif state is State.FAILED:
            plan.failed.append(key)
        elif state is State.SUBMITTING:
            plan.claimed.append(key)
        else:
            plan.reused.append((key, state))
    return plan


def plan_submission(
    ledger: Ledger,
    prompt_set: str,
    requests: Iterable[CatalogRequestLike],
    *,
    resubmit_in_doubt: InDoubtSelection | bool | str | Iterable[str] | None = None,
    retry_failed: bool = False,
    dry_run: bool = False,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> SubmissionPlan:
    """Decide what to create. Creates nothing.

    For real (not `dry_run`): claims abandoned by dead processes are settled first (so they are not
    reused as if they were progressing) and the set's requests are filed in the ledger. A dry run
    only reads: no row, membership or recovery is written.
    """
    unique: dict[str, CatalogRequestLike] = {}
    for request in requests:
        unique.setdefault(request.request_key, request)
    selection = resubmit_in_doubt if isinstance(resubmit_in_doubt, InDoubtSelection) else InDoubtSelection.of(resubmit_in_doubt)
    if dry_run:
        known = ledger.known(unique)
    else:
        ledger.recover_abandoned(stale_after_s=stale_after_s)
        result = ledger.plan(prompt_set, [planned_request(r) for r in unique.values()])
        known = result.known
    return _decide(prompt_set, unique, known, selection, retry_failed, dry_run)


def try_recorder(
    sending: Callable[[int, str], None], answered: Callable[[int, TryAnswer], None], sent: list[int]
) -> Callable[[CreateTry], None]:
    """The client's `on_try` hook, called in a worker thread: `sending(try, client request id)` before
    each try is sent (its number then goes to `sent`), `answered(try, answer)` once a try's answer is
    judged not to have created anything, or maybe to have, before any retry wait. An accepted create
    is recorded by the caller, with everything its answer carried."""

    def on_try(event: CreateTry) -> None:
        if event.phase == "sending":
            sending(event.try_number, event.client_request_id)
            sent.append(event.try_number)
        elif event.created is not True:
            answered(event.try_number, TryAnswer(event.created, event.status_code, printable(event.detail)))

    return on_try


# Accepted answers wait at most this long for a batch when no claim comes to take them along.
ANSWER_FLUSH_AFTER_S = 0.005


# One transaction's worth: the accepted answers and the claims waiting, each with its waiter's future.
TryBatch = tuple[list[tuple[AcceptedTry, asyncio.Future[None]]], list[tuple[TrySending, asyncio.Future[None]]]]


class TryLog(WriterLoop[TryBatch]):
    """Group commit of a submission's write-ahead records, on one writer thread.

    - `sending` (before a try is sent) waits until its claim and try row are committed: the claims
      waiting at the same moment are committed in one transaction (`Ledger.record_tries`), so a
      window of creates pays for one commit, not one each. A create is never sent before its try row
      is committed; a lost claim raises `ClaimLost` and the try is not sent.
    - `accepted` (an accepted answer) does not wait: the answer joins the next transaction, which
      the next claim starts (so it is durable before the create that took its slot is sent), or
      once `window` answers are waiting, or after `flush_after_s`. After a crash an accepted try whose
      record had not been committed yet is recovered as in doubt (its try row says sent, unanswered):
      safe, never a second purchase.
    - `call` runs any other ledger write (a refusal's answer, settling an attempt) on the same thread,
      in order, one transaction each: those are rare, and wait for their commit.

    What a crash can leave in doubt: a try is 'sent, unanswered' on record from the commit of its
    claim to the commit of its answer. A create holds its slot (`max_concurrency`) from its claim to
    its answer's arrival, and the next claim of that slot is committed together with (or after) that
    answer, so at most `window` (= max_concurrency) tries are on record as sent and unanswered at any
    time: a crash puts at most one window in doubt, exactly as when each try was its own transaction.
    A database error fails the batch as a whole (nothing of it is committed): it is then retried one
    record at a time with the one-try calls, so each record fails or succeeds on its own.
    """

    def __init__(self, ledger: Ledger, *, window: int, flush_after_s: float = ANSWER_FLUSH_AFTER_S):
        self._ledger = ledger
        self._window = max(1, window)
        self._sending: list[tuple[TrySending, asyncio.Future[None]]] = []
        self._accepted: list[tuple[AcceptedTry, asyncio.Future[None]]] = []
        self._failed: BaseException | None = None
        self.commits = 0  # transactions of batched records (for tests and benchmarks)
        super().__init__(flush_after_s=flush_after_s, thread_name="wan-ledger-writer")

    async def sending(self, item: TrySending) -> None:
        """Return once the try is committed as sent; raises `ClaimLost` (do not send) or a database error."""
        future = self._enqueue(self._sending, item)
        self._wake_now()
        await future

    def accepted(self, item: AcceptedTry) -> asyncio.Future[None]:
        """Queue an accepted answer; the future is done once it is committed (or failed to be)."""
        future = self._enqueue(self._accepted, item)
        if len(self._accepted) >= self._window:
            self._wake_now()
        else:
            self._flush_soon()
        return future

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Another ledger write, on the writer thread (after what is queued before it)."""
        return await self._in_writer_thread(function, *args, **kwargs)

    def _enqueue(self, queue: list[tuple[Any, asyncio.Future[None]]], item: Any) -> asyncio.Future[None]:
        if self._failed is not None or self._closing:
            raise RuntimeError("the ledger writer has stopped") from self._failed
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append((item, future))
        return future

    def _take(self) -> TryBatch | None:
        accepted, self._accepted = self._accepted, []
        sending, self._sending = self._sending, []
        return (accepted, sending) if accepted or sending else None

    async def _write(self, batch: TryBatch) -> None:
        for future, error in await self._in_writer_thread(self._commit, *batch):
            if future.done():  # its waiter was cancelled
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def _stopped_by(self, error: BaseException) -> None:
        self._failed = error
        for _item, future in (*self._accepted, *self._sending):
            if not future.done():
                future.set_exception(RuntimeError(f"the ledger writer stopped: {error!r}"))

    def _commit(
        self, accepted: list[tuple[AcceptedTry, asyncio.Future[None]]], sending: list[tuple[TrySending, asyncio.Future[None]]]
    ) -> list[tuple[asyncio.Future[None], BaseException | None]]:
        """On the writer thread: one transaction for the batch, or one record at a time if it fails."""
        results: list[tuple[asyncio.Future[None], BaseException | None]]
        try:
            outcomes = self._ledger.record_tries([a for a, _ in accepted], [s for s, _ in sending])
            self.commits += 1
            results = [(future, None) for _, future in accepted]
            results += [(future, outcome) for (_, future), outcome in zip(sending, outcomes, strict=True)]
        except Exception:
            log.warning("a batch of %d create records failed; recording them one at a time", len(accepted) + len(sending))
            results = [(future, _outcome_of(self._accept_one, item)) for item, future in accepted]
            results += [(future, _outcome_of(self._send_one, item)) for item, future in sending]
        return results

    def _accept_one(self, item: AcceptedTry) -> None:
        self._ledger.try_answered(
            item.request_key, item.attempt, item.try_number, item.answer,
            next_poll_at=item.next_poll_at, expected_seconds=item.expected_seconds,
        )  # fmt: skip

    def _send_one(self, item: TrySending) -> None:
        self._ledger.try_sending(item.request_key, item.attempt, item.try_number, item.client_request_id, item.claim)


def _outcome_of(function: Callable[[Any], None], item: Any) -> BaseException | None:
    try:
        function(item)
    except Exception as exc:
        return exc
    return None


class LoopHook:
    """A client's `on_try` hook whose work is a coroutine on the caller's event loop: the async client
    awaits `anotify` there; a client that runs hooks in a worker thread calls it, and the thread
    waits for the coroutine to finish on the loop."""

    def __init__(self, notify: Callable[[CreateTry], Awaitable[None]]):
        self._notify = notify
        self._loop = asyncio.get_running_loop()

    async def anotify(self, event: CreateTry) -> None:
        await self._notify(event)

    def __call__(self, event: CreateTry) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("call the hook from a worker thread, or await its anotify() on the loop")
        asyncio.run_coroutine_threadsafe(self._notify(event), self._loop).result()


def _first_poll_at(client: AsyncAimlApiClient, expected: float | None, now: datetime) -> datetime:
    return now + timedelta(seconds=client.config.poll_schedule.next_delay(0.0, 0, expected))


async def submit_planned(
    ledger: Ledger,
    client: AsyncAimlApiClient,
    plan: SubmissionPlan,
    *,
    max_concurrency: int,
    run_id: str | None = None,
    allowed_roots: Sequence[Path] = (),
    expected_seconds_fn: Callable[[VideoRequest], float | None] | None = None,
    now_fn: Callable[[], datetime] = utcnow,
) -> SubmissionReport:
    """Create the plan's requests, at most `max_concurrency` at once, each try recorded write-ahead.

    Creating stops after a 401 (the key) or a 403 (out of credits), or when the provider's rate limit
    asks for a longer wait than the client makes (a quota: `rate_limited_until`; shorter waits are
    ridden by the client's pacer): creates in flight finish and are recorded, the rest stay planned,
    and the report says what was bought before the stop. An
    unexpected exception is raised after the batch, its row settled by what was sent. Ledger writes
    run on one writer thread (`TryLog`, a group commit) so a slow database never stalls the event
    loop under in-flight creates, and a window of creates pays for one commit.
    """
    report = SubmissionReport.of_plan(plan)
    for state in (State.IN_DOUBT, State.FAILED):
        keys = [item.request.request_key for item in plan.to_submit if item.requeue_from is state]
        if keys:
            await asyncio.to_thread(ledger.requeue, keys, from_states={state})
    expected_seconds = expected_seconds_fn or learned_expectation(ledger, client.config.expected_seconds)
    # Looked up once per request shape (a read of the ledger), before any create.
    expected_of = await asyncio.to_thread(
        lambda: {item.request.request_key: expected_seconds(item.request.request) for item in plan.to_submit}
    )
    roots_of = functools.lru_cache(maxsize=None)(
        lambda source_file: tuple(allowed_roots_for(Path(source_file), allowed_roots))
    )
    slots = asyncio.Semaphore(max_concurrency)
    trylog = TryLog(ledger, window=max_concurrency)

    async def submit_one(item: PlannedCreate) -> None:
        request, key, attempt = item.request, item.request.request_key, item.attempt
        async with slots:
            if report.stopped_by:
                report.failed_to_submit.append((key, f"not sent: {report.stopped_by}"))
                return
            expected = expected_of[key]
            claim = AttemptClaim(plan.prompt_set, item.reason, run_id)
            sent: list[int] = []  # try numbers sent

            async def record_try(event: CreateTry) -> None:
                if event.phase == "sending":
                    await trylog.sending(TrySending(key, attempt, event.try_number, event.client_request_id, claim))
                    sent.append(event.try_number)
                elif event.created is not True:  # recorded (and committed) before any retry wait
                    answer = TryAnswer(event.created, event.status_code, printable(event.detail))
                    await trylog.call(ledger.try_answered, key, attempt, event.try_number, answer)

            on_try = LoopHook(record_try)

            try:
                generation = await client.submit(
                    request.request,
                    request_key=key,
                    attempt=attempt,
                    allowed_roots=roots_of(request.source_file),
                    media_sha256={"image": request.image_sha256, "audio": request.audio_sha256},
                    on_try=on_try,
                )
            except ClaimLost:
                if sent:  # another process took it between two of our tries
                    await trylog.call(
                        ledger.finish_attempt, key, attempt, AttemptOutcome.NOT_ACCEPTED,
                        "another process claimed it between two tries",
                    )
                report.reused += 1
                return
            except BaseException as exc:  # even a cancellation: the create may have been sent
                await _record_failure(ledger, report, key, attempt, bool(sent), exc)
                _note_rate_limit_stop(report, client)
                if getattr(exc, "created", UNJUDGED) is UNJUDGED:
                    raise
                return
            answer = TryAnswer(
                True,
                detail="accepted",
                generation_id=generation.id,
                raw_status=generation.raw_status,
                credits_used=generation.credits_used,
                usd_spent=generation.usd_spent,
            )
            # Not waited for here: the slot's next claim commits it (see `TryLog`).
            recorded = trylog.accepted(AcceptedTry(
                key, attempt, sent[-1], answer, _first_poll_at(client, expected, now_fn()), expected
            ))  # fmt: skip
        try:
            await recorded
        except Exception as exc:
            # Accepted (paid) but not recorded: keep the id on the try's row at least, and settle the
            # attempt from it (submitted, with its id); the log line is the last resort.
            log.error("generation %s was created for %s but recording it failed: %s", generation.id, key, exc)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(ledger.record_accepted_try, key, attempt, sent[-1], answer)
                await asyncio.to_thread(ledger.settle_abandoned_attempt, key, attempt, "recording the answer failed")
            raise
        report.new += 1
        report.credits_used += generation.credits_used or 0.0
        report.usd_spent += generation.usd_spent or 0.0

    try:
        results = await asyncio.gather(*(submit_one(item) for item in plan.to_submit), return_exceptions=True)
    finally:
        await trylog.close()
    report.rate_limited_429s = _rate_limited_answers(client)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return report


def _note_rate_limit_stop(report: SubmissionReport, client: Any) -> None:
    """Once the client's pacer has stopped creating (the provider's quota asked for a longer wait
    than the client makes), no further create is started: the report says until when."""
    stop: PacerStop | None = getattr(client, "create_stop", None)
    if stop is None or report.stopped_by:
        return
    report.rate_limited, report.rate_limited_until = True, stop.until
    report.stopped_by = stop.describe()


def _rate_limited_answers(client: Any) -> int:
    gate = getattr(client, "create_gate", None)
    return gate.pacer.counts.rate_limited if gate is not None else 0


async def _record_failure(
    ledger: Ledger, report: SubmissionReport, key: str, attempt: int, sent: bool, exc: BaseException
) -> None:
    """Act on what the client says the failure means for the money (`exc.created`)."""
    message = printable(f"{type(exc).__name__}: {exc}", 500)
    if getattr(exc, "created", UNJUDGED) is False:
        if not sent:  # refused before anything was sent (its image changed, say): no attempt was made
            await asyncio.to_thread(ledger.note_not_sent, key, message)
            report.failed_to_submit.append((key, message))
        elif isinstance(exc, RequestRejected):
            await asyncio.to_thread(ledger.finish_attempt, key, attempt, AttemptOutcome.REJECTED, message)
            report.rejected.append((key, message))
        else:
            await asyncio.to_thread(ledger.finish_attempt, key, attempt, AttemptOutcome.NOT_ACCEPTED, message)
            report.failed_to_submit.append((key, message))
        if isinstance(exc, AuthenticationError | OutOfCredits) and not report.stopped_by:
            report.auth_failed = isinstance(exc, AuthenticationError)
            report.out_of_credits = isinstance(exc, OutOfCredits)
            report.stopped_by = f"creating stopped after {message}"
        return
    # May have been created (None), or an unexpected failure: settle the attempt by what was sent.
    state = await asyncio.to_thread(ledger.settle_abandoned_attempt, key, attempt, message) if sent else None
    row = await asyncio.to_thread(ledger.row, key)
    if state is State.IN_DOUBT or (row is not None and row.state is State.IN_DOUBT and sent):
        report.in_doubt.append(key)
    elif not sent:
        report.failed_to_submit.append((key, message))


def check_budget(plans: Collection[SubmissionPlan], max_usd: float | None) -> None:
    """Refuse before any create when what these plans would newly buy is estimated above `max_usd`."""
    if max_usd is None:
        return
    estimate = sum(plan.estimated_usd for plan in plans)
    if estimate > max_usd:
        count = sum(len(plan.to_submit) for plan in plans)
        names = ", ".join(plan.prompt_set for plan in plans)
        raise BudgetExceeded(
            f"{names}: would newly buy {count} generation(s) estimated at ${estimate:.4f}, above the limit of "
            f"${max_usd:.4f}; nothing was submitted"
        )


def submit_prompt_set(
    ledger: Ledger,
    client_factory: Callable[[], AsyncAimlApiClient],
    prompt_set: str,
    requests: Iterable[CatalogRequestLike],
    *,
    max_concurrency: int = 8,
    max_usd: float | None = None,
    dry_run: bool = False,
    resubmit_in_doubt: InDoubtSelection | bool | str | Iterable[str] | None = None,
    retry_failed: bool = False,
    run_id: str | None = None,
    allowed_roots: Sequence[Path] = (),
) -> SubmissionReport:
    """Plan, guard the budget, then create what this API has not bought (nothing on a dry run).

    `max_usd` bounds the estimate of what this run would newly create; above it `BudgetExceeded` is
    raised before any create (a dry run too: it answers "would this run go ahead?"). A dry run writes
    nothing to the ledger.
    """
    requests = list(requests)
    plan = plan_submission(
        ledger, prompt_set, requests, resubmit_in_doubt=resubmit_in_doubt, retry_failed=retry_failed, dry_run=True
    )
    check_budget([plan], max_usd)  # before anything is written
    if dry_run:
        return SubmissionReport.of_plan(plan)
    plan = plan_submission(
        ledger, prompt_set, requests, resubmit_in_doubt=resubmit_in_doubt, retry_failed=retry_failed
    )
    check_budget([plan], max_usd)  # the ledger may have moved on since the first read
    if not plan.to_submit:
        return SubmissionReport.of_plan(plan)

    async def run() -> SubmissionReport:
        async with client_factory() as client:
            return await submit_planned(
                ledger, client, plan, max_concurrency=max_concurrency, run_id=run_id, allowed_roots=allowed_roots
            )

    return asyncio.run(run())
