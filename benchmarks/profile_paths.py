"""Where one collection's and one submission's time goes, step by step: the profiles behind what
`make bench` misses (figures 1, 3a and 8). Not a figure: nothing here has a target.

    .venv/bin/python benchmarks/profile_paths.py collect [--count 500]
    .venv/bin/python benchmarks/profile_paths.py submit [--count 500]

collect: a worker submits N generations to a benchmark-mode emulator (latency 0.3 s), polls until
every one is completed, then calls `collect_videos` once, as one `downloaded_videos` step does, and
times each step of a video's path. submit: a worker runs the core `submit_prompt_set` (figure 3a's
"core") and splits each create into the wait for its write-ahead records to commit and its HTTP call.

A step's figure is its wall time summed over every call. Calls overlap (8 at a time; threads share
the 2 cores and the GIL), so the split says where a video or a create spends its time; the steps do
not add up to the wall. The emulator serves from this process, the measured code runs in a fresh
worker process, as in the figures.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import (
    API_CONCURRENCY,
    REPO,
    SAMPLE_IMAGES,
    pipeline_env,
    run_worker,
    worker_entry,
    write_csv_catalog,
)

SET_NAME = "bench"
COLLECT_LATENCY_S = 0.3
SUBMIT_LATENCY_S = 3600.0  # nothing completes while creates are timed
COMPLETION_WAIT_S = 120.0


class StepTimes:
    """Wall time and calls per step, recorded by wrapping functions in place (sync or async)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def _add(self, name: str, started: float) -> None:
        self.seconds[name] += time.perf_counter() - started
        self.calls[name] += 1

    def wrap(self, owner: Any, attribute: str, name: str | None = None) -> None:
        function, label = getattr(owner, attribute), name or attribute
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return await function(*args, **kwargs)
                finally:
                    self._add(label, started)

            setattr(owner, attribute, timed_async)
            return

        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._add(label, started)

        setattr(owner, attribute, timed)

    def rows(self) -> list[dict[str, Any]]:
        ordered = sorted(self.seconds.items(), key=lambda item: -item[1])
        return [{"step": name, "calls": self.calls[name], "total_s": seconds,
                 "ms_per_call": 1000 * seconds / self.calls[name]} for name, seconds in ordered]


def _setup(params: dict[str, Any]) -> tuple[Any, Any, Any, list[Any]]:
    os.environ.update(params["env"])
    from wan_pipeline.api import ClientConfig
    from wan_pipeline.catalog import load_prompt_set
    from wan_pipeline.ledger import Ledger
    from wan_pipeline.scopes import EMULATOR_SCOPE
    from wan_pipeline.settings import load_settings

    settings = load_settings()
    requests = load_prompt_set(Path(params["catalog"]), allowed_roots=[REPO / "data"]).requests
    config = ClientConfig(base_url=settings.base_url, api_key=settings.api_key, max_concurrency=API_CONCURRENCY)
    return settings, Ledger(settings.ledger_url, scope=EMULATOR_SCOPE), config, requests


def worker_collect(params: dict[str, Any]) -> dict[str, Any]:
    settings, ledger, config, requests = _setup(params)
    import wan_pipeline.collection as collection
    from wan_pipeline.api import AsyncAimlApiClient
    from wan_pipeline.ledger import Ledger, State
    from wan_pipeline.polling import poll_due
    from wan_pipeline.storage import VideoStore
    from wan_pipeline.submission import submit_prompt_set

    submit_prompt_set(ledger, lambda: AsyncAimlApiClient(config), SET_NAME, requests, max_concurrency=API_CONCURRENCY)
    give_up_at = time.monotonic() + COMPLETION_WAIT_S
    keys = [r.request_key for r in requests]
    while not all(row.state == State.COMPLETED for row in ledger.rows_for_keys(keys)):
        if time.monotonic() > give_up_at:
            raise RuntimeError(f"not every generation completed within {COMPLETION_WAIT_S:g} s")
        time.sleep(COLLECT_LATENCY_S)
        # Everything is polled now, whatever its next poll time (the emulator has finished them).
        poll_due(ledger, config, limit=len(keys), time_budget_s=30.0, now=datetime.now(UTC) + timedelta(hours=1))
    steps = StepTimes()
    for name in ("_download_fresh", "_probe_dict", "measure_quality", "_store_preview", "hashed_stamp"):
        steps.wrap(collection, name)
    steps.wrap(VideoStore, "read_sidecar", "VideoStore.read_sidecar")
    steps.wrap(VideoStore, "write_sidecar", "VideoStore.write_sidecar")
    steps.wrap(Ledger, "record_video", "Ledger.record_video")
    started, cpu = time.perf_counter(), time.process_time()
    report = collection.collect_videos(
        ledger, lambda: AsyncAimlApiClient(config), VideoStore(settings.output_root), requests
    )
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"count": len(requests), "downloaded": report.count("downloaded"), "failures": len(report.failures),
            "seconds": seconds, "cpu_s": cpu, "steps": steps.rows()}


def worker_submit(params: dict[str, Any]) -> dict[str, Any]:
    _, ledger, config, requests = _setup(params)
    from wan_pipeline.api import AsyncAimlApiClient
    from wan_pipeline.ledger import Ledger
    from wan_pipeline.submission import TryLog, submit_prompt_set

    steps = StepTimes()
    steps.wrap(TryLog, "sending", "TryLog.sending (wait for the claim's commit)")
    steps.wrap(TryLog, "_commit", "TryLog._commit (one group commit)")
    steps.wrap(Ledger, "_accept_many", "Ledger._accept_many (answers of a commit)")
    steps.wrap(Ledger, "_claim_many", "Ledger._claim_many (claims of a commit)")
    steps.wrap(AsyncAimlApiClient, "_call", "AsyncAimlApiClient._call (HTTP)")
    steps.wrap(AsyncAimlApiClient, "submit", "AsyncAimlApiClient.submit (whole create)")
    started, cpu = time.perf_counter(), time.process_time()
    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(config), SET_NAME, requests,
                               max_concurrency=API_CONCURRENCY)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"count": len(requests), "created": report.new, "seconds": seconds, "cpu_s": cpu, "steps": steps.rows()}


def profile(kind: str, count: int) -> dict[str, Any]:
    from wan_pipeline.emulator import EmulatorConfig, running_emulator

    latency = COLLECT_LATENCY_S if kind == "collect" else SUBMIT_LATENCY_S
    with tempfile.TemporaryDirectory(prefix="wan-profile-") as workdir:
        root = Path(workdir)
        catalog = write_csv_catalog(root / "catalog" / f"{SET_NAME}.csv", count, SAMPLE_IMAGES)
        with running_emulator(EmulatorConfig(latency_s=latency, small_frames=True)) as emulator:
            env = pipeline_env(emulator.base_url, root, expected_s=latency, allowed_root=REPO / "data")
            return run_worker("profile_paths.py", kind, {"env": env, "catalog": str(catalog)}, timeout_s=900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("collect", "submit"))
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()
    result = profile(args.kind, args.count)
    done = result.get("downloaded", result.get("created"))
    print(f"{args.kind} of {result['count']}: {result['seconds']:.2f} s wall, {result['cpu_s']:.2f} s CPU "
          f"({1000 * result['seconds'] / result['count']:.2f} ms a generation), {done} done")
    print("| step | calls | total s | ms a call |\n|---|---|---|---|")
    for row in result["steps"]:
        print(f"| {row['step']} | {row['calls']} | {row['total_s']:.2f} | {row['ms_per_call']:.2f} |")


if __name__ == "__main__":
    if not worker_entry({"collect": worker_collect, "submit": worker_submit}):
        main()
