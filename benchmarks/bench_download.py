"""Figure 4: one large video through the pipeline's download path vs a bare `httpx.stream` copy.

The emulator serves `GET /_emulator/blob/<n_bytes>` (deterministic bytes, streamed in 1 MiB chunks).
Each variant downloads it to a file in a fresh worker process, timed from the request to the closed
file; its memory cost is the peak resident set during the download minus the resident set before
(VmHWM reset just before). Variants are interleaved and repeated; the median is kept.
- async client: `AsyncAimlApiClient.download`, what the `downloaded_videos` asset uses (streams to a
  temporary name, hashes while streaming, renames when complete);
- sync client: `AimlApiClient.download`, the same protocol on `httpx.Client`;
- bare httpx: `httpx.stream("GET", url)` copied chunk by chunk into a file (no hash, no rename);
- two more bare copies split the clients' cost: the same with a sha256 of the stream, and the same
  on `httpx.AsyncClient` (no hash).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from pathlib import Path
from typing import Any

from common import Figure, PeakMemory, Table, Target, bench_main, median, ratio, run_worker

SIZE_BYTES, QUICK_SIZE_BYTES = 500 * 1000**2, 50 * 1000**2
REPEATS, QUICK_REPEATS = 3, 1
VARIANTS = ("bare httpx", "bare httpx + sha256", "bare httpx async", "async client", "sync client")
TARGET_RATIO = 0.9
TARGET_MEMORY_MB = 64.0


def _bare_httpx(url: str, destination: Path, *, hashed: bool = False) -> int:
    import httpx

    size, digest = 0, hashlib.sha256()
    with httpx.stream("GET", url, timeout=60) as response, destination.open("wb") as handle:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            if hashed:
                digest.update(chunk)
            handle.write(chunk)
            size += len(chunk)
    return size


def _bare_httpx_async(url: str, destination: Path) -> int:
    import httpx

    async def download() -> int:
        size = 0
        async with httpx.AsyncClient(timeout=60) as client, client.stream("GET", url) as response:
            response.raise_for_status()
            with destination.open("wb") as handle:
                async for chunk in response.aiter_bytes():
                    handle.write(chunk)
                    size += len(chunk)
        return size

    return asyncio.run(download())


def _async_client(url: str, destination: Path) -> int:
    from wan_pipeline.api import AsyncAimlApiClient, ClientConfig

    async def download() -> int:
        async with AsyncAimlApiClient(ClientConfig()) as client:
            return (await client.download(url, destination))[0]

    return asyncio.run(download())


def _sync_client(url: str, destination: Path) -> int:
    from wan_pipeline.api import AimlApiClient, ClientConfig

    with AimlApiClient(ClientConfig()) as client:
        return client.download(url, destination)[0]


DOWNLOADERS = {
    "bare httpx": _bare_httpx,
    "bare httpx + sha256": functools.partial(_bare_httpx, hashed=True),
    "bare httpx async": _bare_httpx_async,
    "async client": _async_client,
    "sync client": _sync_client,
}


def worker_download(params: dict[str, Any]) -> dict[str, Any]:
    import httpx  # noqa: F401 (imported before the measurement, like the clients' modules)

    import wan_pipeline.api  # noqa: F401

    destination = Path(params["destination"])
    download = DOWNLOADERS[params["variant"]]
    with PeakMemory() as memory:
        start = time.perf_counter()
        size = download(params["url"], destination)
        seconds = time.perf_counter() - start
    destination.unlink()
    return {"bytes": size, "seconds": seconds, "mb_per_s": size / seconds / 1e6, "memory_growth_mb": memory.growth_mb}


def run(quick: bool, workdir: Path) -> list[Figure]:
    from wan_pipeline.emulator import EmulatorConfig, running_emulator

    size, repeats = (QUICK_SIZE_BYTES, QUICK_REPEATS) if quick else (SIZE_BYTES, REPEATS)
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    with running_emulator(EmulatorConfig()) as emulator:
        url = f"{emulator.base_url}/_emulator/blob/{size}"
        for _ in range(repeats):
            for variant in VARIANTS:
                params = {"variant": variant, "url": url, "destination": str(workdir / "video.mp4")}
                result = run_worker("bench_download.py", "download", params, timeout_s=600)
                if result["bytes"] != size:
                    raise RuntimeError(f"{variant} downloaded {result['bytes']} of {size} bytes")
                runs[variant].append(result)
    summary = {
        variant: {"mb_per_s": median(r["mb_per_s"] for r in rs), "seconds": median(r["seconds"] for r in rs),
                  "memory_growth_mb": max(r["memory_growth_mb"] for r in rs)}
        for variant, rs in runs.items()
    }
    bare = summary["bare httpx"]["mb_per_s"]
    rows = [[variant, s["seconds"], s["mb_per_s"], ratio(s["mb_per_s"], bare), s["memory_growth_mb"]]
            for variant, s in summary.items()]
    figure = Figure(
        "4",
        f"Download of one {size / 1e6:,.0f} MB video",
        {"size MB": size / 1e6, "repeats (median kept)": repeats},
        [Table("", ["variant", "seconds", "MB/s", "ratio to bare", "peak RSS growth MB (max of repeats)"], rows)],
        data={"summary": summary, "runs": runs},
    )
    for variant in ("async client", "sync client"):
        s = summary[variant]
        throughput = ratio(s["mb_per_s"], bare)
        figure.targets += [
            Target(f"{variant} / bare throughput", throughput, f">= {TARGET_RATIO:g}", throughput >= TARGET_RATIO),
            Target(f"{variant} peak RSS growth (MB)", s["memory_growth_mb"], f"< {TARGET_MEMORY_MB:g} MB",
                   s["memory_growth_mb"] < TARGET_MEMORY_MB),
        ]
    split = {name: ratio(summary[name]["mb_per_s"], bare) for name in ("bare httpx + sha256", "bare httpx async")}
    figure.notes = [
        f"Split of the cost: hashing the stream alone brings a bare copy to {split['bare httpx + sha256']:.2f} of "
        f"its speed, httpx's async transport alone to {split['bare httpx async']:.2f}; the clients do the "
        "first (sync client) or both (async client).",
        "MB = 10^6 bytes. The emulator serves from this benchmark's process, the download runs in a fresh "
        "worker process: server and client each have a core.",
        "The clients also compute the sha256 of the stream and write under a temporary name, renamed once "
        "complete; the bare copy does neither.",
    ]
    return [figure]


if __name__ == "__main__":
    bench_main(run, {"download": worker_download})
