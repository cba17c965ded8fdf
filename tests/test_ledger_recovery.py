"""In doubt only when a send may have been accepted (issue 8, problem 6).

A process killed while holding a create is settled by what its tries say: nothing sent -> planned,
every try answered "not created" (killed in the retry wait) -> planned with the attempt closed
not_accepted, a try sent and never answered -> in doubt naming the client request id, an accepted
answer recorded but not applied -> submitted with its generation id. The killed processes are real
(`ledger_worker.py`, SIGKILL), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_worker import (
    CREDITS,
    USD,
    Clock,
    LedgerTarget,
    answer,
    claim,
    client_request_id,
    generation_id,
    planned,
    send,
    wait_for,
)

from wan_pipeline.ledger import AttemptOutcome, Ledger, State
from wan_pipeline.ledger.reports import spend

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
WORKER = Path(__file__).with_name("ledger_worker.py")
REPO = Path(__file__).resolve().parents[1]
KEY = "ab" * 16


@pytest.fixture
def ledger(target: LedgerTarget) -> Iterator[Ledger]:
    opened = target.open()
    opened.plan("s", [planned(KEY)])
    yield opened
    opened.close()


def killed_worker(target: LedgerTarget, command: str, *arguments: str, expect: str) -> subprocess.Popen:
    """Start a worker, wait until it says `expect`, SIGKILL it. Returned unreaped (a zombie)."""
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), command, target.to_json(), *arguments],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert worker.stdout.readline().strip() == expect
    finally:
        worker.kill()
    return worker


def reap(worker: subprocess.Popen) -> None:
    worker.communicate()


def recovered(ledger: Ledger, state: State) -> list[str]:
    """Recover until the dead owner's claim is settled (the kill is asynchronous)."""
    moved: list[str] = []

    def settled() -> bool:
        moved.extend(ledger.recover_abandoned())
        row = ledger.row(KEY)
        return row.state is state and all(a.outcome is not None for a in ledger.attempts())

    wait_for(settled, f"the dead claim to settle as {state}")
    return moved


def test_a_claim_with_no_try_recorded_is_in_doubt_not_planned(target: LedgerTarget, ledger: Ledger) -> None:
    """A claim is written with its first try in one transaction; a claim without any try was made by
    code that claimed before sending (before tries were recorded), so it may have been sent."""
    worker = killed_worker(target, "claim-unsent", KEY, expect="claimed")
    try:
        assert ledger.row(KEY).state is State.SUBMITTING
        assert recovered(ledger, State.IN_DOUBT) == [KEY]
    finally:
        reap(worker)

    assert "claimed before tries were recorded" in ledger.row(KEY).error
    (attempt,) = ledger.attempts()
    assert attempt.outcome == AttemptOutcome.IN_DOUBT
    assert claim(ledger, KEY) is None


def test_a_process_killed_before_its_first_try_leaves_nothing_to_recover(target: LedgerTarget) -> None:
    ledger = target.open()
    ledger.plan("s", [planned(KEY)])
    worker = killed_worker(target, "open", "/dev/null", "/", expect="opened")  # opened, planned, never sent
    reap(worker)
    assert ledger.recover_abandoned(stale_after_s=0) == []
    assert ledger.row(KEY).state is State.PLANNED and ledger.attempts() == []
    assert claim(ledger, KEY) == 1


def test_a_process_killed_in_its_retry_wait_leaves_the_row_planned_and_closes_its_attempt(
    target: LedgerTarget, ledger: Ledger
) -> None:
    worker = killed_worker(target, "wait", KEY, expect="waiting")
    try:
        # The "not created" answer released the claim before the retry wait: nothing to settle.
        assert ledger.row(KEY).state is State.PLANNED
        assert recovered(ledger, State.PLANNED) == []
    finally:
        reap(worker)

    (attempt,) = ledger.attempts()
    assert attempt.outcome == AttemptOutcome.NOT_ACCEPTED and "died between tries" in attempt.error
    assert ledger.progress("s").in_doubt == []
    assert spend(ledger.attempts()).in_doubt == 0
    assert claim(ledger, KEY) == 2


@pytest.mark.parametrize("tries", [1, 3])
def test_a_process_killed_after_sending_a_try_with_no_answer_leaves_it_in_doubt(
    target: LedgerTarget, ledger: Ledger, tries: int
) -> None:
    worker = killed_worker(target, "hold", KEY, str(tries), expect=f"sent {tries}")
    try:
        assert ledger.recover_abandoned() in ([], [KEY])  # alive until the kill lands
        moved = recovered(ledger, State.IN_DOUBT)
    finally:
        reap(worker)

    assert set(moved) <= {KEY}
    row = ledger.row(KEY)
    sent = client_request_id(KEY, 1, tries)
    assert "died" in row.error and f"try {tries}" in row.error and sent in row.error
    (attempt,) = ledger.attempts()
    assert (attempt.outcome, attempt.client_request_id) == (AttemptOutcome.IN_DOUBT, sent)
    assert [t.created for t in ledger.try_rows(KEY)] == [False] * (tries - 1) + [None]
    assert claim(ledger, KEY) is None  # resubmitted only on explicit request


def test_a_process_killed_after_its_accepted_answer_was_recorded_becomes_submitted(
    target: LedgerTarget, ledger: Ledger
) -> None:
    # The worker records the accepted answer on the try's row only (`record_accepted_try`, what the
    # submission keeps when recording the whole answer failed), then dies before applying it.
    worker = killed_worker(target, "accepted", KEY, expect="recorded")
    try:
        assert recovered(ledger, State.SUBMITTED) == []
    finally:
        reap(worker)

    row = ledger.row(KEY)
    assert (row.generation_id, row.usd_spent) == (generation_id(KEY, 1), USD)
    assert row.next_poll_at is not None  # polled at once
    (attempt,) = ledger.attempts()
    assert (attempt.outcome, attempt.generation_id, attempt.usd_spent) == ("created", generation_id(KEY, 1), USD)


def test_a_try_answered_with_a_server_error_is_in_doubt_and_ends_the_attempt(ledger: Ledger) -> None:
    send(ledger, KEY)
    assert answer(ledger, KEY, None, status_code=504) is State.IN_DOUBT
    (attempt,) = ledger.attempts()
    assert attempt.outcome == AttemptOutcome.IN_DOUBT and "create outcome unknown" in attempt.error
    assert ledger.recover_abandoned(stale_after_s=0) == []  # nothing left to recover


def test_settling_its_own_abandoned_attempt_follows_the_tries(ledger: Ledger) -> None:
    send(ledger, KEY)
    answer(ledger, KEY, False, status_code=503)
    send(ledger, KEY)  # try 2 sent, then the client blew up
    assert ledger.settle_abandoned_attempt(KEY, 1, "RuntimeError: boom") is State.IN_DOUBT
    assert client_request_id(KEY, 1, 2) in ledger.row(KEY).error
    assert ledger.settle_abandoned_attempt(KEY, 1, "again") is None  # already settled: left alone
    assert ledger.row(KEY).state is State.IN_DOUBT


def test_a_late_accepted_answer_keeps_its_generation_id_and_cost_after_the_row_was_reclaimed(
    target: LedgerTarget,
) -> None:
    """A claim recovered as stale, resubmitted, then the first claimant's create turns out accepted: two
    generations were bought. The row stays the new attempt's; the first purchase stays on record."""
    clock = Clock()
    slow, other = target.open(clock=clock), target.open(clock=clock)
    slow.plan("s", [planned(KEY)])
    send(slow, KEY)
    clock.advance(901)
    assert other.recover_abandoned(stale_after_s=900) == [KEY]
    assert other.requeue([KEY], from_states={State.IN_DOUBT}) == [KEY]
    assert claim(other, KEY) == 2
    answer(other, KEY, True, attempt=2, try_number=1)

    assert answer(slow, KEY, True, attempt=1, try_number=1) is State.SUBMITTED  # the row's, unchanged
    assert other.row(KEY).generation_id == generation_id(KEY, 2)
    first = other.attempts()[0]
    assert (first.attempt, first.outcome, first.generation_id) == (1, "created", generation_id(KEY, 1))
    assert spend(other.attempts()).usd_spent == pytest.approx(2 * USD)
    (tried,) = [t for t in other.try_rows(KEY) if t.attempt == 1]
    assert tried.generation_id == generation_id(KEY, 1)


def test_a_late_accepted_answer_for_a_requeued_row_nobody_claimed_saves_buying_it_again(
    target: LedgerTarget,
) -> None:
    clock = Clock()
    slow, other = target.open(clock=clock), target.open(clock=clock)
    slow.plan("s", [planned(KEY)])
    send(slow, KEY)
    clock.advance(901)
    other.recover_abandoned(stale_after_s=900)
    other.requeue([KEY], from_states={State.IN_DOUBT})

    assert answer(slow, KEY, True, attempt=1, try_number=1) is State.SUBMITTED
    row = other.row(KEY)
    assert (row.state, row.attempts, row.generation_id) == (State.SUBMITTED, 1, generation_id(KEY, 1))
    assert claim(other, KEY) is None  # nothing left to resubmit
    assert [(a.attempt, a.outcome) for a in other.attempts()] == [(1, "created")]


@pytest.mark.parametrize("outcome", ["finish_attempt", "accepted answer"])
def test_only_the_claimant_closes_its_open_attempt(target: LedgerTarget, outcome: str) -> None:
    """Another process's call for the same attempt number must not close the claimant's attempt: the
    claimant's real answer would then be recorded on the row but not on the attempt (its id, its cost)."""
    owner, other = target.open(), target.open()
    owner.plan("s", [planned(KEY)])
    send(owner, KEY)
    if outcome == "finish_attempt":
        other.finish_attempt(KEY, 1, AttemptOutcome.NOT_ACCEPTED, "not mine")
    else:
        assert answer(other, KEY, True, attempt=1, try_number=1, credits_used=1.0) is State.SUBMITTING
    assert owner.row(KEY).state is State.SUBMITTING
    answer(owner, KEY, True)

    assert owner.row(KEY).state is State.SUBMITTED
    (attempt,) = owner.attempts()
    assert (attempt.outcome, attempt.generation_id, attempt.credits_used) == ("created", generation_id(KEY, 1), CREDITS)


def test_recovery_ignores_live_claims_of_other_scopes(target: LedgerTarget) -> None:
    clock = Clock()
    mine, theirs = target.open(clock=clock), target.open(clock=clock, scope="https://api.aimlapi.com")
    theirs.plan("s", [planned(KEY)])
    send(theirs, KEY)
    clock.advance(10_000)
    assert mine.recover_abandoned(stale_after_s=900) == []
    assert theirs.row(KEY).state is State.SUBMITTING
