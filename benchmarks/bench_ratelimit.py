"""Figure 3c: riding the provider's create rate limit, and stopping at its quota.

The emulator limits creates with a token bucket (R creates per second, a burst of B = one second's
worth) and answers 429 with `Retry-After` beyond it. `submit_prompt_set` (the core the
`submitted_generations` asset calls, write-ahead ledger and all) creates N generations through it,
in a fresh worker process with its own ledger, each measurement against a fresh emulator:
- paced: the async client as shipped (AIMD on 429s, Retry-After as a pause shared by the run's creates);
- unpaced: the same client with `pace_creates=False` (each create retries its own 429s, honouring
  Retry-After): the comparison that shows what the pacer buys.
The accepted-create rate is N / the submit's wall time (start-up, the first burst and the ledger
writes included), against R. A second table runs the free tier's quota: K creates per hour, N > K
asked; the run must stop at once with the rest planned, none in doubt.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from common import (
    API_CONCURRENCY,
    CREATE_ROUTE,
    REPO,
    SAMPLE_IMAGES,
    Figure,
    Table,
    Target,
    bench_main,
    median,
    pipeline_env,
    run_worker,
    write_csv_catalog,
)

RATE_PER_S = 20.0
COUNT, QUICK_COUNT = 500, 100
REPEATS, QUICK_REPEATS = 3, 1
QUOTA, QUOTA_ASKED = 20, 50
TARGET_RATE_RATIO = 0.9
TARGET_429_SHARE = 0.10
EMULATOR_LATENCY_S = 3600.0  # nothing completes: the benchmark only creates
SET_NAME = "bench"


def worker_submit(params: dict[str, Any]) -> dict[str, Any]:
    os.environ.update(params["env"])
    from wan_pipeline.api import AsyncAimlApiClient, ClientConfig
    from wan_pipeline.catalog import load_prompt_set
    from wan_pipeline.ledger import Ledger, State
    from wan_pipeline.scopes import EMULATOR_SCOPE
    from wan_pipeline.settings import load_settings
    from wan_pipeline.submission import submit_prompt_set

    settings = load_settings()
    requests = load_prompt_set(Path(params["catalog"]), allowed_roots=[REPO / "data"]).requests
    ledger = Ledger(settings.ledger_url, scope=EMULATOR_SCOPE)
    config = ClientConfig(
        base_url=settings.base_url, api_key=settings.api_key, max_concurrency=API_CONCURRENCY,
        pace_creates=params["paced"],
    )
    start = time.perf_counter()
    report = submit_prompt_set(
        ledger, lambda: AsyncAimlApiClient(config), SET_NAME, requests, max_concurrency=API_CONCURRENCY
    )
    seconds = time.perf_counter() - start
    states = [row.state for row in ledger.rows(SET_NAME)]
    return {
        "seconds": seconds,
        "created": report.new,
        "not_submitted": len(report.failed_to_submit),
        "planned": states.count(State.PLANNED),
        "in_doubt": states.count(State.IN_DOUBT),
        "rate_limited_until": (
            report.rate_limited_until.strftime("%Y-%m-%d %H:%M:%S UTC") if report.rate_limited_until else None
        ),
        "client_429s": report.rate_limited_429s,
    }


def measure_once(count: int, faults: dict[str, Any], paced: bool, root: Path) -> dict[str, Any]:
    from wan_pipeline.emulator import EmulatorConfig, FaultConfig, running_emulator

    root.mkdir(parents=True)
    catalog = write_csv_catalog(root / "catalog" / f"{SET_NAME}.csv", count, SAMPLE_IMAGES)
    config = EmulatorConfig(latency_s=EMULATOR_LATENCY_S, small_frames=True, faults=FaultConfig(**faults))
    with running_emulator(config) as emulator:
        env = pipeline_env(emulator.base_url, root, expected_s=EMULATOR_LATENCY_S, allowed_root=REPO / "data")
        result = run_worker(
            "bench_ratelimit.py", "submit", {"catalog": str(catalog), "env": env, "paced": paced}, timeout_s=900
        )
        stats = emulator.stats()
    created_at = sorted(g["created_at"] for g in stats["generations"].values())
    calls = sum(stats["requests"].get(CREATE_ROUTE, {}).values())
    served = stats["create_429s"]
    return {
        **result,
        "create_calls": calls,
        "accepted": stats["accepted_creates"],
        "rate_limit_429s": served["rate_limit"],
        "quota_429s": served["quota"],
        "share_429": (served["rate_limit"] + served["quota"]) / calls if calls else 0.0,
        "accepted_per_s": result["created"] / result["seconds"],
        "sustained_per_s": (len(created_at) - 1) / (created_at[-1] - created_at[0]) if len(created_at) > 1 else 0.0,
        "duplicates": sum(n - 1 for n in stats["creates_by_body_hash"].values()),
    }


def run(quick: bool, workdir: Path) -> list[Figure]:
    count, repeats = (QUICK_COUNT, QUICK_REPEATS) if quick else (COUNT, REPEATS)
    limit = {"create_rate_limit_per_s": RATE_PER_S}
    runs: dict[str, list[dict[str, Any]]] = {"paced": [], "unpaced": []}
    for repeat in range(repeats):
        runs["paced"].append(measure_once(count, limit, True, workdir / f"paced-{repeat}"))
    runs["unpaced"].append(measure_once(count, limit, False, workdir / "unpaced"))
    quota = measure_once(QUOTA_ASKED, {"create_quota": QUOTA}, True, workdir / "quota")

    rows = []
    summary: dict[str, dict[str, float]] = {}
    for variant, measured in runs.items():
        s = {key: median(r[key] for r in measured) for key in (
            "seconds", "created", "create_calls", "rate_limit_429s", "share_429", "accepted_per_s",
            "sustained_per_s", "not_submitted", "in_doubt", "duplicates")}
        summary[variant] = s
        rows.append([
            variant, len(measured), s["seconds"], s["created"], s["not_submitted"], s["create_calls"],
            s["rate_limit_429s"], s["share_429"], s["accepted_per_s"] / RATE_PER_S, s["sustained_per_s"] / RATE_PER_S,
            s["in_doubt"], s["duplicates"],
        ])
    paced = summary["paced"]
    quota_rows = [[
        QUOTA_ASKED, QUOTA, quota["created"], quota["planned"], quota["in_doubt"], quota["quota_429s"],
        quota["seconds"], quota["rate_limited_until"] or "-",
    ]]
    figure = Figure(
        "3c",
        "Riding the provider's create rate limit (token bucket) and stopping at its quota",
        {"R (creates / s)": RATE_PER_S, "burst B": int(RATE_PER_S), "N": count, "API concurrency": API_CONCURRENCY,
         "repeats (median kept)": repeats, "small_frames": True},
        [
            Table("", ["variant", "runs", "submit s", "created", "not submitted", "create calls", "429s",
                       "429 share", "accepted rate / R", "sustained rate / R", "in doubt", "duplicates"], rows),
            Table(f"Quota: {QUOTA} creates an hour, {QUOTA_ASKED} asked (paced client, max wait 60 s)",
                  ["asked", "quota", "created", "left planned", "in doubt", "429s", "run s", "resumes after (UTC)"],
                  quota_rows),
        ],
        data={"runs": runs, "summary": summary, "quota": quota},
    )
    complete = paced["created"] == count and paced["duplicates"] == 0 and paced["in_doubt"] == 0
    ratio_value = paced["accepted_per_s"] / RATE_PER_S
    figure.targets = [
        Target(f"accepted-create rate / R at R = {RATE_PER_S:g}/s, N = {count}", ratio_value,
               f">= {TARGET_RATE_RATIO:g}", ratio_value >= TARGET_RATE_RATIO and complete,
               "" if complete else "not every create was bought exactly once"),
        Target("429s / create calls", paced["share_429"], f"<= {TARGET_429_SHARE:g}",
               paced["share_429"] <= TARGET_429_SHARE),
        Target(f"quota stop: left planned / in doubt of {QUOTA_ASKED - QUOTA} unbought",
               quota["planned"], f"= {QUOTA_ASKED - QUOTA} planned, 0 in doubt",
               quota["planned"] == QUOTA_ASKED - QUOTA and quota["in_doubt"] == 0 and quota["created"] == QUOTA),
    ]
    figure.notes = [
        "accepted rate = N / seconds of `submit_prompt_set` (imports excluded, the ledger's write-ahead records "
        "included); sustained = (N - 1) / the span between the emulator's first and last accepted create. "
        "The first burst of B tokens lets either exceed R slightly.",
        "429 share = 429s the emulator served for the limit / every POST it answered. unpaced: the same client "
        "with `pace_creates=False`; each create retries its own 429 (5 tries at most), so some give up.",
        "The token bucket is checked in the same step as the create; 429s consume no token.",
    ]
    return [figure]


if __name__ == "__main__":
    bench_main(run, {"submit": worker_submit})
