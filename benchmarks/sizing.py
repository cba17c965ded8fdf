"""Sizing on paper: what 10,000 and 100,000 generations a week ask of the API, the machines, the
database and the bucket, from the benchmark's per-generation figures and the provider's contract.

    .venv/bin/python benchmarks/sizing.py [--results benchmarks/results/latest.json]
        [--resolution 1080p] [--set-size 100] [--per-week 10000 100000]

Every input is named with its source. Figures measured by `make bench` are read from the results
JSON (so a new benchmark run changes the table); the rest are constants with the place they come
from. deploy/SIZING.md shows this script's output and explains each line.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
SECONDS_PER_WEEK = 7 * 24 * 3600
WEEKS_PER_YEAR = 52

# --- constants and where they come from ------------------------------------------------------------
# Contract (shared/reference/aimlapi-video-contract.md), "Generation object": observed processing
# time of 5 s at 1080p, "about 2 min 52 s".
PROCESSING_S = 172.0
# Contract, same section: 1080p costs $0.1575 per second (documented example: 5 s = $0.7875).
# 720p is not documented; configs/prices.yaml estimates $0.105 per second.
USD_PER_SECOND = {"1080p": 0.1575, "720p": 0.105}
VIDEO_SECONDS = 5
# Size of a real 5 s output (the benchmark's figure 7 assumes the same: "real-size bytes"): H.264 at
# about 8 Mbit/s for 1080p30 and 4 Mbit/s for 720p30, times 5 s. An assumption, not a measurement:
# the emulator's CRF-32 files are 120-280 KB.
VIDEO_BYTES = {"1080p": 5_000_000, "720p": 2_500_000}
# Measured on PostgreSQL for this document (deploy/SIZING.md, "How the row sizes were measured"):
# average pg_column_size of a row after a 4-generation `wan-pipeline run`, and rows per generation.
LEDGER_ROWS = {  # table: (rows per generation, bytes per row)
    "wan_generations": (1, 772),
    "wan_attempts": (1, 272),
    "wan_create_tries": (1, 201),
    "wan_set_videos": (1, 248),
    "wan_prompt_set_members": (1, 71),
}
# Same run: 109 event_logs rows for its 2 runs (submit + collect of one set), 2,078 bytes on average.
EVENT_ROWS_PER_SET = 109
EVENT_BYTES = 2078
# Row data to table size on disk (tuple headers, indexes, free space): a rule of thumb, not measured.
TABLE_OVERHEAD = 2.0
# Same run: one sidecar .json per video (2,048-2,091 bytes) and per set the contact sheet, comparison
# sheets, experiment parquet/csv and the IO manager's parquet: 183,412 bytes for a 4-video set.
SIDECAR_BYTES = 2_100
PER_SET_OBJECT_BYTES = 183_412
# wan_pipeline/defs/sensors.py: minimum_interval_seconds of the three sensors (30 s, 10 s, 30 s).
SENSOR_TICKS_PER_WEEK = SECONDS_PER_WEEK // 30 * 2 + SECONDS_PER_WEEK // 10


@dataclass(frozen=True)
class Measured:
    polls_per_generation: float  # figure 2
    submit_ms: float  # figure 3a, core per generation at N = 500
    poll_ms: float  # figure 3b, sensor tick per due generation at N = 5,000
    polls_per_second: float  # figure 3b, the same tick's rate
    hash_ms_per_mb: float  # figure 4, (bare + sha256) - bare, per MB
    probe_ms: dict[str, float]  # figure 7, download step - transfer
    quality_ms: dict[str, float]  # figure 7
    experiment_ms: float  # figure 1 phases, step:experiment_table per generation at N = 500
    check_ms: float  # figure 1 phases, videos_match_requests per generation at N = 500
    date: str


def _table(results: dict, figure: str, index: int = 0) -> tuple[list[str], list[list]]:
    (fig,) = [f for f in results["figures"] if f["figure"] == figure]
    table = fig["tables"][index]
    return table["columns"], table["rows"]


def _row(columns: list[str], rows: list[list], **match) -> dict:
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        if all(record.get(k) == v for k, v in match.items()):
            return record
    raise KeyError(f"no row {match}")


def read_measurements(path: Path) -> Measured:
    results = json.loads(path.read_text())
    cols, rows = _table(results, "2")
    polls = _row(cols, rows, variant="wan-pipeline (completion sensor)")["polls / generation (mean)"]
    cols, rows = _table(results, "3a")
    core = _row(cols, rows, N=500, variant="core")
    cols, rows = _table(results, "3b")
    tick = _row(cols, rows, **{"N due": 5000, "variant": "sensor tick"})
    # The cost of hashing, from one large video streamed alone (not 8 at a time, which shares the cores).
    cols, rows = _table(results, "4", 1)
    bare = _row(cols, rows, variant="bare httpx")["seconds"]
    hashed = _row(cols, rows, variant="bare httpx + sha256")["seconds"]
    size_mb = next(f for f in results["figures"] if f["figure"] == "4")["params"]["large video MB"]
    cols, rows = _table(results, "7")  # the real-bitrate files
    probe, quality = {}, {}
    for resolution in ("720p", "1080p"):
        record = _row(cols, rows, resolution=resolution)
        probe[resolution] = record["probe ms"]
        quality[resolution] = record["quality ms"]
    cols, rows = _table(results, "1", 1)
    experiment = _row(cols, rows, phase="step:experiment_table_s")["N = 500"]
    check = _row(cols, rows, phase="step:downloaded_videos_videos_match_requests_s")["N = 500"]
    return Measured(
        polls_per_generation=polls,
        submit_ms=core["seconds"] / 500 * 1000,
        poll_ms=tick["seconds"] / tick["polled"] * 1000,
        polls_per_second=tick["polls / s"],
        hash_ms_per_mb=(hashed - bare) / size_mb * 1000,
        probe_ms=probe,
        quality_ms=quality,
        experiment_ms=experiment / 500 * 1000,
        check_ms=check / 500 * 1000,
        date=results["machine"]["date"],
    )


def size(per_week: int, m: Measured, resolution: str, set_size: int) -> list[tuple[str, str, str]]:
    """(quantity, value, arithmetic) rows for one weekly volume."""
    n = per_week
    sets = -(-n // set_size)
    rate = n / SECONDS_PER_WEEK
    busy_rate = n / (40 * 3600)  # the same volume submitted in 40 working hours
    video = VIDEO_BYTES[resolution]
    usd = USD_PER_SECOND[resolution] * VIDEO_SECONDS
    verify_ms = m.hash_ms_per_mb * video / 1e6 + m.probe_ms[resolution] + m.quality_ms[resolution] + m.check_ms
    cpu_s = n * (verify_ms + m.experiment_ms + m.submit_ms + m.polls_per_generation * m.poll_ms) / 1000
    ledger_bytes = sum(rows * size for rows, size in LEDGER_ROWS.values())
    ledger_rows = sum(rows for rows, _ in LEDGER_ROWS.values())
    events = sets * EVENT_ROWS_PER_SET
    db_week = (n * ledger_bytes + events * EVENT_BYTES) * TABLE_OVERHEAD
    store_week = n * (video + SIDECAR_BYTES) + sets * PER_SET_OBJECT_BYTES
    gb = 1e9
    return [
        ("provider rate limit", "not documented", "contract: 429 'Too Many Requests (free tier: hourly limit)', no number"),
        ("provider processing time", f"{PROCESSING_S:g} s", "contract: about 2 min 52 s for 5 s at 1080p"),
        ("creates / week", f"{n:,}", "one per generation (+1 per retried try after a 429/502/503)"),
        ("average create rate", f"{rate * 3600:,.0f} / h", f"{n:,} / {SECONDS_PER_WEEK:,} s"),
        ("create rate if sent in 40 h", f"{busy_rate * 3600:,.0f} / h", f"{n:,} / 144,000 s"),
        ("generations in flight at the provider (avg)", f"{rate * PROCESSING_S:,.1f}",
         f"{rate:.4f}/s x {PROCESSING_S:g} s (Little's law)"),
        ("... if sent in 40 h", f"{busy_rate * PROCESSING_S:,.0f}", f"{busy_rate:.4f}/s x {PROCESSING_S:g} s"),
        ("polls (GET) / week", f"{n * m.polls_per_generation:,.0f}", f"{n:,} x {m.polls_per_generation:g}"),
        ("poll rate if sent in 40 h", f"{busy_rate * m.polls_per_generation:.2f} / s",
         f"vs one code server's {m.polls_per_second:.0f} polls/s (figure 3b)"),
        ("bytes downloaded / week", f"{n * video / gb:,.0f} GB", f"{n:,} x {video / 1e6:g} MB"),
        ("verification CPU per video", f"{verify_ms:.0f} ms",
         f"hash {m.hash_ms_per_mb * video / 1e6:.1f} + probe {m.probe_ms[resolution]:.1f} + quality "
         f"{m.quality_ms[resolution]:.1f} + check {m.check_ms:.1f}"),
        ("pipeline CPU / week", f"{cpu_s / 3600:,.1f} core-hours",
         f"{n:,} x ({verify_ms:.0f} verify + {m.experiment_ms:.0f} experiment + {m.submit_ms:.0f} submit + "
         f"{m.polls_per_generation:g} x {m.poll_ms:.1f} poll) ms"),
        ("ledger rows / week", f"{n * ledger_rows:,}", f"{n:,} x {ledger_rows} ({', '.join(LEDGER_ROWS)})"),
        ("Dagster event rows / week", f"{events:,.0f}", f"{sets:,} sets of {set_size} x {EVENT_ROWS_PER_SET:g} (2 runs each)"),
        ("sensor ticks / week", f"{SENSOR_TICKS_PER_WEEK:,}", "3 sensors at 30, 10, 30 s (independent of volume)"),
        ("database growth / week", f"{db_week / gb:,.2f} GB",
         f"({n:,} x {ledger_bytes:,} B + {events:,.0f} x {EVENT_BYTES:,} B) x {TABLE_OVERHEAD:g}"),
        ("database after a year", f"{db_week * WEEKS_PER_YEAR / gb:,.0f} GB", f"x {WEEKS_PER_YEAR}"),
        ("object store growth / week", f"{store_week / gb:,.0f} GB",
         f"{n:,} x ({video / 1e6:g} MB + {SIDECAR_BYTES:,} B) + {sets:,} x {PER_SET_OBJECT_BYTES:,} B"),
        ("object store after a year", f"{store_week * WEEKS_PER_YEAR / 1e12:,.1f} TB", f"x {WEEKS_PER_YEAR}"),
        ("spend / week", f"${n * usd:,.0f}", f"{n:,} x {VIDEO_SECONDS} s x ${USD_PER_SECOND[resolution]}/s"),
        ("spend / year", f"${n * usd * WEEKS_PER_YEAR:,.0f}", f"x {WEEKS_PER_YEAR}"),
    ]


def render(volumes: list[int], m: Measured, resolution: str, set_size: int) -> str:
    tables = {n: size(n, m, resolution, set_size) for n in volumes}
    header = ["quantity"] + [f"{n:,} / week" for n in volumes] + [f"arithmetic ({volumes[-1]:,} / week)"]
    lines = [
        f"Sizing for {resolution}, {VIDEO_SECONDS} s videos, prompt sets of {set_size}; "
        f"measurements from the benchmark run of {m.date}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for i, (quantity, _, _) in enumerate(tables[volumes[0]]):
        values = [tables[n][i][1] for n in volumes]
        lines.append("| " + " | ".join([quantity, *values, tables[volumes[-1]][i][2]]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--resolution", choices=sorted(VIDEO_BYTES), default="1080p")
    parser.add_argument("--set-size", type=int, default=100)
    parser.add_argument("--per-week", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    print(render(args.per_week, read_measurements(args.results), args.resolution, args.set_size))


if __name__ == "__main__":
    main()
