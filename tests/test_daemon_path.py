"""The daemon path on PostgreSQL: `dagster-daemon run` and `dagster-webserver` as separate processes on the
production instance config (deploy/dagster.yaml), the ledger in the same throwaway database, the emulator
as a process of its own.

What is launched goes through the webserver's GraphQL API as the UI launches it (a run of
`submit_prompt_set` with the partition tag), into the queue the daemon drains; the daemon's sensors add
the partitions and request the collections; every run executes in a run worker process of its own.
The tests prove: a set is submitted, collected by the sensor's request, its videos stored and checked,
each request bought once; the `aimlapi` pool keeps two sets' submissions apart; a run worker killed
mid-submission leaves a failed run, a freed slot, its in-flight creates in doubt, and a relaunch that
buys only what was never sent.

The services are started once for the module (their startup is most of the cost) and every test works
on prompt sets of its own, so the tests also run one at a time. Changes to deploy/dagster.yaml in the
test's copy, and why:
- `concurrency.pools.default_limit: 1`: one `aimlapi` slot, so the pool's effect is visible with two
  sets (production: 4).
- `run_monitoring.poll_interval_seconds: 1` and `free_slots_after_run_end_seconds: 1`: the monitoring
  daemon frees the slots a dead run worker held only when it polls (production: every 60 s) and once the
  run has been over that long (production: 300 s); the test waits for it in seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
from conftest import EMULATOR_API_KEY, POSTGRES_URL, throwaway_database
from dagster_services import REPO, Services, graphql, running_services, service_env, templated_instance_config
from sqlalchemy.engine import make_url

from wan_pipeline.ledger import AttemptOutcome, Ledger, State
from wan_pipeline.scopes import EMULATOR_SCOPE

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(not POSTGRES_URL, reason="WAN_PIPELINE_TEST_POSTGRES_URL not set"),
]

DEPLOY_CONFIG = REPO / "deploy" / "dagster.yaml"
SAMPLE_IMAGES = REPO / "data" / "images"
SUBMIT_JOB = "submit_prompt_set"
COLLECT_JOB = "collect_prompt_set"
SUBMIT_STEP = "submitted_generations"
POOL = "aimlapi"
# Generous: CI machines are shared; a healthy run takes a fraction of it.
RUN_DEADLINE_S = 150.0
TEST_TIMEOUT_S = 400
PER_RUN_CONCURRENCY = 2  # WAN_PIPELINE_API_CONCURRENCY: creates in flight per submission
# A create's answer is ~90 bytes: trickled at 6 B/s it takes ~15 s (a submission step that holds the pool
# slot long enough for the other set's step to be seen waiting); at 1 B/s it stays in flight ~90 s.
SLOW_CREATES = {"create_trickle_rate": 1.0, "trickle_bytes_per_s": 6.0}
HELD_CREATES = {"create_trickle_rate": 1.0, "trickle_bytes_per_s": 1.0}
NO_TRICKLE = {"create_trickle_rate": 0.0, "trickle_bytes_per_s": 4.0}

END_TO_END, POOL_A, POOL_B, KILLED = "daemon_e2e", "pool_a", "pool_b", "killed_worker"
KILLED_SEEDS = [1, 2, 3, 4, 5, 6]


def prompt_set(prompt: str, seeds: list[int]) -> str:
    return (
        "defaults: {resolution: 720p, duration: 5, generate_audio: false}\n"
        "grid:\n  images: [../../data/images/mug.png]\n"
        f"  prompts: ['{prompt}']\n  seeds: {seeds}\n"
    )


# Distinct prompts: no two sets share a request key, so every create of the module is its own purchase.
PROMPT_SETS = {
    END_TO_END: prompt_set("Slow dolly-in on the mug (daemon path)", [1, 2]),
    POOL_A: prompt_set("Orbit around the mug (pool A)", [1, 2]),
    POOL_B: prompt_set("Orbit around the mug (pool B)", [1, 2]),
    KILLED: prompt_set("Crash zoom on the mug", KILLED_SEEDS),
}

LAUNCH = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN = """
query Run($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { runId status tags { key value } } }
}
"""
RUNS = """
query Runs($filter: RunsFilter!) {
  runsOrError(filter: $filter) { __typename ... on Runs { results { runId status tags { key value } } } }
}
"""
SENSOR = """
query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename ... on Sensor { name jobOriginId sensorState { selectorId status } }
  }
}
"""
START_SENSOR = """
mutation Start($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename ... on Sensor { sensorState { status } } ... on PythonError { message }
  }
}
"""
STOP_SENSOR = """
mutation Stop($jobOriginId: String, $jobSelectorId: String) {
  stopSensor(jobOriginId: $jobOriginId, jobSelectorId: $jobSelectorId) {
    __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on PythonError { message }
  }
}
"""
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


@dataclass
class Stack:
    root: Path
    database_url: str
    output: Path
    services: Services
    client: httpx.Client
    location: str
    instance: dg.DagsterInstance

    # -- GraphQL, as the UI ----------------------------------------------------------------------

    def sensor(self, name: str) -> dict[str, Any]:
        sensor = graphql(self.client, SENSOR, selector=self._sensor_selector(name))["sensorOrError"]
        assert sensor["__typename"] == "Sensor", sensor
        return sensor

    def _sensor_selector(self, name: str) -> dict[str, str]:
        return {"repositoryLocationName": self.location, "repositoryName": "__repository__", "sensorName": name}

    def switch_sensor(self, name: str, *, on: bool) -> None:
        """The sensor's toggle in the UI (startSensor / stopSensor)."""
        sensor = self.sensor(name)
        if (sensor["sensorState"]["status"] == "RUNNING") == on:
            return
        if on:
            result = graphql(self.client, START_SENSOR, selector=self._sensor_selector(name))["startSensor"]
            status = (result.get("sensorState") or {}).get("status")
        else:
            result = graphql(
                self.client, STOP_SENSOR, jobOriginId=sensor["jobOriginId"],
                jobSelectorId=sensor["sensorState"]["selectorId"],
            )["stopSensor"]
            status = (result.get("instigationState") or {}).get("status")
        assert status == ("RUNNING" if on else "STOPPED"), result

    def launch(self, job: str, partition: str) -> str:
        """The UI's "Launch run" of a job for one partition: queued, for the daemon to launch."""
        params = {
            "selector": {"repositoryLocationName": self.location, "repositoryName": "__repository__", "pipelineName": job},
            "mode": "default",
            "runConfigData": {},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
        }
        result = graphql(self.client, LAUNCH, executionParams=params)["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return result["run"]["runId"]

    def run(self, run_id: str) -> dict[str, Any]:
        run = graphql(self.client, RUN, runId=run_id)["runOrError"]
        assert run["__typename"] == "Run", run
        return {**run, "tags": {t["key"]: t["value"] for t in run["tags"]}}

    def wait_for_run(self, run_id: str, status: str = "SUCCESS") -> dict[str, Any]:
        run = self.services.wait_for(
            f"run {run_id} to finish", lambda: (r := self.run(run_id))["status"] in FINISHED and r,
            deadline_s=RUN_DEADLINE_S,
        )
        if run["status"] != status:
            pytest.fail(f"run {run_id} ended {run['status']}, not {status}:\n{self.run_log(run_id)}\n{self.services.tails()}")
        return run

    def runs(self, job: str, partition: str) -> list[dict[str, Any]]:
        flt = {"pipelineName": job, "tags": [{"key": "dagster/partition", "value": partition}]}
        result = graphql(self.client, RUNS, filter=flt)["runsOrError"]
        assert result["__typename"] == "Runs", result
        return [{**r, "tags": {t["key"]: t["value"] for t in r["tags"]}} for r in result["results"]]

    # -- the event log storage and the ledger, read directly -----------------------------------------

    def events(self, run_id: str, *types: dg.DagsterEventType) -> list[dg.EventLogEntry]:
        return list(self.instance.all_logs(run_id, of_type=set(types) if types else None))

    def run_log(self, run_id: str) -> str:
        lines = []
        for entry in self.events(run_id)[-60:]:
            kind = entry.dagster_event.event_type_value if entry.dagster_event else "log"
            lines.append(f"{kind} {entry.step_key or ''} {entry.message or entry.user_message}"[:400])
        return "\n".join(lines)

    def worker_pid(self, run_id: str) -> int:
        """The pid the run worker reported for itself ("Started process for run (pid: N).")."""
        for entry in self.events(run_id, dg.DagsterEventType.ENGINE_EVENT):
            data = entry.dagster_event.engine_event_data if entry.dagster_event else None
            if data and "pid" in data.metadata and "Started process for run" in (entry.message or ""):
                return int(data.metadata["pid"].value)
        return 0

    def step_interval(self, run_id: str, step_key: str) -> tuple[float, float]:
        starts = [e.timestamp for e in self.events(run_id, dg.DagsterEventType.STEP_START) if e.step_key == step_key]
        ends = [
            e.timestamp for e in self.events(run_id, dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE)
            if e.step_key == step_key
        ]
        assert len(starts) == 1 and len(ends) == 1, (run_id, step_key, starts, ends)
        return starts[0], ends[0]

    def ledger(self) -> Ledger:
        return Ledger(self.database_url, scope=EMULATOR_SCOPE)

    def rows(self, prompt_set: str) -> list[Any]:
        with closing(self.ledger()) as ledger:
            return ledger.rows(prompt_set)

    # -- the emulator ----------------------------------------------------------------------------

    def emulator_stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.services.emulator_url}/_emulator/stats", timeout=10.0).json()

    def set_faults(self, **faults: Any) -> None:
        httpx.post(f"{self.services.emulator_url}/_emulator/faults", json=faults, timeout=10.0).raise_for_status()


def assert_no_duplicate_create(stats: dict[str, Any]) -> None:
    duplicated = {body: n for body, n in stats["creates_by_body_hash"].items() if n != 1}
    assert not duplicated, f"creates sent more than once: {duplicated}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("daemon_path")
    catalog = root / "configs" / "prompt_sets"
    catalog.mkdir(parents=True)
    shutil.copytree(SAMPLE_IMAGES, root / "data" / "images")
    for name, text in PROMPT_SETS.items():
        (catalog / f"{name}.yaml").write_text(text)
    home = root / "dagster_home"
    home.mkdir()
    templated_instance_config(
        DEPLOY_CONFIG, home / "dagster.yaml",
        concurrency={"pools": {"default_limit": 1}},
        run_monitoring={"poll_interval_seconds": 1, "free_slots_after_run_end_seconds": 1},
    )
    logs = root / "logs"
    logs.mkdir()
    with throwaway_database() as database_url, pytest.MonkeyPatch.context() as env, running_services(logs) as services:
        url = make_url(database_url)
        pg = {
            "DAGSTER_HOME": str(home),
            "DAGSTER_PG_HOST": url.host or "127.0.0.1",
            "DAGSTER_PG_PORT": str(url.port or 5432),
            "DAGSTER_PG_USERNAME": url.username or "postgres",
            "DAGSTER_PG_PASSWORD": url.password or "",
            "DAGSTER_PG_DB": url.database,
        }
        for key, value in pg.items():  # this process reads the same instance
            env.setenv(key, value)
        services.start_emulator(
            service_env(), "--latency", "1.5", "--api-key", EMULATOR_API_KEY, "--seed", "3", "--small-frames"
        )
        dagster_env = service_env(
            **pg,
            AIMLAPI_API_KEY=EMULATOR_API_KEY,
            AIMLAPI_BASE_URL=services.emulator_url,
            WAN_PIPELINE_LEDGER_URL=database_url,
            WAN_PIPELINE_CATALOG_DIR=str(catalog),
            WAN_PIPELINE_OUTPUT=str(root / "outputs"),
            WAN_PIPELINE_ALLOWED_ROOTS=str(root),
            WAN_PIPELINE_EXPECTED_SECONDS="1.5",
            WAN_PIPELINE_API_CONCURRENCY=str(PER_RUN_CONCURRENCY),
        )
        dagster_env.pop("WAN_PIPELINE_AUTO_SUBMIT", None)
        workspace = REPO / "workspace.yaml"
        services.start_webserver(dagster_env, workspace)
        with services.client() as client, dg.DagsterInstance.from_config(str(home)) as instance:
            location = services.wait_until_loaded(client)
            stack = Stack(root, database_url, root / "outputs", services, client, location, instance)
            # As a user would in the UI, before the daemon first ticks it: the free catalog refresh would
            # launch a generation_requests run per new set, each holding its set's run slot.
            stack.switch_sensor("catalog_automation_sensor", on=False)
            services.start_daemon(dagster_env, workspace)
            services.wait_until_daemons_healthy(client)
            for name in ("prompt_set_sensor", "generation_completion_sensor"):
                assert stack.sensor(name)["sensorState"]["status"] == "RUNNING", name
            # The daemon's prompt_set_sensor turns the catalog files into partitions.
            services.wait_for(
                "the daemon's prompt_set_sensor to add the partitions",
                lambda: set(PROMPT_SETS) <= set(instance.get_dynamic_partitions("prompt_sets")),
                deadline_s=60.0,
            )
            yield stack


@pytest.fixture
def services_on_failure(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack; the services' log tails are printed when the test failed."""
    failed_before = request.session.testsfailed
    yield stack
    if request.session.testsfailed > failed_before:
        print(stack.services.tails())


def process_tree(pid: int) -> set[int]:
    """`pid` and its descendants (from /proc): a run worker and the step processes it started."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in tree:
            tree.add(current)
            todo.extend(children.get(current, []))
    return tree


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_daemon_launches_the_submission_and_the_sensor_requested_collection(services_on_failure: Stack) -> None:
    stack = services_on_failure
    stack.switch_sensor("generation_completion_sensor", on=True)
    creates_before = stack.emulator_stats()["accepted_creates"]

    submit_id = stack.launch(SUBMIT_JOB, END_TO_END)
    submitted = stack.wait_for_run(submit_id)
    assert submitted["tags"]["wan_pipeline/bought"] == "2"

    # The daemon's completion sensor polls the generations and, once they are terminal, requests the
    # collection; the queue launches it.
    (collect_run,) = stack.services.wait_for(
        "the completion sensor to request the collection run",
        lambda: stack.runs(COLLECT_JOB, END_TO_END), deadline_s=RUN_DEADLINE_S,
    )
    assert collect_run["tags"]["dagster/sensor_name"] == "generation_completion_sensor"
    collect_id = collect_run["runId"]
    # The other tests need no collections: switched off now (the daemon takes a few ticks to notice),
    # their sets' collection runs do not compete with their submissions for the CPU.
    stack.switch_sensor("generation_completion_sensor", on=False)
    collected = stack.wait_for_run(collect_id)
    assert collected["tags"]["wan_pipeline/collected"] == "2"

    # Each run ran in a run worker of its own: not the daemon, not the webserver, not this process.
    pids = {run_id: stack.worker_pid(run_id) for run_id in (submit_id, collect_id)}
    service_pids = {s.pid for s in stack.services.started} | {os.getpid()}
    assert all(pids.values()), pids
    assert not set(pids.values()) & service_pids, (pids, service_pids)
    assert len(set(pids.values())) == 2, pids

    output = stack.output / END_TO_END
    rows = stack.rows(END_TO_END)
    assert [row.state for row in rows] == [State.COMPLETED, State.COMPLETED]
    for row in rows:
        video = output / f"{row.request_key}.mp4"
        assert video.is_file() and video.stat().st_size > 0, video
        assert (output / f"{row.request_key}.json").is_file()
    checks = {
        e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data.passed
        for e in stack.events(collect_id, dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    }
    assert checks == {"videos_match_requests": True, "no_failed_generations": True, "videos_pass_quality_checks": True}

    stats = stack.emulator_stats()
    assert stats["accepted_creates"] - creates_before == 2  # one create per request, none while collecting
    assert_no_duplicate_create(stats)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_the_pool_limit_keeps_two_sets_submissions_apart(services_on_failure: Stack) -> None:
    stack = services_on_failure
    stack.switch_sensor("generation_completion_sensor", on=False)  # no collections competing for the CPU
    creates_before = stack.emulator_stats()["accepted_creates"]
    stack.set_faults(**SLOW_CREATES)
    try:
        run_ids = [stack.launch(SUBMIT_JOB, POOL_A), stack.launch(SUBMIT_JOB, POOL_B)]

        # Seen while it happens: one run's step holds the only `aimlapi` slot, the other's waits for it.
        def one_holds_one_waits() -> bool:
            info = stack.instance.event_log_storage.get_concurrency_info(POOL)
            holders = {slot.run_id for slot in info.claimed_slots}
            return len(holders & set(run_ids)) == 1 and len(info.pending_run_ids & set(run_ids)) == 1

        stack.services.wait_for(
            "one submission to hold the aimlapi slot while the other waits for it",
            one_holds_one_waits, deadline_s=RUN_DEADLINE_S, every_s=0.2,
        )
        runs = [stack.wait_for_run(run_id) for run_id in run_ids]
    finally:
        stack.set_faults(**NO_TRICKLE)
    assert stack.instance.event_log_storage.get_concurrency_info(POOL).slot_count == 1
    assert [run["tags"]["wan_pipeline/bought"] for run in runs] == ["2", "2"]

    # The recorded step intervals: the second submission started only after the first had ended.
    (first_start, first_end), (second_start, second_end) = sorted(stack.step_interval(r, SUBMIT_STEP) for r in run_ids)
    assert first_start < first_end <= second_start < second_end, (first_start, first_end, second_start, second_end)

    stats = stack.emulator_stats()
    assert stats["accepted_creates"] - creates_before == 4
    assert_no_duplicate_create(stats)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_a_run_worker_killed_mid_submission(services_on_failure: Stack) -> None:
    stack = services_on_failure
    stack.switch_sensor("generation_completion_sensor", on=False)
    requests = len(KILLED_SEEDS)
    creates_before = stack.emulator_stats()["accepted_creates"]
    stack.set_faults(**HELD_CREATES)
    try:
        run_id = stack.launch(SUBMIT_JOB, KILLED)

        # Creates in flight: accepted (and charged) by the API, their answers still arriving, the ledger's
        # claims `submitting`; the rest of the set not sent yet.
        def in_flight() -> list[Any]:
            held = [row for row in stack.rows(KILLED) if row.state == State.SUBMITTING]
            accepted = stack.emulator_stats()["accepted_creates"] - creates_before
            return held if len(held) == PER_RUN_CONCURRENCY and accepted == PER_RUN_CONCURRENCY else []

        held = stack.services.wait_for("creates in flight", in_flight, deadline_s=RUN_DEADLINE_S, every_s=0.2)
        worker = stack.worker_pid(run_id)
        assert worker and worker not in {s.pid for s in stack.services.started}
        assert os.getpgid(worker) == stack.services.get("daemon").pid  # started by the daemon's run launcher
        # The worker and the step process it spawned (the default multiprocess executor), which holds the
        # claims: all of it dies at once, as when the worker's machine or pod goes.
        tree = process_tree(worker)
        owners = {int(row.claim_owner.rsplit(":", 2)[1]) for row in held}
        assert owners <= tree - {worker} or owners == {worker}, (owners, tree)
        for pid in sorted(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        stack.set_faults(**NO_TRICKLE)

    # The dead worker's run is marked failed (by the code server of the daemon that launched it, which
    # watches its run workers: the default run launcher has no worker health check for run monitoring), and
    # the slot it held in the `aimlapi` pool is freed (by the monitoring daemon, once the run is over).
    stack.wait_for_run(run_id, status="FAILURE")
    engine_messages = [e.message or "" for e in stack.events(run_id, dg.DagsterEventType.ENGINE_EVENT)]
    assert any("terminated by signal 9 (SIGKILL)" in m for m in engine_messages), engine_messages[-5:]
    stack.services.wait_for(
        "the monitoring daemon to free the killed run's pool slot",
        lambda: run_id not in {s.run_id for s in stack.instance.event_log_storage.get_concurrency_info(POOL).claimed_slots},
        deadline_s=RUN_DEADLINE_S,
    )

    # The relaunch settles the dead claims first (their tries were sent and never answered: in doubt),
    # then buys only what was never sent.
    relaunch_id = stack.launch(SUBMIT_JOB, KILLED)
    relaunched = stack.wait_for_run(relaunch_id)
    assert relaunched["tags"]["wan_pipeline/bought"] == str(requests - PER_RUN_CONCURRENCY)

    rows = {row.request_key: row for row in stack.rows(KILLED)}
    assert len(rows) == requests
    held_keys = {row.request_key for row in held}
    assert {k for k, row in rows.items() if row.state == State.IN_DOUBT} == held_keys
    assert all(row.generation_id for k, row in rows.items() if k not in held_keys)
    with closing(stack.ledger()) as ledger:
        attempts = [a for a in ledger.attempts() if a.request_key in rows]
    # One create attempt per request: the in-doubt ones were not bought again.
    assert sorted(a.request_key for a in attempts) == sorted(rows)
    for attempt in attempts:
        if attempt.request_key in held_keys:
            assert (attempt.run_id, attempt.outcome) == (run_id, AttemptOutcome.IN_DOUBT.value), attempt
        else:
            assert attempt.run_id == relaunch_id, attempt

    stats = stack.emulator_stats()
    assert stats["accepted_creates"] - creates_before == requests  # held when killed + never sent before
    assert_no_duplicate_create(stats)
