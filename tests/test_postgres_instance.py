"""The production instance config (`deploy/dagster.yaml`) on a real PostgreSQL: a prompt set runs end to end.

Each test gets its own throwaway database (the `postgres_database` fixture of conftest; dagster-postgres
has no schema option), used for both the Dagster storage and the generation ledger, so parallel workers
never share tables.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage
from pipeline_support import REPO, Project, make_project
from sqlalchemy.engine import make_url

from wan_pipeline.definitions import build_definitions
from wan_pipeline.ledger import Ledger, State
from wan_pipeline.settings import load_settings

POSTGRES_URL = os.environ.get("WAN_PIPELINE_TEST_POSTGRES_URL")
DEPLOY_CONFIG = REPO / "deploy" / "dagster.yaml"
PROMPT_SET = "pg_launch"
PROMPT_SET_YAML = """\
description: Two shots through a PostgreSQL-backed instance
defaults: {resolution: 720p, duration: 5, generate_audio: false}
grid:
  images: [../../data/images/mug.png]
  prompts: [Slow dolly-in on the mug]
  seeds: [1, 2]
"""
COMPLETION_DEADLINE_S = 30.0

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not POSTGRES_URL, reason="WAN_PIPELINE_TEST_POSTGRES_URL not set"),
]


@pytest.fixture
def deploy_home(tmp_path: Path, postgres_database: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DAGSTER_HOME holding the production config, its DAGSTER_PG_* variables pointing at the test database."""
    url = make_url(postgres_database)
    env = {
        "DAGSTER_PG_HOST": url.host or "127.0.0.1",
        "DAGSTER_PG_PORT": str(url.port or 5432),
        "DAGSTER_PG_USERNAME": url.username or "postgres",
        "DAGSTER_PG_PASSWORD": url.password or "",
        "DAGSTER_PG_DB": url.database,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY_CONFIG, home / "dagster.yaml")
    return home


@pytest.fixture
def pg_instance(deploy_home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(deploy_home)) as instance:
        yield instance


@pytest.fixture
def pg_project(
    tmp_path: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch, pg_instance: dg.DagsterInstance,
    postgres_database: str,
) -> Project:
    """make_project on the PostgreSQL instance, with the ledger in the same database."""
    project = make_project(tmp_path, emulator, monkeypatch, pg_instance)
    # make_project wires a SQLite ledger and reads settings once: point them at PostgreSQL and rebuild.
    monkeypatch.setenv("WAN_PIPELINE_LEDGER_URL", postgres_database)
    settings = load_settings()
    return dataclasses.replace(project, settings=settings, defs=build_definitions(settings))


def wait_until_collection_is_requested(project: Project) -> None:
    """Tick the completion sensor (bounded) until it asks to collect the prompt set."""
    cursor = None
    deadline = time.monotonic() + COMPLETION_DEADLINE_S
    while time.monotonic() < deadline:
        result = project.tick("generation_completion_sensor", cursor)
        cursor = result.cursor
        if any(r.partition_key == PROMPT_SET for r in result.run_requests or []):
            return
        time.sleep(0.2)
    pytest.fail(f"no collection requested within {COMPLETION_DEADLINE_S:.0f} s: {project.ledger.progress(PROMPT_SET)}")


def test_deploy_config_sets_the_queue_and_the_api_pool(pg_instance: dg.DagsterInstance) -> None:
    assert isinstance(pg_instance.run_storage, PostgresRunStorage)
    assert isinstance(pg_instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(pg_instance.run_coordinator, dg.QueuedRunCoordinator)
    concurrency = pg_instance.get_concurrency_config()
    assert concurrency.pool_config.default_pool_limit == 4
    [per_set] = concurrency.run_queue_config.tag_concurrency_limits
    assert per_set == {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_prompt_set_runs_end_to_end_on_postgres(
    pg_project: Project, deploy_home: Path, postgres_database: str
) -> None:
    project = pg_project
    project.write_set(f"{PROMPT_SET}.yaml", PROMPT_SET_YAML)

    submitted = project.submit(PROMPT_SET)
    assert submitted.success
    wait_until_collection_is_requested(project)
    collected = project.collect(PROMPT_SET)
    assert collected.success
    checks = {evaluation.check_name: evaluation.passed for evaluation in collected.get_asset_check_evaluations()}
    assert checks == {"videos_match_requests": True, "no_failed_generations": True, "videos_pass_quality_checks": True}

    # A second instance opened from the same config sees what the first one wrote: it is in PostgreSQL.
    materialized_by = {
        "generation_requests": submitted.run_id,
        "submitted_generations": submitted.run_id,
        "generation_results": collected.run_id,
        "downloaded_videos": collected.run_id,
    }
    with dg.DagsterInstance.from_config(str(deploy_home)) as reader:
        assert reader.has_dynamic_partition("prompt_sets", PROMPT_SET)
        for run_id in {submitted.run_id, collected.run_id}:
            assert reader.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
        for asset, run_id in materialized_by.items():
            records = reader.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[PROMPT_SET]), limit=5
            ).records
            assert [record.run_id for record in records] == [run_id], asset

    # Read from the PostgreSQL ledger directly: rows left in a SQLite ledger would not be found here.
    with closing(Ledger(postgres_database, scope=project.ledger.scope)) as ledger:
        rows = ledger.rows(PROMPT_SET)
    assert len(rows) == 2
    assert all(row.state == State.COMPLETED for row in rows)
    output = Path(project.settings.output_root) / PROMPT_SET
    for row in rows:
        video = output / f"{row.request_key}.mp4"
        assert video.is_file() and video.stat().st_size > 0, video
        assert (output / f"{row.request_key}.json").is_file()
