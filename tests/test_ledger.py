"""The generation ledger: its state machine, write-ahead claims raced by two processes, recovery of
claims left by a killed process, the poll-scheduling queries and per-set progress.

Every test runs on SQLite and on PostgreSQL (WAN_PIPELINE_TEST_POSTGRES_URL; each test in its own schema).
The issue-8 behaviours (scopes, attempts and spend, in doubt only when sent, migrations, progress) are
in the `test_ledger_*.py` files beside this one.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from ledger_worker import (
    CREDITS,
    T0,
    Clock,
    LedgerTarget,
    answer,
    claim,
    client_request_id,
    generation_id,
    ledger_target,
    planned,
    send,
    submit,
    wait_for,
)

from wan_pipeline.ledger import (
    AttemptOutcome,
    ClaimLost,
    IllegalTransition,
    KnownRequest,
    Ledger,
    PlannedRequest,
    State,
    VideoSource,
)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
WORKER = Path(__file__).with_name("ledger_worker.py")
REPO = Path(__file__).resolve().parents[1]
RAW_TO_STATUS = {"queued": "pending", "generating": "pending", "completed": "completed", "error": "failed"}


def key(n: int) -> str:
    return f"{n:032x}"


def poll(ledger: Ledger, request_key: str, raw_status: str, *, url: str | None = None) -> State:
    status = RAW_TO_STATUS[raw_status]
    return ledger.record_poll(
        request_key,
        raw_status=raw_status,
        status=status,
        video_url=url or (f"https://cdn.example/{request_key}.mp4" if status == "completed" else None),
        video_expires_at=T0 + timedelta(hours=24) if status == "completed" else None,
        error="upstream failed" if status == "failed" else None,
        credits_used=None,
        usd_spent=None,
        next_poll_at=T0 + timedelta(seconds=30) if status == "pending" else None,
    )


def store(ledger: Ledger, prompt_set: str, request_key: str) -> None:
    ledger.record_video(
        prompt_set, request_key, path=f"/out/{prompt_set}/{request_key}.mp4", sha256="cd" * 32, size_bytes=1234
    )


def drive(ledger: Ledger, request_key: str, state: State) -> None:
    """Bring a planned row to `state` through legal moves only, as the submission and poller do."""
    if state is State.PLANNED:
        return
    send(ledger, request_key)
    if state is State.IN_DOUBT:
        answer(ledger, request_key, None, status_code=504)
    elif state is State.REJECTED:
        answer(ledger, request_key, False, status_code=400)
        ledger.finish_attempt(request_key, ledger.row(request_key).attempts, AttemptOutcome.REJECTED, "HTTP 400")
    elif state is not State.SUBMITTING:
        answer(ledger, request_key, True)
        final_poll = {State.GENERATING: "generating", State.COMPLETED: "completed", State.FAILED: "error"}
        if state in final_poll:
            poll(ledger, request_key, "generating")
            poll(ledger, request_key, final_poll[state])
    assert ledger.row(request_key).state is state


def _applied(call: Callable[[], object]) -> bool:
    try:
        call()
    except (IllegalTransition, ClaimLost):
        return False
    return True


def _finish(ledger: Ledger, k: str, outcome: AttemptOutcome) -> bool:
    """`finish_attempt` never raises: it applied when it moved the row."""
    before = ledger.row(k).state
    ledger.finish_attempt(k, ledger.row(k).attempts, outcome, "not created")
    return ledger.row(k).state is not before


def _accepted(ledger: Ledger, k: str) -> bool:
    """An accepted answer never raises (a paid create is always recorded on its attempt): it applied
    when it moved the row. A row with no try recorded has nothing to answer."""
    if not ledger.try_rows(k):
        return False
    before = ledger.row(k).state
    return answer(ledger, k, True) is State.SUBMITTED and before is not State.SUBMITTED


OPERATIONS: dict[str, Callable[[Ledger, str], bool]] = {
    "claim": lambda ledger, k: claim(ledger, k) is not None,
    "answer_created": _accepted,
    "answer_not_created": lambda ledger, k: _applied(lambda: answer(ledger, k, False, status_code=503)),
    "answer_unknown": lambda ledger, k: _applied(lambda: answer(ledger, k, None, status_code=504)),
    "finish_rejected": lambda ledger, k: _finish(ledger, k, AttemptOutcome.REJECTED),
    "finish_not_accepted": lambda ledger, k: _finish(ledger, k, AttemptOutcome.NOT_ACCEPTED),
    "poll_queued": lambda ledger, k: _applied(lambda: poll(ledger, k, "queued")),
    "poll_generating": lambda ledger, k: _applied(lambda: poll(ledger, k, "generating")),
    "poll_completed": lambda ledger, k: _applied(lambda: poll(ledger, k, "completed")),
    "poll_error": lambda ledger, k: _applied(lambda: poll(ledger, k, "error")),
    "postpone_poll": lambda ledger, k: _applied(lambda: ledger.postpone_poll(k, T0)),
    "refresh_video_url": lambda ledger, k: _applied(
        lambda: ledger.refresh_video_url(k, "https://x/y.mp4", None)
    ),
    "record_video": lambda ledger, k: _applied(lambda: store(ledger, "transitions", k)),
    "requeue_in_doubt": lambda ledger, k: ledger.requeue([k], from_states={State.IN_DOUBT}) == [k],
    "requeue_failed": lambda ledger, k: ledger.requeue([k], from_states={State.FAILED}) == [k],
    "requeue_rejected": lambda ledger, k: ledger.requeue([k], from_states={State.REJECTED}) == [k],
}

S = State
# For each operation, the states it applies in and the state it leaves; every other state refuses it.
LEGAL: dict[str, dict[State, State]] = {
    "claim": {S.PLANNED: S.SUBMITTING},
    # From in_doubt only for the claimant itself (a late answer after its claim was recovered).
    "answer_created": {S.SUBMITTING: S.SUBMITTED, S.IN_DOUBT: S.SUBMITTED},
    # "Not created" releases the claim at once, before any retry wait.
    "answer_not_created": {S.SUBMITTING: S.PLANNED},
    "answer_unknown": {S.SUBMITTING: S.IN_DOUBT, S.IN_DOUBT: S.IN_DOUBT},
    "finish_rejected": {S.SUBMITTING: S.REJECTED},
    "finish_not_accepted": {S.SUBMITTING: S.PLANNED},
    "poll_queued": {S.SUBMITTED: S.SUBMITTED, S.GENERATING: S.GENERATING},
    "poll_generating": {S.SUBMITTED: S.GENERATING, S.GENERATING: S.GENERATING},
    "poll_completed": {S.SUBMITTED: S.COMPLETED, S.GENERATING: S.COMPLETED, S.COMPLETED: S.COMPLETED},
    "poll_error": {S.SUBMITTED: S.FAILED, S.GENERATING: S.FAILED, S.FAILED: S.FAILED},
    "postpone_poll": {S.SUBMITTED: S.SUBMITTED, S.GENERATING: S.GENERATING},
    "refresh_video_url": {S.COMPLETED: S.COMPLETED},
    "record_video": {S.COMPLETED: S.COMPLETED},
    "requeue_in_doubt": {S.IN_DOUBT: S.PLANNED},
    "requeue_failed": {S.FAILED: S.PLANNED},
    "requeue_rejected": {S.REJECTED: S.PLANNED},
}


def test_every_operation_from_every_state_moves_only_where_legal(ledger: Ledger) -> None:
    cases = list(itertools.product(OPERATIONS, State))
    ledger.plan("transitions", [planned(key(n)) for n in range(len(cases))])
    mismatches = []
    for n, (operation, state) in enumerate(cases):
        drive(ledger, key(n), state)
        applied = OPERATIONS[operation](ledger, key(n))
        expected = LEGAL[operation].get(state)
        after = ledger.row(key(n)).state
        if applied != (expected is not None) or after is not (expected or state):
            mismatches.append(f"{operation} from {state}: applied={applied}, now {after}, expected {expected}")
    assert mismatches == []


def test_a_second_try_re_claims_only_the_row_its_own_first_try_released(target: LedgerTarget) -> None:
    owner, other = target.open(), target.open()
    owner.plan("s", [planned(key(1))])
    assert send(owner, key(1)) == (1, 1)
    assert answer(owner, key(1), False, status_code=429) is State.PLANNED  # released before the retry wait
    with pytest.raises(ClaimLost):
        send(other, key(1), attempt=1, try_number=2)  # not its attempt
    assert send(owner, key(1)) == (1, 2)
    assert answer(owner, key(1), True) is State.SUBMITTED

    tries = owner.try_rows(key(1))
    assert [(t.try_number, t.created, t.status_code) for t in tries] == [(1, False, 429), (2, True, 200)]
    assert [t.client_request_id for t in tries] == [client_request_id(key(1), 1, n) for n in (1, 2)]
    (attempt,) = owner.attempts()
    assert (attempt.attempt, attempt.outcome, attempt.generation_id) == (1, "created", generation_id(key(1), 1))
    assert attempt.client_request_id == client_request_id(key(1), 1, 2)  # of the try that was accepted


def test_an_accepted_answer_for_a_try_never_recorded_moves_nothing(ledger: Ledger) -> None:
    """Only a try recorded before it was sent can be answered: an answer for a try the ledger never
    saw (a bug in the caller, or another process's numbers) must not turn a planned row into a
    submitted purchase with no attempt behind it."""
    ledger.plan("s", [planned(key(1))])
    with pytest.raises((IllegalTransition, ValueError)):
        answer(ledger, key(1), True, attempt=1, try_number=1)
    row = ledger.row(key(1))
    assert (row.state, row.generation_id) == (State.PLANNED, None)
    assert ledger.attempts() == []


def test_plan_files_a_shared_request_once_in_both_sets(ledger: Ledger) -> None:
    first = ledger.plan("alpha", [planned(key(1)), planned(key(2)), planned(key(1))])
    drive(ledger, key(2), State.SUBMITTED)
    second = ledger.plan("beta", [planned(key(2)), planned(key(3))])

    assert first.new == [key(1), key(2)] and first.known == {}
    assert second.new == [key(3)]
    assert second.known == {key(2): KnownRequest(State.SUBMITTED, 1)}  # already bought: not planned again
    assert [r.request_key for r in ledger.rows("beta")] == [key(2), key(3)]
    assert ledger.row(key(2)).prompt_sets == ("alpha", "beta")
    assert ledger.row(key(2)).attempts == 1
    assert len(ledger.rows()) == 3
    assert ledger.prompt_sets() == ["alpha", "beta"]
    assert ledger.known([key(2), key(9)]) == {key(2): KnownRequest(State.SUBMITTED, 1)}


def test_only_the_claimant_records_the_outcome_of_its_create(target: LedgerTarget, clock: Clock) -> None:
    owner, other = target.open(clock=clock), target.open(clock=clock)
    owner.plan("s", [planned(key(1))])
    assert claim(owner, key(1)) == 1
    assert claim(other, key(1)) is None

    with pytest.raises(IllegalTransition, match="claimed by"):
        answer(other, key(1), False, attempt=1, try_number=1)
    with pytest.raises(IllegalTransition, match="claimed by"):
        answer(other, key(1), None, attempt=1, try_number=1)
    assert owner.row(key(1)).state is State.SUBMITTING
    (unanswered,) = owner.try_rows(key(1))
    assert unanswered.answered_at is None  # the refused answers left nothing behind
    answer(owner, key(1), True)
    assert owner.row(key(1)).generation_id == generation_id(key(1), 1)


def test_two_processes_claiming_the_same_keys_claim_each_exactly_once(
    target: LedgerTarget, tmp_path: Path
) -> None:
    keys = [key(n) for n in range(200)]
    ledger = target.open()
    ledger.plan("race", [planned(k) for k in keys])
    keys_file, go = tmp_path / "keys.json", tmp_path / "go"
    keys_file.write_text(json.dumps(keys))
    ready = [tmp_path / f"ready-{n}" for n in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "claim", target.to_json(), str(keys_file), str(seed), str(flag), str(go)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for seed, flag in enumerate(ready)
    ]
    try:
        wait_for(lambda: all(flag.exists() for flag in ready), "both workers to be ready")
        go.touch()  # both start claiming the same keys at once
        won = [json.loads(worker.communicate(timeout=60)[0]) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()

    assert all(worker.returncode == 0 for worker in workers)
    assert set(won[0]).isdisjoint(won[1])
    assert sorted(won[0] + won[1]) == keys
    rows = ledger.rows("race")
    assert {(r.state, r.attempts) for r in rows} == {(State.SUBMITTING, 1)}
    owners = {r.claim_owner.rsplit(":", 2)[1] for r in rows}
    assert owners <= {str(worker.pid) for worker in workers}
    # Exactly one attempt and one try recorded per key: the loser of each race wrote nothing.
    made = ledger.attempts()
    assert sorted(a.request_key for a in made) == keys and {a.attempt for a in made} == {1}
    assert all(len(ledger.try_rows(k)) == 1 for k in keys[:20])


def test_a_claim_left_by_a_killed_process_that_sent_becomes_in_doubt_not_planned(target: LedgerTarget) -> None:
    ledger = target.open()
    ledger.plan("s", [planned(key(1))])
    holder = subprocess.Popen(
        [sys.executable, str(WORKER), "hold", target.to_json(), key(1)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "sent 1"
        assert ledger.recover_abandoned() == []  # its owner is alive: the create may be in flight
        holder.kill()  # SIGKILL: no chance to record anything
        # Not reaped yet, the holder is a zombie: it still "exists" but will never finish the call.
        recovered = wait_for(ledger.recover_abandoned, "the dead claim to be recovered")
    finally:
        holder.kill()
        holder.communicate()

    assert recovered == [key(1)]
    row = ledger.row(key(1))
    assert row.state is State.IN_DOUBT
    assert "died" in row.error
    assert claim(ledger, key(1)) is None  # resubmitted only after an explicit requeue
    assert ledger.progress("s").in_doubt == [key(1)]


def test_a_stale_claim_is_recovered_and_a_late_answer_still_counts(target: LedgerTarget, clock: Clock) -> None:
    owner, other = target.open(clock=clock), target.open(clock=clock)
    owner.plan("s", [planned(key(1)), planned(key(2))])
    claim(owner, key(1))
    claim(owner, key(2))

    clock.advance(899)
    assert other.recover_abandoned(stale_after_s=900) == []
    clock.advance(2)
    assert sorted(other.recover_abandoned(stale_after_s=900)) == [key(1), key(2)]
    assert {r.state for r in other.rows("s")} == {State.IN_DOUBT}
    assert "older than 900 s" in other.row(key(1)).error

    # The claimant was only slow: its answer for key 1 is recorded, not lost.
    answer(owner, key(1), True)
    assert other.row(key(1)).state is State.SUBMITTED
    assert [(a.outcome, a.generation_id) for a in other.attempts(request_keys=[key(1)])] == [
        ("created", generation_id(key(1), 1))
    ]
    # Key 2 was explicitly resubmitted by another process meanwhile: the old claimant's late answer
    # cannot touch the new attempt's row, but its purchase stays on record (two were bought).
    assert other.requeue([key(2)], from_states={State.IN_DOUBT}) == [key(2)]
    assert claim(other, key(2)) == 2
    assert answer(owner, key(2), True, attempt=1, try_number=1) is State.SUBMITTING
    row = other.row(key(2))
    assert (row.state, row.claim_owner, row.attempts, row.generation_id) == (State.SUBMITTING, other.owner, 2, None)
    assert [(a.attempt, a.outcome, a.generation_id) for a in other.attempts(request_keys=[key(2)])] == [
        (1, "created", generation_id(key(2), 1)),
        (2, None, None),
    ]


def test_requeue_happens_only_on_explicit_request(ledger: Ledger) -> None:
    states = {1: State.IN_DOUBT, 2: State.FAILED, 3: State.REJECTED, 4: State.COMPLETED}
    ledger.plan("s", [planned(key(n)) for n in states])
    for n, state in states.items():
        drive(ledger, key(n), state)
    keys = [key(n) for n in states]

    replanned = ledger.plan("s", [planned(k) for k in keys])
    assert replanned.new == [] and replanned.known == {key(n): KnownRequest(s, 1) for n, s in states.items()}
    assert ledger.recover_abandoned(stale_after_s=0) == []  # recovery never requeues anything

    assert ledger.requeue(keys, from_states={State.FAILED}) == [key(2)]
    failed_again = ledger.row(key(2))
    assert failed_again.state is State.PLANNED
    assert [failed_again.generation_id, failed_again.video_url, failed_again.next_poll_at] == [None] * 3
    assert ledger.row(key(1)).state is State.IN_DOUBT
    assert ledger.requeue(keys, from_states={State.IN_DOUBT}) == [key(1)]
    assert ledger.requeue(keys, from_states={State.REJECTED}) == [key(3)]
    with pytest.raises(IllegalTransition):
        ledger.requeue(keys, from_states={State.COMPLETED})
    assert ledger.row(key(4)).state is State.COMPLETED
    assert claim(ledger, key(2)) == 2


def test_due_for_poll_is_ordered_by_next_poll_time_and_bounded(ledger: Ledger) -> None:
    offsets = {1: 30, 2: -10, 3: 0, 4: -20, 5: 50, 6: -5}
    ledger.plan("s", [planned(key(n)) for n in [*offsets, 7, 8]])
    for n, seconds in offsets.items():
        submit(ledger, key(n), next_poll_at=T0 + timedelta(seconds=seconds))
    ledger.postpone_poll(key(6), T0 - timedelta(seconds=5))  # still due, now generating below
    poll(ledger, key(6), "generating")
    ledger.postpone_poll(key(6), T0 - timedelta(seconds=5))
    drive(ledger, key(7), State.COMPLETED)  # terminal rows are never due

    assert [r.request_key for r in ledger.due_for_poll(T0, limit=2)] == [key(4), key(2)]
    assert [r.request_key for r in ledger.due_for_poll(T0, limit=10)] == [key(4), key(2), key(6), key(3)]
    assert ledger.next_poll_time() == T0 - timedelta(seconds=20)
    poll(ledger, key(4), "completed")
    assert ledger.next_poll_time() == T0 - timedelta(seconds=10)


def test_polls_keep_the_first_seen_times_and_refuse_going_backwards(ledger: Ledger, clock: Clock) -> None:
    ledger.plan("s", [planned(key(1))])
    submit(ledger, key(1))
    clock.advance(10)
    assert poll(ledger, key(1), "queued") is State.SUBMITTED
    clock.advance(10)
    assert poll(ledger, key(1), "generating") is State.GENERATING
    clock.advance(10)
    assert poll(ledger, key(1), "queued") is State.GENERATING  # never back to submitted
    clock.advance(10)
    assert poll(ledger, key(1), "completed", url="https://cdn.example/first.mp4") is State.COMPLETED
    clock.advance(10)
    assert poll(ledger, key(1), "completed", url="https://cdn.example/fresh.mp4") is State.COMPLETED

    row = ledger.row(key(1))
    assert row.generating_at == T0 + timedelta(seconds=20)
    assert row.completed_at == T0 + timedelta(seconds=40)
    assert row.video_url == "https://cdn.example/fresh.mp4"
    assert (row.poll_count, row.next_poll_at) == (5, None)
    assert (row.credits_used, row.usd_spent) == (CREDITS, 0.7875)  # charged at submit, kept
    with pytest.raises(IllegalTransition):
        poll(ledger, key(1), "generating")
    with pytest.raises(ValueError, match="next poll time"):
        ledger.record_poll(
            key(1), raw_status="generating", status="pending", video_url=None, video_expires_at=None,
            error=None, credits_used=None, usd_spent=None, next_poll_at=None,
        )  # fmt: skip


def test_stored_videos_per_set_and_only_completed_ones(ledger: Ledger, clock: Clock) -> None:
    states = {1: State.COMPLETED, 2: State.COMPLETED, 3: State.FAILED, 4: State.REJECTED, 5: State.GENERATING}
    ledger.plan("s", [planned(key(n)) for n in states])
    ledger.plan("other", [planned(key(1)), planned(key(9))])
    drive(ledger, key(9), State.COMPLETED)
    for n, state in states.items():
        drive(ledger, key(n), state)

    assert ledger.progress("s").uncollected == 2
    store(ledger, "s", key(1))
    assert (ledger.progress("s").collected, ledger.progress("s").uncollected) == (1, 1)
    assert ledger.progress("other").collected == 0  # stored in "s"'s folder, not in "other"'s
    clock.advance(1)
    ledger.record_video(
        "other", key(1), path="/out/other/1.mp4", sha256="cd" * 32, size_bytes=1234,
        source=VideoSource.COPY, copied_from_set="s",
    )  # fmt: skip
    found = ledger.stored_videos([key(1), key(2)])
    assert list(found) == [key(1)]
    assert [(v.prompt_set, v.path, v.source, v.copied_from_set) for v in found[key(1)]] == [
        ("s", f"/out/s/{key(1)}.mp4", VideoSource.DOWNLOAD, None),
        ("other", "/out/other/1.mp4", VideoSource.COPY, "s"),
    ]
    clock.advance(1)
    store(ledger, "s", key(1))  # recording again updates the one record of the set
    assert len(ledger.stored_videos([key(1)])[key(1)]) == 2
    with pytest.raises(IllegalTransition):
        store(ledger, "s", key(3))


def test_timestamps_are_timezone_aware_utc(ledger: Ledger) -> None:
    ledger.plan("s", [planned(key(1))])
    paris_time = (T0 + timedelta(minutes=5)).astimezone(timezone(timedelta(hours=2)))
    submit(ledger, key(1), next_poll_at=paris_time)

    row = ledger.row(key(1))
    assert row.next_poll_at == T0 + timedelta(minutes=5)
    stamps = [row.planned_at, row.claimed_at, row.submitted_at, row.next_poll_at, row.updated_at]
    assert all(stamp.tzinfo is UTC for stamp in stamps)
    (attempt,) = ledger.attempts()
    assert attempt.claimed_at.tzinfo is UTC and attempt.finished_at.tzinfo is UTC
    assert ledger.try_rows(key(1))[0].sent_at.tzinfo is UTC
    with pytest.raises(sa.exc.StatementError, match="timezone-aware"):
        ledger.postpone_poll(key(1), datetime(2026, 1, 1, 12, 0))


def test_sqlite_ledger_creates_its_folder_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "data" / "ledger.sqlite"
    Ledger(f"sqlite:///{path}", scope="emulator").plan("s", [planned(key(1))])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_ledger_is_always_bound_to_a_scope(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scope"):
        Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}", scope="")
    with pytest.raises(ValueError, match="PostgreSQL"):
        Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}", scope="emulator", schema="nope")


@pytest.mark.postgres
def test_postgres_ledger_repr_hides_the_password(tmp_path: Path) -> None:
    with ledger_target("postgres", tmp_path) as where:
        with_password = sa.make_url(where.url).set(password="s3cret-pw").render_as_string(hide_password=False)
        ledger = Ledger(with_password, scope="emulator", schema=where.schema)  # trust auth: password ignored
        ledger.plan("s", [planned(key(1))])
        assert "s3cret-pw" not in repr(ledger)
        ledger.close()


def test_replanning_a_set_retires_keys_its_catalog_dropped_but_keeps_their_history(ledger: Ledger) -> None:
    ledger.plan("s", [planned(key(1)), planned(key(2))])
    ledger.plan("s", [planned(key(2)), planned(key(3))])  # the prompt of key 1 was edited into key 3

    assert [r.request_key for r in ledger.rows("s")] == [key(2), key(3)]
    assert ledger.progress("s").total == 2
    assert ledger.set_members("s") == [key(2), key(3)]
    assert ledger.row(key(1)) is not None  # bought history stays in the ledger
    ledger.plan("s", [planned(key(1)), planned(key(2)), planned(key(3))])  # edited back: reinstated
    assert {r.request_key for r in ledger.rows("s")} == {key(1), key(2), key(3)}


def test_observed_processing_time_is_learned_per_request_shape(ledger: Ledger, clock: Clock) -> None:
    def shaped(n: int, resolution: str) -> PlannedRequest:
        request = {"prompt": f"p{n}", "resolution": resolution, "duration": 5}
        return PlannedRequest(key(n), "alibaba/wan-2-6-i2v", request, 0.5, None)

    ledger.plan("s", [shaped(n, "720p") for n in range(4)] + [shaped(9, "1080p")])
    for n, seconds in [(0, 40), (1, 60), (9, 500)]:
        drive(ledger, key(n), State.SUBMITTED)
        clock.advance(seconds)
        poll(ledger, key(n), "completed")
    # Two observations are not enough to trust: the poll schedule keeps probing.
    assert ledger.observed_processing_seconds("alibaba/wan-2-6-i2v", "720p", 5) is None
    drive(ledger, key(2), State.SUBMITTED)
    clock.advance(50)
    poll(ledger, key(2), "completed")
    # The median of 40, 50 and 60 s; the 1080p generation is another shape and does not count.
    assert ledger.observed_processing_seconds("alibaba/wan-2-6-i2v", "720p", 5) == 50
    assert ledger.observed_processing_seconds("alibaba/wan-2-6-i2v", "720p", 10) is None
