"""Run every benchmark and write the results table: `make bench` (full) or `make bench-quick` (CI).

Each figure's script runs in its own process (one crash does not lose the others) and hands its
figures back as JSON; figure 6 (scaling) is computed from figures 1, 3a, 3b and 5. The results go to
benchmarks/results/latest.{md,json} (full) or quick.{md,json} (--quick), with the machine and date.
Exit status: 0 unless a benchmark script crashed or timed out; missed targets are reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH_DIR, PYTHON, REPO, RESULTS_DIR, machine_description
from report import document, scaling_figure

# (script, timeout of the full run s, timeout of the quick run s), in the order they run.
BENCHMARKS = (
    ("bench_e2e.py", 420, 90),
    ("bench_streaming.py", 300, 90),
    ("bench_one_set.py", 1200, 120),
    ("bench_polling.py", 300, 90),
    ("bench_submit.py", 420, 90),
    ("bench_sensor.py", 900, 90),
    ("bench_ratelimit.py", 420, 90),
    ("bench_download.py", 300, 90),
    ("bench_catalog.py", 240, 90),
    ("bench_quality.py", 240, 60),
)


def run_benchmark(script: str, quick: bool, timeout_s: float, workdir: Path) -> tuple[list[dict], str | None]:
    """The figures a script produced, and why it failed (None when it did not)."""
    output = workdir / f"{script}.json"
    command = [PYTHON, str(BENCH_DIR / script), "--json", str(output), *(["--quick"] if quick else [])]
    started = time.monotonic()
    print(f"== {script}{' --quick' if quick else ''}", flush=True)
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [], f"{script}: timed out after {timeout_s} s"
    print(f"   {time.monotonic() - started:.0f} s, exit {done.returncode}", flush=True)
    if done.returncode != 0 or not output.exists():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-25:])
        print(tail, file=sys.stderr)
        return [], f"{script}: exit {done.returncode}: {tail.splitlines()[-1] if tail else ''}"
    return json.loads(output.read_text()), None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small version of every figure (under 2 minutes)")
    parser.add_argument("--only", nargs="*", metavar="SCRIPT", help="run only these scripts, e.g. bench_e2e.py")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the results files")
    args = parser.parse_args()

    machine = machine_description()
    started = time.monotonic()
    figures: list[dict] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="wan-bench-all-") as workdir:
        for script, full_timeout, quick_timeout in BENCHMARKS:
            if args.only and script not in args.only:
                continue
            produced, failure = run_benchmark(script, args.quick, quick_timeout if args.quick else full_timeout,
                                              Path(workdir))
            figures += produced
            failures += [failure] if failure else []
    figures.append(scaling_figure(figures))
    elapsed = time.monotonic() - started

    mode = "quick" if args.quick else "full"
    stem = "quick" if args.quick else "latest"
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"mode": mode, "machine": machine, "elapsed_s": round(elapsed, 1), "failures": failures,
               "figures": figures}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    (args.out / f"{stem}.md").write_text(document(figures, machine, mode=mode, elapsed_s=elapsed, failures=failures))
    print(f"Wrote {args.out / stem}.md and .json in {elapsed:.0f} s"
          + (f"; crashed: {'; '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
