"""Polling and set progress: a paid generation is never given up on lightly, nor allowed to block its set."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from ledger_moves import submit_row
from pipeline_support import TWO_SEEDS, Project, make_project

from wan_pipeline import polling
from wan_pipeline.ledger import COLLECT_EARLY_AFTER, Ledger, PlannedRequest, SetProgress, State, generations
from wan_pipeline.ledger import store as ledger_store
from wan_pipeline.ledger.store import COLLECT_BATCH

SET = "launch"


def submitted_with_unknown_id(ledger: Ledger, key: str, submitted_ago: timedelta) -> None:
    """A ledger row whose generation the provider answers 404 for, submitted `submitted_ago`."""
    ledger.plan(SET, [PlannedRequest(key, "alibaba/wan-2-6-i2v", {"prompt": "p"}, 0.5, None)])
    submit_row(ledger, key, "unknown-generation-id", prompt_set=SET)
    with ledger._writer.begin() as conn:  # backdate the submission: the ledger has no API for it
        conn.execute(
            generations.update()
            .where(generations.c.request_key == key, generations.c.api_scope == ledger.scope)
            .values(submitted_at=datetime.now(UTC) - submitted_ago)
        )


def make_due(ledger: Ledger, key: str) -> None:
    ledger.postpone_poll(key, datetime(2000, 1, 1, tzinfo=UTC))


def test_a_404_is_retried_and_fails_only_when_it_persists_long_after_the_create(tmp_path, client_config) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}", scope="emulator")
    young, old = f"{1:032x}", f"{2:032x}"
    submitted_with_unknown_id(ledger, young, timedelta(minutes=1))
    submitted_with_unknown_id(ledger, old, polling.NOT_FOUND_GRACE + timedelta(minutes=1))

    polling.poll_due(ledger, client_config, limit=10, time_budget_s=10)
    # One 404 is not proof: both are still waited for, and remembered as not found.
    assert [(r.state, r.raw_status) for r in ledger.rows_for_keys([young, old])] == [
        (State.SUBMITTED, "not_found"),
        (State.SUBMITTED, "not_found"),
    ]
    make_due(ledger, young)
    make_due(ledger, old)
    polling.poll_due(ledger, client_config, limit=10, time_budget_s=10)
    assert ledger.row(young).state is State.SUBMITTED  # still within the grace period
    assert ledger.row(old).state is State.FAILED
    assert "does not know generation" in ledger.row(old).error


def test_finished_videos_are_collected_in_batches_while_others_still_run() -> None:
    """Was: finished videos waited 10 min for stragglers. Now: collected incrementally, in batches."""
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

    def progress(oldest_uncollected_at=None, collected=0, **counts: int) -> SetProgress:
        return SetProgress("s", {**dict.fromkeys(State, 0), **{State(k): v for k, v in counts.items()}},
                           collected=collected, fingerprint="f", oldest_uncollected_at=oldest_uncollected_at)

    just_finished = progress(now, generating=1, completed=2)
    assert just_finished.collection_due(now) is None  # waits a moment for others to batch with
    assert just_finished.collection_due(now + COLLECT_EARLY_AFTER) == "partial"
    assert just_finished.should_collect(now + COLLECT_EARLY_AFTER)
    assert just_finished.collection_due(now + timedelta(days=1), in_flight=True) is None  # one run at a time
    batch = progress(now, generating=1, completed=COLLECT_BATCH)
    assert batch.collection_due(now) == "partial"  # a full batch goes at once
    stored = progress(None, collected=2, generating=1, completed=2)
    assert stored.collection_due(now + timedelta(days=1)) is None  # nothing new finished
    nothing_finished = progress(generating=3)
    assert not nothing_finished.should_collect(now + timedelta(days=1))
    all_terminal = progress(completed=2, failed=1)
    assert all_terminal.collection_due(now) == "final" and all_terminal.should_collect(now)
    assert all_terminal.collection_due(now, in_flight=True) is None


@pytest.fixture
def project(tmp_path, emulator, monkeypatch) -> Project:
    with dg.instance_for_test() as instance:
        yield make_project(tmp_path, emulator, monkeypatch, instance)


def test_a_stuck_generation_does_not_keep_the_sets_finished_videos_from_being_collected(
    project: Project, monkeypatch
) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    assert project.submit(SET).success
    stuck, done = (r.request_key for r in project.ledger.rows(SET))
    with project.ledger._writer.begin() as conn:  # the provider will never finish this one
        conn.execute(
            generations.update()
            .where(generations.c.request_key == stuck, generations.c.api_scope == project.ledger.scope)
            .values(generation_id="stuck-id")
        )
    monkeypatch.setattr(ledger_store, "COLLECT_EARLY_AFTER", timedelta(0))

    cursor, request = None, None
    for _ in range(100):
        result = project.tick("generation_completion_sensor", cursor)
        cursor = result.cursor
        if result.run_requests:
            (request,) = result.run_requests
            break
        make_due(project.ledger, done)
        time.sleep(0.05)  # the emulator finishes `done` after its latency
    assert request is not None and project.ledger.row(stuck).state is State.SUBMITTED
    collected = project.defs.resolve_job_def("collect_prompt_set").execute_in_process(
        instance=project.instance, partition_key=SET, run_config=request.run_config, tags=request.tags
    )
    assert collected.success
    videos = list((project.root / "outputs" / SET).glob("*.mp4"))
    assert [v.stem for v in videos] == [done]
    results = next(
        e.step_materialization_data.materialization.metadata
        for e in collected.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("generation_results")
    )
    assert results["still_pending"].value == 1 and results["completed"].value == 1
