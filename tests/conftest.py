"""Shared fixtures: one running emulator per test session (faults and stats reset for every test), and a
throwaway PostgreSQL database per test (or per module) when WAN_PIPELINE_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from ledger_worker import Clock, LedgerTarget, ledger_target
from psycopg2 import sql
from sqlalchemy.engine import make_url

from wan_pipeline.api import ClientConfig
from wan_pipeline.emulator import EmulatorConfig, FaultConfig, running_emulator
from wan_pipeline.ledger import Ledger
from wan_pipeline.settings import Secret

# CI (`.ci/run`) sets this: every service a production-mode test needs runs there, so a skip in CI
# is a failure (a service that did not start, a missing dependency), never a silent pass.
NO_SKIPS = bool(os.environ.get("WAN_PIPELINE_NO_SKIPS"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where it must run (WAN_PIPELINE_NO_SKIPS): {reason}"


EMULATOR_API_KEY = "sk-test-emulator-4f9c2d7e1a"
EMULATOR_LATENCY_S = 0.6


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[Any]:
    config = EmulatorConfig(latency_s=EMULATOR_LATENCY_S, seed=1, api_key=EMULATOR_API_KEY)
    with running_emulator(config) as emu:
        yield emu


@pytest.fixture
def emulator(emulator_server: Any) -> Any:
    """The session's emulator with no faults and zeroed stats."""
    no_faults = {f.name: getattr(FaultConfig(), f.name) for f in dataclasses.fields(FaultConfig)}
    emulator_server.update_faults(**no_faults)
    emulator_server.reset_stats()
    return emulator_server


@pytest.fixture
def client_config(emulator: Any) -> ClientConfig:
    """A client config for the emulator: short timeouts, quick retries and polls."""
    return ClientConfig(
        base_url=emulator.base_url,
        api_key=Secret(EMULATOR_API_KEY),
        connect_timeout=2.0,
        read_timeout=5.0,
        write_timeout=5.0,
        max_attempts=3,
        max_retry_seconds=5.0,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        poll_min_interval_s=0.05,
        poll_max_interval_s=0.5,
        expected_seconds=EMULATOR_LATENCY_S,
    )


# Ledger tests run on SQLite and on PostgreSQL (WAN_PIPELINE_TEST_POSTGRES_URL; each test in its own schema).
LEDGER_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=LEDGER_BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerTarget]:
    """Where a test ledger lives: a SQLite file, or a throwaway PostgreSQL schema."""
    with ledger_target(request.param, tmp_path) as where:
        yield where


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(target: LedgerTarget, clock: Clock) -> Iterator[Ledger]:
    opened = target.open(clock=clock)
    yield opened
    opened.close()


POSTGRES_URL = os.environ.get("WAN_PIPELINE_TEST_POSTGRES_URL")


@contextmanager
def throwaway_database() -> Iterator[str]:
    """The URL of a database created on WAN_PIPELINE_TEST_POSTGRES_URL's server and dropped (with its
    connections) afterwards."""
    assert POSTGRES_URL, "WAN_PIPELINE_TEST_POSTGRES_URL not set"
    name = f"wan_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(POSTGRES_URL)
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    try:
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        with admin.cursor() as cursor:
            # FORCE: the ledger's cached engine and Dagster's event watcher may still hold connections.
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        admin.close()


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A database of its own for this test (see `throwaway_database`)."""
    if not POSTGRES_URL:
        pytest.skip("WAN_PIPELINE_TEST_POSTGRES_URL not set")
    with throwaway_database() as url:
        yield url
