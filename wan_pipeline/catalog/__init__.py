"""Prompt-set catalog: one YAML or CSV file per prompt set -> validated, expanded generation requests.

A prompt set's name is its file stem, a slug `[a-z0-9][a-z0-9_-]*` (it becomes a Dagster partition
key). Loading expands items, seeds and the grid into one `CatalogRequest` per generation: every
image/audio is identified by its content sha256, a missing seed is derived deterministically, and each
generation gets its `request_key`. Every problem is collected, with file, line (YAML) or row (CSV),
field, value and what is allowed, so a catalog is fixed in one pass and nothing is paid for until it
is valid. Nothing here reads the environment: roots, prices and limits are arguments.

One module per idea:
  discovery     which files are sets, their names, how paths are shown
  limits        file size, generations per set, YAML aliases, allowed characters (`CatalogLimits`)
  yaml_format   YAML: bounded parsing, line numbers, items and grid -> drafts
  csv_format    CSV: header and rows -> drafts
  drafts        catalog field names; generations as written
  media         allowed roots; media references resolved and inspected once per load
  requests      drafts -> validated `CatalogRequest`s, duplicates
  problems      collecting problems, values quoted short and escaped
  model         `CatalogProblem`, `CatalogRequest`, `PromptSet`, `SetReport`, the DataFrame view
  loader        one file -> `PromptSet` (`load_prompt_set`)
  reports       `validate_paths`, `format_reports`, `validate_command`

Discovery: `discover_prompt_sets` returns only files usable as partitions (valid, unique names).
Files it leaves out are not forgotten: `prompt_set_files` lists every candidate, and validating a
folder (`validate_paths`) reports invalid names and two files claiming one name.
"""

from wan_pipeline.catalog.discovery import (
    SET_SUFFIXES,
    SLUG,
    discover_prompt_sets,
    display_path,
    is_valid_set_name,
    prompt_set_files,
)
from wan_pipeline.catalog.drafts import CATALOG_FIELDS
from wan_pipeline.catalog.limits import (
    MAX_ALIAS_NODES,
    MAX_FILE_BYTES,
    MAX_GENERATIONS,
    CatalogLimits,
)
from wan_pipeline.catalog.loader import load_prompt_set
from wan_pipeline.catalog.media import allowed_roots_for
from wan_pipeline.catalog.model import (
    FRAME_DTYPES,
    CatalogError,
    CatalogProblem,
    CatalogRequest,
    PromptSet,
    SetReport,
    requests_from_dataframe,
    requests_to_dataframe,
)
from wan_pipeline.catalog.reports import format_reports, validate_command, validate_paths
from wan_pipeline.catalog.yaml_format import GRID_KEYS, ITEM_KEYS, TOP_LEVEL_KEYS

__all__ = [
    "CATALOG_FIELDS",
    "FRAME_DTYPES",
    "GRID_KEYS",
    "ITEM_KEYS",
    "MAX_ALIAS_NODES",
    "MAX_FILE_BYTES",
    "MAX_GENERATIONS",
    "SET_SUFFIXES",
    "SLUG",
    "TOP_LEVEL_KEYS",
    "CatalogError",
    "CatalogLimits",
    "CatalogProblem",
    "CatalogRequest",
    "PromptSet",
    "SetReport",
    "allowed_roots_for",
    "discover_prompt_sets",
    "display_path",
    "format_reports",
    "is_valid_set_name",
    "load_prompt_set",
    "prompt_set_files",
    "requests_from_dataframe",
    "requests_to_dataframe",
    "validate_command",
    "validate_paths",
]
