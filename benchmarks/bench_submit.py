"""Figure 3a: submit throughput, through the `submitted_generations` asset and its core, vs bare httpx.

Three variants create the same N generations (same bodies, same concurrency) against one emulator,
each in a fresh worker process with its own ledger, interleaved and repeated (the median is kept):
- asset: the `submit_prompt_set` job materialized in process on a Dagster instance; the rate is
  N / the `submitted_generations` step (the job's whole time is reported too);
- core: `wan_pipeline.submission.submit_prompt_set`, which the asset calls (write-ahead ledger);
- bare: an `httpx.AsyncClient` posting pre-built bodies under a semaphore of the same size.
The pipeline builds each body itself (reads the image, checks it, base64); the bare loop gets them free.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from common import (
    API_CONCURRENCY,
    BENCH_API_KEY,
    REPO,
    SAMPLE_IMAGES,
    Figure,
    PeakMemory,
    Table,
    Target,
    bench_main,
    dagster_step_timings,
    median,
    pipeline_env,
    ratio,
    run_worker,
    write_csv_catalog,
)

SIZES, QUICK_SIZES = (10, 100, 500), (20,)
REPEATS, QUICK_REPEATS = 3, 1
VARIANTS = ("bare", "core", "asset")
TARGET_RATIO = 0.8
# Nothing completes during a submit benchmark: the emulator only creates.
EMULATOR_LATENCY_S = 3600.0
SET_NAME = "bench"


# ---------------------------------------------------------------------------------------------------
# Workers (each in a fresh process; `params` carries the environment of a throwaway project)


def _load_requests(catalog: str) -> list[Any]:
    from wan_pipeline.catalog import load_prompt_set

    return load_prompt_set(Path(catalog), allowed_roots=[REPO / "data"]).requests


def worker_bare(params: dict[str, Any]) -> dict[str, Any]:
    import httpx

    from wan_pipeline.api import build_create_body
    from wan_pipeline.catalog import allowed_roots_for

    requests = _load_requests(params["catalog"])
    bodies = [build_create_body(r.request, allowed_roots=allowed_roots_for(Path(r.source_file))) for r in requests]
    url = params["base_url"] + "/v2/video/generations"
    headers = {"Authorization": f"Bearer {BENCH_API_KEY}"}

    async def create_all() -> list[int]:
        slots = asyncio.Semaphore(API_CONCURRENCY)
        async with httpx.AsyncClient(timeout=60) as client:

            async def create(body: dict) -> int:
                async with slots:
                    return (await client.post(url, json=body, headers=headers)).status_code

            return await asyncio.gather(*(create(body) for body in bodies))

    with PeakMemory() as memory:
        start, cpu = time.perf_counter(), time.process_time()
        statuses = asyncio.run(create_all())
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "created": sum(s == 200 for s in statuses),
            "memory_growth_mb": memory.growth_mb}


def worker_core(params: dict[str, Any]) -> dict[str, Any]:
    os.environ.update(params["env"])
    from wan_pipeline.api import AsyncAimlApiClient, ClientConfig
    from wan_pipeline.ledger import Ledger
    from wan_pipeline.scopes import EMULATOR_SCOPE
    from wan_pipeline.settings import load_settings
    from wan_pipeline.submission import submit_prompt_set

    settings = load_settings()
    requests = _load_requests(params["catalog"])
    ledger = Ledger(settings.ledger_url, scope=EMULATOR_SCOPE)
    config = ClientConfig(base_url=settings.base_url, api_key=settings.api_key, max_concurrency=API_CONCURRENCY)
    with PeakMemory() as memory:
        start, cpu = time.perf_counter(), time.process_time()
        report = submit_prompt_set(
            ledger, lambda: AsyncAimlApiClient(config), SET_NAME, requests, max_concurrency=API_CONCURRENCY
        )
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "created": report.new, "memory_growth_mb": memory.growth_mb}


def worker_asset(params: dict[str, Any]) -> dict[str, Any]:
    os.environ.update(params["env"])
    import dagster as dg

    from wan_pipeline.definitions import build_definitions
    from wan_pipeline.runner import QUIET_LOGGING, ensure_dagster_home
    from wan_pipeline.settings import load_settings

    home = ensure_dagster_home(REPO)
    settings = load_settings()
    with dg.DagsterInstance.get() as instance:
        job = build_definitions(settings).resolve_job_def("submit_prompt_set")
        instance.add_dynamic_partitions("prompt_sets", [SET_NAME])
        with PeakMemory() as memory:
            start = time.perf_counter()
            # The benchmark buys (emulated) thousands of dollars' worth: raise the per-run budget explicitly.
            budget = {"ops": {"submitted_generations": {"config": {"max_usd": 1e9}}}}
            result = job.execute_in_process(
                instance=instance, partition_key=SET_NAME, run_config={**QUIET_LOGGING, **budget}, raise_on_error=False
            )
            seconds = time.perf_counter() - start
    steps = dagster_step_timings(home)[0]["steps"]
    created = 0
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key.to_user_string() == "submitted_generations":
            created = int(materialization.metadata["new"].value)
    return {
        "seconds": steps.get("submitted_generations", seconds),
        "job_seconds": seconds,
        "catalog_step_seconds": steps.get("generation_requests"),
        "created": created,
        "success": result.success,
        "memory_growth_mb": memory.growth_mb,
    }


# ---------------------------------------------------------------------------------------------------
# Harness


def measure_once(variant: str, count: int, base_url: str, root: Path) -> dict[str, Any]:
    root.mkdir(parents=True)
    catalog = write_csv_catalog(root / "catalog" / f"{SET_NAME}.csv", count, SAMPLE_IMAGES)
    env = pipeline_env(base_url, root, expected_s=EMULATOR_LATENCY_S, allowed_root=REPO / "data")
    result = run_worker(
        "bench_submit.py", variant, {"catalog": str(catalog), "base_url": base_url, "env": env}, timeout_s=600
    )
    if result["created"] != count:
        raise RuntimeError(f"{variant} created {result['created']} of {count} generations")
    return {**result, "creates_per_s": count / result["seconds"]}


def measure(sizes: tuple[int, ...], repeats: int, workdir: Path) -> dict[int, dict[str, list[dict[str, Any]]]]:
    from wan_pipeline.emulator import EmulatorConfig, running_emulator

    results: dict[int, dict[str, list[dict[str, Any]]]] = {n: {v: [] for v in VARIANTS} for n in sizes}
    with running_emulator(EmulatorConfig(latency_s=EMULATOR_LATENCY_S, small_frames=True)) as emulator:
        for count in sizes:
            for repeat in range(repeats):
                for variant in VARIANTS:
                    root = workdir / f"{variant}-{count}-{repeat}"
                    results[count][variant].append(measure_once(variant, count, emulator.base_url, root))
    return results


def summarize(results: dict[int, dict[str, list[dict[str, Any]]]]) -> dict[int, dict[str, dict[str, float]]]:
    summary: dict[int, dict[str, dict[str, float]]] = {}
    for count, by_variant in results.items():
        summary[count] = {}
        for variant, runs in by_variant.items():
            summary[count][variant] = {
                "creates_per_s": median(r["creates_per_s"] for r in runs),
                "seconds": median(r["seconds"] for r in runs),
                "memory_growth_mb": median(r["memory_growth_mb"] for r in runs),
            }
            if variant == "asset":
                summary[count][variant]["job_seconds"] = median(r["job_seconds"] for r in runs)
    return summary


def run(quick: bool, workdir: Path) -> list[Figure]:
    sizes, repeats = (QUICK_SIZES, QUICK_REPEATS) if quick else (SIZES, REPEATS)
    results = measure(sizes, repeats, workdir)
    summary = summarize(results)
    rows = []
    for count, by_variant in summary.items():
        bare = by_variant["bare"]["creates_per_s"]
        for variant in VARIANTS:
            s = by_variant[variant]
            rows.append([
                count, variant, s["seconds"], s["creates_per_s"], ratio(s["creates_per_s"], bare),
                s.get("job_seconds", "-"), s["memory_growth_mb"],
            ])
    figure = Figure(
        "3a",
        "Submit throughput: `submitted_generations` (asset and core) vs a bare httpx loop",
        {"concurrency": API_CONCURRENCY, "repeats (median kept)": repeats, "sizes": ", ".join(map(str, sizes)),
         "small_frames": True},
        [Table("", ["N", "variant", "seconds", "creates / s", "ratio to bare", "whole submit job s",
                    "peak RSS growth MB"], rows)],
        data={"summary": {str(n): v for n, v in summary.items()}, "runs": {str(n): v for n, v in results.items()}},
    )
    largest = max(sizes)
    for variant in ("asset", "core"):
        value = ratio(summary[largest][variant]["creates_per_s"], summary[largest]["bare"]["creates_per_s"])
        figure.targets.append(Target(f"{variant} / bare creates per second at N = {largest}", value,
                                     f">= {TARGET_RATIO:g}", value >= TARGET_RATIO))
    figure.notes = [
        "asset: seconds of the `submitted_generations` step (Dagster event log); the whole job (run start, "
        "catalog step, parquet IO, events) is the next column. core: `submit_prompt_set` alone. bare: "
        "httpx.AsyncClient + semaphore posting bodies built beforehand.",
        "Each measurement is a fresh worker process with its own ledger (SQLite) and Dagster instance; "
        "variants are interleaved and each point is the median of the repeats.",
    ]
    return [figure]


if __name__ == "__main__":
    bench_main(run, {"bare": worker_bare, "core": worker_core, "asset": worker_asset})
