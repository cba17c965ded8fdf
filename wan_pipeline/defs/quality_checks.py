"""A non-blocking check: the stored videos whose quality metrics fail their thresholds."""

import dagster as dg
import pandas as pd

from wan_pipeline.catalog import requests_from_dataframe
from wan_pipeline.quality import QualityThresholds
from wan_pipeline.safe_text import printable

from .assets import downloaded_videos
from .partitions import prompt_sets
from .resources import VideoStoreResource

LISTED = 100  # failing videos named in the metadata


@dg.asset_check(
    asset=downloaded_videos,
    partitions_def=prompt_sets,
    additional_ins={"generation_requests": dg.AssetIn()},
    description="Warns about stored videos that fail a quality check (first frame off the image, frozen, "
    "black or blank stretches, silent or unexpected audio); lists them with their metrics. Never blocks.",
)
def videos_pass_quality_checks(
    downloaded_videos: pd.DataFrame, generation_requests: pd.DataFrame, video_store: VideoStoreResource
) -> dg.AssetCheckResult:
    store = video_store.get()
    stored = set(downloaded_videos["request_key"]) if len(downloaded_videos) else set()
    failing, measured, metrics = [], 0, []
    for request in requests_from_dataframe(generation_requests):
        if request.request_key not in stored:
            continue
        quality = (store.read_sidecar(request.prompt_set, request.request_key) or {}).get("quality")
        if quality is None:
            continue
        measured += 1
        metrics.append(quality)
        if not quality.get("passed"):
            failing.append((request.request_key, request.request.seed, quality.get("failures") or []))
    frame = pd.DataFrame(metrics)

    def median(name: str) -> float:
        return float(frame[name].median()) if name in frame and frame[name].notna().any() else float("nan")

    listing = "\n".join(
        f"- `{key}` (seed {seed}): {printable('; '.join(failures), 300)}" for key, seed, failures in failing[:LISTED]
    )
    return dg.AssetCheckResult(
        passed=not failing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "videos_measured": measured,
            "failing": len(failing),
            "median_first_frame_ssim": median("first_frame_ssim"),
            "median_motion": median("motion"),
            "max_longest_frozen_s": float(frame["longest_frozen_s"].max()) if "longest_frozen_s" in frame else 0.0,
            "max_longest_blank_s": float(frame["longest_blank_s"].max()) if "longest_blank_s" in frame else 0.0,
            "thresholds": dg.MetadataValue.json(QualityThresholds.from_env().to_dict()),
            "failing_videos": dg.MetadataValue.md(listing or "none"),
        },
    )
