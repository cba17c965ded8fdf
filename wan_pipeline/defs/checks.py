"""Asset checks on a prompt set's outputs."""


import dagster as dg
import pandas as pd

from wan_pipeline.catalog import requests_from_dataframe
from wan_pipeline.collection import verify_videos
from wan_pipeline.ledger import State
from wan_pipeline.safe_text import printable

from .assets import downloaded_videos, generation_results, pending_in
from .partitions import prompt_sets
from .resources import VideoStoreResource


@dg.asset_check(
    asset=downloaded_videos,
    blocking=True,
    partitions_def=prompt_sets,
    additional_ins={"generation_requests": dg.AssetIn(), "generation_results": dg.AssetIn()},
    description="Every completed generation has a decodable video whose resolution, duration and audio "
    "match its request and whose sha256 matches its provenance sidecar (a file unchanged since it was hashed "
    "and probed, by its recorded stamp, is judged on that record). An increment (generations still "
    "running) is judged on what it stored, never on what is still pending; the final collection on "
    "every completed generation.",
)
def videos_match_requests(
    context: dg.AssetCheckExecutionContext,
    downloaded_videos: pd.DataFrame,
    generation_requests: pd.DataFrame,
    generation_results: pd.DataFrame,
    video_store: VideoStoreResource,
) -> dg.AssetCheckResult:
    completed = set(generation_results.loc[generation_results["state"] == str(State.COMPLETED), "request_key"])
    pending = pending_in(generation_results)
    checked = completed
    if pending:
        # What this increment stored (downloaded or copied); files kept from an earlier increment were
        # checked by it, and the final collection checks them all again.
        new = downloaded_videos.loc[downloaded_videos["stored_how"] != "kept", "request_key"] if len(downloaded_videos) else []
        checked = completed & set(new)
    report = verify_videos(video_store.get(), requests_from_dataframe(generation_requests), checked)
    problems = report.problems
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={
            "videos_checked": report.checked,
            # The others are unchanged since they were hashed and probed (see WAN_PIPELINE_REHASH).
            "videos_hashed_again": report.hashed,
            "collection": "partial" if pending else "final",
            "still_pending": pending,
            "problems": len(problems),
            "details": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "all videos match"),
        },
    )


@dg.asset_check(
    asset=generation_results,
    partitions_def=prompt_sets,
    description="Warns when the provider reported failed generations (or rejected requests); lists them.",
)
def no_failed_generations(generation_results: pd.DataFrame) -> dg.AssetCheckResult:
    failed = generation_results[generation_results["state"].isin([str(State.FAILED), str(State.REJECTED)])]
    return dg.AssetCheckResult(
        passed=failed.empty,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "failed": len(failed),
            "failures": dg.MetadataValue.md(
                "\n".join(f"- `{r.request_key}` ({r.state}): {printable(r.error)}" for r in failed.itertuples())
                or "none"
            ),
        },
    )
