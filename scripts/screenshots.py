"""Regenerate the README's screenshots of the Dagster UI from what the code does today (`make screenshots`).

A throwaway project (catalog, ledger, outputs, Dagster home) in a temporary folder, driven through the
real Definitions against the local emulator:
  - `product_shots`: submitted and collected (a submission run and a collection run, with cost tags);
  - `spring_campaign`: submitted to a slow emulator, so its generations are pending (the completion
    sensor's observation of generation_results shows the counts);
  - `edited`: materialized, then its file edited (Unsynced downstream);
  - `broken`: valid once, then edited into an invalid file (observed as invalid, with its problems).
Then `dagster-webserver` serves that instance and headless Chromium (Debian's `chromium`) takes the pictures.

    python scripts/screenshots.py [--out docs] [--chromium chromium]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-screenshots-emulator"
WINDOW = "1500,950"
SET_TWO = """\
defaults: {resolution: 720p, duration: 5}
items:
  - image: ../../data/images/mug.png
    prompt: Slow dolly-in on a steaming mug, morning light
    seeds: [1, 2]
"""
SET_THREE = """\
defaults: {resolution: 1080p, duration: 5}
items:
  - image: ../../data/images/still_life.png
    prompt: Gentle push-in on the geometric still life
    seeds: [3, 4, 5]
"""
# (file name in docs/, page, what it shows)
SHOTS = [
    ("ui_runs_cost_tags.png", "/runs", "the runs list with what each run bought and collected"),
    ("ui_pending.png", "/assets/generation_results?view=events&partition=spring_campaign", "pending counts"),
    ("ui_stale.png", "/assets/generation_requests?view=partitions&partition=edited", "an edited set shown Unsynced"),
    ("ui_invalid.png", "/assets/prompt_set_file?view=events&partition=broken", "an invalid set and its problems"),
    ("asset_graph.png", "/assets/downloaded_videos?view=lineage&lineageScope=upstream&lineageDepth=5", "the asset graph"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed(root: Path) -> None:
    """Build the instance's history through the real Definitions (imports after the environment is set)."""
    import dagster as dg

    from wan_pipeline.definitions import build_definitions
    from wan_pipeline.defs.sensors import evaluate_sensor
    from wan_pipeline.emulator import EmulatorConfig, running_emulator
    from wan_pipeline.settings import load_settings

    catalog = root / "configs" / "prompt_sets"

    with dg.DagsterInstance.get() as instance:
        fast = EmulatorConfig(latency_s=0.5, api_key=API_KEY, small_frames=True)
        with running_emulator(fast) as emulator:
            os.environ["AIMLAPI_BASE_URL"] = emulator.base_url
            os.environ["WAN_PIPELINE_EXPECTED_SECONDS"] = "0.5"
            defs = build_definitions(load_settings())
            for name in ("product_shots", "edited", "broken"):
                (catalog / f"{name}.yaml").write_text(SET_TWO.replace("[1, 2]", {"product_shots": "[1, 2]", "edited": "[7]", "broken": "[8]"}[name]))
            cursor = evaluate_sensor(defs, instance, "prompt_set_sensor", None).cursor
            submit = defs.resolve_job_def("submit_prompt_set")
            collect = defs.resolve_job_def("collect_prompt_set")
            for name in ("product_shots", "edited", "broken"):
                submit.execute_in_process(instance=instance, partition_key=name, raise_on_error=False)
            sensor_cursor = None
            deadline = time.monotonic() + 60
            collected: set[str] = set()
            while collected != {"product_shots", "edited", "broken"} and time.monotonic() < deadline:
                result = evaluate_sensor(defs, instance, "generation_completion_sensor", sensor_cursor)
                sensor_cursor = result.cursor
                for request in result.run_requests:
                    collect.execute_in_process(
                        instance=instance, partition_key=request.partition_key, raise_on_error=False,
                        tags={**request.tags, "dagster/run_key": request.run_key}, run_config=request.run_config,
                    )
                    collected.add(request.partition_key)
                time.sleep(0.3)
            # An edit (Unsynced) and a file made invalid (observed as such), seen by the catalog sensor.
            (catalog / "edited.yaml").write_text(SET_TWO.replace("[1, 2]", "[7, 9]"))
            (catalog / "broken.yaml").write_text(SET_TWO.replace("720p", "480p").replace("prompt:", "promt:"))
            (catalog / "Bad Name.csv").write_text("image,prompt\n../../data/images/mug.png,A pan\n")
            evaluate_sensor(defs, instance, "prompt_set_sensor", cursor)
        slow = EmulatorConfig(latency_s=3600.0, api_key=API_KEY, small_frames=True)
        with running_emulator(slow) as emulator:
            os.environ["AIMLAPI_BASE_URL"] = emulator.base_url
            os.environ["WAN_PIPELINE_EXPECTED_SECONDS"] = "180"  # what the real API takes: a pending set
            defs = build_definitions(load_settings())
            (catalog / "spring_campaign.yaml").write_text(SET_THREE)
            evaluate_sensor(defs, instance, "prompt_set_sensor", None)
            defs.resolve_job_def("submit_prompt_set").execute_in_process(
                instance=instance, partition_key="spring_campaign", raise_on_error=False
            )
            evaluate_sensor(defs, instance, "generation_completion_sensor", sensor_cursor)


def wait_until_loaded(base_url: str, process: subprocess.Popen, deadline_s: float = 90.0) -> None:
    query = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"
    give_up = time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise SystemExit(f"dagster-webserver exited with {process.returncode}")
        try:
            entries = httpx.post(f"{base_url}/graphql", json={"query": query}, timeout=5).json()["data"][
                "workspaceOrError"
            ]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit("the code location did not load in time")


def shoot(chromium: str, url: str, target: Path, profile: Path) -> None:
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={WINDOW}",
        "--virtual-time-budget=20000", f"--screenshot={target}", url,
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wan-screenshots-") as tmp:
        root = Path(tmp)
        (root / "configs" / "prompt_sets").mkdir(parents=True)
        shutil.copytree(REPO / "data" / "images", root / "data" / "images")
        home = root / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ.update({
            "DAGSTER_HOME": str(home),
            "AIMLAPI_API_KEY": API_KEY,
            "WAN_PIPELINE_CATALOG_DIR": str(root / "configs" / "prompt_sets"),
            "WAN_PIPELINE_OUTPUT": str(root / "outputs"),
            "WAN_PIPELINE_LEDGER_URL": f"sqlite:///{root / 'ledger.sqlite'}",
            "WAN_PIPELINE_ALLOWED_ROOTS": str(root),
        })
        seed(root)
        port = free_port()
        webserver = Path(sys.executable).parent / "dagster-webserver"
        with (root / "webserver.log").open("wb") as log:
            process = subprocess.Popen(
                [str(webserver), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                cwd=REPO, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                base_url = f"http://127.0.0.1:{port}"
                wait_until_loaded(base_url, process)
                # The "Join the Dagster community" dialog would cover every picture: mark it seen.
                httpx.post(f"{base_url}/graphql", json={"query": "mutation { setNuxSeen }"}, timeout=10)
                for name, page, what in SHOTS:
                    shoot(args.chromium, base_url + page, args.out / name, root / f"chromium-{name}")
                    print(f"{args.out / name}: {what}")
            finally:
                os.killpg(process.pid, 15)
                process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
