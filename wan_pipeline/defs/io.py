"""Parquet IO for the DataFrame assets, on any fsspec root through universal-pathlib."""

from __future__ import annotations

import dagster as dg
import pandas as pd
from upath import UPath

from wan_pipeline.safe_text import printable
from wan_pipeline.storage import atomic_writer

# What to run first when an asset's input was never materialized for a set, and why it is missing.
SUBMIT_FIRST = "nothing was submitted for it: run submit_prompt_set (generation_requests + submitted_generations) for this set first"
MISSING_INPUT = {
    "generation_requests": SUBMIT_FIRST,
    "submitted_generations": SUBMIT_FIRST,
    "generation_results": "its results were never collected: run collect_prompt_set (generation_results + "
    "downloaded_videos) for this set, or let generation_completion_sensor request it when its generations finish",
}


def missing_input_message(upstream: str, partition: str | None) -> str:
    """One line: which input is missing for which set, and what to run first."""
    where = f"prompt set {printable(partition or '?', 100)!r}"
    why = MISSING_INPUT.get(upstream, f"materialize {upstream} for this set first")
    return f"{upstream} has not been materialized for {where} yet ({why})"


class ParquetUPathIOManager(dg.UPathIOManager):
    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pd.DataFrame, path: UPath) -> None:
        # Not `path.open("wb")`: an fsspec file on an object store uploads what it holds even when the
        # write fails midway (closing it commits), and a local one is overwritten in place.
        with atomic_writer(path) as handle:
            obj.to_parquet(handle, index=False)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pd.DataFrame:
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            # A raw FileNotFoundError inside DagsterExecutionLoadInputError says nothing a user can act
            # on (and a backfill page only shows "Failed"): say which input and what to run first.
            upstream = context.upstream_output.asset_key.to_user_string() if context.upstream_output else "input"
            partition = context.asset_partition_key if context.has_asset_partitions else None
            raise dg.Failure(
                description=missing_input_message(upstream, partition), allow_retries=False
            ) from None
        with handle:
            return pd.read_parquet(handle)


class ParquetIOManager(dg.ConfigurableIOManagerFactory):
    """Stores each partition at `<base_dir>/<asset>/<prompt_set>.parquet`."""

    base_dir: str

    def create_io_manager(self, context: dg.InitResourceContext) -> ParquetUPathIOManager:
        return ParquetUPathIOManager(base_path=UPath(self.base_dir))
