"""Figure 8 (issue 12's figure 5): 5,000 generations in one prompt set through `wan-pipeline run` (fixed L = 5 s).

The same measurement as figure 1 (`bench_e2e.measure_pipeline`: a fresh project, a CSV catalog over
the sample images, a fresh emulator in benchmark mode, `wan-pipeline run` as a subprocess), at sizes
up to 5,000 in one set, to say whether the wall stays within L + 60 s and the process within 1.5 GB,
and where the knee is. The sensor half of that figure (20,000 due drained in at most 4 ticks) is
figure 8b, in `bench_sensor.py`.
"""

from __future__ import annotations

from pathlib import Path

from bench_e2e import LATENCY_S, measure_pipeline, phase_table
from common import Figure, Table, Target, bench_main, ratio

SIZES, QUICK_SIZES = (1000, 5000), (100,)
TARGET_SIZE = 5000
TARGET_OVERHEAD_S = 60.0
TARGET_RSS_MB = 1536.0


def run(quick: bool, workdir: Path) -> list[Figure]:
    # The run's own --deadline: long enough to see where a missed target lands, not only that it missed.
    runs = [measure_pipeline(n, LATENCY_S, workdir / f"one-set-{n}", deadline_s=120.0 + 0.2 * n)
            for n in (QUICK_SIZES if quick else SIZES)]
    main_table = Table(
        "",
        ["N", "wall s", "wall - L s", "per generation ms", "peak RSS MB", "creates", "GETs / generation",
         "downloads", "exit code"],
        [[r["count"], r["wall_s"], r["wall_s"] - LATENCY_S, 1000 * r["wall_s"] / r["count"], r["max_rss_mb"],
          r["creates"], ratio(r["gets"], r["count"]), r["downloads"], r["exit_code"]] for r in runs],
    )
    phases = phase_table(runs)
    figure = Figure(
        "8",
        "5,000 in one set through `wan-pipeline run` (issue 12, figure 5)",
        {"L (emulator latency) s": LATENCY_S, "small_frames": True},
        [main_table, phases],
        data={"latency_s": LATENCY_S, "runs": runs},
    )
    at_target = next((r for r in runs if r["count"] == TARGET_SIZE), None)
    wall = at_target["wall_s"] if at_target else None
    rss = at_target["max_rss_mb"] if at_target else None
    figure.targets = [
        Target(f"wall at N = {TARGET_SIZE} in one set (s)", wall,
               f"<= L + {TARGET_OVERHEAD_S:g} s = {LATENCY_S + TARGET_OVERHEAD_S:g} s",
               None if wall is None else wall <= LATENCY_S + TARGET_OVERHEAD_S),
        Target(f"peak RSS at N = {TARGET_SIZE} (MB)", rss, f"<= {TARGET_RSS_MB:g} MB",
               None if rss is None else rss <= TARGET_RSS_MB),
    ]
    figure.notes = [
        "Wall time runs from the interpreter's start to its exit (validation, submission, polling, "
        "every collection increment, checks, experiment table, summary); peak RSS is the whole "
        "`wan-pipeline run` process's.",
    ]
    figure.notes += [f"N = {r['count']}: `wan-pipeline run` exited {r['exit_code']}: {r['output_tail']}"
                     for r in runs if r["exit_code"]]
    return [figure]


if __name__ == "__main__":
    bench_main(run)
