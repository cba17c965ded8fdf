"""Shared by every benchmark: the time scale, catalogs, worker processes, memory and pipeline runs.

Method, in one place:
- The emulator runs in the benchmark's own process (a background thread); the code being measured
  runs in a fresh subprocess (a "worker", or `wan-pipeline run` itself), so the two share the two
  cores as a client and a server would, and each measurement starts from a clean heap.
- Time is scaled: the real service takes ~172 s per generation and the provider's example polls
  every 15 s; a benchmark picks a latency L and shrinks the baseline's poll interval by L / 172.
- Results are compared as ratios measured side by side in the same run: absolute seconds are not
  stable on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from report import figure_markdown

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable
WAN_PIPELINE = str(Path(sys.executable).with_name("wan-pipeline"))
SAMPLE_IMAGES = sorted(p for p in (REPO / "data" / "images").iterdir() if p.suffix in {".png", ".jpg", ".jpeg"})

# The real service (shared contract): ~2 min 52 s per 5 s video; the provider's example polls every
# 15 s with a 1000 s limit. Benchmarks shrink all three by the same factor.
REAL_LATENCY_S = 172.0
PROVIDER_POLL_INTERVAL_S = 15.0
PROVIDER_LIMIT_S = 1000.0
# The pipeline's default in-flight API calls (WAN_PIPELINE_API_CONCURRENCY); bare loops use the same.
API_CONCURRENCY = 8
BENCH_API_KEY = "bench-key-not-secret"
# Routes as the emulator's request counters (/_emulator/stats) name them.
CREATE_ROUTE = "POST /v2/video/generations"
POLL_ROUTE = "GET /v2/video/generations"
VIDEO_ROUTE = "GET /_emulator/videos"


def scaled(real_seconds: float, latency_s: float) -> float:
    """A real-service duration shrunk by the benchmark's time scale (latency_s / 172 s)."""
    return real_seconds * latency_s / REAL_LATENCY_S


# ---------------------------------------------------------------------------------------------------
# Catalogs


def write_csv_catalog(
    path: Path, count: int, images: Sequence[Path], *, seed_offset: int = 0, prompt: str = "Slow pan across the scene"
) -> Path:
    """`count` generations over `images` in turn, distinct seeds, 720p 5 s without audio."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "prompt", "resolution", "duration", "seed", "generate_audio"])
        for index in range(count):
            image = images[index % len(images)]
            writer.writerow([str(image), prompt, "720p", 5, seed_offset + index + 1, "no"])
    return path


# ---------------------------------------------------------------------------------------------------
# Memory: peak resident set of this process (Linux)


def _status_kb(name: str) -> int:
    match = re.search(rf"^{name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS, so the next peak reading covers only what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not allowed here (some containers): the peak then covers the whole process, an upper bound


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


class PeakMemory:
    """Peak RSS growth over a block: `with PeakMemory() as mem: ...; mem.growth_mb`."""

    def __enter__(self) -> PeakMemory:
        self.start_mb = rss_mb()
        reset_peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mb = peak_rss_mb()
        self.growth_mb = self.peak_mb - self.start_mb


# ---------------------------------------------------------------------------------------------------
# Workers: the measured code runs in a fresh subprocess that prints one JSON line


def run_worker(
    script: str, kind: str, params: dict[str, Any], *, env: dict[str, str] | None = None, timeout_s: float = 600
) -> dict[str, Any]:
    """Run `python <script> --worker <kind> '<params>'`; return the JSON object it printed last."""
    command = [PYTHON, str(BENCH_DIR / script), "--worker", kind, json.dumps(params)]
    done = subprocess.run(
        command, env={**os.environ, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {script} {kind} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def worker_entry(handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """In a worker process, run the handler named on the command line and print its result."""
    if len(sys.argv) < 4 or sys.argv[1] != "--worker":
        return False
    result = handlers[sys.argv[2]](json.loads(sys.argv[3]))
    print(json.dumps(result), flush=True)
    return True


# ---------------------------------------------------------------------------------------------------
# `wan-pipeline run` as a subprocess


def pipeline_env(base_url: str, root: Path, *, expected_s: float, allowed_root: Path) -> dict[str, str]:
    """Environment of a throwaway project (catalog, output, ledger, Dagster instance) under `root`."""
    return {
        "AIMLAPI_BASE_URL": base_url,
        "AIMLAPI_API_KEY": BENCH_API_KEY,
        "WAN_PIPELINE_EXPECTED_SECONDS": str(expected_s),
        "WAN_PIPELINE_CATALOG_DIR": str(root / "catalog"),
        "WAN_PIPELINE_OUTPUT": str(root / "outputs"),
        "WAN_PIPELINE_LEDGER_URL": f"sqlite:///{root / 'ledger.sqlite'}",
        "WAN_PIPELINE_ALLOWED_ROOTS": str(allowed_root),
        "WAN_PIPELINE_API_CONCURRENCY": str(API_CONCURRENCY),
        "DAGSTER_HOME": str(root / "dagster_home"),
        "DAGSTER_DISABLE_TELEMETRY": "1",
    }


@dataclass
class CommandRun:
    wall_s: float
    exit_code: int
    max_rss_mb: float
    started_at: float  # time.time() just before the process started
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, stdout line)

    def tail(self, count: int = 15) -> str:
        return "\n".join(line for _, line in self.lines[-count:])


def run_timed_command(command: Sequence[str], *, env: dict[str, str], cwd: Path, timeout_s: float) -> CommandRun:
    """Run a command, timestamp each stdout line, and read the child's own peak RSS (wait4)."""
    started_at = time.time()
    start = time.monotonic()
    process = subprocess.Popen(
        list(command), env={**os.environ, **env}, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[tuple[float, str]] = []

    def read_output() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    killer = threading.Timer(timeout_s, process.kill)
    killer.start()
    try:
        # wait4 (not Popen.wait) returns the rusage of this one child: its peak RSS.
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        killer.cancel()
    wall = time.monotonic() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=10)
    process.stdout.close()
    return CommandRun(wall, process.returncode, usage.ru_maxrss / 1024, started_at, lines)


def run_pipeline(set_name: str, env: dict[str, str], *, root: Path, deadline_s: float) -> CommandRun:
    """`wan-pipeline run <set>` timed end to end (interpreter start to exit)."""
    command = [WAN_PIPELINE, "run", set_name, "--deadline", str(deadline_s)]
    return run_timed_command(command, env=env, cwd=root, timeout_s=deadline_s + 120)


STEP_EVENTS = ("STEP_START", "STEP_SUCCESS", "STEP_FAILURE")


def dagster_step_timings(dagster_home: Path) -> list[dict[str, Any]]:
    """Every run of a Dagster instance with its start/end and per-step durations (from the event log)."""
    import dagster as dg

    timings: list[dict[str, Any]] = []
    if not (dagster_home / "dagster.yaml").exists():  # the command failed before it made its instance
        return timings
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for run in reversed(instance.get_runs()):
            steps: dict[str, dict[str, float]] = {}
            logs = instance.all_logs(run.run_id)
            for entry in logs:
                event = entry.dagster_event
                if event is not None and entry.step_key and event.event_type_value in STEP_EVENTS:
                    steps.setdefault(entry.step_key, {})[event.event_type_value] = entry.timestamp
            timings.append(
                {
                    "job": run.job_name,
                    "status": str(run.status.value),
                    # From the run's first event (planning) to its last (success or failure).
                    "start": min((entry.timestamp for entry in logs), default=None),
                    "end": max((entry.timestamp for entry in logs), default=None),
                    "steps": {
                        key: (times.get("STEP_SUCCESS") or times.get("STEP_FAILURE") or 0) - times["STEP_START"]
                        for key, times in steps.items()
                        if "STEP_START" in times
                    },
                }
            )
    return timings


def pipeline_phases(run: CommandRun, dagster_home: Path, last_completion_at: float | None) -> dict[str, float]:
    """Where the wall time of one `wan-pipeline run` went, from its Dagster runs' event log.

    `last_completion_at` (the emulator's clock, same machine) splits the wait between the submit run
    and the collect run into the provider's own processing and the pipeline's detection lag.
    """
    runs = dagster_step_timings(dagster_home)
    submit = next((r for r in runs if r["job"] == "submit_prompt_set"), None)
    collects = [r for r in runs if r["job"] == "collect_prompt_set" and r["start"]]
    # Incremental collection: increments run while generations still do; the last run is the final one.
    collect = collects[-1] if collects else None
    phases: dict[str, float] = {}
    if not (submit and submit["start"]):
        return phases
    phases["startup_and_validation_s"] = submit["start"] - run.started_at
    phases["submit_run_s"] = submit["end"] - submit["start"]
    phases.update({f"step:{step}_s": seconds for step, seconds in submit["steps"].items()})
    if collect:
        increments = collects[:-1]
        if increments:
            phases["collection_increments"] = len(increments)
            phases["increment_runs_s (overlap the wait)"] = sum(r["end"] - r["start"] for r in increments)
        if last_completion_at is not None:
            phases["provider_still_processing_s"] = max(0.0, last_completion_at - submit["end"])
            phases["detect_last_completion_and_start_collect_s"] = collect["start"] - max(last_completion_at, submit["end"])
        else:
            phases["waiting_s"] = collect["start"] - submit["end"]
        phases["collect_run_s"] = collect["end"] - collect["start"]
        phases.update({f"step:{step}_s": seconds for step, seconds in collect["steps"].items()})
        phases["summary_and_exit_s"] = run.started_at + run.wall_s - collect["end"]
    return {name: round(value, 3) for name, value in phases.items()}


@dataclass
class PipelineMeasurement:
    run: CommandRun
    stats: dict[str, Any]  # the emulator's /_emulator/stats after the run
    phases: dict[str, float]
    ledger_url: str

    def requests(self, route: str) -> int:
        return sum(self.stats["requests"].get(route, {}).values())


def measure_pipeline_run(
    count: int, emulator_config: Any, root: Path, *, expected_s: float, deadline_s: float
) -> PipelineMeasurement:
    """A fresh project with a `count`-row catalog, run by `wan-pipeline run` against a fresh emulator."""
    from wan_pipeline.emulator import running_emulator

    write_csv_catalog(root / "catalog" / "bench.csv", count, SAMPLE_IMAGES)
    with running_emulator(emulator_config) as emulator:
        env = pipeline_env(emulator.base_url, root, expected_s=expected_s, allowed_root=REPO / "data")
        run = run_pipeline("bench", env, root=root, deadline_s=deadline_s)
        stats = emulator.stats()
    completions = [g["completes_at"] for g in stats["generations"].values()]
    phases = pipeline_phases(run, root / "dagster_home", max(completions, default=None))
    return PipelineMeasurement(run, stats, phases, env["WAN_PIPELINE_LEDGER_URL"])


# ---------------------------------------------------------------------------------------------------
# Figures and the command line every benchmark shares


@dataclass
class Target:
    name: str
    value: float | None
    goal: str  # e.g. "<= 25 s"
    met: bool | None  # None: not measured in this mode
    note: str = ""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Figure:
    number: str
    title: str
    params: dict[str, Any]
    tables: list[Table]
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw measurements, for the JSON and for scaling

    def to_json(self) -> dict[str, Any]:
        return {
            "figure": self.number,
            "title": self.title,
            "params": self.params,
            "tables": [table.__dict__ for table in self.tables],
            "targets": [target.__dict__ for target in self.targets],
            "notes": self.notes,
            "data": self.data,
        }


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


def machine_description() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    versions = {}
    for package in ("dagster", "httpx", "uvicorn", "sqlalchemy", "av"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_gb, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "packages": versions,
    }


def bench_main(run: Callable[[bool, Path], list[Figure]], handlers: dict[str, Callable] | None = None) -> None:
    """Command line of one benchmark script: `[--quick] [--json PATH]`, or a worker invocation."""
    if handlers and worker_entry(handlers):
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a small version, for CI")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wan-bench-") as workdir:
        figures = run(args.quick, Path(workdir))
    payload = [figure.to_json() for figure in figures]
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    for figure in payload:
        print(figure_markdown(figure))
