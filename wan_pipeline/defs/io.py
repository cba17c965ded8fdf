"""Parquet IO for the DataFrame assets, on any fsspec root through universal-pathlib."""

from __future__ import annotations

import dagster as dg
import pandas as pd
from upath import UPath


class ParquetUPathIOManager(dg.UPathIOManager):
    extension = ".parquet"

    def dump_to_path(self, context: dg.OutputContext, obj: pd.DataFrame, path: UPath) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            obj.to_parquet(handle, index=False)

    def load_from_path(self, context: dg.InputContext, path: UPath) -> pd.DataFrame:
        with path.open("rb") as handle:
            return pd.read_parquet(handle)


class ParquetIOManager(dg.ConfigurableIOManagerFactory):
    """Stores each partition at `<base_dir>/<asset>/<prompt_set>.parquet`."""

    base_dir: str

    def create_io_manager(self, context: dg.InitResourceContext) -> ParquetUPathIOManager:
        return ParquetUPathIOManager(base_path=UPath(self.base_dir))
