"""`wan-pipeline` as a user runs it: a subprocess, configured only through the environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EMULATOR_API_KEY
from pipeline_support import REPO, TWO_SEEDS


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


def wan_pipeline(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wan_pipeline.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_run_collects_a_set_then_a_rerun_spends_nothing(workdir, emulator) -> None:
    cwd, env = workdir
    first = wan_pipeline(cwd, env, "run", "--deadline", "120")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "launch: 2 generations, 2 newly submitted" in first.stdout
    assert sorted(
        p.suffix for p in (cwd / "data" / "outputs" / "launch").iterdir() if p.stem != "contact_sheet"
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


def test_a_rejected_key_is_named_and_nothing_is_bought_or_collected(workdir, emulator) -> None:
    cwd, env = workdir
    (cwd / "configs" / "prompt_sets" / "second.yaml").write_text(TWO_SEEDS.replace("[1, 2]", "[3]"))
    result = wan_pipeline(cwd, {**env, "AIMLAPI_API_KEY": "sk-wrong-key-123"}, "run", "--deadline", "60")

    assert result.returncode == 1
    assert "rejected the key (401)" in result.stdout
    assert "ERROR second: not submitted: The API rejected the key" in result.stdout
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
