"""The generation ledger: its state machine, write-ahead claims raced by two processes, recovery of
claims left by a killed process, the poll-scheduling queries and per-set summaries.

Every test runs on SQLite and on PostgreSQL (WAN_PIPELINE_TEST_POSTGRES_URL; each test in its own schema).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from ledger_worker import LedgerTarget, ledger_target, wait_for

from wan_pipeline.ledger import (
    IllegalTransition,
    Ledger,
    PlannedRequest,
    State,
    format_status,
)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
WORKER = Path(__file__).with_name("ledger_worker.py")
REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CREDITS = 1_575_000  # the documented price of 5 s at 1080p: $0.7875
RAW_TO_STATUS = {"queued": "pending", "generating": "pending", "completed": "completed", "error": "failed"}


class Clock:
    """A ledger clock the test moves by hand."""

    def __init__(self, start: datetime = T0):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerTarget]:
    with ledger_target(request.param, tmp_path) as where:
        yield where


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(target: LedgerTarget, clock: Clock) -> Iterator[Ledger]:
    opened = target.open(clock=clock)
    yield opened
    opened.close()


def key(n: int) -> str:
    return f"{n:032x}"


def planned(request_key: str, usd: float = 0.5) -> PlannedRequest:
    return PlannedRequest(request_key, "alibaba/wan-2-6-i2v", {"prompt": f"prompt {request_key}"}, usd, 100.0)


def mark_submitted(
    ledger: Ledger, request_key: str, *, next_poll_at: datetime = T0, **cost: float | None
) -> None:
    ledger.mark_submitted(
        request_key,
        f"gen-{request_key[-6:]}",
        raw_status="queued",
        credits_used=cost.get("credits_used", CREDITS),
        usd_spent=cost.get("usd_spent"),
        next_poll_at=next_poll_at,
    )


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


def drive(ledger: Ledger, request_key: str, state: State) -> None:
    """Bring a planned row to `state` through legal moves only."""
    if state is State.PLANNED:
        return
    assert ledger.claim(request_key) is not None
    if state is State.IN_DOUBT:
        ledger.mark_in_doubt(request_key, "answer lost")
    elif state is State.REJECTED:
        ledger.mark_rejected(request_key, "Body validation error")
    elif state is not State.SUBMITTING:
        mark_submitted(ledger, request_key)
        final_poll = {State.GENERATING: "generating", State.COMPLETED: "completed", State.FAILED: "error"}
        if state in final_poll:
            poll(ledger, request_key, "generating")
            poll(ledger, request_key, final_poll[state])
    assert ledger.row(request_key).state is state


def _applied(call: Callable[[], object]) -> bool:
    try:
        call()
    except IllegalTransition:
        return False
    return True


OPERATIONS: dict[str, Callable[[Ledger, str], bool]] = {
    "claim": lambda ledger, k: ledger.claim(k) is not None,
    "mark_submitted": lambda ledger, k: _applied(lambda: mark_submitted(ledger, k)),
    "mark_in_doubt": lambda ledger, k: _applied(lambda: ledger.mark_in_doubt(k, "lost")),
    "release": lambda ledger, k: _applied(lambda: ledger.release(k, "503")),
    "mark_rejected": lambda ledger, k: _applied(lambda: ledger.mark_rejected(k, "400")),
    "poll_queued": lambda ledger, k: _applied(lambda: poll(ledger, k, "queued")),
    "poll_generating": lambda ledger, k: _applied(lambda: poll(ledger, k, "generating")),
    "poll_completed": lambda ledger, k: _applied(lambda: poll(ledger, k, "completed")),
    "poll_error": lambda ledger, k: _applied(lambda: poll(ledger, k, "error")),
    "postpone_poll": lambda ledger, k: _applied(lambda: ledger.postpone_poll(k, T0)),
    "refresh_video_url": lambda ledger, k: _applied(
        lambda: ledger.refresh_video_url(k, "https://x/y.mp4", None)
    ),
    "record_download": lambda ledger, k: _applied(
        lambda: ledger.record_download(k, path="/v.mp4", sha256="ab" * 32, size_bytes=10)
    ),
    "requeue_in_doubt": lambda ledger, k: ledger.requeue([k], from_states={State.IN_DOUBT}) == [k],
    "requeue_failed": lambda ledger, k: ledger.requeue([k], from_states={State.FAILED}) == [k],
    "requeue_rejected": lambda ledger, k: ledger.requeue([k], from_states={State.REJECTED}) == [k],
}

S = State
# For each operation, the states it applies in and the state it leaves; every other state refuses it.
LEGAL: dict[str, dict[State, State]] = {
    "claim": {S.PLANNED: S.SUBMITTING},
    # From in_doubt only for the claimant itself (a late answer after its claim was recovered).
    "mark_submitted": {S.SUBMITTING: S.SUBMITTED, S.IN_DOUBT: S.SUBMITTED},
    "mark_in_doubt": {S.SUBMITTING: S.IN_DOUBT, S.IN_DOUBT: S.IN_DOUBT},
    "release": {S.SUBMITTING: S.PLANNED, S.IN_DOUBT: S.PLANNED},
    "mark_rejected": {S.SUBMITTING: S.REJECTED, S.IN_DOUBT: S.REJECTED},
    "poll_queued": {S.SUBMITTED: S.SUBMITTED, S.GENERATING: S.GENERATING},
    "poll_generating": {S.SUBMITTED: S.GENERATING, S.GENERATING: S.GENERATING},
    "poll_completed": {S.SUBMITTED: S.COMPLETED, S.GENERATING: S.COMPLETED, S.COMPLETED: S.COMPLETED},
    "poll_error": {S.SUBMITTED: S.FAILED, S.GENERATING: S.FAILED, S.FAILED: S.FAILED},
    "postpone_poll": {S.SUBMITTED: S.SUBMITTED, S.GENERATING: S.GENERATING},
    "refresh_video_url": {S.COMPLETED: S.COMPLETED},
    "record_download": {S.COMPLETED: S.COMPLETED},
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
            mismatches.append(
                f"{operation} from {state}: applied={applied}, now {after}, expected {expected}"
            )
    assert mismatches == []


def test_plan_files_a_shared_request_once_in_both_sets(ledger: Ledger) -> None:
    first = ledger.plan("alpha", [planned(key(1)), planned(key(2)), planned(key(1))])
    drive(ledger, key(2), State.SUBMITTED)
    second = ledger.plan("beta", [planned(key(2)), planned(key(3))])

    assert first.new == [key(1), key(2)] and first.known == {}
    assert second.new == [key(3)]
    assert second.known == {key(2): State.SUBMITTED}  # already bought: not planned again
    assert [r.request_key for r in ledger.rows("beta")] == [key(2), key(3)]
    assert ledger.row(key(2)).prompt_sets == ("alpha", "beta")
    assert ledger.row(key(2)).attempts == 1
    assert len(ledger.rows()) == 3
    assert ledger.prompt_sets() == ["alpha", "beta"]


def test_only_the_claimant_records_the_outcome_of_its_create(target: LedgerTarget, clock: Clock) -> None:
    owner, other = target.open(clock=clock), target.open(clock=clock)
    owner.plan("s", [planned(key(1))])
    assert owner.claim(key(1)).attempt == 1
    assert other.claim(key(1)) is None

    with pytest.raises(IllegalTransition, match="claimed by"):
        mark_submitted(other, key(1))
    with pytest.raises(IllegalTransition, match="claimed by"):
        other.release(key(1))
    assert owner.row(key(1)).state is State.SUBMITTING
    mark_submitted(owner, key(1))
    assert owner.row(key(1)).generation_id is not None


def test_two_processes_claiming_the_same_keys_claim_each_exactly_once(
    target: LedgerTarget, tmp_path: Path
) -> None:
    keys = [key(n) for n in range(300)]
    ledger = target.open()
    ledger.plan("race", [planned(k) for k in keys])
    keys_file, go = tmp_path / "keys.json", tmp_path / "go"
    keys_file.write_text(json.dumps(keys))
    ready = [tmp_path / f"ready-{n}" for n in range(2)]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "claim",
                target.to_json(),
                str(keys_file),
                str(seed),
                str(flag),
                str(go),
            ],
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


def test_a_claim_left_by_a_killed_process_becomes_in_doubt_not_planned(target: LedgerTarget) -> None:
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
        assert holder.stdout.readline().strip() == "claimed"
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
    assert ledger.claim(key(1)) is None  # resubmitted only after an explicit requeue
    assert ledger.summary("s").in_doubt == [key(1)]


def test_a_stale_claim_is_recovered_and_a_late_answer_still_counts(
    target: LedgerTarget, clock: Clock
) -> None:
    owner, other = target.open(clock=clock), target.open(clock=clock)
    owner.plan("s", [planned(key(1)), planned(key(2))])
    owner.claim(key(1))
    owner.claim(key(2))

    clock.advance(899)
    assert other.recover_abandoned(stale_after_s=900) == []
    clock.advance(2)
    assert sorted(other.recover_abandoned(stale_after_s=900)) == [key(1), key(2)]
    assert {r.state for r in other.rows("s")} == {State.IN_DOUBT}

    # The claimant was only slow: its answer for key 1 is recorded, not lost.
    mark_submitted(owner, key(1))
    assert other.row(key(1)).state is State.SUBMITTED
    # Key 2 was explicitly resubmitted by another process meanwhile: the old claimant cannot touch it.
    assert other.requeue([key(2)], from_states={State.IN_DOUBT}) == [key(2)]
    assert other.claim(key(2)).attempt == 2
    with pytest.raises(IllegalTransition, match="claimed by"):
        mark_submitted(owner, key(2))


def test_requeue_happens_only_on_explicit_request(ledger: Ledger) -> None:
    states = {1: State.IN_DOUBT, 2: State.FAILED, 3: State.REJECTED, 4: State.COMPLETED}
    ledger.plan("s", [planned(key(n)) for n in states])
    for n, state in states.items():
        drive(ledger, key(n), state)
    keys = [key(n) for n in states]

    replanned = ledger.plan("s", [planned(k) for k in keys])
    assert replanned.new == [] and replanned.known == {key(n): s for n, s in states.items()}

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
    assert ledger.claim(key(2)).attempt == 2


def test_due_for_poll_is_ordered_by_next_poll_time_and_bounded(ledger: Ledger) -> None:
    offsets = {1: 30, 2: -10, 3: 0, 4: -20, 5: 50, 6: -5}
    ledger.plan("s", [planned(key(n)) for n in [*offsets, 7, 8]])
    for n, seconds in offsets.items():
        ledger.claim(key(n))
        mark_submitted(ledger, key(n), next_poll_at=T0 + timedelta(seconds=seconds))
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
    ledger.claim(key(1))
    mark_submitted(ledger, key(1))
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


def test_summary_and_status_per_set(ledger: Ledger) -> None:
    ledger.plan("alpha", [planned(key(n)) for n in (1, 2, 3)])
    ledger.plan("beta", [planned(key(1)), planned(key(4))])
    drive(ledger, key(1), State.COMPLETED)
    drive(ledger, key(2), State.IN_DOUBT)
    ledger.claim(key(4))
    mark_submitted(ledger, key(4), credits_used=None, usd_spent=0.5)

    alpha = ledger.summary("alpha")
    assert {s: c for s, c in alpha.counts.items() if c} == {
        State.COMPLETED: 1,
        State.IN_DOUBT: 1,
        State.PLANNED: 1,
    }
    assert alpha.total == 3
    assert alpha.usd_spent == pytest.approx(0.7875)
    assert alpha.estimated_usd == pytest.approx(1.5)
    assert alpha.in_doubt == [key(2)]
    beta = ledger.summary("beta")
    assert {s: c for s, c in beta.counts.items() if c} == {State.COMPLETED: 1, State.SUBMITTED: 1}
    assert beta.usd_spent == pytest.approx(0.7875 + 0.5)

    text = format_status(ledger, ["alpha"])
    assert "alpha" in text and "beta" not in text
    assert "completed" in text and "0.7875" in text
    assert key(2) in text and "--resubmit-in-doubt" in text
    everything = format_status(ledger)
    assert "alpha" in everything and "beta" in everything
    assert "no requests recorded" in format_status(ledger, ["gamma"])


def test_missing_downloads_and_terminal_rows(ledger: Ledger) -> None:
    states = {1: State.COMPLETED, 2: State.COMPLETED, 3: State.FAILED, 4: State.REJECTED, 5: State.GENERATING}
    ledger.plan("s", [planned(key(n)) for n in states])
    ledger.plan("other", [planned(key(9))])
    drive(ledger, key(9), State.COMPLETED)
    for n, state in states.items():
        drive(ledger, key(n), state)

    assert {r.request_key for r in ledger.terminal_rows("s")} == {key(1), key(2), key(3), key(4)}
    assert [r.request_key for r in ledger.missing_downloads("s")] == [key(1), key(2)]
    ledger.record_download(key(1), path="/out/s/1.mp4", sha256="cd" * 32, size_bytes=1234)
    assert [r.request_key for r in ledger.missing_downloads("s")] == [key(2)]
    row = ledger.row(key(1))
    assert (row.download_path, row.download_sha256, row.download_bytes) == ("/out/s/1.mp4", "cd" * 32, 1234)
    with pytest.raises(IllegalTransition):
        ledger.record_download(key(3), path="/out/s/3.mp4", sha256="ef" * 32, size_bytes=1)


def test_timestamps_are_timezone_aware_utc(ledger: Ledger) -> None:
    ledger.plan("s", [planned(key(1))])
    ledger.claim(key(1))
    paris_time = (T0 + timedelta(minutes=5)).astimezone(timezone(timedelta(hours=2)))
    mark_submitted(ledger, key(1), next_poll_at=paris_time)

    row = ledger.row(key(1))
    assert row.next_poll_at == T0 + timedelta(minutes=5)
    stamps = [row.planned_at, row.claimed_at, row.submitted_at, row.next_poll_at, row.updated_at]
    assert all(stamp.tzinfo is UTC for stamp in stamps)
    with pytest.raises(sa.exc.StatementError, match="timezone-aware"):
        ledger.postpone_poll(key(1), datetime(2026, 1, 1, 12, 0))


def test_sqlite_ledger_creates_its_folder_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "data" / "ledger.sqlite"
    Ledger(f"sqlite:///{path}").plan("s", [planned(key(1))])
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.postgres
def test_postgres_ledger_repr_hides_the_password(tmp_path: Path) -> None:
    with ledger_target("postgres", tmp_path) as where:
        with_password = sa.make_url(where.url).set(password="s3cret-pw").render_as_string(hide_password=False)
        ledger = Ledger(with_password, schema=where.schema)  # trust auth: the password is ignored
        ledger.plan("s", [planned(key(1))])
        assert "s3cret-pw" not in repr(ledger)
        ledger.close()


def test_replanning_a_set_retires_keys_its_catalog_dropped_but_keeps_their_history(ledger: Ledger) -> None:
    ledger.plan("s", [planned(key(1)), planned(key(2))])
    ledger.plan("s", [planned(key(2)), planned(key(3))])  # the prompt of key 1 was edited into key 3

    assert [r.request_key for r in ledger.rows("s")] == [key(2), key(3)]
    assert ledger.summary("s").total == 2
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
