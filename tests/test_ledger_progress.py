"""One place for set progress (issue 8): `Ledger.progress(set)`, used by the sensor, `run` and `status`.

Counts over the set's current members only; collected means stored in that set's folder; a member
this scope never planned counts as planned; the fingerprint changes whenever a state does.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from ledger_worker import T0, Clock, LedgerTarget, answer, planned, send, submit

from wan_pipeline.ledger import COLLECT_EARLY_AFTER, Ledger, State

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def key(n: int) -> str:
    return f"{n:032x}"


def complete(ledger: Ledger, k: str) -> None:
    ledger.record_poll(
        k, raw_status="completed", status="completed", video_url="https://cdn.example/v.mp4",
        video_expires_at=None, error=None, credits_used=None, usd_spent=None, next_poll_at=None,
    )  # fmt: skip


def store(ledger: Ledger, prompt_set: str, k: str) -> None:
    ledger.record_video(prompt_set, k, path=f"/out/{prompt_set}/{k}.mp4", sha256="ab" * 32, size_bytes=9)


def nonzero(counts: dict[State, int]) -> dict[State, int]:
    return {s: c for s, c in counts.items() if c}


def test_progress_counts_the_current_members_and_what_is_stored_in_each_set(ledger: Ledger, clock: Clock) -> None:
    ledger.plan("alpha", [planned(key(n)) for n in (1, 2, 3, 4, 9)])
    ledger.plan("alpha", [planned(key(n)) for n in (1, 2, 3, 4)])  # key 9 retired from alpha
    ledger.plan("beta", [planned(key(1)), planned(key(5))])
    for n in (1, 2, 9):
        submit(ledger, key(n), prompt_set="alpha")
        clock.advance(60)
        complete(ledger, key(n))
    store(ledger, "alpha", key(1))
    send(ledger, key(3), prompt_set="alpha")
    answer(ledger, key(3), None)  # in doubt

    alpha = ledger.progress("alpha")
    assert alpha.prompt_set == "alpha" and set(alpha.counts) == set(State)  # every state, zeros included
    assert nonzero(alpha.counts) == {State.COMPLETED: 2, State.IN_DOUBT: 1, State.PLANNED: 1}
    assert (alpha.total, alpha.collected, alpha.uncollected, alpha.pending) == (4, 1, 1, 0)
    assert alpha.in_doubt == [key(3)]
    assert alpha.oldest_uncollected_at == T0 + timedelta(seconds=120)  # key 2, the one not stored
    assert alpha.ready_to_collect and not alpha.done

    # Key 1 is stored in alpha's folder, not in beta's: beta still has it to collect (by copying).
    beta = ledger.progress("beta")
    assert nonzero(beta.counts) == {State.COMPLETED: 1, State.PLANNED: 1}
    assert (beta.collected, beta.uncollected) == (0, 1)
    store(ledger, "beta", key(1))
    assert (ledger.progress("beta").collected, ledger.progress("beta").uncollected) == (1, 0)
    assert ledger.progress("beta").done  # nothing pending, everything finished stored (planned waits for a person)
    assert ledger.progress("nobody").total == 0 and not ledger.progress("nobody").ready_to_collect


def test_members_this_scope_never_planned_count_as_planned(target: LedgerTarget) -> None:
    emulator = target.open()
    emulator.plan("shots", [planned(key(1)), planned(key(2))])
    submit(emulator, key(1), prompt_set="shots")
    complete(emulator, key(1))
    store(emulator, "shots", key(1))

    real = emulator.for_scope("https://api.aimlapi.com")
    progress = real.progress("shots")
    assert nonzero(progress.counts) == {State.PLANNED: 2}
    assert (progress.total, progress.collected, progress.in_doubt) == (2, 0, [])
    assert progress.fingerprint != emulator.progress("shots").fingerprint


def test_pending_generations_hold_collection_until_stragglers_wait_too_long(ledger: Ledger, clock: Clock) -> None:
    ledger.plan("s", [planned(key(1)), planned(key(2))])
    submit(ledger, key(1), prompt_set="s")
    submit(ledger, key(2), prompt_set="s")
    complete(ledger, key(1))
    progress = ledger.progress("s")
    assert (progress.pending, progress.oldest_pending_since) == (1, T0)
    assert not progress.ready_to_collect and not progress.should_collect(clock.now)
    assert progress.should_collect(clock.now + COLLECT_EARLY_AFTER)  # one stuck generation waits no longer


def test_the_fingerprint_changes_with_states_and_only_with_them(ledger: Ledger) -> None:
    ledger.plan("s", [planned(key(1)), planned(key(2))])
    seen = [ledger.progress("s").fingerprint]
    assert ledger.progress("s").fingerprint == seen[0]  # asked again, nothing changed

    send(ledger, key(1), prompt_set="s")
    seen.append(ledger.progress("s").fingerprint)
    answer(ledger, key(1), True)
    seen.append(ledger.progress("s").fingerprint)
    ledger.postpone_poll(key(1), T0 + timedelta(seconds=5))  # no state change
    assert ledger.progress("s").fingerprint == seen[-1]
    complete(ledger, key(1))
    seen.append(ledger.progress("s").fingerprint)
    ledger.plan("s", [planned(key(1))])  # key 2 retired: the set changed
    seen.append(ledger.progress("s").fingerprint)
    assert len(set(seen)) == len(seen)
