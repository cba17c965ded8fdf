"""The experiment table of a prompt set, and its comparison sheets, as an asset of their own."""

import base64

import dagster as dg
import pandas as pd

from wan_pipeline.catalog import requests_from_dataframe
from wan_pipeline.experiments import experiment_table as build_experiment_table
from wan_pipeline.experiments import write_comparison_sheets, write_experiment_table

from .assets import PROMPT_SET_ASSET
from .resources import AimlApiResource, LedgerResource, VideoStoreResource

BEST_COLUMNS = ["image_ref", "prompt", "seed", "first_frame_ssim", "motion", "request_key"]


def best_seed_per_prompt(frame: pd.DataFrame) -> pd.DataFrame:
    """Per image and prompt, the passing generation whose first frame is closest to its image."""
    passed = frame[frame["quality_passed"].fillna(False).astype(bool)]
    ranked = passed.sort_values("first_frame_ssim", ascending=False, na_position="last")
    return ranked.groupby(["image_ref", "prompt"], sort=False).head(1)[BEST_COLUMNS]


@dg.asset(
    **PROMPT_SET_ASSET,
    group_name="experiments",
    kinds={"pandas", "parquet"},
    ins={"generation_requests": dg.AssetIn(), "downloaded_videos": dg.AssetIn()},
)
def experiment_table(
    context: dg.AssetExecutionContext,
    generation_requests: pd.DataFrame,
    downloaded_videos: pd.DataFrame,
    aimlapi: AimlApiResource,
    ledger: LedgerResource,
    video_store: VideoStoreResource,
) -> dg.Output[pd.DataFrame]:
    """One row per generation: every request field, outcome, cost, timings and quality metrics. Also
    written as `<output>/<set>/experiment.parquet` and `.csv`, with the set's comparison sheets
    (`comparison_*.png`, one per image and page). Reads the ledger and the sidecars; calls no API."""
    del downloaded_videos  # a dependency only: the table describes what was collected
    store = video_store.get()
    frame = build_experiment_table(ledger.get(aimlapi), store, requests_from_dataframe(generation_requests))
    parquet, csv = write_experiment_table(store, context.partition_key, frame)
    first: list[bytes] = []
    sheets = write_comparison_sheets(
        store, context.partition_key, frame, on_page=lambda page, png: first.append(png) if not first else None
    )
    failing = int((frame["quality_passed"] == False).sum())  # noqa: E712 (a nullable boolean column)
    metadata: dict = {
        "dagster/row_count": len(frame),
        "quality_failing": failing,
        "parquet": dg.MetadataValue.path(parquet),
        "csv": dg.MetadataValue.path(csv),
        "read_with": dg.MetadataValue.md(f"```python\npd.read_parquet({parquet!r})\n```"),
        "best_seed_per_prompt": dg.MetadataValue.md(
            best_seed_per_prompt(frame).to_markdown(index=False) if frame["quality_passed"].any() else "_(none passed)_"
        ),
        "comparison_sheets": len(sheets),
    }
    if first:
        caption = "" if len(sheets) == 1 else f"\n\nFirst of {len(sheets)} pages; all are in the set's folder."
        metadata["comparison_sheet"] = dg.MetadataValue.md(
            f"![comparison sheet](data:image/png;base64,{base64.b64encode(first[0]).decode()}){caption}"
        )
        metadata["comparison_sheet_path"] = dg.MetadataValue.path(sheets[0])
    return dg.Output(frame, metadata=metadata)


__all__ = ["best_seed_per_prompt", "experiment_table"]
