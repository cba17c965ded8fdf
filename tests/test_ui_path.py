"""The UI path through the webserver's GraphQL API, as a person in the Dagster UI takes it: a new file
becomes a partition, "Materialize" on that partition's submission assets launches a run, the asset
page shows the pending counts, the runs list shows what the run bought, and the collection the
completion sensor asks for stores the videos and says what it collected.

The daemon is not started: its two sensors are evaluated against the webserver's instance and their
results applied as the daemon would (partitions, observations, the requested run launched through
GraphQL like any other).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
from conftest import EMULATOR_API_KEY
from dagster_services import graphql
from pipeline_support import SAMPLE_IMAGES, TWO_SEEDS
from test_webserver_smoke import REPO, WEBSERVER, free_port, query_until_loaded, stop_process_group

from wan_pipeline.definitions import build_definitions
from wan_pipeline.defs.sensors import evaluate_sensor
from wan_pipeline.emulator import EmulatorConfig, running_emulator
from wan_pipeline.settings import load_settings

SET = "launch"
RUN_DEADLINE_S = 90.0

LAUNCH = """
mutation Launch($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status tags { key value } }
  }
}
"""
OBSERVATIONS = """
query Observations($assetKey: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $assetKey) {
    __typename
    ... on Asset {
      assetObservations(partitions: $partitions, limit: 1) {
        partition
        metadataEntries {
          label
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on TimestampMetadataEntry { timestamp }
        }
      }
    }
  }
}
"""


def launch(client: httpx.Client, location: str, assets: list[str], partition: str, tags: dict | None = None,
           run_config: dict | None = None) -> str:
    """What "Materialize" on a partition does in the UI: a run of the implicit asset job on a selection."""
    params = {
        "selector": {
            "repositoryLocationName": location,
            "repositoryName": "__repository__",
            "pipelineName": "__ASSET_JOB",
            "assetSelection": [{"path": [a]} for a in assets],
            "assetCheckSelection": [],
        },
        "mode": "default",
        "runConfigData": run_config or {},
        "executionMetadata": {
            "tags": [{"key": k, "value": v} for k, v in {"dagster/partition": partition, **(tags or {})}.items()]
        },
    }
    result = graphql(client, LAUNCH, executionParams=params)["launchPipelineExecution"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def wait_for_run(client: httpx.Client, run_id: str, log_path: Path) -> dict[str, str]:
    deadline = time.monotonic() + RUN_DEADLINE_S
    while time.monotonic() < deadline:
        run = graphql(client, RUN, runId=run_id)["runOrError"]
        if run["status"] in {"SUCCESS", "FAILURE", "CANCELED"}:
            assert run["status"] == "SUCCESS", log_path.read_text()[-3000:]
            return {t["key"]: t["value"] for t in run["tags"]}
        time.sleep(0.5)
    pytest.fail(f"run {run_id} did not finish within {RUN_DEADLINE_S:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_ui_path_launch_see_pending_and_cost_then_collect(tmp_path: Path, monkeypatch) -> None:
    catalog = tmp_path / "configs" / "prompt_sets"
    catalog.mkdir(parents=True)
    shutil.copytree(SAMPLE_IMAGES, tmp_path / "data" / "images")
    (catalog / f"{SET}.yaml").write_text(TWO_SEEDS)
    home = tmp_path / "dagster_home"
    home.mkdir()
    # Runs start at once (no daemon in this test to dequeue them).
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nrun_coordinator:\n  module: dagster.core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
    )
    # Generations that take long enough to be seen pending.
    config = EmulatorConfig(latency_s=12.0, api_key=EMULATOR_API_KEY, small_frames=True)
    with running_emulator(config) as emulator:
        env = {
            "DAGSTER_HOME": str(home),
            "AIMLAPI_API_KEY": EMULATOR_API_KEY,
            "AIMLAPI_BASE_URL": emulator.base_url,
            "WAN_PIPELINE_CATALOG_DIR": str(catalog),
            "WAN_PIPELINE_OUTPUT": str(tmp_path / "outputs"),
            "WAN_PIPELINE_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
            "WAN_PIPELINE_ALLOWED_ROOTS": str(tmp_path),
            "WAN_PIPELINE_EXPECTED_SECONDS": "12",
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        defs = build_definitions(load_settings())
        port = free_port()
        log_path = tmp_path / "webserver.log"
        with dg.DagsterInstance.from_config(str(home)) as instance, log_path.open("wb") as log:
            evaluate_sensor(defs, instance, "prompt_set_sensor", None)  # the new file becomes a partition
            process = subprocess.Popen(
                [str(WEBSERVER), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                base_url = f"http://127.0.0.1:{port}"
                workspace = query_until_loaded(base_url, process, log_path)
                (entry,) = workspace["locationEntries"]
                assert entry["name"] == "wan-pipeline"
                with httpx.Client(base_url=base_url, timeout=30.0) as client:
                    # 1. Materialize the submission of the partition, as the UI does.
                    run_id = launch(client, entry["name"], ["generation_requests", "submitted_generations"], SET)
                    tags = wait_for_run(client, run_id, log_path)
                    assert tags["wan_pipeline/bought"] == "2" and float(tags["wan_pipeline/usd"]) > 0
                    assert emulator.stats()["accepted_creates"] == 2

                    # 2. The completion sensor's tick: pending counts on the asset page.
                    first = evaluate_sensor(defs, instance, "generation_completion_sensor", None)
                    assert not first.run_requests
                    asset = graphql(
                        client, OBSERVATIONS, assetKey={"path": ["generation_results"]}, partitions=[SET]
                    )["assetOrError"]
                    (observation,) = asset["assetObservations"]
                    entries = {e["label"]: e for e in observation["metadataEntries"]}
                    assert observation["partition"] == SET
                    assert entries["pending"]["intValue"] == 2
                    assert entries["queued"]["intValue"] + entries["generating"]["intValue"] == 2
                    assert entries["completed"]["intValue"] == 0
                    assert entries["expected_finish"]["timestamp"] > time.time() - 60

                    # 3. Once terminal, the sensor asks for a collection; the daemon would launch it.
                    cursor, deadline = first.cursor, time.monotonic() + RUN_DEADLINE_S
                    while True:
                        result = evaluate_sensor(defs, instance, "generation_completion_sensor", cursor)
                        cursor = result.cursor
                        if result.run_requests or time.monotonic() > deadline:
                            break
                        time.sleep(1.0)
                    (request,) = result.run_requests
                    collect_id = launch(
                        client, entry["name"], ["generation_results", "downloaded_videos"], SET,
                        tags={**request.tags, "dagster/run_key": request.run_key},
                    )
                    tags = wait_for_run(client, collect_id, log_path)
                    assert tags["wan_pipeline/collected"] == "2" and tags["wan_pipeline/completed"] == "2"
                    assert len(list((tmp_path / "outputs" / SET).glob("*.mp4"))) == 2
                    assert emulator.stats()["accepted_creates"] == 2  # collecting bought nothing
            finally:
                stop_process_group(process)
