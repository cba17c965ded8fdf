"""Steps on dagster-celery workers: a prompt set runs end to end through two worker processes.

The broker is the RabbitMQ on loopback, results go to Redis, the Dagster instance and the ledger are
one throwaway PostgreSQL database, the outputs a shared folder. Workers and the launcher are
subprocesses with environments built here from scratch (nothing inherited from pytest), each in its own
working directory: a step that leaned on the launching process's state would fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import pytest
from conftest import EMULATOR_API_KEY
from pipeline_support import REPO, SAMPLE_IMAGES, TWO_SEEDS
from sqlalchemy.engine import make_url

from wan_pipeline.cli import api_environment
from wan_pipeline.defs import executors
from wan_pipeline.ledger import Ledger, State
from wan_pipeline.scopes import api_scope
from wan_pipeline.settings import SettingsError

BROKER = os.environ.get("WAN_PIPELINE_TEST_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND = os.environ.get("WAN_PIPELINE_TEST_CELERY_BACKEND", "redis://127.0.0.1:6379/0")
PROMPT_SET = "celery_set"
WORKERS = 2
READY_DEADLINE_S = 60.0
RUN_TIMEOUT_S = 90.0
CELERY_ENV = {"WAN_PIPELINE_EXECUTOR": "celery", executors.BROKER_ENV: BROKER, executors.BACKEND_ENV: BACKEND}
# The variables a worker and the launcher get from the host; everything else is set by the test.
HOST_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")


# --- the executor choice, without services -------------------------------------------------------


def test_default_executor_is_dagsters() -> None:
    assert executors.job_executor({}) is None
    assert executors.job_executor({"WAN_PIPELINE_EXECUTOR": "multiprocess"}) is None
    with pytest.raises(SettingsError, match="WAN_PIPELINE_EXECUTOR='k8s'"):
        executors.job_executor({"WAN_PIPELINE_EXECUTOR": "k8s"})
    with pytest.raises(SettingsError, match=executors.BROKER_ENV):
        executors.job_executor({"WAN_PIPELINE_EXECUTOR": "celery"})


def test_celery_config_keeps_the_urls_in_the_environment() -> None:
    secret_broker = "amqp://wan:s3cret-pw@rabbit:5672//"
    env = {**CELERY_ENV, executors.BROKER_ENV: secret_broker, executors.QUEUE_ENV: "wan-steps"}
    config = executors.celery_executor_config(env)
    assert config == {
        "broker": {"env": executors.BROKER_ENV},
        "backend": {"env": executors.BACKEND_ENV},
        "config_source": {"task_default_queue": "wan-steps"},
    }
    assert executors.job_executor(env).name == "celery"
    line = executors.describe({**env, executors.BACKEND_ENV: "redis://:r3dis-pw@redis:6379/0"})
    assert "s3cret-pw" not in line and "r3dis-pw" not in line
    assert "amqp://wan:**@rabbit:5672//" in line and "queue wan-steps" in line


def test_a_worker_refuses_what_only_the_launcher_would_have(tmp_path: Path) -> None:
    env = {
        executors.BROKER_ENV: BROKER,
        "AIMLAPI_API_KEY": "k",
        "WAN_PIPELINE_LEDGER_URL": "postgresql://db/wan",
        "WAN_PIPELINE_OUTPUT": str(tmp_path),
        "WAN_PIPELINE_CATALOG_DIR": str(tmp_path),
    }
    executors.check_worker_environment(env)
    with pytest.raises(SettingsError, match="AIMLAPI_API_KEY"):
        executors.check_worker_environment({k: v for k, v in env.items() if k != "AIMLAPI_API_KEY"})
    with pytest.raises(SettingsError, match="shared ledger"):
        executors.check_worker_environment({**env, "WAN_PIPELINE_LEDGER_URL": "sqlite:///data/ledger.sqlite"})
    with pytest.raises(SettingsError, match="absolute WAN_PIPELINE_OUTPUT"):
        executors.check_worker_environment({**env, "WAN_PIPELINE_OUTPUT": "data/outputs"})
    with pytest.raises(SettingsError, match="absolute WAN_PIPELINE_CATALOG_DIR"):
        executors.check_worker_environment({**env, "WAN_PIPELINE_CATALOG_DIR": "configs/prompt_sets"})
    executors.check_worker_environment({**env, "WAN_PIPELINE_OUTPUT": "s3://bucket/videos"})


def test_the_executor_refuses_an_instance_workers_cannot_share() -> None:
    with dg.instance_for_test() as instance:  # SQLite in a temporary DAGSTER_HOME
        with pytest.raises(dg.DagsterInvariantViolationError, match="shared Dagster instance"):
            executors._require_shared_instance(instance)


def test_dev_refuses_an_embedded_emulator_for_remote_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIMLAPI_API_KEY", raising=False)
    monkeypatch.delenv("AIMLAPI_BASE_URL", raising=False)
    with pytest.raises(SettingsError, match="on every worker"):
        with api_environment(steps_elsewhere=True):
            pass
    assert "AIMLAPI_BASE_URL" not in os.environ


# --- end to end on workers ------------------------------------------------------------------------


def _unreachable(url: str) -> str | None:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2):
            return None
    except OSError as exc:
        return f"{executors.mask_url(url)} unreachable ({exc})"


@dataclass
class Worker:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (pid {self.process.pid}, exit {self.process.poll()}) ---\n" + "\n".join(
            text.splitlines()[-lines:]
        )


def _host_env() -> dict[str, str]:
    return {key: os.environ[key] for key in HOST_ENV if key in os.environ}


def _stop(*processes: subprocess.Popen) -> None:
    """Warm shutdown (SIGTERM) of the process groups the test started, then SIGKILL; always reaped."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the pool's children too, if any outlived the parent
        except ProcessLookupError:
            pass
        process.wait()


@dataclass
class Deployment:
    env: dict[str, str]  # what every worker and the launcher share
    home: Path
    output: Path
    queue: str
    workers: list[Worker]
    root: Path

    def launch(self, job: str, label: str) -> tuple[dg.DagsterRun, int]:
        """Execute a job the way a run worker does (`dagster job execute`), in its own process and
        folder; returns the run and the launcher's pid."""
        cwd = self.root / f"launcher-{label}"
        cwd.mkdir()
        log = self.root / f"launcher-{label}.log"
        tags = {"dagster/partition": PROMPT_SET, "wan_pipeline_test/launch": f"{self.queue}-{label}"}
        command = [
            sys.executable, "-m", "dagster", "job", "execute", "-m", "wan_pipeline.definitions", "-a", "defs",
            "-j", job, "--tags", json.dumps(tags),
        ]
        with log.open("w") as out:
            process = subprocess.Popen(
                command, cwd=cwd, env={**self.env, "DAGSTER_HOME": str(self.home)}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                process.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _stop(process)
                pytest.fail(f"{job} did not finish in {RUN_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            runs = instance.get_runs(dg.RunsFilter(tags={"wan_pipeline_test/launch": tags["wan_pipeline_test/launch"]}))
        assert len(runs) == 1, log.read_text()[-4000:]
        assert runs[0].status == dg.DagsterRunStatus.SUCCESS, log.read_text()[-4000:]
        return runs[0], process.pid


def _wait_until_ready(workers: list[Worker]) -> None:
    """Each worker's log says it is consuming (bounded); a worker that exits fails the test at once."""
    deadline = time.monotonic() + READY_DEADLINE_S
    pending = list(workers)
    while pending and time.monotonic() < deadline:
        for worker in list(pending):
            if worker.process.poll() is not None:
                pytest.fail(f"worker {worker.name} exited at start:\n{worker.tail()}")
            if " ready." in worker.log.read_text(errors="replace"):
                pending.remove(worker)
        time.sleep(0.1)
    if pending:
        pytest.fail("workers not ready in time:\n" + "\n".join(w.tail() for w in pending))


def _delete_queue(queue: str) -> None:
    from kombu import Connection

    with Connection(BROKER, connect_timeout=5) as connection:
        channel = connection.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


@pytest.fixture
def deployment(
    tmp_path: Path, postgres_database: str, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    for url in (BROKER, BACKEND):
        if reason := _unreachable(url):
            pytest.skip(reason)
    catalog_dir = tmp_path / "configs" / "prompt_sets"
    catalog_dir.mkdir(parents=True)
    shutil.copytree(SAMPLE_IMAGES, tmp_path / "data" / "images")
    (catalog_dir / f"{PROMPT_SET}.yaml").write_text(TWO_SEEDS)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    pg = make_url(postgres_database)
    pg_env = {
        "DAGSTER_PG_HOST": pg.host or "127.0.0.1",
        "DAGSTER_PG_PORT": str(pg.port or 5432),
        "DAGSTER_PG_USERNAME": pg.username or "postgres",
        "DAGSTER_PG_PASSWORD": pg.password or "",
        "DAGSTER_PG_DB": pg.database,
    }
    queue = f"wan-test-{uuid.uuid4().hex[:10]}"  # this test's own queue: parallel tests never share tasks
    env = {
        **_host_env(),
        **pg_env,
        **CELERY_ENV,
        executors.QUEUE_ENV: queue,
        "PYTHONPATH": str(REPO),
        "DAGSTER_DISABLE_TELEMETRY": "1",
        "AIMLAPI_API_KEY": EMULATOR_API_KEY,
        "AIMLAPI_BASE_URL": emulator.base_url,
        "WAN_PIPELINE_CATALOG_DIR": str(catalog_dir),
        "WAN_PIPELINE_OUTPUT": str(tmp_path / "outputs"),
        "WAN_PIPELINE_LEDGER_URL": postgres_database,
        "WAN_PIPELINE_ALLOWED_ROOTS": str(tmp_path),
        "WAN_PIPELINE_EXPECTED_SECONDS": "0.5",
    }
    for key, value in pg_env.items():  # for this process's reader of the instance
        monkeypatch.setenv(key, value)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("prompt_sets", [PROMPT_SET])

    workers: list[Worker] = []
    try:
        for index in range(WORKERS):
            name = f"wan-w{index}-{queue}"
            cwd = tmp_path / f"worker-{index}"
            cwd.mkdir()
            log = tmp_path / f"worker-{index}.log"
            command = [
                sys.executable, "-m", "celery", "-A", "wan_pipeline.defs.executors", "worker", "-Q", queue,
                "-n", f"{name}@%h", "-c", "1", "--prefetch-multiplier=1", "--loglevel=INFO",
                "--without-mingle", "--without-gossip",
            ]
            with log.open("w") as out:
                process = subprocess.Popen(
                    command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            workers.append(Worker(name, process, log))
        _wait_until_ready(workers)
        yield Deployment(env, home, tmp_path / "outputs", queue, workers, tmp_path)
    finally:
        _stop(*(worker.process for worker in workers))
        # Shown by pytest only when the test fails (captured teardown output).
        print("\n".join(worker.tail() for worker in workers))
        try:
            _delete_queue(queue)
        except Exception as exc:  # a leftover queue is harmless; do not mask the test's outcome
            print(f"could not delete queue {queue}: {exc}")


def _step_executions(instance: dg.DagsterInstance, run_id: str) -> tuple[dict[str, str], dict[str, int]]:
    """Per step key: the celery worker that dagster-celery says ran it, and the pid of its STEP_START."""
    workers: dict[str, str] = {}
    pids: dict[str, int] = {}
    for record in instance.all_logs(run_id):
        event = record.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.is_step_start:
            pids[event.step_key] = event.pid
        elif event.event_type == dg.DagsterEventType.ENGINE_EVENT and "in celery worker" in (event.message or ""):
            metadata = event.engine_event_data.metadata
            workers[event.step_key] = metadata["Celery worker"].value
    return workers, pids


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_prompt_set_runs_end_to_end_on_celery_workers(
    deployment: Deployment, emulator: Any, postgres_database: str
) -> None:
    submission, submit_launcher = deployment.launch("submit_prompt_set", "submit")
    collection, collect_launcher = deployment.launch("collect_prompt_set", "collect")

    # The ledger (PostgreSQL) holds both generations, completed; each was bought exactly once.
    with closing(Ledger(postgres_database, scope=api_scope(emulator.base_url))) as ledger:
        rows = ledger.rows(PROMPT_SET)
    assert len(rows) == 2
    assert all(row.state == State.COMPLETED for row in rows), [(r.request_key, r.state) for r in rows]
    stats = emulator.stats()
    assert stats["accepted_creates"] == len(rows)
    assert all(count == 1 for count in stats["creates_by_body_hash"].values()), stats["creates_by_body_hash"]
    for row in rows:
        video = deployment.output / PROMPT_SET / f"{row.request_key}.mp4"
        assert video.is_file() and video.stat().st_size > 0, video
        assert (deployment.output / PROMPT_SET / f"{row.request_key}.json").is_file()

    # Every step ran in a worker's pool process, none in a launcher (or here); both workers took steps.
    worker_pids = {worker.process.pid: worker.name for worker in deployment.workers}
    ran_on: dict[str, set[str]] = {}
    with dg.DagsterInstance.from_config(str(deployment.home)) as instance:
        for run, launcher_pid in ((submission, submit_launcher), (collection, collect_launcher)):
            by_worker, pids = _step_executions(instance, run.run_id)
            assert pids, f"no steps in run {run.run_id}"
            assert set(by_worker) == set(pids), (by_worker, pids)
            for step_key, pid in pids.items():
                assert pid not in (launcher_pid, os.getpid()), (step_key, pid)
                parent = _parent_pid(pid)
                assert parent in worker_pids, f"{step_key} ran in pid {pid} (parent {parent}), not a worker's"
                assert by_worker[step_key].startswith(worker_pids[parent]), (step_key, by_worker[step_key])
                ran_on.setdefault(worker_pids[parent], set()).add(f"{run.job_name}:{step_key}")
            assert "guest:guest" not in json.dumps(run.run_config)
    assert {"submit_prompt_set:submitted_generations", "collect_prompt_set:downloaded_videos"} <= set().union(
        *ran_on.values()
    )
    assert len(ran_on) == WORKERS, f"steps ran on {sorted(ran_on)} only: {ran_on}"

    # The broker's password shows nowhere in what the workers and launchers printed.
    for log in deployment.root.glob("*.log"):
        assert "guest:guest" not in log.read_text(errors="replace"), log.name
