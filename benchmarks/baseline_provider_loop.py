"""The baseline: the provider's documented example, applied to a catalog one generation at a time.

The Wan 2.6 image-to-video page shows it in Python with `requests`: create the generation, then
GET it; while the status is `queued` or `generating`, sleep 15 s and GET again, giving up after
1000 s; once it has left those states, the answer holds the video URL. We add the download (stream
the video to a file) and run it for every row of a CSV catalog, strictly in sequence, as a script
written from that page would. Nothing is retried, nothing is recorded, nothing runs in parallel.

    AIMLAPI_API_KEY=... python benchmarks/baseline_provider_loop.py --base-url http://127.0.0.1:8000 \
        --catalog my_set.csv --out /tmp/videos [--interval 15] [--limit 1000]

Benchmarks shrink `--interval` and `--limit` by the same factor as the emulator's latency.
It prints one JSON line: the wall time of the loop and, per generation, its polls and timings.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import mimetypes
import os
import time
from pathlib import Path

import requests

MODEL = "alibaba/wan-2-6-i2v"


def image_data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def read_catalog(path: Path) -> list[dict[str, str]]:
    """The CSV catalog's rows (columns as in configs/prompt_sets/*.csv); image paths made absolute."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["image"] = str((path.parent / row["image"]).resolve())
    return rows


def create_body(row: dict[str, str]) -> dict:
    body = {
        "model": MODEL,
        "prompt": row["prompt"],
        "image_url": image_data_uri(Path(row["image"])),
        "resolution": row.get("resolution") or "1080p",
        "duration": row.get("duration") or "5",  # the documented example sends it as a string
    }
    if row.get("seed"):
        body["seed"] = int(row["seed"])
    if row.get("generate_audio"):
        body["generate_audio"] = row["generate_audio"].lower() in ("true", "yes", "1")
    return body


def generate_video(base_url: str, headers: dict, body: dict) -> dict | None:
    response = requests.post(f"{base_url}/v2/video/generations", json=body, headers=headers)
    if response.status_code >= 400:
        print(f"Error: {response.status_code} - {response.text}", flush=True)
        return None
    return response.json()


def get_video(base_url: str, headers: dict, generation_id: str) -> dict:
    params = {"generation_id": generation_id}
    return requests.get(f"{base_url}/v2/video/generations", params=params, headers=headers).json()


def download(url: str, destination: Path) -> int:
    with requests.get(url, stream=True) as response, destination.open("wb") as handle:
        response.raise_for_status()
        size = 0
        for chunk in response.iter_content(chunk_size=1024 * 1024):
            handle.write(chunk)
            size += len(chunk)
    return size


def one_generation(base_url: str, headers: dict, row: dict, out: Path, interval_s: float, limit_s: float) -> dict:
    """Create, poll every `interval_s` until the status leaves queued/generating (or `limit_s`), download."""
    started = time.monotonic()
    created = generate_video(base_url, headers, create_body(row))
    record: dict = {"status": "create failed", "polls": 0}
    if not created or not created.get("id"):
        return record
    generation_id = created["id"]
    record["create_s"] = time.monotonic() - started
    poll_started = time.time()
    answer = None
    while time.time() - poll_started < limit_s:
        answer = get_video(base_url, headers, generation_id)
        record["polls"] += 1
        if answer.get("status") in ("queued", "generating"):
            time.sleep(interval_s)
        else:
            break
    record["status"] = (answer or {}).get("status", "timeout")
    record["wait_s"] = time.monotonic() - started - record["create_s"]
    url = ((answer or {}).get("video") or {}).get("url")
    if record["status"] == "completed" and url:
        record["bytes"] = download(url, out / f"{generation_id}.mp4")
    record["total_s"] = time.monotonic() - started
    record["generation_id"] = generation_id
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--catalog", type=Path, required=True, help="a CSV prompt set")
    parser.add_argument("--out", type=Path, required=True, help="folder for the videos")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between polls (provider: 15)")
    parser.add_argument("--limit", type=float, default=1000.0, help="give up polling after S s (provider: 1000)")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {os.environ.get('AIMLAPI_API_KEY', '')}"}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = read_catalog(args.catalog)
    started = time.monotonic()
    generations = [
        one_generation(args.base_url.rstrip("/"), headers, row, args.out, args.interval, args.limit) for row in rows
    ]
    print(json.dumps({"loop_s": time.monotonic() - started, "generations": generations}), flush=True)


if __name__ == "__main__":
    main()
