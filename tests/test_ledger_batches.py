"""Group commit (figure 3 of issue 12): the batched writes record exactly what the one-row calls do.

`Ledger.record_tries` claims and records many tries, and applies many accepted answers, in one
transaction; `Ledger.record_polls` applies many poll answers in one. Both are checked against the
one-row calls on twin rows, on SQLite and PostgreSQL. `TryLog` (submission's writer) is checked for the
write-ahead rule itself: a try is committed (seen by another connection) before `sending` returns, and an
accepted answer is committed with the next claim, before the create that took its slot may be sent.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from ledger_worker import T0, Clock, LedgerTarget, claim, client_request_id, generation_id, planned, send

from wan_pipeline.ledger import AttemptClaim, ClaimLost, IllegalTransition, Ledger, State, TryAnswer
from wan_pipeline.ledger.store import AcceptedTry, PollAnswer, TrySending
from wan_pipeline.submission import TryLog

KEYS = [f"{n:032x}" for n in range(1, 9)]
CREDITS = 1_050_000.0


@pytest.fixture
def ledger(ledger: Ledger) -> Ledger:
    """The shared ledger fixture (conftest), with KEYS planned in set `s`."""
    ledger.plan("s", [planned(k) for k in KEYS])
    return ledger


def sending(key: str, attempt: int = 1, try_number: int = 1) -> TrySending:
    return TrySending(key, attempt, try_number, client_request_id(key, attempt, try_number), AttemptClaim("s"))


def accepted_answer(key: str, attempt: int = 1) -> TryAnswer:
    return TryAnswer(True, 200, "accepted", generation_id(key, attempt), "queued", CREDITS)


def accepted(key: str, attempt: int = 1, try_number: int = 1) -> AcceptedTry:
    return AcceptedTry(key, attempt, try_number, accepted_answer(key, attempt), T0 + timedelta(seconds=30), 40.0)


def recorded(ledger: Ledger, key: str) -> tuple[Any, ...]:
    """Everything the ledger holds for a key, with the key itself taken out (to compare twins)."""
    row = ledger.row(key)
    tries = [(t.try_number, t.sent_at, t.answered_at, t.created, t.status_code, t.credits_used, t.usd_spent, t.detail)
             for t in ledger.try_rows(key)]  # fmt: skip
    attempt_rows = [
        (a.attempt, a.outcome, a.credits_used, a.usd_spent, a.estimated_usd, a.error, a.finished_at)
        for a in ledger.attempts(request_keys=[key])
    ]
    fields = ("state", "attempts", "raw_status", "submitted_at", "next_poll_at", "poll_count", "generating_at",
              "completed_at", "video_url", "error", "credits_used", "usd_spent", "expected_seconds", "claim_owner")
    return tuple(getattr(row, f) for f in fields), tuple(tries), tuple(attempt_rows)


def test_batched_claims_and_answers_record_what_the_one_try_calls_record(ledger: Ledger) -> None:
    batched, single = KEYS[:3], KEYS[4:7]
    assert ledger.record_tries([], [sending(k) for k in batched]) == [None, None, None]
    for k in single:
        ledger.try_sending(k, 1, 1, client_request_id(k, 1, 1), AttemptClaim("s"))
    assert ledger.record_tries([accepted(k) for k in batched], []) == []
    for k in single:
        item = accepted(k)
        ledger.try_answered(k, 1, 1, item.answer, next_poll_at=item.next_poll_at, expected_seconds=40.0)
    for b, s in zip(batched, single, strict=True):
        assert ledger.row(b).state is State.SUBMITTED and ledger.row(b).generation_id == generation_id(b, 1)
        assert recorded(ledger, b) == recorded(ledger, s)


def test_a_claim_another_process_holds_is_lost_and_leaves_no_try(target: LedgerTarget, ledger: Ledger) -> None:
    other = target.open()
    assert claim(other, KEYS[1]) == 1
    outcomes = ledger.record_tries([], [sending(KEYS[0]), sending(KEYS[1]), sending(KEYS[2])])
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], ClaimLost) and "not sending attempt 1 try 1" in str(outcomes[1])
    assert [t.client_request_id for t in ledger.try_rows(KEYS[1])] == [client_request_id(KEYS[1], 1, 1)]  # the other's
    assert ledger.row(KEYS[1]).claim_owner == other.owner
    other.close()


def test_a_later_try_reclaims_only_its_own_released_claim(ledger: Ledger) -> None:
    send(ledger, KEYS[0])
    ledger.try_answered(KEYS[0], 1, 1, TryAnswer(False, 503, "HTTP 503"))  # released before the retry wait
    assert ledger.record_tries([], [sending(KEYS[0], 1, 2)]) == [None]
    row = ledger.row(KEYS[0])
    assert row.state is State.SUBMITTING and row.attempts == 1
    assert [t.try_number for t in ledger.try_rows(KEYS[0])] == [1, 2]
    assert ledger.attempts(request_keys=[KEYS[0]])[0].client_request_id == client_request_id(KEYS[0], 1, 2)


def test_a_batch_with_an_answer_to_an_unsent_try_commits_nothing(ledger: Ledger) -> None:
    send(ledger, KEYS[0])
    with pytest.raises(IllegalTransition):
        ledger.record_tries([accepted(KEYS[0]), accepted(KEYS[1])], [sending(KEYS[2])])
    assert ledger.row(KEYS[0]).state is State.SUBMITTING  # its answer was rolled back with the batch
    assert ledger.row(KEYS[2]).state is State.PLANNED and ledger.try_rows(KEYS[2]) == []  # so was the claim


def submitted_twins(ledger: Ledger, keys: list[str]) -> None:
    for k in keys:
        send(ledger, k)
        item = accepted(k)
        ledger.try_answered(k, 1, 1, item.answer, next_poll_at=item.next_poll_at)


def test_batched_polls_apply_what_record_poll_applies(ledger: Ledger, clock: Clock) -> None:
    submitted_twins(ledger, KEYS)
    later = T0 + timedelta(seconds=90)
    answers = [
        PollAnswer(KEYS[0], "pending", "queued", next_poll_at=later),
        PollAnswer(KEYS[1], "pending", "generating", next_poll_at=later, credits_used=CREDITS * 2),
        PollAnswer(KEYS[2], "completed", "completed", video_url="https://cdn.example/v.mp4", credits_used=CREDITS),
        PollAnswer(KEYS[3], "failed", "failed", error="moderation"),
    ]
    clock.advance(5)
    outcomes = ledger.record_polls(answers)
    assert outcomes == [State.SUBMITTED, State.GENERATING, State.COMPLETED, State.FAILED]
    for answer, twin in zip(answers, KEYS[4:], strict=True):
        fields = {name: getattr(answer, name) for name in ("raw_status", "video_url", "video_expires_at", "error",
                                                          "credits_used", "usd_spent", "next_poll_at")}  # fmt: skip
        assert ledger.record_poll(twin, status=answer.status, **fields) is ledger.row(answer.request_key).state
        assert recorded(ledger, answer.request_key) == recorded(ledger, twin)


def test_a_batched_poll_that_is_not_a_legal_move_is_refused_alone(ledger: Ledger) -> None:
    submitted_twins(ledger, KEYS[:3])
    assert ledger.record_polls([PollAnswer(KEYS[0], "completed", "completed", video_url="u")]) == [State.COMPLETED]
    later = T0 + timedelta(seconds=90)
    outcomes = ledger.record_polls([
        PollAnswer(KEYS[0], "pending", "generating", next_poll_at=later),  # completed -> generating
        PollAnswer(KEYS[1], "pending", "generating", next_poll_at=later),
        PollAnswer("f" * 32, "failed", "failed"),
        PollAnswer(KEYS[2], postpone=True, next_poll_at=later, raw_status="not_found"),
        PollAnswer(KEYS[7], postpone=True, next_poll_at=later),  # planned: nothing to postpone
    ])  # fmt: skip
    assert isinstance(outcomes[0], IllegalTransition) and isinstance(outcomes[2], KeyError)
    assert isinstance(outcomes[4], IllegalTransition)
    assert outcomes[1] is State.GENERATING and outcomes[3] is State.SUBMITTED
    assert ledger.row(KEYS[0]).state is State.COMPLETED and ledger.row(KEYS[0]).poll_count == 1
    assert ledger.row(KEYS[1]).state is State.GENERATING
    row = ledger.row(KEYS[2])
    assert (row.raw_status, row.next_poll_at, row.poll_count) == ("not_found", later, 0)


def test_the_writer_commits_a_try_before_it_may_be_sent_and_an_answer_with_the_next_claim(
    target: LedgerTarget, ledger: Ledger
) -> None:
    observer = target.open()  # another connection: sees only what is committed

    async def scenario() -> None:
        # No timer flush during the test: an answer is committed only by a claim, W answers, or close.
        trylog = TryLog(ledger, window=4, flush_after_s=3600.0)
        await trylog.sending(sending(KEYS[0]))
        assert observer.row(KEYS[0]).state is State.SUBMITTING  # committed before it may be sent
        assert [t.answered_at for t in observer.try_rows(KEYS[0])] == [None]
        answer = trylog.accepted(accepted(KEYS[0]))  # not waited for
        assert not answer.done()
        await trylog.sending(sending(KEYS[1]))  # the slot's next create: its claim carries the answer
        assert observer.row(KEYS[0]).state is State.SUBMITTED and observer.row(KEYS[1]).state is State.SUBMITTING
        await answer
        with pytest.raises(ClaimLost):
            await trylog.sending(sending(KEYS[1], 2))  # attempt 2 of a row being created: never sent
        last = trylog.accepted(accepted(KEYS[1]))
        await trylog.close()  # what is queued is committed before the writer stops
        assert last.done() and last.exception() is None

    asyncio.run(scenario())
    assert {observer.row(k).state for k in KEYS[:2]} == {State.SUBMITTED}
    observer.close()
