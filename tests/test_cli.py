"""`wan-pipeline` as a user runs it: a subprocess, configured only through the environment."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import EMULATOR_API_KEY
from pipeline_support import REPO, TWO_SEEDS

from wan_pipeline.emulator import EmulatorConfig, running_emulator
from wan_pipeline.scopes import api_origin


@pytest.fixture
def workdir(tmp_path: Path, emulator) -> tuple[Path, dict[str, str]]:
    (tmp_path / "configs" / "prompt_sets").mkdir(parents=True)
    shutil.copytree(REPO / "data" / "images", tmp_path / "data" / "images")
    (tmp_path / "configs" / "prompt_sets" / "launch.yaml").write_text(TWO_SEEDS)
    env = {
        **os.environ,
        "AIMLAPI_API_KEY": EMULATOR_API_KEY,
        "AIMLAPI_BASE_URL": emulator.base_url,
        "WAN_PIPELINE_EXPECTED_SECONDS": "0.5",
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }
    for name in ("WAN_PIPELINE_CATALOG_DIR", "WAN_PIPELINE_OUTPUT", "WAN_PIPELINE_LEDGER_URL"):
        env.pop(name, None)  # the documented defaults, relative to the working directory
    return tmp_path, env


def wan_pipeline(cwd: Path, env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wan_pipeline.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_run_collects_a_set_then_a_rerun_spends_nothing(workdir, emulator) -> None:
    cwd, env = workdir
    first = wan_pipeline(cwd, env, "run", "--deadline", "120")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "launch: 2 generations, 2 newly submitted" in first.stdout
    assert sorted(
        p.suffix for p in (cwd / "data" / "outputs" / "launch").iterdir()
        if p.stem not in ("contact_sheet", "experiment") and not p.stem.startswith("comparison_")
    ) == [".json", ".json", ".mp4", ".mp4"]
    assert (cwd / "data" / "ledger.sqlite").exists()

    again = wan_pipeline(cwd, env, "run", "launch")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing new was submitted" in again.stdout
    assert emulator.stats()["accepted_creates"] == 2
    assert EMULATOR_API_KEY not in first.stdout + first.stderr + again.stdout + again.stderr

    status = wan_pipeline(cwd, env, "status")
    assert status.returncode == 0 and "launch" in status.stdout and "completed" in status.stdout


def test_run_reports_failures_with_the_providers_message_and_exits_non_zero(workdir, emulator) -> None:
    cwd, env = workdir
    emulator.update_faults(error_rate=1.0)
    result = wan_pipeline(cwd, env, "run", "--deadline", "120")
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAILED launch/")]
    assert len(failures) == 2 and all(len(line) > len("FAILED launch/") + 34 for line in failures)
    assert "Traceback" not in result.stderr

    # A rerun does not buy them again unless asked.
    emulator.update_faults(error_rate=0.0)
    rerun = wan_pipeline(cwd, env, "run", "--deadline", "120")
    assert rerun.returncode == 1 and emulator.stats()["accepted_creates"] == 2
    retried = wan_pipeline(cwd, env, "run", "--retry-failed", "--deadline", "120")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert emulator.stats()["accepted_creates"] == 4


def test_in_doubt_creates_are_listed_and_resubmitted_only_when_asked(workdir, emulator) -> None:
    cwd, env = workdir
    emulator.update_faults(create_drop_rate=1.0)
    result = wan_pipeline(cwd, env, "run", "--deadline", "60")
    assert result.returncode == 1
    assert sum(line.startswith("IN DOUBT launch/") for line in result.stdout.splitlines()) == 2
    # Nothing was reused: an in-doubt request is not one the ledger already had.
    assert "launch: 2 generations, 0 newly submitted ($0.0000), 0 reused from the ledger" in result.stdout
    status = wan_pipeline(cwd, env, "status", "launch")
    assert "in_doubt" in status.stdout

    emulator.update_faults(create_drop_rate=0.0)
    assert wan_pipeline(cwd, env, "run", "--deadline", "60").returncode == 1
    assert emulator.stats()["accepted_creates"] == 2  # the dropped creates were accepted (paid)
    resubmitted = wan_pipeline(cwd, env, "run", "--resubmit-in-doubt", "--deadline", "120")
    assert resubmitted.returncode == 0, resubmitted.stdout + resubmitted.stderr
    assert emulator.stats()["accepted_creates"] == 4


def test_an_invalid_catalog_submits_nothing_and_names_the_problem(workdir, emulator) -> None:
    cwd, env = workdir
    (cwd / "configs" / "prompt_sets" / "launch.yaml").write_text(TWO_SEEDS.replace("720p", "4k"))
    validate = wan_pipeline(cwd, env, "validate")
    assert validate.returncode == 1
    assert "launch.yaml:1: resolution: got '4k', allowed: 720p | 1080p" in validate.stdout
    run = wan_pipeline(cwd, env, "run")
    assert run.returncode == 1 and "Nothing was submitted" in run.stdout
    assert emulator.stats()["accepted_creates"] == 0


def test_running_out_of_credits_stops_submitting_and_still_collects_what_was_bought(
    workdir, emulator
) -> None:
    cwd, env = workdir
    emulator.update_faults(credit_limit=1_050_000)  # exactly one 720p 5 s generation
    result = wan_pipeline(cwd, env, "run", "--deadline", "120")

    assert result.returncode == 1
    assert emulator.stats()["accepted_creates"] == 1
    assert "out of credits" in result.stdout
    assert sum(line.startswith("NOT SUBMITTED launch/") for line in result.stdout.splitlines()) == 1
    assert len(list((cwd / "data" / "outputs" / "launch").glob("*.mp4"))) == 1  # the one bought


def test_an_exhausted_quota_stops_the_run_with_the_time_and_the_next_run_continues(workdir, emulator) -> None:
    cwd, env = workdir
    emulator.update_faults(create_quota=1)  # the free tier's hourly quota: one create this hour
    result = wan_pipeline(cwd, env, "run", "--deadline", "120")

    assert result.returncode == 75, result.stdout + result.stderr  # EX_TEMPFAIL: try again later
    assert emulator.stats()["accepted_creates"] == 1 and emulator.stats()["create_429s"]["quota"] >= 1
    (stop,) = [line for line in result.stdout.splitlines() if line.startswith("RATE LIMITED launch:")]
    until = emulator.stats()["limits"]["quota_window_ends_at"]
    shown = datetime.strptime(stop.split("until ")[1][:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert abs(shown.timestamp() - until) <= 2  # the absolute UTC time the provider gave
    assert "1 left planned (a 429 creates nothing: not charged, not in doubt)" in stop
    assert "IN DOUBT" not in result.stdout
    assert len(list((cwd / "data" / "outputs" / "launch").glob("*.mp4"))) == 1  # the one bought is collected

    emulator.update_faults(create_quota=None)  # the next hour
    resumed = wan_pipeline(cwd, env, "run", "--deadline", "120")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "launch: 2 generations, 1 newly submitted" in resumed.stdout
    assert emulator.stats()["accepted_creates"] == 2
    assert sorted(emulator.stats()["creates_by_body_hash"].values()) == [1, 1]


def test_a_rejected_key_is_named_and_nothing_is_bought_or_collected(workdir, emulator) -> None:
    cwd, env = workdir
    (cwd / "configs" / "prompt_sets" / "second.yaml").write_text(TWO_SEEDS.replace("[1, 2]", "[3]"))
    result = wan_pipeline(cwd, {**env, "AIMLAPI_API_KEY": "sk-wrong-key-123"}, "run", "--deadline", "60")

    assert result.returncode == 1
    assert "rejected the key (401)" in result.stdout
    assert "ERROR second: not submitted: Submission stopped: the API rejected the key (401)" in result.stdout
    assert "collection failed" not in result.stdout and "Nothing new was submitted" not in result.stdout
    assert emulator.stats()["accepted_creates"] == 0
    assert "sk-wrong-key-123" not in result.stdout + result.stderr


def test_max_usd_bounds_the_whole_run_not_each_set(workdir, emulator) -> None:
    cwd, env = workdir
    (cwd / "configs" / "prompt_sets" / "second.yaml").write_text(TWO_SEEDS.replace("[1, 2]", "[3, 4]"))
    # Each set is estimated at $1.05 (two 720p 5 s generations); together $2.10.
    refused = wan_pipeline(cwd, env, "run", "--max-usd", "1.5")
    assert refused.returncode == 1 and "Refused" in refused.stdout
    assert emulator.stats()["accepted_creates"] == 0
    allowed = wan_pipeline(cwd, env, "run", "--max-usd", "2.2", "--deadline", "120")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert emulator.stats()["accepted_creates"] == 4


def test_a_badly_named_catalog_file_stops_a_run_over_the_folder(workdir, emulator) -> None:
    cwd, env = workdir
    (cwd / "configs" / "prompt_sets" / "Spring Campaign.yaml").write_text(TWO_SEEDS)
    result = wan_pipeline(cwd, env, "run")
    assert result.returncode == 1 and "Spring Campaign" in result.stdout
    assert emulator.stats()["accepted_creates"] == 0


def total_usd(output: str) -> float:
    """The USD of the last line starting with `total` (the status and run summaries end with one)."""
    (line,) = [line for line in output.splitlines() if line.startswith("total")][-1:]
    return float(line.split("$", 1)[1].split()[0])


def test_the_demo_keeps_its_own_ledger_so_a_run_against_another_api_buys_everything_there(
    workdir, emulator
) -> None:
    cwd, env = workdir
    demo_env = {k: v for k, v in env.items() if k not in ("AIMLAPI_API_KEY", "AIMLAPI_BASE_URL")}
    demo = wan_pipeline(cwd, demo_env, "demo", "--latency", "0.5", "--deadline", "120")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert len(list((cwd / "data" / "demo" / "outputs" / "launch").glob("*.mp4"))) == 2
    assert not (cwd / "data" / "ledger.sqlite").exists()

    # Another implementation of the API (the emulator, not announcing itself): bought there, for real.
    other = EmulatorConfig(latency_s=0.5, seed=3, identify=False)
    with running_emulator(other) as another_api:
        run = wan_pipeline(cwd, {**env, "AIMLAPI_BASE_URL": another_api.base_url}, "run", "--deadline", "120")
        assert run.returncode == 0, run.stdout + run.stderr
        assert "launch: 2 generations, 2 newly submitted" in run.stdout
        assert another_api.stats()["accepted_creates"] == 2
        charged = another_api.stats()["credits_charged"]
        assert charged > 0 and total_usd(run.stdout) == pytest.approx(charged / 2_000_000)
        sidecars = [json.loads(p.read_text()) for p in (cwd / "data" / "outputs" / "launch").glob("*.json")]
        assert {s["api"]["scope"] for s in sidecars} == {api_origin(another_api.base_url)}


def test_status_total_equals_what_the_api_charged_after_retries_and_resubmits(workdir, emulator) -> None:
    cwd, env = workdir
    emulator.update_faults(create_503_rate=0.5, create_504_rate=0.3)  # retried; in doubt, not created
    first = wan_pipeline(cwd, env, "run", "--deadline", "120")
    emulator.update_faults(create_503_rate=0.0, create_504_rate=0.0, error_rate=1.0)
    wan_pipeline(cwd, env, "run", "--resubmit-in-doubt", "all", "--deadline", "120")
    emulator.update_faults(error_rate=0.0)
    last = wan_pipeline(cwd, env, "run", "--retry-failed", "--resubmit-in-doubt", "launch", "--deadline", "120")
    assert last.returncode == 0, first.stdout + last.stdout + last.stderr

    status = wan_pipeline(cwd, env, "status")
    charged = emulator.stats()["credits_charged"]
    assert emulator.stats()["accepted_creates"] >= 4  # two bought, failed, bought again
    assert total_usd(status.stdout) == pytest.approx(charged / 2_000_000), status.stdout
    assert status.stdout.splitlines()[0] == "== API emulator (in use)"


def test_a_401_after_one_create_is_reported_with_its_cost_and_collected(workdir, emulator) -> None:
    cwd, env = workdir
    emulator.update_faults(auth_fail_after_creates=1)
    result = wan_pipeline(cwd, env, "run", "--deadline", "120")

    assert result.returncode == 1
    assert emulator.stats()["accepted_creates"] == 1
    assert "launch: 2 generations, 1 newly submitted ($0.5250)" in result.stdout
    assert "rejected the key (401)" in result.stdout and "Bought 1 generation(s) for $0.5250" in result.stdout
    assert "Nothing was created" not in result.stdout
    assert "Stack Trace" not in result.stderr and "Traceback" not in result.stderr  # one located message
    assert len(list((cwd / "data" / "outputs" / "launch").glob("*.mp4"))) == 1  # what was bought is collected
    assert total_usd(result.stdout) == pytest.approx(0.525)


def test_a_dry_run_writes_buys_and_collects_nothing(workdir, emulator) -> None:
    cwd, env = workdir
    dry = wan_pipeline(cwd, env, "run", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "launch: 2 generation(s); would newly buy 2 (estimated $1.0500), reuse 0 ($0)" in dry.stdout
    assert emulator.stats()["requests"] == {} or emulator.stats()["accepted_creates"] == 0
    assert not (cwd / "dagster_home" / "history").exists() and not (cwd / "data" / "outputs").exists()
    status = wan_pipeline(cwd, env, "status")
    assert "nothing bought yet" in status.stdout or "no purchases" in status.stdout

    assert wan_pipeline(cwd, env, "run", "--deadline", "120").returncode == 0
    again = wan_pipeline(cwd, env, "run", "--dry-run")
    assert "would newly buy 0 (estimated $0.0000), reuse 2 ($0)" in again.stdout


def test_validate_shows_what_would_be_newly_bought_against_the_ledger(workdir, emulator) -> None:
    cwd, env = workdir
    assert wan_pipeline(cwd, env, "run", "--deadline", "120").returncode == 0
    (cwd / "configs" / "prompt_sets" / "launch.yaml").write_text(TWO_SEEDS.replace("[1, 2]", "[1, 2, 3]"))
    validate = wan_pipeline(cwd, env, "validate")
    assert validate.returncode == 0, validate.stdout
    assert "launch: would newly buy 1 of 3 (est. $0.5250 of $1.5750); 2 already bought" in validate.stdout


def test_ledger_upgrade_and_a_ledger_newer_than_the_code(workdir, emulator) -> None:
    cwd, env = workdir
    ledger_file = cwd / "data" / "ledger.sqlite"
    ledger_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "tests" / "fixtures" / "ledger" / "ledger_aa9253d.sqlite", ledger_file)
    upgraded = wan_pipeline(cwd, env, "ledger", "upgrade")
    assert upgraded.returncode == 0 and "from no revision to 0002_scopes_attempts" in upgraded.stdout
    assert "is at the newest schema" in wan_pipeline(cwd, env, "ledger", "upgrade").stdout
    status = wan_pipeline(cwd, env, "status")
    assert "== API legacy; never reused automatically" in status.stdout

    with sqlite3.connect(ledger_file) as db:
        db.execute("UPDATE wan_ledger_version SET version_num = '0099_from_the_future'")
    newer = wan_pipeline(cwd, env, "status")
    assert newer.returncode == 2 and "0099_from_the_future" in newer.stderr and "Traceback" not in newer.stderr


def test_the_deadline_is_a_hard_wall_even_while_a_create_answer_trickles(workdir, emulator) -> None:
    cwd, env = workdir
    # Each create answer arrives 4 bytes a second: a minute or more per create without the wall.
    emulator.update_faults(create_trickle_rate=1.0, trickle_bytes_per_s=4.0)
    result = wan_pipeline(cwd, env, "run", "--deadline", "6", timeout=45)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "stopped at the hard deadline of 6 s" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # The create was sent and its answer never read: in doubt, never planned, never lost.
    assert sum(line.startswith("IN DOUBT launch/") for line in result.stdout.splitlines()) >= 1
    status = wan_pipeline(cwd, env, "status")
    assert "in_doubt" in status.stdout and "client request id wanp-" in status.stdout
