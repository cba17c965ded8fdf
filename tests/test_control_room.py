"""The Dagster UI as the control room (issue 10): pending work, cost, staleness, broken files and
failures in words, evaluated as the models do it (sensors and the schedule on an instance with
build contexts, jobs in process) against the emulator."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml
from conftest import EMULATOR_API_KEY
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest
from pipeline_support import REPO, TWO_SEEDS, Project, make_project

from wan_pipeline.definitions import build_definitions
from wan_pipeline.defs.assets import file_data_version, prompt_set_file
from wan_pipeline.defs.resources import AimlApiResource
from wan_pipeline.defs.sensors import STATES_TAG
from wan_pipeline.emulator import EmulatorConfig, running_emulator
from wan_pipeline.settings import load_settings

SET = "launch"


@pytest.fixture
def project(tmp_path, emulator, monkeypatch) -> Project:
    with dg.instance_for_test() as instance:
        yield make_project(tmp_path, emulator, monkeypatch, instance)


def apply(project: Project, result: dg.SensorResult) -> None:
    """What the daemon does with a sensor result besides launching runs: partitions and asset events."""
    for request in result.dynamic_partitions_requests or []:
        project.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events or []:
        project.instance.report_runless_asset_event(event)


def observations(result: dg.SensorResult, asset: str) -> dict[str, dict]:
    return {
        e.partition: {k: v.value for k, v in e.metadata.items()}
        for e in result.asset_events or []
        if isinstance(e, dg.AssetObservation) and e.asset_key.to_user_string() == asset
    }


def run_tags(project: Project, result: dg.ExecuteInProcessResult) -> dict[str, str]:
    tags = project.instance.get_run_by_id(result.run_id).tags
    return {k.removeprefix("wan_pipeline/"): v for k, v in tags.items() if k.startswith("wan_pipeline/")}


def failure_description(result: dg.ExecuteInProcessResult) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure)
    return failure.step_failure_data.user_failure_data.description


# 1. Pending work is visible -------------------------------------------------------------------------


def tick_log(capfd, level: str) -> list[str]:
    """The sensor's tick-log lines at `level`, as its console logger printed them."""
    marker = f" - dagster - {level} - "
    return [line.split(marker, 1)[1] for line in capfd.readouterr().err.splitlines() if marker in line]


def test_completion_sensor_observes_and_logs_pending_work_per_set(tmp_path, monkeypatch, capfd) -> None:
    # A slower emulator than the session's, so the generations are surely still pending at the first tick.
    config = EmulatorConfig(latency_s=3.0, api_key=EMULATOR_API_KEY, small_frames=True)
    with running_emulator(config) as emulator, dg.instance_for_test() as instance:
        project = make_project(tmp_path, emulator, monkeypatch, instance)
        monkeypatch.setenv("WAN_PIPELINE_EXPECTED_SECONDS", "3")  # make_project sets 0.5
        project.defs = build_definitions(load_settings())
        _pending_work_is_observed(project, capfd)


def _pending_work_is_observed(project: Project, capfd) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    assert project.submit(SET).success
    capfd.readouterr()
    first = project.tick("generation_completion_sensor")
    (seen,) = observations(first, "generation_results").values()
    assert seen["pending"] == 2 and seen["queued"] + seen["generating"] == 2
    assert seen["completed"] == 0 and seen["failed"] == 0 and seen["in_doubt"] == 0
    assert seen["oldest_pending_age_s"] >= 0
    # Expected finish from the rows' expected processing time (WAN_PIPELINE_EXPECTED_SECONDS=0.5 here).
    assert abs(seen["expected_finish"] - time.time()) < 60
    line = next(line for line in tick_log(capfd, "INFO") if line.startswith(f"{SET}: "))
    assert "queued" in line and "generating" in line and "expected done by" in line

    # Bounded rate: the same states a moment later are not observed again ...
    again = project.tick("generation_completion_sensor", first.cursor)
    if json.loads(again.cursor)["observed"][SET][0] == json.loads(first.cursor)["observed"][SET][0]:
        assert not observations(again, "generation_results")
    # ... and the last word on a finished set says nothing is pending any more.
    cursor, last = again.cursor, {}
    for _ in range(100):
        result = project.tick("generation_completion_sensor", cursor)
        cursor = result.cursor
        last = observations(result, "generation_results").get(SET) or last
        if last.get("completed") == 2:
            break
        time.sleep(0.1)
    assert last["completed"] == 2 and last["pending"] == 0


# 2. Cost in the UI ----------------------------------------------------------------------------------


def test_runs_are_tagged_with_what_they_bought_and_collected(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    submitted = project.submit(SET)
    assert submitted.success
    tags = run_tags(project, submitted)
    assert tags["bought"] == "2" and float(tags["usd"]) > 0 and tags["in_doubt"] == "0"
    metadata = {
        k: v.value
        for k, v in project.instance.get_latest_materialization_event(dg.AssetKey("submitted_generations"))
        .asset_materialization.metadata.items()
    }
    assert metadata["set_usd_to_date"] == pytest.approx(float(tags["usd"]))
    assert metadata["set_purchases_to_date"] == 2

    # A second submission buys nothing: its tags say so, the set's spend to date is unchanged.
    again = project.submit(SET)
    assert run_tags(project, again)["bought"] == "0" and run_tags(project, again)["usd"] == "0.0000"

    for _ in range(100):
        result = project.tick("generation_completion_sensor")
        if result.run_requests:
            break
        time.sleep(0.1)
    (request,) = result.run_requests
    collected = project.collect(SET, **request.tags, **{"dagster/run_key": request.run_key})
    assert collected.success
    tags = run_tags(project, collected)
    assert tags["collected"] == "2" and tags["completed"] == "2" and tags["failed"] == "0"


def test_default_per_run_budget_refuses_before_any_create_and_run_config_raises_it(
    project: Project, monkeypatch
) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)  # estimated $1.05
    monkeypatch.setenv("WAN_PIPELINE_MAX_USD", "0.5")
    refused = project.submit(SET)
    assert not refused.success and project.accepted_creates() == 0
    message = failure_description(refused)
    assert "WAN_PIPELINE_MAX_USD" in message and "max_usd" in message
    assert run_tags(project, refused)["bought"] == "0"

    raised = project.submit(SET, max_usd=2.0)
    assert raised.success and project.accepted_creates() == 2

    monkeypatch.delenv("WAN_PIPELINE_MAX_USD")
    project.write_set("big.yaml", TWO_SEEDS.replace("seeds: [1, 2]", "seeds: [" + ", ".join(map(str, range(10, 50))) + "]"))
    assert not project.submit("big").success  # 40 x $0.525 = $21 > the $20 default
    assert project.accepted_creates() == 2


# 3. Catalog edits mark work stale by themselves -----------------------------------------------------


def test_editing_a_file_marks_the_catalog_unsynced_and_only_the_free_refresh_is_automated(project: Project) -> None:
    path = project.catalog_dir / f"{SET}.yaml"
    path.write_text(TWO_SEEDS)
    first = project.tick("prompt_set_sensor")
    apply(project, first)
    (observed,) = observations(first, "prompt_set_file").values()
    assert observed["valid"] is True
    assert project.submit(SET).success

    graph = project.defs.resolve_asset_graph()
    def status(asset: str) -> StaleStatus:
        return CachingStaleStatusResolver(project.instance, graph, LoadingContextForTest(project.instance)).get_status(dg.AssetKey(asset), SET)

    assert status("generation_requests") == StaleStatus.FRESH
    # The automation sensor's previous evaluation: nothing to do while the file is unchanged.
    before = dg.evaluate_automation_conditions(defs=project.defs, instance=project.instance)
    assert before.total_requested == 0
    path.write_text(TWO_SEEDS.replace("[1, 2]", "[1, 3]"))
    second = project.tick("prompt_set_sensor", first.cursor)
    apply(project, second)
    assert set(observations(second, "prompt_set_file")) == {SET}
    assert status("generation_requests") == StaleStatus.STALE  # "Unsynced", no manual step
    assert not project.tick("prompt_set_sensor", second.cursor).asset_events  # observed once per change

    evaluation = dg.evaluate_automation_conditions(defs=project.defs, instance=project.instance, cursor=before.cursor)
    requested = {
        (key.to_user_string(), tuple(sorted(evaluation.get_requested_partitions(key) or ())))
        for key in project.defs.resolve_asset_graph().get_all_asset_keys()
        if evaluation.get_num_requested(key)
    }
    assert requested == {("generation_requests", (SET,))}  # never the spending assets


# 4. Broken files are named, never partitions ---------------------------------------------------------


def test_prompt_set_sensor_names_every_file_it_cannot_use(project: Project, capfd) -> None:
    (project.catalog_dir / "good.yaml").write_text(TWO_SEEDS)
    (project.catalog_dir / "Bad Name.csv").write_text("image,prompt\n../../data/images/mug.png,A pan\n")
    (project.catalog_dir / "empty.yaml").write_text("")
    (project.catalog_dir / "syntax.yaml").write_text("items: [\n")
    (project.catalog_dir / "invalid.yaml").write_text(TWO_SEEDS.replace("prompt:", "promt:"))
    capfd.readouterr()
    result = project.tick("prompt_set_sensor")
    (added,) = result.dynamic_partitions_requests
    assert list(added.partition_keys) == ["good"]  # a partition is a usable set
    warnings = tick_log(capfd, "WARNING")
    for name, reason in [
        ("Bad Name.csv", "allowed: a slug"),
        ("empty.yaml", "no generations"),
        ("syntax.yaml", "malformed YAML"),
        ("invalid.yaml", "did you mean 'prompt'"),
    ]:
        (line,) = [w for w in warnings if f"skipped: {name}:" in w]
        assert reason in line and "\n" not in line
    # Unchanged files are not validated again, but still named on every tick.
    project.tick("prompt_set_sensor", result.cursor)
    assert sum(line.startswith("skipped:") for line in tick_log(capfd, "WARNING")) == 4


def test_a_set_that_becomes_invalid_stays_a_partition_and_is_observed_as_invalid(project: Project) -> None:
    path = project.catalog_dir / f"{SET}.yaml"
    path.write_text(TWO_SEEDS)
    first = project.tick("prompt_set_sensor")
    apply(project, first)
    path.write_text(TWO_SEEDS.replace("720p", "480p"))
    second = project.tick("prompt_set_sensor", first.cursor)
    observed = observations(second, "prompt_set_file")[SET]
    assert observed["valid"] is False and "480p" in observed["problems"]


# 5. Failures in words -------------------------------------------------------------------------------


def test_collecting_a_set_never_submitted_fails_with_one_line_saying_what_to_run_first(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    result = project.collect(SET)
    assert not result.success
    message = failure_description(result)
    assert "submitted_generations has not been materialized for prompt set 'launch'" in message
    assert "run submit_prompt_set" in message and "\n" not in message
    assert "FileNotFoundError" not in message


def test_an_invalid_catalog_fails_saying_what_to_do(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS.replace("720p", "480p"))
    message = failure_description(project.submit(SET))
    first_line = message.splitlines()[0]
    assert "invalid" in first_line and "fix its file" in first_line and "nothing was submitted" in first_line


# 6. Details -----------------------------------------------------------------------------------------


def test_the_code_location_has_a_name() -> None:
    (entry,) = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"]
    assert entry["python_module"]["location_name"] == "wan-pipeline"


def test_results_tables_and_contact_sheet_labels_show_prompts(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    job = project.defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=project.instance, partition_key=SET)
    results = project.instance.get_latest_materialization_event(dg.AssetKey("generation_results"))
    table = results.asset_materialization.metadata["results"].value
    assert "| prompt" in table and "Slow dolly-in on a steaming mug" in table
    assert result.success


def test_a_fresh_daemon_does_not_repeat_collections_that_run_already_did(project: Project) -> None:
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    assert project.submit(SET).success
    for _ in range(100):
        result = project.tick("generation_completion_sensor")
        if result.run_requests:
            break
        time.sleep(0.1)
    (request,) = result.run_requests
    # What `wan-pipeline run` does: executes the requested collection in process, with its tags.
    assert project.collect(SET, **request.tags, **{"dagster/run_key": request.run_key}).success
    assert project.instance.get_runs(filters=dg.RunsFilter(tags={STATES_TAG: request.tags[STATES_TAG]}))
    # The daemon starts later with no cursor: it must not launch the same collection again.
    assert not project.tick("generation_completion_sensor").run_requests


def test_schedule_requests_every_set_and_its_runs_get_the_default_budget(project: Project) -> None:
    project.instance.add_dynamic_partitions("prompt_sets", ["alpha"])
    schedule = project.defs.resolve_schedule_def("production_schedule")
    context = dg.build_schedule_context(
        instance=project.instance,
        scheduled_execution_time=datetime(2026, 12, 1, 6, 0, tzinfo=UTC),
        repository_def=project.defs.get_repository_def(),
    )
    (request,) = schedule.evaluate_tick(context).run_requests
    # No run config: the run is bounded by WAN_PIPELINE_MAX_USD, raised only explicitly.
    assert request.partition_key == "alpha" and not request.run_config


def test_location_readme_documents_the_budget() -> None:
    assert "WAN_PIPELINE_MAX_USD" in Path(REPO / "README.md").read_text()


# Resources own their clients -------------------------------------------------------------------------


def test_the_api_resource_builds_its_config_once_and_closes_its_clients() -> None:
    resource = AimlApiResource(api_key="sk-test-owned", base_url="http://127.0.0.1:9")
    with dg.build_resources({"aimlapi": resource}) as resources:
        api = resources.aimlapi
        assert api.client_config() is api.client_config()  # built at setup, not per call
        client = api.client()
        assert not client._http.is_closed
        assert "sk-test-owned" not in repr(api.client_config())
    assert client._http.is_closed  # closed with the resource


def test_the_core_receives_the_resources_client_factory(project: Project, monkeypatch) -> None:
    made = []
    resource = project.defs.resources["aimlapi"]
    original = type(resource).async_client

    def counting(self):
        made.append(1)
        return original(self)

    monkeypatch.setattr(type(resource), "async_client", counting)
    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    assert project.submit(SET).success
    for row in project.ledger.rows(SET):  # due now: the tick polls (a tick with nothing due makes no client)
        project.ledger.postpone_poll(row.request_key, datetime(2000, 1, 1, tzinfo=UTC))
    project.tick("generation_completion_sensor")
    assert len(made) >= 2  # the submission and the sensor's poll both came through the resource


def test_observing_the_source_from_the_ui_gives_the_same_data_version_as_the_sensor(project: Project) -> None:
    from dagster._core.definitions.observe import observe

    project.write_set(f"{SET}.yaml", TWO_SEEDS)
    (by_sensor,) = [e for e in project.tick("prompt_set_sensor").asset_events if e.partition == SET]
    result = observe([prompt_set_file], instance=project.instance, resources={"catalog": project.defs.resources["catalog"]})
    (event,) = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    observation = event.asset_observation_data.asset_observation
    assert observation.partition == SET
    assert observation.tags["dagster/data_version"] == by_sensor.tags["dagster/data_version"]
    assert by_sensor.tags["dagster/data_version"] == file_data_version(project.catalog_dir / f"{SET}.yaml")


def test_a_cursor_from_before_the_upgrade_does_not_look_like_an_edit(project: Project, monkeypatch) -> None:
    path = project.catalog_dir / f"{SET}.yaml"
    path.write_text(TWO_SEEDS)
    project.instance.add_dynamic_partitions("prompt_sets", [SET])
    from wan_pipeline.storage import file_sha256

    legacy = json.dumps({SET: file_sha256(path)[1]})  # the old cursor: set -> full sha256
    monkeypatch.setenv("WAN_PIPELINE_AUTO_SUBMIT", "1")
    result = project.tick("prompt_set_sensor", legacy)
    assert not result.run_requests  # nothing changed, so nothing is bought
    assert "files" in json.loads(result.cursor)
