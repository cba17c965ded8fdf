"""Figure 3b: one `generation_completion_sensor` tick with N generations due (N up to 5,000); figure
8b: 20,000 due drained by ticks of the sensor's shape (issue 12, figure 5's sensor half).

3b: a worker seeds a ledger with N real generations created on the emulator (through the core submit,
with an expected time of 0 so each is due at once; the emulator's latency is an hour, so they stay
pending), waits until all N are due, and times one tick evaluated the way a daemon does
(`dg.build_sensor_context` with the definitions' resources), then, once all are due again, the core
call the sensor makes (`wan_pipeline.polling.poll_due`). N grows in steps on the same ledger.

8b: another worker seeds DRAIN_COUNT due generations the same way and calls `poll_due` with the
sensor's per-tick limit and time budget until every one has been polled; each call is a tick. The
quick mode drains 1,000 with a limit of 250 a tick (the same four ticks, smaller).
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    API_CONCURRENCY,
    REPO,
    SAMPLE_IMAGES,
    Figure,
    PeakMemory,
    Table,
    Target,
    bench_main,
    pipeline_env,
    run_worker,
    write_csv_catalog,
)

SIZES, QUICK_SIZES = (10, 100, 500, 2000, 5000), (10, 100)
TARGET_SIZE = 5000
TARGET_SECONDS = 30.0
EMULATOR_LATENCY_S = 3600.0  # nothing completes: every poll answers queued
SEED_CONCURRENCY = 16
SET_NAME = "tick"
DUE_WAIT_S = 120.0
DRAIN_COUNT, QUICK_DRAIN = 20_000, (1_000, 250)  # quick: (due, poll limit per tick)
DRAIN_TICKS = 4


def _wait_until_all_due(ledger: Any, count: int) -> None:
    """Bounded wait until the `count` pending generations are all due (each has its own next poll time)."""
    give_up_at = time.monotonic() + DUE_WAIT_S
    while len(ledger.due_for_poll(datetime.now(UTC), count + 1)) < count:
        if time.monotonic() > give_up_at:
            raise RuntimeError(f"not all {count} generations became due within {DUE_WAIT_S:g} s")
        time.sleep(0.2)


def _polls_recorded(ledger: Any) -> int:
    return sum(row.poll_count for row in ledger.rows(SET_NAME))


def worker_ticks(params: dict[str, Any]) -> dict[str, Any]:
    os.environ.update(params["env"])
    import dagster as dg

    from wan_pipeline.api import AsyncAimlApiClient, ClientConfig
    from wan_pipeline.catalog import load_prompt_set
    from wan_pipeline.definitions import build_definitions
    from wan_pipeline.defs.sensors import TICK_POLL_LIMIT, TICK_TIME_BUDGET_S
    from wan_pipeline.ledger import Ledger
    from wan_pipeline.polling import poll_due
    from wan_pipeline.runner import ensure_dagster_home
    from wan_pipeline.scopes import EMULATOR_SCOPE
    from wan_pipeline.settings import load_settings
    from wan_pipeline.submission import submit_prompt_set

    ensure_dagster_home(REPO)
    settings = load_settings()
    requests = load_prompt_set(Path(params["catalog"]), allowed_roots=[REPO / "data"]).requests
    ledger = Ledger(settings.ledger_url, scope=EMULATOR_SCOPE)
    seed_config = ClientConfig(base_url=settings.base_url, api_key=settings.api_key,
                               max_concurrency=SEED_CONCURRENCY, expected_seconds=0.0)
    # What the sensor's resource hands to poll_due (definitions.py: concurrency from the environment).
    poll_config = ClientConfig(base_url=settings.base_url, api_key=settings.api_key, max_concurrency=API_CONCURRENCY)
    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def("generation_completion_sensor")

    def sensor_tick(instance: dg.DagsterInstance) -> None:
        with dg.build_sensor_context(
            instance=instance, definitions=defs, sensor_name=sensor.name, resources=defs.resources
        ) as context:
            sensor(context)

    def core_tick(_instance: dg.DagsterInstance) -> None:
        poll_due(ledger, poll_config, limit=TICK_POLL_LIMIT, time_budget_s=TICK_TIME_BUDGET_S)

    results = []
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("prompt_sets", [SET_NAME])
        for count in params["sizes"]:
            report = submit_prompt_set(
                ledger, lambda: AsyncAimlApiClient(seed_config), SET_NAME, requests[:count],
                max_concurrency=SEED_CONCURRENCY,
            )
            if report.new + report.reused != count:
                raise RuntimeError(f"seeding {count} generations: {report.new} new, {report.reused} reused")
            for variant, tick in (("sensor tick", sensor_tick), ("core poll_due", core_tick)):
                _wait_until_all_due(ledger, count)
                polls_before = _polls_recorded(ledger)
                with PeakMemory() as memory:
                    start = time.perf_counter()
                    tick(instance)
                    seconds = time.perf_counter() - start
                polled = _polls_recorded(ledger) - polls_before
                results.append({"count": count, "variant": variant, "seconds": seconds, "polled": polled,
                                "memory_growth_mb": memory.growth_mb})
    return {"results": results, "time_budget_s": TICK_TIME_BUDGET_S, "poll_limit": TICK_POLL_LIMIT}


def worker_drain(params: dict[str, Any]) -> dict[str, Any]:
    """N due drained by `poll_due` calls shaped like the sensor's ticks (its limit and time budget)."""
    os.environ.update(params["env"])
    from wan_pipeline.api import AsyncAimlApiClient, ClientConfig
    from wan_pipeline.catalog import load_prompt_set
    from wan_pipeline.defs.sensors import TICK_POLL_LIMIT, TICK_TIME_BUDGET_S
    from wan_pipeline.ledger import Ledger
    from wan_pipeline.polling import poll_due
    from wan_pipeline.scopes import EMULATOR_SCOPE
    from wan_pipeline.settings import load_settings
    from wan_pipeline.submission import submit_prompt_set

    settings = load_settings()
    count = params["count"]
    poll_limit = params.get("poll_limit") or TICK_POLL_LIMIT
    requests = load_prompt_set(Path(params["catalog"]), allowed_roots=[REPO / "data"]).requests
    ledger = Ledger(settings.ledger_url, scope=EMULATOR_SCOPE)
    seed_config = ClientConfig(base_url=settings.base_url, api_key=settings.api_key,
                               max_concurrency=SEED_CONCURRENCY, expected_seconds=0.0)
    poll_config = ClientConfig(base_url=settings.base_url, api_key=settings.api_key, max_concurrency=API_CONCURRENCY)
    submit_prompt_set(ledger, lambda: AsyncAimlApiClient(seed_config), SET_NAME, requests[:count],
                      max_concurrency=SEED_CONCURRENCY)
    _wait_until_all_due(ledger, count)
    ticks = []
    while len(ticks) < 10:
        start = time.perf_counter()
        report = poll_due(ledger, poll_config, limit=poll_limit, time_budget_s=TICK_TIME_BUDGET_S)
        seconds = time.perf_counter() - start
        covered = sum(1 for row in ledger.rows(SET_NAME) if row.poll_count >= 1)
        ticks.append({"seconds": seconds, "polled": report.polled, "covered": covered})
        if covered >= count:
            break
    return {"count": count, "ticks": ticks, "time_budget_s": TICK_TIME_BUDGET_S, "poll_limit": poll_limit}


def run_drain(count: int, poll_limit: int | None, workdir: Path) -> Figure:
    """Figure 8b: `count` due drained by sensor-shaped ticks (`poll_limit`: the sensor's own when None)."""
    from wan_pipeline.emulator import EmulatorConfig, running_emulator

    catalog = write_csv_catalog(workdir / "catalog" / f"{SET_NAME}.csv", count, SAMPLE_IMAGES)
    with running_emulator(EmulatorConfig(latency_s=EMULATOR_LATENCY_S, small_frames=True)) as emulator:
        env = pipeline_env(emulator.base_url, workdir, expected_s=0.0, allowed_root=REPO / "data")
        params = {"env": env, "catalog": str(catalog), "count": count, "poll_limit": poll_limit}
        outcome = run_worker("bench_sensor.py", "drain", params, timeout_s=1800)
    rows = [[n, t["seconds"], t["polled"], t["covered"]] for n, t in enumerate(outcome["ticks"], 1)]
    within = all(t["seconds"] <= outcome["time_budget_s"] + 1.0 for t in outcome["ticks"])
    drained = outcome["ticks"][-1]["covered"] >= count
    figure = Figure(
        "8b", f"{count:,} due drained by completion-sensor-shaped `poll_due` calls (issue 12, figure 5's sensor half)",
        {"N due": count, "poll concurrency": API_CONCURRENCY, "tick time budget s": outcome["time_budget_s"],
         "poll limit per tick": outcome["poll_limit"]},
        [Table("", ["tick", "seconds", "polled", "due rows polled so far"], rows)], data=outcome,
    )
    longest = max(t["seconds"] for t in outcome["ticks"])
    figure.targets.append(Target(
        f"ticks to poll all {count:,} due", len(rows), f"<= {DRAIN_TICKS}, each inside its {outcome['time_budget_s']:g} s budget",
        drained and within and len(rows) <= DRAIN_TICKS, f"longest tick {longest:.2f} s",
    ))
    figure.notes = [
        "Each tick is `poll_due` with the sensor's time budget and a per-tick poll limit (the sensor's own in "
        "the full run; the quick run drains fewer with a smaller limit, in as many ticks): the sensor's own "
        "call, without the partition listing of figure 3b. Every poll answers `queued`. `due rows polled so "
        "far` counts the rows polled at least once.",
    ]
    return figure


def run(quick: bool, workdir: Path) -> list[Figure]:
    return [run_ticks(quick, workdir / "ticks"),
            run_drain(*(QUICK_DRAIN if quick else (DRAIN_COUNT, None)), workdir / "drain")]


def run_ticks(quick: bool, workdir: Path) -> Figure:
    from wan_pipeline.emulator import EmulatorConfig, running_emulator

    sizes = QUICK_SIZES if quick else SIZES
    catalog = write_csv_catalog(workdir / "catalog" / f"{SET_NAME}.csv", max(sizes), SAMPLE_IMAGES)
    with running_emulator(EmulatorConfig(latency_s=EMULATOR_LATENCY_S, small_frames=True)) as emulator:
        env = pipeline_env(emulator.base_url, workdir, expected_s=0.0, allowed_root=REPO / "data")
        outcome = run_worker("bench_sensor.py", "ticks", {"env": env, "catalog": str(catalog), "sizes": list(sizes)},
                             timeout_s=900)
    rows = [[r["count"], r["variant"], r["seconds"], r["polled"], r["count"] / r["seconds"], r["memory_growth_mb"]]
            for r in outcome["results"]]
    figure = Figure(
        "3b",
        "One completion-sensor tick with N generations due",
        {"sizes": ", ".join(map(str, sizes)), "poll concurrency": API_CONCURRENCY,
         "tick time budget s": outcome["time_budget_s"], "poll limit per tick": outcome["poll_limit"]},
        [Table("", ["N due", "variant", "seconds", "polled", "polls / s", "peak RSS growth MB"], rows)],
        data=outcome,
    )
    at_target = [r for r in outcome["results"] if r["count"] == TARGET_SIZE]
    for r in at_target:
        complete = r["polled"] == r["count"]
        figure.targets.append(Target(
            f"{r['variant']} with {TARGET_SIZE:,} due (s)", r["seconds"], f"< {TARGET_SECONDS:g} s, all polled",
            r["seconds"] < TARGET_SECONDS and complete, f"{r['polled']:,} polled",
        ))
    if not at_target:
        figure.targets.append(Target(f"sensor tick with {TARGET_SIZE:,} due (s)", None, f"< {TARGET_SECONDS:g} s", None))
    figure.notes = [
        "Every poll answers `queued` (emulator latency 1 h), so a tick does its full work: one GET per due "
        "generation, its ledger write batched with others (`PollWriter`: one transaction per 250 answers or "
        "50 ms, on a writer thread). `polled` counts the ledger's recorded polls; the sensor stops starting "
        "polls at its time budget and leaves the rest due for the next tick.",
        "The sensor tick also lists the prompt-set partitions and computes each set's progress (one read of "
        "its rows) to decide on collection runs.",
    ]
    return figure


if __name__ == "__main__":
    bench_main(run, {"ticks": worker_ticks, "drain": worker_drain})
