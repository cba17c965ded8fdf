"""Incremental collection: a set's finished videos are collected while the rest still run."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from conftest import EMULATOR_API_KEY
from pipeline_support import Project, make_project

from wan_pipeline import collection as collection_module
from wan_pipeline.defs.sensors import COLLECTION_TAG, STATES_TAG, collection_in_flight
from wan_pipeline.emulator import EmulatorConfig, running_emulator
from wan_pipeline.ledger import State, generations
from wan_pipeline.ledger import store as ledger_store
from wan_pipeline.runner import PipelineRunner, RunOptions

SET = "stream"
THREE_SEEDS = """\
defaults: {resolution: 720p, duration: 5}
items:
  - image: ../../data/images/mug.png
    prompt: Slow dolly-in on a steaming mug
    seeds: [1, 2, 3]
"""
VIDEO_ROUTE = "GET /_emulator/videos"


@pytest.fixture
def project(tmp_path, emulator, monkeypatch) -> Project:
    monkeypatch.setattr(ledger_store, "COLLECT_EARLY_AFTER", timedelta(0))  # an increment as soon as one waits
    with dg.instance_for_test() as instance:
        yield make_project(tmp_path, emulator, monkeypatch, instance)


def _set_generation_id(project: Project, key: str, generation_id: str) -> None:
    with project.ledger._writer.begin() as conn:
        conn.execute(
            generations.update()
            .where(generations.c.request_key == key, generations.c.api_scope == project.ledger.scope)
            .values(generation_id=generation_id)
        )


def _due_now(project: Project) -> None:
    for row in project.ledger.rows(SET, states={State.SUBMITTED, State.GENERATING}):
        project.ledger.postpone_poll(row.request_key, datetime(2000, 1, 1, tzinfo=UTC))


def _tick_until(project: Project, cursor: str | None, done) -> tuple[dg.SensorResult, str | None]:
    """Ticks (each one polls what is due) until `done(result)`; bounded by the emulator's latency."""
    for _ in range(200):
        _due_now(project)
        result = project.tick("generation_completion_sensor", cursor)
        cursor = result.cursor
        if done(result):
            return result, cursor
    raise AssertionError("the sensor never got there")


def _run(project: Project, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    result = project.defs.resolve_job_def("collect_prompt_set").execute_in_process(
        instance=project.instance, partition_key=request.partition_key, run_config=request.run_config,
        tags={**request.tags, "dagster/run_key": request.run_key}, asset_selection=request.asset_selection,
    )
    assert result.success
    return result


def _metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key == dg.AssetKey(asset):
            return {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}
    raise AssertionError(f"{asset} was not materialized")


def _check(result: dg.ExecuteInProcessResult, name: str) -> dg.AssetCheckEvaluation:
    (found,) = [c for c in result.get_asset_check_evaluations() if c.check_name == name]
    return found


def _downloads(project: Project) -> int:
    return sum(project.emulator.stats()["requests"].get(VIDEO_ROUTE, {}).values())


def test_sensor_collects_a_set_in_increments_and_never_downloads_a_video_twice(project: Project) -> None:
    project.write_set(f"{SET}.yaml", THREE_SEEDS)
    assert project.submit(SET).success
    first, second, third = (r.request_key for r in project.ledger.rows(SET))
    real = {r.request_key: r.generation_id for r in project.ledger.rows(SET)}
    _set_generation_id(project, second, "held-back-1")  # the provider "still runs" these two
    _set_generation_id(project, third, "held-back-2")
    downloads_before = _downloads(project)

    # 1. One finished of three: an increment, with its own run key and only results + videos.
    result, cursor = _tick_until(project, None, lambda r: bool(r.run_requests))
    (increment,) = result.run_requests
    progress = project.ledger.progress(SET)
    assert progress.counts[State.COMPLETED] == 1 and progress.pending == 2
    assert increment.run_key == f"collect-{SET}-1of3-{progress.fingerprint}"
    assert increment.tags[COLLECTION_TAG] == "partial" and increment.tags[STATES_TAG] == progress.fingerprint
    assert set(increment.asset_selection) == {dg.AssetKey("generation_results"), dg.AssetKey("downloaded_videos")}
    # The same state asks for nothing again (cursor) ...
    assert not project.tick("generation_completion_sensor", cursor).run_requests
    collected = _run(project, increment)
    videos = _metadata(collected, "downloaded_videos")
    assert videos["collection"] == "partial" and videos["still_pending"] == 2
    assert videos["videos"] == 1 and videos["downloaded"] == 1
    assert videos["contact_sheet"] == "drawn by the final collection"
    assert _metadata(collected, "generation_results")["still_pending"] == 2
    check = _check(collected, "videos_match_requests")
    assert check.passed and check.metadata["videos_checked"].value == 1  # pending ones do not fail it
    # ... nor does a fresh daemon (no cursor) for the state that run collected.
    assert not project.tick("generation_completion_sensor").run_requests
    assert _downloads(project) - downloads_before == 1

    # 2. One more finished: another increment, a different run key; the first video is kept.
    _set_generation_id(project, second, real[second])
    result, cursor = _tick_until(project, cursor, lambda r: bool(r.run_requests))
    (increment2,) = result.run_requests
    assert increment2.run_key.startswith(f"collect-{SET}-2of3-") and increment2.run_key != increment.run_key
    collected = _run(project, increment2)
    videos = _metadata(collected, "downloaded_videos")
    assert (videos["downloaded"], videos["already_verified"], videos["still_pending"]) == (1, 1, 1)
    assert _check(collected, "videos_match_requests").metadata["videos_checked"].value == 1
    assert _downloads(project) - downloads_before == 2

    # 3. All terminal: the final collection (whole job, the check judges everything), its own run key.
    _set_generation_id(project, third, real[third])
    result, cursor = _tick_until(project, cursor, lambda r: bool(r.run_requests))
    (final,) = result.run_requests
    progress = project.ledger.progress(SET)
    assert progress.ready_to_collect
    assert final.run_key == f"collect-{SET}-{progress.fingerprint}" and final.tags[COLLECTION_TAG] == "final"
    assert final.asset_selection is None and not final.run_config
    collected = _run(project, final)
    videos = _metadata(collected, "downloaded_videos")
    assert (videos["collection"], videos["videos"], videos["downloaded"], videos["already_verified"]) == ("final", 3, 1, 2)
    assert "data:image/png;base64," in videos["contact_sheet"]
    check = _check(collected, "videos_match_requests")
    assert check.passed and check.metadata["videos_checked"].value == 3
    assert _downloads(project) - downloads_before == 3  # each video downloaded exactly once
    assert project.ledger.progress(SET).done
    assert not project.tick("generation_completion_sensor", cursor).run_requests


def test_a_generation_completing_during_an_increment_is_stored_by_it(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_set(f"{SET}.yaml", THREE_SEEDS)
    assert project.submit(SET).success
    _, second, third = (r.request_key for r in project.ledger.rows(SET))
    real = {r.request_key: r.generation_id for r in project.ledger.rows(SET)}
    _set_generation_id(project, second, "held-back-1")
    _set_generation_id(project, third, "held-back-2")
    result, _ = _tick_until(project, None, lambda r: bool(r.run_requests))
    (increment,) = result.run_requests

    download = collection_module._download_fresh
    polled_meanwhile: list[int] = []

    def second_finishes() -> None:  # what the sensor does meanwhile (a daemon's, or `run`'s thread)
        _set_generation_id(project, second, real[second])
        _tick_until(project, None, lambda r: project.ledger.progress(SET).counts[State.COMPLETED] == 2)

    async def download_while_the_sensor_polls(*args, **kwargs):
        if not polled_meanwhile:
            polled_meanwhile.append(1)
            await asyncio.to_thread(second_finishes)
        return await download(*args, **kwargs)

    monkeypatch.setattr(collection_module, "_download_fresh", download_while_the_sensor_polls)
    videos = _metadata(_run(project, increment), "downloaded_videos")
    # Pending at the start of the run: still_pending says 2; the run stored the one that finished meanwhile.
    assert (videos["collection"], videos["still_pending"], videos["downloaded"]) == ("partial", 2, 2)
    progress = project.ledger.progress(SET)
    assert (progress.collected, progress.pending) == (2, 1)


def test_a_partial_collection_is_judged_on_what_it_stored(project: Project) -> None:
    """A damaged video stored by an increment fails the blocking check; pending ones never do."""
    project.write_set(f"{SET}.yaml", THREE_SEEDS)
    assert project.submit(SET).success
    _, second, third = (r.request_key for r in project.ledger.rows(SET))
    _set_generation_id(project, second, "held-back-1")
    _set_generation_id(project, third, "held-back-2")
    result, _ = _tick_until(project, None, lambda r: bool(r.run_requests))
    (increment,) = result.run_requests
    collected = _run(project, increment)
    assert _check(collected, "videos_match_requests").passed
    (video,) = (project.root / "outputs" / SET).glob("*.mp4")
    sidecar = video.with_suffix(".json")
    record = json.loads(sidecar.read_text())
    # An increment draws no sheet: its preview was made by the collection, as it stored the video.
    assert (project.root / "outputs" / ".previews" / f"{record['video']['sha256']}.jpg").exists()
    sidecar.write_text(json.dumps({**record, "video": {**record["video"], "sha256": "0" * 64}}))
    # The next increment re-downloads the file that no longer verifies and checks it again.
    again = project.defs.resolve_job_def("collect_prompt_set").execute_in_process(
        instance=project.instance, partition_key=SET, run_config=increment.run_config,
        asset_selection=increment.asset_selection, raise_on_error=False,
    )
    videos = _metadata(again, "downloaded_videos")
    assert videos["downloaded"] == 1 and videos["collection"] == "partial"
    assert _check(again, "videos_match_requests").passed


def test_no_request_while_a_collection_of_the_set_is_in_flight(project: Project) -> None:
    project.write_set(f"{SET}.yaml", THREE_SEEDS)
    assert project.submit(SET).success
    _, second, third = (r.request_key for r in project.ledger.rows(SET))
    _set_generation_id(project, second, "held-back-1")
    _set_generation_id(project, third, "held-back-2")
    job = project.defs.resolve_job_def("collect_prompt_set")
    running = project.instance.create_run_for_job(
        job, status=dg.DagsterRunStatus.STARTED, tags={"dagster/partition": SET}
    )
    assert collection_in_flight(project.instance, SET) and not collection_in_flight(project.instance, "other")
    cursor = None
    for _ in range(40):  # long enough for the first one to finish at the emulator
        _due_now(project)
        result = project.tick("generation_completion_sensor", cursor)
        cursor = result.cursor
        assert not result.run_requests
        if project.ledger.progress(SET).counts[State.COMPLETED]:
            break
    assert project.ledger.progress(SET).counts[State.COMPLETED] == 1
    project.instance.report_run_failed(running)
    (request,) = project.tick("generation_completion_sensor", cursor).run_requests  # asked once it ended
    assert request.tags[COLLECTION_TAG] == "partial"


def test_run_stores_the_fast_video_before_the_slow_one_completes(tmp_path, monkeypatch) -> None:
    # Seeded jitter: the two generations take about 1.4 s and 8.1 s.
    config = EmulatorConfig(latency_s=5.0, latency_jitter_s=4.5, seed=9, api_key=EMULATOR_API_KEY)
    monkeypatch.setattr(ledger_store, "COLLECT_EARLY_AFTER", timedelta(0))
    with running_emulator(config) as emulator, dg.instance_for_test() as instance:
        project = make_project(tmp_path, emulator, monkeypatch, instance)
        project.write_set(f"{SET}.yaml", THREE_SEEDS.replace("[1, 2, 3]", "[1, 2]"))
        out = io.StringIO()
        code = PipelineRunner(project.defs, instance, project.settings, out=out).run(
            RunOptions(prompt_sets=[SET], deadline_s=120, tick_interval_s=0.5)
        )
        assert code == 0, out.getvalue()
        stats = emulator.stats()
        runs = list(reversed(instance.get_runs(filters=dg.RunsFilter(job_name="collect_prompt_set"))))
    finishes = {g: s["completes_at"] for g, s in stats["generations"].items()}
    fast, slow = sorted(finishes, key=finishes.get)
    assert finishes[slow] - finishes[fast] > 5
    stored = {}
    for sidecar in (tmp_path / "outputs" / SET).glob("*.json"):
        record = json.loads(sidecar.read_text())
        stored[record["generation_id"]] = datetime.fromisoformat(record["timings"]["stored_at"]).timestamp()
    assert set(stored) == {fast, slow}
    assert stored[fast] < finishes[slow]  # collected while the slow one was still running
    kinds = [r.tags.get(COLLECTION_TAG) for r in runs]
    assert kinds[0] == "partial" and kinds[-1] == "final" and kinds.count("final") == 1
    assert len({r.tags["dagster/run_key"] for r in runs}) == len(runs)  # deterministic, distinct run keys
    assert sum(stats["requests"].get(VIDEO_ROUTE, {}).values()) == 2  # nothing downloaded twice
    assert project.ledger.progress(SET).done
