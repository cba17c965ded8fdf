"""Figure 5: validating and expanding a large CSV catalog, and how often each image is read and hashed.

20 distinct 1280x720 JPEG images and a CSV of N rows over them (distinct seeds) are written first;
a fresh worker process then times `load_prompt_set` (what the `generation_requests` asset does:
validate every row, identify each image by its sha256, derive keys and prices), the DataFrame round
trip the assets use, and `validate_paths` (`wan-pipeline validate`). Reads and hashes of image bytes
are counted by wrapping `wan_pipeline.sources.read_bytes` and `sha256_hex` for the measurement.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import Figure, PeakMemory, Table, Target, bench_main, run_worker, write_csv_catalog

SIZES, QUICK_SIZES = (1000, 10_000), (1000,)
IMAGE_COUNT = 20
IMAGE_SIZE = (1280, 720)
TARGET_SIZE = 10_000
TARGET_SECONDS = 5.0


def write_images(folder: Path, count: int) -> list[Path]:
    """`count` distinct JPEGs: seeded noise under a per-image tint (each a realistic ~100-300 KB)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        noise = Image.effect_noise(IMAGE_SIZE, 40 + index)
        tint = Image.new("RGB", IMAGE_SIZE, ((37 * index) % 256, (91 * index) % 256, (151 * index) % 256))
        image = Image.blend(Image.merge("RGB", (noise, noise, noise)), tint, 0.5)
        path = folder / f"image_{index:02d}.jpg"
        image.save(path, quality=85)
        paths.append(path)
    return paths


class MediaCounter:
    """Counts reads and hashes of media bytes, per image (by content), while installed."""

    def __init__(self) -> None:
        from wan_pipeline import sources

        self.sources = sources
        self.reads: Counter[str] = Counter()
        self.hashes: Counter[str] = Counter()
        self._read_bytes, self._sha256_hex = sources.read_bytes, sources.sha256_hex

    def __enter__(self) -> MediaCounter:
        def read_bytes(ref: str, **kwargs: Any) -> bytes:
            self.reads[ref] += 1
            return self._read_bytes(ref, **kwargs)

        def sha256_hex(data: bytes) -> str:
            digest = self._sha256_hex(data)
            self.hashes[digest] += 1
            return digest

        self.sources.read_bytes, self.sources.sha256_hex = read_bytes, sha256_hex
        return self

    def __exit__(self, *exc: object) -> None:
        self.sources.read_bytes, self.sources.sha256_hex = self._read_bytes, self._sha256_hex


def worker_catalog(params: dict[str, Any]) -> dict[str, Any]:
    from wan_pipeline.catalog import load_prompt_set, requests_from_dataframe, validate_paths

    catalog, roots = Path(params["catalog"]), [Path(params["image_dir"])]
    results: dict[str, Any] = {}
    with MediaCounter() as counter, PeakMemory() as memory:
        start = time.perf_counter()
        prompt_set = load_prompt_set(catalog, allowed_roots=roots)
        results["load_s"] = time.perf_counter() - start
    results.update(
        requests=len(prompt_set.requests),
        load_memory_growth_mb=memory.growth_mb,
        images_hashed=len(counter.hashes),
        max_hashes_per_image=max(counter.hashes.values(), default=0),
        max_reads_per_image=max(counter.reads.values(), default=0),
    )
    start = time.perf_counter()
    frame = prompt_set.to_dataframe()
    requests_from_dataframe(frame)
    results["dataframe_round_trip_s"] = time.perf_counter() - start
    with MediaCounter() as counter:
        start = time.perf_counter()
        reports = validate_paths([catalog], allowed_roots=roots)
        results["validate_s"] = time.perf_counter() - start
    results["validate_ok"] = all(report.ok for report in reports)
    results["validate_max_hashes_per_image"] = max(counter.hashes.values(), default=0)
    return results


def run(quick: bool, workdir: Path) -> list[Figure]:
    images = write_images(workdir / "images", IMAGE_COUNT)
    measured = []
    for count in QUICK_SIZES if quick else SIZES:
        catalog = write_csv_catalog(workdir / "catalog" / f"rows_{count}.csv", count, images)
        params = {"catalog": str(catalog), "image_dir": str(workdir / "images")}
        measured.append({"count": count, **run_worker("bench_catalog.py", "catalog", params, timeout_s=300)})
    rows = [[m["count"], m["requests"], m["load_s"], m["images_hashed"], m["max_hashes_per_image"],
             m["max_reads_per_image"], m["dataframe_round_trip_s"], m["validate_s"], m["load_memory_growth_mb"]]
            for m in measured]
    figure = Figure(
        "5",
        f"Catalog: validate and expand a CSV over {IMAGE_COUNT} images",
        {"images": f"{IMAGE_COUNT} JPEG {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}", "columns":
         "image, prompt, resolution, duration, seed, generate_audio"},
        [Table("", ["rows", "requests", "load_prompt_set s", "images hashed", "max hashes / image",
                    "max reads / image", "DataFrame round trip s", "validate_paths s", "peak RSS growth MB"], rows)],
        data={"runs": measured},
    )
    at_target = next((m for m in measured if m["count"] == TARGET_SIZE), None)
    if at_target:
        figure.targets = [
            Target(f"load_prompt_set of {TARGET_SIZE:,} rows (s)", at_target["load_s"], f"< {TARGET_SECONDS:g} s",
                   at_target["load_s"] < TARGET_SECONDS),
            Target("hashes per image", at_target["max_hashes_per_image"], "= 1",
                   at_target["max_hashes_per_image"] == 1 and at_target["images_hashed"] == IMAGE_COUNT),
        ]
    else:
        figure.targets = [Target(f"load_prompt_set of {TARGET_SIZE:,} rows (s)", None, f"< {TARGET_SECONDS:g} s", None)]
    figure.notes = [
        "load_prompt_set = parse, validate, resolve and inspect media, derive request keys and prices "
        "(the `generation_requests` asset; it then builds the DataFrame, timed separately with the "
        "downstream assets' `requests_from_dataframe`).",
        "validate_paths is `wan-pipeline validate`: the same load plus the report.",
    ]
    return [figure]


if __name__ == "__main__":
    bench_main(run, {"catalog": worker_catalog})
