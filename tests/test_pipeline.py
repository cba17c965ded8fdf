"""The Dagster layer on a real instance against the emulator: assets, sensors, schedule, checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
from conftest import EMULATOR_API_KEY
from pipeline_support import TWO_SEEDS, Project, make_project

from wan_pipeline.definitions import build_definitions
from wan_pipeline.defs import sensors as sensors_module
from wan_pipeline.emulator import EmulatorConfig, running_emulator
from wan_pipeline.ledger import State
from wan_pipeline.media import probe_video
from wan_pipeline.scopes import api_origin
from wan_pipeline.settings import load_settings

SET = "launch"


@pytest.fixture
def project(tmp_path, emulator, monkeypatch) -> Project:
    with dg.instance_for_test() as instance:
        yield make_project(tmp_path, emulator, monkeypatch, instance)


def materialization(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        found = event.step_materialization_data.materialization
        if found.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in found.metadata.items()}
    raise AssertionError(f"{asset} was not materialized")


def tick_until_collect_requested(
    project: Project, cursor: str | None = None, limit_s: float = 30.0, prompt_set: str | None = None
):
    """Evaluate the completion sensor on its own clock until it asks for a collection run (of
    `prompt_set`, when given: another set that became ready meanwhile gets a request of its own)."""
    give_up = time.monotonic() + limit_s
    while time.monotonic() < give_up:
        result = project.tick("generation_completion_sensor", cursor)
        cursor = result.cursor
        if any(prompt_set in (None, r.partition_key) for r in result.run_requests):
            return result, cursor
        time.sleep(0.1)
    raise AssertionError("the completion sensor never requested a collection run")


def run_sensor_path(project: Project, prompt_set: str = SET) -> dg.ExecuteInProcessResult:
    submitted = project.submit(prompt_set)
    assert submitted.success
    result, _ = tick_until_collect_requested(project, prompt_set=prompt_set)
    (request,) = [r for r in result.run_requests if r.partition_key == prompt_set]
    return project.collect(prompt_set, **{"dagster/run_key": request.run_key})


GOLDEN_GRAPH = Path(__file__).parent / "golden" / "asset_graph.json"


def asset_graph_snapshot(defs: dg.Definitions) -> dict:
    """What the UI's asset graph shows: keys, deps, partitions, checks, kinds, groups, automation."""
    graph = defs.resolve_asset_graph()
    snapshot = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        snapshot[key.to_user_string()] = {
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "partitions": node.partitions_def.name if node.partitions_def else None,
            "checks": sorted(c.name for c in graph.asset_check_keys if c.asset_key == key),
            "kinds": sorted(node.kinds),
            "group": node.group_name,
            "observable_source": node.is_observable and not node.is_materializable,
            "automation": (node.automation_condition.get_label() or type(node.automation_condition).__name__)
            if node.automation_condition else None,
            "owners": list(node.owners),
        }
    return {
        "assets": snapshot,
        "sensors": sorted(s.name for s in defs.sensors),
        "schedules": sorted(s.name for s in defs.schedules),
        "jobs": sorted(j.name for j in defs.jobs),
    }


def test_asset_graph_matches_its_snapshot(project: Project) -> None:
    snapshot = asset_graph_snapshot(project.defs)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN_GRAPH.write_text(json.dumps(snapshot, indent=2, sort_keys=True) + "\n")
    assert snapshot == json.loads(GOLDEN_GRAPH.read_text())
    graph = project.defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.partitions_def.name == "prompt_sets"
        if node.is_materializable:
            assert node.code_version and node.owners and node.group_name


def test_a_set_goes_from_catalog_to_verified_videos_through_the_sensor(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    collected = run_sensor_path(project)

    assert collected.success
    assert project.accepted_creates() == 2
    checks = {c.check_name: c.passed for c in collected.get_asset_check_evaluations()}
    assert checks == {"videos_match_requests": True, "no_failed_generations": True, "videos_pass_quality_checks": True}
    out = project.root / "outputs" / SET
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2
    for video in videos:
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert {
            "generation_id",
            "request_key",
            "prompt_set",
            "seed",
            "request",
            "timings",
            "cost",
            "video",
        } <= set(sidecar)
        assert sidecar["request_key"] == video.stem and sidecar["prompt_set"] == SET
        assert sidecar["request"]["image_url"]["sha256"] and "base64" not in json.dumps(sidecar)
        probe = probe_video(video)
        assert (probe.height, round(probe.duration_s), probe.has_audio) == (720, 5, True)
        assert sidecar["video"]["height"] == 720 and sidecar["video"]["has_audio"] is True
    assert {json.loads(v.with_suffix(".json").read_text())["seed"] for v in videos} == {1, 2}
    assert (out / "contact_sheet.png").read_bytes().startswith(b"\x89PNG")
    assert "contact_sheet" in materialization(collected, "downloaded_videos")


def test_ad_hoc_run_of_all_four_assets_waits_for_the_provider(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    job = project.defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=project.instance, partition_key=SET, raise_on_error=False)

    assert result.success
    assert materialization(result, "generation_results")["completed"] == 2
    assert materialization(result, "downloaded_videos")["downloaded"] == 2
    assert project.accepted_creates() == 2


def test_rematerializing_a_finished_set_buys_nothing_and_downloads_nothing(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    assert run_sensor_path(project).success
    creates = project.accepted_creates()

    job = project.defs.resolve_implicit_global_asset_job_def()
    again = job.execute_in_process(instance=project.instance, partition_key=SET)
    assert materialization(again, "submitted_generations")["reused"] == 2
    assert materialization(again, "submitted_generations")["new"] == 0
    assert materialization(again, "downloaded_videos")["already_verified"] == 2
    assert project.accepted_creates() == creates


def check_metadata(result: dg.ExecuteInProcessResult, name: str) -> dict:
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    assert evaluation.passed, evaluation.metadata
    return {key: value.value for key, value in evaluation.metadata.items()}


def test_a_rematerialization_reads_no_unchanged_video_and_replaces_one_changed_in_place(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    assert run_sensor_path(project).success
    job = project.defs.resolve_implicit_global_asset_job_def()

    again = job.execute_in_process(instance=project.instance, partition_key=SET)
    assert materialization(again, "downloaded_videos")["already_verified"] == 2
    # Both files still have the stamp recorded when they were hashed: neither is read again.
    check = check_metadata(again, "videos_match_requests")
    assert (check["videos_checked"], check["videos_hashed_again"]) == (2, 0)

    video = sorted((project.root / "outputs" / SET).glob("*.mp4"))[0]
    recorded = json.loads(video.with_suffix(".json").read_text())["video"]["sha256"]
    with open(video, "r+b") as handle:  # same size, same inode: only its mtime says it changed
        handle.seek(video.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    third = job.execute_in_process(instance=project.instance, partition_key=SET)
    videos = materialization(third, "downloaded_videos")
    assert (videos["downloaded"], videos["already_verified"]) == (1, 1)  # hashed, found changed, replaced
    assert hashlib.sha256(video.read_bytes()).hexdigest() == recorded
    assert project.accepted_creates() == 2

    monkeypatch.setenv("WAN_PIPELINE_REHASH", "always")
    fourth = job.execute_in_process(instance=project.instance, partition_key=SET)
    assert check_metadata(fourth, "videos_match_requests")["videos_hashed_again"] == 2


def test_editing_one_prompt_submits_exactly_one_new_generation(project: Project) -> None:
    path = project.write_set(f"{SET}.yaml", TWO_SEEDS)
    assert project.submit(SET).success
    path.write_text(TWO_SEEDS.replace("seeds: [1, 2]", "seeds: [1, 3]"))

    result = project.submit(SET)
    assert materialization(result, "submitted_generations")["new"] == 1
    assert project.accepted_creates() == 3
    # The set is now what its catalog says: the edited-away generation is history, not a member.
    seeds = sorted(r.request_json["seed"] for r in project.ledger.rows(SET))
    assert seeds == [1, 3]


def test_data_version_of_the_catalog_changes_with_its_request_keys(project: Project) -> None:
    path = project.write_set(f"{SET}.yaml", TWO_SEEDS)
    first = project.submit(SET)
    path.write_text(TWO_SEEDS + "    negative_prompt: text\n")
    second = project.submit(SET)
    versions = [
        r.get_asset_materialization_events()[0].step_materialization_data.materialization.tags[
            "dagster/data_version"
        ]
        for r in (first, second)
    ]
    assert versions[0] != versions[1]


def test_blocking_check_fails_on_a_truncated_video_and_stops_nothing_else(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    assert run_sensor_path(project).success
    video = sorted((project.root / "outputs" / SET).glob("*.mp4"))[0]
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 2])

    # What "Execute check" in the UI does: a run of the check alone on that partition.
    check = dg.AssetCheckKey(dg.AssetKey("downloaded_videos"), "videos_match_requests")
    check_only = project.defs.resolve_job_def("collect_prompt_set").get_subset(
        asset_selection=set(), asset_check_selection={check}
    )
    result = check_only.execute_in_process(instance=project.instance, partition_key=SET, raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "videos_match_requests" and not evaluation.passed
    assert video.stem in evaluation.metadata["details"].value
    # Blocking: the check's own step fails (a deployment would stop anything downstream of it) ...
    assert {e.step_key for e in result.all_events if e.is_step_failure} == {
        "downloaded_videos_videos_match_requests"
    }
    # ... and nothing else is touched: the other video stays verified, the asset stays materialized.
    store = project.defs.resources["video_store"].get()
    others = [p for p in (project.root / "outputs" / SET).glob("*.mp4") if p != video]
    assert others and all(store.is_verified(SET, p.stem) for p in others)
    assert project.instance.get_latest_materialization_event(dg.AssetKey("downloaded_videos")) is not None


def test_completion_sensor_requests_once_per_terminal_state_and_bounds_its_tick(
    project: Project, monkeypatch
) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS.replace("seeds: [1, 2]", "seeds: [1, 2, 3, 4, 5]"))
    assert project.submit(SET).success
    monkeypatch.setattr(sensors_module, "TICK_POLL_LIMIT", 2)
    # Make all five due at once: a bounded tick polls only TICK_POLL_LIMIT of them.
    for row in project.ledger.rows(SET):
        project.ledger.postpone_poll(row.request_key, datetime(2000, 1, 1, tzinfo=UTC))

    def gets() -> int:
        return sum(project.emulator.stats()["requests"].get("GET /v2/video/generations", {}).values())

    before = gets()
    first = project.tick("generation_completion_sensor")
    assert gets() - before == 2
    assert not first.run_requests  # three generations still pending

    monkeypatch.setattr(sensors_module, "TICK_POLL_LIMIT", 5000)
    result, cursor = tick_until_collect_requested(project, first.cursor)
    (request,) = result.run_requests
    assert request.partition_key == SET and request.run_key.startswith(f"collect-{SET}-")
    assert json.loads(cursor)["requested"][SET] in request.run_key
    # A repeat tick with the same terminal states asks for nothing.
    assert not project.tick("generation_completion_sensor", cursor).run_requests


def test_prompt_set_sensor_registers_new_files_and_only_submits_when_asked(
    project: Project, monkeypatch
) -> None:
    (project.catalog_dir / "alpha.yaml").write_text(TWO_SEEDS)
    (project.catalog_dir / "beta.csv").write_text("image,prompt\n../../data/images/mug.png,A pan\n")
    first = project.tick("prompt_set_sensor")
    (added,) = first.dynamic_partitions_requests
    assert sorted(added.partition_keys) == ["alpha", "beta"]
    assert not first.run_requests  # submitting spends money: off by default

    project.instance.add_dynamic_partitions("prompt_sets", ["alpha", "beta"])
    (project.catalog_dir / "beta.csv").unlink()
    (project.catalog_dir / "alpha.yaml").write_text(TWO_SEEDS.replace("[1, 2]", "[7]"))
    monkeypatch.setenv("WAN_PIPELINE_AUTO_SUBMIT", "1")
    second = project.tick("prompt_set_sensor", first.cursor)
    assert not second.dynamic_partitions_requests
    assert "beta" in project.instance.get_dynamic_partitions("prompt_sets")  # history kept
    (request,) = second.run_requests
    assert request.partition_key == "alpha" and request.run_key.startswith("auto-submit-alpha-")
    assert not project.tick("prompt_set_sensor", second.cursor).run_requests


def test_production_schedule_requests_a_submission_per_prompt_set(project: Project) -> None:
    project.instance.add_dynamic_partitions("prompt_sets", ["alpha", "beta"])
    schedule = project.defs.resolve_schedule_def("production_schedule")
    context = dg.build_schedule_context(
        instance=project.instance,
        scheduled_execution_time=datetime(2026, 11, 24, 6, 0, tzinfo=UTC),
        repository_def=project.defs.get_repository_def(),
    )
    requests = list(schedule.evaluate_tick(context).run_requests)
    assert [(r.partition_key, r.run_key) for r in requests] == [
        ("alpha", "alpha-20261124T0600"),
        ("beta", "beta-20261124T0600"),
    ]
    assert schedule.job_name == "submit_prompt_set"


def test_budget_guard_and_dry_run_submit_nothing(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    refused = project.submit(SET, max_usd=0.5)  # two 720p 5 s generations are estimated at $1.05
    assert not refused.success
    assert project.accepted_creates() == 0

    dry = project.submit(SET, dry_run=True)
    assert dry.success
    # Nothing materialized, nothing written: the plan is an observation and a log line.
    assert not any(
        e.asset_key == dg.AssetKey("submitted_generations") for e in dry.get_asset_materialization_events()
    )
    (observation,) = [
        e.asset_observation_data.asset_observation for e in dry.all_events if e.event_type_value == "ASSET_OBSERVATION"
    ]
    assert observation.metadata["would_buy"].value == 2
    assert observation.metadata["would_spend_usd"].value == pytest.approx(1.05)
    assert project.accepted_creates() == 0 and project.ledger.rows() == []
    # ... so the completion sensor has nothing to collect.
    assert not project.tick("generation_completion_sensor").run_requests


def test_an_invalid_catalog_fails_before_anything_is_submitted(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS.replace("720p", "480p"))
    result = project.submit(SET)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "480p" in failure.step_failure_data.user_failure_data.description
    assert project.accepted_creates() == 0


def test_failed_and_in_doubt_generations_are_reported_not_raised(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    project.emulator.update_faults(create_drop_rate=1.0)
    submitted = project.submit(SET)
    assert submitted.success
    assert materialization(submitted, "submitted_generations")["in_doubt"] == 2

    other = "other"
    project.write_set(f"{other}.yaml", TWO_SEEDS.replace("[1, 2]", "[5]"))
    project.emulator.update_faults(create_drop_rate=0.0, error_rate=1.0)
    collected = run_sensor_path(project, other)
    assert collected.success  # a failed generation does not fail the asset
    results = materialization(collected, "generation_results")
    assert results["failed"] == 1
    (warning,) = [
        c for c in collected.get_asset_check_evaluations() if c.check_name == "no_failed_generations"
    ]
    assert not warning.passed and warning.severity == dg.AssetCheckSeverity.WARN
    assert [r.state for r in project.ledger.rows(SET)] == [State.IN_DOUBT, State.IN_DOUBT]


def test_expired_video_urls_are_refreshed_by_polling_again(tmp_path, monkeypatch) -> None:
    # Signed URLs that live half a second: by collection time every recorded URL has expired.
    config = EmulatorConfig(latency_s=0.3, url_ttl_s=0.5, api_key=EMULATOR_API_KEY, small_frames=True)
    with running_emulator(config) as emulator, dg.instance_for_test() as instance:
        project = make_project(tmp_path, emulator, monkeypatch, instance)
        project.write_set(f"{SET}.yaml", TWO_SEEDS)
        assert project.submit(SET).success
        tick_until_collect_requested(project)
        time.sleep(0.6)  # let the recorded URLs expire (setup, not a timing assertion)
        collected = project.collect(SET)

        assert collected.success
        metadata = materialization(collected, "downloaded_videos")
        assert metadata["downloaded"] == 2 and metadata["refreshed_urls"] >= 2
        assert len(list((tmp_path / "outputs" / SET).glob("*.mp4"))) == 2


def test_a_request_shared_by_a_second_set_is_copied_from_the_store_not_downloaded(tmp_path, monkeypatch) -> None:
    # Signed URLs that live half a second, and the first set collected before the second is submitted:
    # the second set's video must come from the store, with no call to the provider at all.
    config = EmulatorConfig(latency_s=0.3, url_ttl_s=0.5, api_key=EMULATOR_API_KEY, small_frames=True)
    with running_emulator(config) as emulator, dg.instance_for_test() as instance:
        project = make_project(tmp_path, emulator, monkeypatch, instance)
        project.write_set(f"{SET}.yaml", TWO_SEEDS)
        assert run_sensor_path(project).success
        project.write_set("reprise.yaml", TWO_SEEDS.replace("[1, 2]", "[2]"))
        assert project.submit("reprise").success
        time.sleep(0.6)  # let the recorded URLs expire (setup, not a timing assertion)
        emulator.reset_stats()

        result, _ = tick_until_collect_requested(project)
        assert "reprise" in [r.partition_key for r in result.run_requests]
        collected = project.collect("reprise")

        assert collected.success
        metadata = materialization(collected, "downloaded_videos")
        assert (metadata["downloaded"], metadata["copied_from_other_sets"]) == (0, 1)
        assert emulator.stats()["requests"] == {}  # no poll, no download, no create
        (video,) = (tmp_path / "outputs" / "reprise").glob("*.mp4")
        original = tmp_path / "outputs" / SET / video.name
        assert video.read_bytes() == original.read_bytes()
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert sidecar["reused_from"]["prompt_set"] == SET and sidecar["cost"]["usd_spent_by_this_set"] == 0.0
        checks = {c.check_name: c.passed for c in collected.get_asset_check_evaluations()}
        assert checks["videos_match_requests"]


def test_a_video_larger_than_its_request_allows_never_reaches_its_final_name(tmp_path, monkeypatch) -> None:
    # 5 s at 720p may be at most ~21 MB (see api.max_video_bytes); this server sends 40 MB.
    config = EmulatorConfig(latency_s=0.3, api_key=EMULATOR_API_KEY, small_frames=True)
    with running_emulator(config) as emulator, dg.instance_for_test() as instance:
        emulator.update_faults(oversize_video_bytes=40 * 1024 * 1024)
        project = make_project(tmp_path, emulator, monkeypatch, instance)
        project.write_set(f"{SET}.yaml", TWO_SEEDS)
        assert project.submit(SET).success
        tick_until_collect_requested(project)
        collected = project.collect(SET)

        assert not collected.success
        folder = tmp_path / "outputs" / SET
        assert not list(folder.glob("*.mp4")) and not list(folder.glob(".*"))  # nothing kept, no temporaries
        for row in project.ledger.rows(SET):
            assert row.state is State.COMPLETED and "not stored: DownloadTooLarge" in row.error
        assert project.ledger.progress(SET).collected == 0  # still to collect, not counted as stored


def test_two_apis_sharing_an_output_folder_keep_both_paid_videos(project: Project, monkeypatch) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS.replace("[1, 2]", "[1]"))
    assert run_sensor_path(project).success
    (first,) = (project.root / "outputs" / SET).glob("*.mp4")
    first_bytes = first.read_bytes()

    with running_emulator(EmulatorConfig(latency_s=0.3, small_frames=True, identify=False, seed=9)) as other:
        monkeypatch.setenv("AIMLAPI_BASE_URL", other.base_url)
        settings = load_settings()
        elsewhere = dataclasses.replace(project, settings=settings, defs=build_definitions(settings), emulator=other)
        assert run_sensor_path(elsewhere).success
        assert other.stats()["accepted_creates"] == 1  # bought again there, for real

    # This API's video took the place; the first API's paid video was moved aside, not overwritten.
    sidecar = json.loads(first.with_suffix(".json").read_text())
    assert sidecar["api"]["scope"] == api_origin(other.base_url)
    (kept,) = (project.root / "outputs" / SET / "by-api" / "emulator").glob("*.mp4")
    assert kept.name == first.name and kept.read_bytes() == first_bytes
    (stored,) = project.ledger.stored_videos([first.stem])[first.stem]
    assert stored.path == str(kept) and project.ledger.progress(SET).collected == 1
