"""Write-ahead submission of a prompt set: buy each request at most once.

The ledger is written before and after every create. `plan_submission` files the set's requests
in the ledger and decides what to create: only rows still `planned` (never bought), plus, on
explicit request, `in_doubt` rows (the answer was lost: they may be paid for) or `failed` ones.
`submit_planned` then, for each, claims the row atomically (so two processes working on one set
never create the same request twice), sends the create, and records what the answer means for
the money: `submitted` with the id, `in_doubt` when it cannot be known, `rejected` for a 400, or
back to `planned` when it was surely not accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Protocol

from wan_pipeline.api import (
    ApiError,
    AsyncAimlApiClient,
    AuthenticationError,
    CreateNotAccepted,
    CreateOutcomeUnknown,
    OutOfCredits,
    RateLimited,
    RequestRejected,
)
from wan_pipeline.api_retry import CREATE_RETRY_STATUSES
from wan_pipeline.ledger import (
    DEFAULT_STALE_AFTER_S,
    IllegalTransition,
    Ledger,
    PlannedRequest,
    State,
    utcnow,
)
from wan_pipeline.models import RequestInvalid, VideoRequest
from wan_pipeline.sources import MediaError

log = logging.getLogger(__name__)


class CatalogRequestLike(Protocol):
    """What submission reads from a catalog request (`wan_pipeline.catalog.CatalogRequest`)."""

    request_key: str
    request: VideoRequest
    estimated_usd: float

    def provenance_request(self) -> dict[str, Any]: ...


class BudgetExceeded(RuntimeError):
    """What a run would newly buy is estimated above its `max_usd`: nothing was created."""


@dataclass
class SubmissionPlan:
    prompt_set: str
    to_submit: list[CatalogRequestLike]  # to create now: never bought, or explicitly requeued
    reused: list[tuple[str, State]]  # bought or being bought already: never created again
    in_doubt: list[str]  # left alone (resubmitted only with resubmit_in_doubt)
    rejected: list[str]  # the API refused them (400): the request must change
    failed: list[str]  # the provider failed them (retried only with retry_failed)
    # States the rows of `to_submit` may be requeued from, as the caller explicitly asked.
    requeue_from: frozenset[State] = frozenset()

    @property
    def estimated_usd(self) -> float:
        """Estimated cost of what this plan would newly create."""
        return sum(r.estimated_usd or 0.0 for r in self.to_submit)


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
    out_of_credits: bool = False
    dry_run: bool = False

    @property
    def would_submit(self) -> list[CatalogRequestLike]:
        """A dry run's answer: what a real run would create now."""
        return self.plan.to_submit if self.dry_run else []

    @classmethod
    def of_plan(cls, plan: SubmissionPlan, *, dry_run: bool) -> SubmissionReport:
        return cls(plan=plan, reused=len(plan.reused), in_doubt=list(plan.in_doubt), dry_run=dry_run)


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


def requeue_states(*, resubmit_in_doubt: bool, retry_failed: bool) -> frozenset[State]:
    """The states a submission may buy again: only those the user explicitly asked for."""
    asked = ((State.IN_DOUBT, resubmit_in_doubt), (State.FAILED, retry_failed))
    return frozenset(state for state, yes in asked if yes)


def would_create(state: State | None, requeue_from: frozenset[State]) -> bool:
    """Whether a request in `state` (None: unknown to the ledger) is created by a submission."""
    return state is None or state == State.PLANNED or state in requeue_from


def estimate_new_spend(
    ledger: Ledger,
    requests: Iterable[CatalogRequestLike],
    *,
    resubmit_in_doubt: bool = False,
    retry_failed: bool = False,
) -> float:
    """Estimated USD of what submitting `requests` would newly buy. Reads the ledger, writes nothing."""
    unique = {r.request_key: r for r in requests}
    states = {row.request_key: row.state for row in ledger.rows_for_keys(unique)}
    requeue_from = requeue_states(resubmit_in_doubt=resubmit_in_doubt, retry_failed=retry_failed)
    return sum(r.estimated_usd for key, r in unique.items() if would_create(states.get(key), requeue_from))


def plan_submission(
    ledger: Ledger,
    prompt_set: str,
    requests: Iterable[CatalogRequestLike],
    *,
    resubmit_in_doubt: bool = False,
    retry_failed: bool = False,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> SubmissionPlan:
    """File the set's requests in the ledger and decide what to create. Creates nothing.

    Claims abandoned by dead processes are recovered first (as in doubt), so they are not reused as
    if they were progressing. In-doubt and failed rows are only planned for resubmission when asked;
    the requeue itself happens in `submit_planned`, so a dry run or a refused budget changes nothing.
    """
    ledger.recover_abandoned(stale_after_s=stale_after_s)
    unique: dict[str, CatalogRequestLike] = {}
    for request in requests:
        unique.setdefault(request.request_key, request)
    result = ledger.plan(prompt_set, [planned_request(r) for r in unique.values()])
    states = {key: State.PLANNED for key in result.new} | result.known
    requeue_from = requeue_states(resubmit_in_doubt=resubmit_in_doubt, retry_failed=retry_failed)
    plan = SubmissionPlan(prompt_set, [], [], [], [], [], requeue_from)
    for request in unique.values():
        key, state = request.request_key, states[request.request_key]
        if would_create(state, requeue_from):
            plan.to_submit.append(request)
        elif state == State.IN_DOUBT:
            plan.in_doubt.append(key)
        elif state == State.REJECTED:
            plan.rejected.append(key)
        elif state == State.FAILED:
            plan.failed.append(key)
        else:
            plan.reused.append((key, state))
    return plan


class _Outcome(Enum):
    RELEASE = "release"  # surely not accepted: nothing bought, back to planned
    IN_DOUBT = "in_doubt"  # may exist and be billed
    REJECT = "reject"  # the request itself is bad


def _failure_outcome(exc: BaseException) -> _Outcome:
    """What a failed create means for the money. When it cannot be known, it is in doubt."""
    if isinstance(exc, RequestRejected):
        return _Outcome.REJECT
    if isinstance(exc, CreateOutcomeUnknown):
        return _Outcome.IN_DOUBT
    # Refused at the door, or before it: unreadable media is refused before any call is made.
    if isinstance(
        exc,
        CreateNotAccepted | RateLimited | OutOfCredits | AuthenticationError | MediaError | RequestInvalid,
    ):
        return _Outcome.RELEASE
    if isinstance(exc, ApiError) and exc.status_code is not None:
        if 400 <= exc.status_code < 500 or exc.status_code in CREATE_RETRY_STATUSES:
            return _Outcome.RELEASE
    return _Outcome.IN_DOUBT


def _is_expected_create_failure(exc: BaseException) -> bool:
    """Failures the ledger and the report fully answer; anything else is raised after the batch."""
    expected = isinstance(exc, ApiError | MediaError | RequestInvalid)
    return expected and not isinstance(exc, AuthenticationError)


async def submit_planned(
    ledger: Ledger,
    client: AsyncAimlApiClient,
    plan: SubmissionPlan,
    *,
    max_concurrency: int,
    expected_seconds_fn: Callable[[VideoRequest], float | None] | None = None,
    now_fn: Callable[[], datetime] = utcnow,
) -> SubmissionReport:
    """Create the plan's requests, at most `max_concurrency` at once, each claimed write-ahead.

    Creating stops after a 403 (out of credits), a 401 or an unexpected exception: creates in
    flight finish and are recorded, the rest stay planned. A 401 or an unexpected exception is then
    raised (its row left in doubt: the create may have been sent). Ledger calls run in threads so
    a slow database never stalls the event loop under in-flight creates.
    """
    report = SubmissionReport.of_plan(plan, dry_run=False)
    if plan.requeue_from:
        keys = [r.request_key for r in plan.to_submit]
        await asyncio.to_thread(ledger.requeue, keys, from_states=plan.requeue_from)
    schedule = client.config.poll_schedule
    expected_seconds = expected_seconds_fn or learned_expectation(ledger, client.config.expected_seconds)
    slots = asyncio.Semaphore(max_concurrency)
    stop_reasons: list[str] = []  # non-empty once creating must stop

    async def submit_one(request: CatalogRequestLike) -> None:
        key = request.request_key
        async with slots:
            if stop_reasons:
                report.failed_to_submit.append((key, f"not sent: creating stopped after {stop_reasons[0]}"))
                return
            # Everything that can fail without sending is done before the claim.
            expected = await asyncio.to_thread(expected_seconds, request.request)
            # Claim only once a slot is free: a claim held while waiting would become a false
            # in-doubt row if this process died before sending.
            claim = await asyncio.to_thread(ledger.claim, key)
            if claim is None:
                report.reused += 1  # another process holds or finished it
                return
            try:
                generation = await client.submit(request.request, request_key=key, attempt=claim.attempt)
            except BaseException as exc:  # even a cancellation: the create may have been sent
                message = f"{type(exc).__name__}: {exc}"
                await _record_failure(ledger, report, key, exc, message)
                if isinstance(exc, OutOfCredits) or not _is_expected_create_failure(exc):
                    stop_reasons.append(message)
                    report.out_of_credits = report.out_of_credits or isinstance(exc, OutOfCredits)
                if not _is_expected_create_failure(exc):
                    raise
                return
            next_poll_at = now_fn() + timedelta(seconds=schedule.next_delay(0.0, 0, expected))
            try:
                await asyncio.to_thread(
                    ledger.mark_submitted,
                    key,
                    generation.id,
                    raw_status=generation.raw_status,
                    credits_used=generation.credits_used,
                    usd_spent=generation.usd_spent,
                    next_poll_at=next_poll_at,
                    expected_seconds=expected,
                )
            except IllegalTransition:
                log.error(
                    "generation %s was created for %s but its claim was lost: record it by hand",
                    generation.id,
                    key,
                )
                raise
            except Exception as exc:
                # The create was accepted (paid) but the ledger could not record it: keep the id
                # where a person will see it, and the row in doubt rather than submitting.
                log.error("generation %s was created for %s but the ledger write failed: %s", generation.id, key, exc)
                note = f"created as generation {generation.id}, but recording it failed: {exc}"
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(ledger.mark_in_doubt, key, note)
                raise
            report.new += 1
            report.credits_used += generation.credits_used or 0.0
            report.usd_spent += generation.usd_spent or 0.0

    results = await asyncio.gather(*(submit_one(r) for r in plan.to_submit), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return report


async def _record_failure(
    ledger: Ledger, report: SubmissionReport, key: str, exc: BaseException, message: str
) -> None:
    outcome = _failure_outcome(exc)
    if outcome is _Outcome.REJECT:
        await asyncio.to_thread(ledger.mark_rejected, key, message)
        report.rejected.append((key, message))
    elif outcome is _Outcome.IN_DOUBT:
        await asyncio.to_thread(ledger.mark_in_doubt, key, message)
        report.in_doubt.append(key)
    else:
        await asyncio.to_thread(ledger.release, key, message)
        report.failed_to_submit.append((key, message))


def submit_prompt_set(
    ledger: Ledger,
    client_factory: Callable[[], AsyncAimlApiClient],
    prompt_set: str,
    requests: Iterable[CatalogRequestLike],
    *,
    max_concurrency: int = 8,
    max_usd: float | None = None,
    dry_run: bool = False,
    resubmit_in_doubt: bool = False,
    retry_failed: bool = False,
) -> SubmissionReport:
    """Plan, guard the budget, then create what the ledger has not bought (nothing on a dry run).

    `max_usd` bounds the estimate of what this run would newly create; above it `BudgetExceeded` is
    raised before any create (a dry run too: it answers "would this run go ahead?").
    """
    plan = plan_submission(
        ledger, prompt_set, requests, resubmit_in_doubt=resubmit_in_doubt, retry_failed=retry_failed
    )
    if max_usd is not None and plan.estimated_usd > max_usd:
        raise BudgetExceeded(
            f"prompt set {prompt_set!r} would newly submit {len(plan.to_submit)} request(s) estimated at "
            f"${plan.estimated_usd:.4f}, above the limit of ${max_usd:.4f}; nothing was submitted"
        )
    if dry_run or not plan.to_submit:
        return SubmissionReport.of_plan(plan, dry_run=dry_run)

    async def run() -> SubmissionReport:
        async with client_factory() as client:
            return await submit_planned(ledger, client, plan, max_concurrency=max_concurrency)

    return asyncio.run(run())
