"""The Dagster webserver loads `workspace.yaml` and shows what a user expects to find in the UI.

The prompt-set partitions are registered by evaluating the real `prompt_set_sensor` against the
webserver's instance first, so this also proves the sensor turns catalog files into partitions.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest

from wan_pipeline.definitions import build_definitions
from wan_pipeline.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CATALOG = REPO / "configs" / "prompt_sets"
WEBSERVER = Path(sys.executable).parent / "dagster-webserver"
STARTUP_DEADLINE_S = 60.0

ASSETS = {
    "prompt_set_file",
    "generation_requests",
    "submitted_generations",
    "generation_results",
    "downloaded_videos",
    "experiment_table",
}
CHECKS = {
    "downloaded_videos": {"videos_match_requests", "videos_pass_quality_checks"},
    "generation_results": {"no_failed_generations"},
}

# Everything the test reads, in one round trip: the code location's load status and, once loaded,
# its assets (with partition keys from the instance and their checks), sensors and schedules.
WORKSPACE_QUERY = """
query WorkspaceContents {
  workspaceOrError {
    __typename
    ... on PythonError { message }
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
          ... on RepositoryLocation {
            repositories {
              name
              assetNodes {
                assetKey { path }
                partitionKeys
                assetChecksOrError {
                  __typename
                  ... on AssetChecks { checks { name } }
                }
              }
              sensors { name sensorState { status } }
              schedules { name scheduleState { status } }
            }
          }
        }
      }
    }
  }
}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_prompt_sets() -> set[str]:
    return {p.stem for p in SAMPLE_CATALOG.iterdir() if p.suffix in {".yaml", ".yml", ".csv"}}


def register_partitions_with_sensor(instance: dg.DagsterInstance) -> None:
    """One tick of the real `prompt_set_sensor`, with its partition requests applied as the daemon would."""
    defs = build_definitions(load_settings())
    with dg.build_sensor_context(
        instance=instance, definitions=defs, sensor_name="prompt_set_sensor", resources=defs.resources
    ) as context:
        result = defs.resolve_sensor_def("prompt_set_sensor")(context)
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh instance whose partitions were registered by the sensor from the sample catalog."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        "DAGSTER_HOME": str(home),
        "WAN_PIPELINE_CATALOG_DIR": str(SAMPLE_CATALOG),
        "WAN_PIPELINE_OUTPUT": str(tmp_path / "outputs"),
        "WAN_PIPELINE_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
        "AIMLAPI_API_KEY": "dummy",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        register_partitions_with_sensor(instance)
    return home


def stop_process_group(process: subprocess.Popen) -> None:
    # The group may already be gone when the webserver died on its own.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def webserver(dagster_home: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A `dagster-webserver` on loopback in its own process group (with its code server), always killed."""
    port = free_port()
    log_path = tmp_path / "webserver.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(WEBSERVER), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield f"http://127.0.0.1:{port}", process, log_path
        finally:
            stop_process_group(process)


def query_until_loaded(base_url: str, process: subprocess.Popen, log_path: Path) -> dict[str, Any]:
    """Poll the GraphQL endpoint until the code location has finished loading (bounded)."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    last = "no answer"
    with httpx.Client(base_url=base_url, timeout=10.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"webserver exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                response = client.post("/graphql", json={"query": WORKSPACE_QUERY})
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                last = response.text[:2000]
                if response.status_code == 200:
                    workspace = response.json()["data"]["workspaceOrError"]
                    entries = workspace.get("locationEntries") or []
                    if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                        return workspace
            time.sleep(0.25)
    pytest.fail(
        f"code location not loaded within {STARTUP_DEADLINE_S:.0f} s; last answer: {last}\n"
        f"{log_path.read_text()[-3000:]}"
    )


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_webserver_serves_the_code_location(webserver: tuple[str, subprocess.Popen, Path]) -> None:
    expected_sets = sample_prompt_sets()
    assert expected_sets, f"no sample prompt sets in {SAMPLE_CATALOG}"

    workspace = query_until_loaded(*webserver)

    assert workspace["__typename"] == "Workspace"
    [entry] = workspace["locationEntries"]
    location = entry["locationOrLoadError"]
    assert location["__typename"] == "RepositoryLocation", location.get("message")
    [repository] = location["repositories"]

    nodes = {"/".join(node["assetKey"]["path"]): node for node in repository["assetNodes"]}
    assert set(nodes) == ASSETS
    for name, node in nodes.items():
        assert set(node["partitionKeys"]) == expected_sets, name
        assert node["assetChecksOrError"]["__typename"] == "AssetChecks", name
        assert {c["name"] for c in node["assetChecksOrError"]["checks"]} == CHECKS.get(name, set()), name

    sensors = {s["name"]: s["sensorState"]["status"] for s in repository["sensors"]}
    assert sensors == {
        "prompt_set_sensor": "RUNNING",
        "generation_completion_sensor": "RUNNING",
        "catalog_automation_sensor": "RUNNING",  # refreshes generation_requests only (free)
    }
    assert entry["name"] == "wan-pipeline"
    # The schedule spends money, so a fresh deployment must not start it on its own.
    schedules = {s["name"]: s["scheduleState"]["status"] for s in repository["schedules"]}
    assert schedules == {"production_schedule": "STOPPED"}
