"""Prompt-set catalog: one YAML or CSV file per prompt set -> validated, expanded generation requests.

A prompt set's name is its file stem, a slug `[a-z0-9][a-z0-9_-]*` (it becomes a Dagster partition
key). Loading expands items, seeds and the grid into one `CatalogRequest` per generation: every
image/audio is identified by its content sha256, a missing seed is derived deterministically, and each
generation gets its `request_key`. Every problem is collected, with file, line (YAML) or row (CSV),
field, value and what is allowed, so a catalog is fixed in one pass and nothing is paid for until it
is valid. The file formats are described in docs and in `load_prompt_set`.

Catalog field names are the request fields, except that media are named `image` and `audio` (they
hold a reference as written, not what goes on the wire).

Allowed roots -- a local media path must resolve (symlinks followed) inside one of:
  1. the folder holding the set file, and below;
  2. `data/` under the current working directory (the project's media folder: the sample
     catalog's `../../data/images/...` lands there when run from the project root), and the
     `data/` of the project a set file belongs to when it lives in `<project>/configs/<folder>/`
     (so a catalog elsewhere, laid out like this one, works from any working directory);
  3. the folders in `WAN_PIPELINE_ALLOWED_ROOTS` (os.pathsep-separated, see settings);
  4. the `allowed_roots` a caller passes.
Anything else (`../../etc/passwd`, `/etc/passwd`) is an error, never an upload. fsspec URLs that
reach the local disk by another name (`local://`, chained `a::b` URLs) are refused: write a path.

Discovery: `discover_prompt_sets` returns only files usable as partitions (valid, unique names).
Files it leaves out are not forgotten: `prompt_set_files` lists every candidate, and validating a
folder (`validate_paths`) reports invalid names and two files claiming one name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import yaml
from fsspec.implementations.local import LocalFileSystem

from wan_pipeline import sources
from wan_pipeline.models import (
    DEFAULT_MODEL,
    MODELS,
    REQUEST_FIELDS,
    ModelSpec,
    VideoRequest,
    check_request_fields,
    derive_seed,
    request_key,
)
from wan_pipeline.pricing import PriceTable, PriceUnknown
from wan_pipeline.settings import load_settings
from wan_pipeline.sources import MediaError

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*")
SLUG_ALLOWED = "a slug [a-z0-9][a-z0-9_-]* (the file name without its extension)"
SET_SUFFIXES = (".yaml", ".yml", ".csv")
# A grid is a multiplication: cap it so a typo cannot plan (and later buy) millions of videos.
MAX_GRID_GENERATIONS = 100_000

# Catalog names for the request fields: media references are `image` / `audio`.
REQUEST_TO_CATALOG = {"image_url": "image", "audio_url": "audio"}
CATALOG_TO_REQUEST = {catalog: request for request, catalog in REQUEST_TO_CATALOG.items()}
CATALOG_FIELDS = tuple(REQUEST_TO_CATALOG.get(name, name) for name in REQUEST_FIELDS)

TOP_LEVEL_KEYS = ("description", "defaults", "items", "grid")
ITEM_KEYS = (*CATALOG_FIELDS, "seeds")
# Grid axes: the three plural lists, then any other field, as a list or a single value.
GRID_LISTS = {"images": "image", "prompts": "prompt", "seeds": "seed"}
GRID_KEYS = (*GRID_LISTS, *(name for name in CATALOG_FIELDS if name not in GRID_LISTS.values()))

CSV_REQUIRED = ("image", "prompt")
CSV_INTEGERS = ("duration", "seed")
CSV_BOOLEANS = ("generate_audio", "enhance_prompt")
CSV_TRUE, CSV_FALSE = ("true", "yes", "1"), ("false", "no", "0")
CSV_BOOL_ALLOWED = "true | false | yes | no | 1 | 0"


# ---------------------------------------------------------------------------------------------------
# Public types


@dataclass(frozen=True)
class CatalogProblem:
    """One thing wrong with a catalog, located precisely enough to fix it without searching."""

    file: str
    location: str | None  # "line 12" (YAML), "row 7" (CSV), None for the whole file
    field: str | None
    value: object
    allowed: str | None
    message: str  # the full sentence, starting with the field when there is one

    def __str__(self) -> str:
        if self.location is None:
            return f"{self.file}: {self.message}"
        # `file:12:` for YAML lines (as compilers print them); `file:row 7:` for CSV rows.
        return f"{self.file}:{self.location.removeprefix('line ')}: {self.message}"


class CatalogError(ValueError):
    """A prompt set that must not be used: every problem is listed, not just the first."""

    def __init__(self, problems: list[CatalogProblem]):
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


@dataclass(frozen=True)
class CatalogRequest:
    """One generation of a prompt set, with where it was written and what identifies its output."""

    prompt_set: str
    source_file: str
    source_line: int  # YAML line (1-based) or CSV row number (1-based, header = row 1)
    request: VideoRequest  # seed always set; image_url/audio_url: resolved absolute path or the URL as given
    image_ref: str  # as written in the catalog
    image_sha256: str | None  # None only for http(s) URLs, identified by URL
    audio_ref: str | None
    audio_sha256: str | None
    seed_derived: bool
    request_key: str
    estimated_usd: float

    def provenance_request(self) -> dict[str, Any]:
        """The API fields, with each media reference replaced by what it was and its content hash."""
        fields: dict[str, Any] = self.request.fields()
        fields["image_url"] = {"source": self.image_ref, "sha256": self.image_sha256}
        if self.audio_ref is not None:
            fields["audio_url"] = {"source": self.audio_ref, "sha256": self.audio_sha256}
        return fields


@dataclass(frozen=True)
class PromptSet:
    name: str
    path: Path
    file_sha256: str
    description: str | None
    requests: list[CatalogRequest]

    @property
    def estimated_usd(self) -> float:
        return round(sum(request.estimated_usd for request in self.requests), 6)

    def to_dataframe(self) -> pd.DataFrame:
        return requests_to_dataframe(self.requests)


@dataclass
class SetReport:
    """The validation outcome of one set file, as `wan-pipeline validate` prints it."""

    name: str
    path: Path
    count: int  # valid generations
    estimated_usd: float  # of the valid generations
    problems: list[CatalogProblem]
    price_is_estimate: bool = False  # some generation is priced with an estimated (undocumented) rate

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------------
# DataFrame view: one row per generation, parquet-friendly dtypes, exact round trip.

FRAME_DTYPES: dict[str, str] = {
    "request_key": "str",
    "prompt_set": "str",
    "source_file": "str",
    "source_line": "int64",
    "seed": "int64",
    "seed_derived": "bool",
    "image_ref": "str",
    "image_sha256": "str",
    "audio_ref": "str",
    "audio_sha256": "str",
    "estimated_usd": "float64",
    "model": "str",
    "prompt": "str",
    "image_url": "str",
    "audio_url": "str",
    "resolution": "str",
    "duration": "int64",
    "negative_prompt": "str",
    "shot_type": "str",
    "generate_audio": "bool",
    "enhance_prompt": "bool",
}


def requests_to_dataframe(requests: Sequence[CatalogRequest]) -> pd.DataFrame:
    records = [
        {
            "request_key": r.request_key,
            "prompt_set": r.prompt_set,
            "source_file": r.source_file,
            "source_line": r.source_line,
            "seed_derived": r.seed_derived,
            "image_ref": r.image_ref,
            "image_sha256": r.image_sha256,
            "audio_ref": r.audio_ref,
            "audio_sha256": r.audio_sha256,
            "estimated_usd": r.estimated_usd,
            **{name: getattr(r.request, name) for name in REQUEST_FIELDS},
        }
        for r in requests
    ]
    return pd.DataFrame.from_records(records, columns=list(FRAME_DTYPES)).astype(FRAME_DTYPES)


def requests_from_dataframe(df: pd.DataFrame) -> list[CatalogRequest]:
    """The requests of `to_dataframe`, e.g. after a parquet round trip (missing strings -> None)."""

    def text(value: Any) -> str | None:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)

    requests = []
    for row in df.to_dict("records"):
        request = VideoRequest(
            model=str(row["model"]),
            prompt=str(row["prompt"]),
            image_url=str(row["image_url"]),
            audio_url=text(row["audio_url"]),
            resolution=str(row["resolution"]),
            duration=int(row["duration"]),
            negative_prompt=text(row["negative_prompt"]),
            shot_type=str(row["shot_type"]),
            generate_audio=bool(row["generate_audio"]),
            seed=int(row["seed"]),
            enhance_prompt=bool(row["enhance_prompt"]),
        )
        requests.append(
            CatalogRequest(
                prompt_set=str(row["prompt_set"]),
                source_file=str(row["source_file"]),
                source_line=int(row["source_line"]),
                request=request,
                image_ref=str(row["image_ref"]),
                image_sha256=text(row["image_sha256"]),
                audio_ref=text(row["audio_ref"]),
                audio_sha256=text(row["audio_sha256"]),
                seed_derived=bool(row["seed_derived"]),
                request_key=str(row["request_key"]),
                estimated_usd=float(row["estimated_usd"]),
            )
        )
    return requests


# ---------------------------------------------------------------------------------------------------
# Discovery and paths


def is_valid_set_name(name: str) -> bool:
    return SLUG.fullmatch(name) is not None


def prompt_set_files(catalog_dir: Path) -> list[Path]:
    """Every candidate set file directly in `catalog_dir` (*.yaml, *.yml, *.csv), valid name or not."""
    return sorted(
        path for path in Path(catalog_dir).iterdir() if path.is_file() and path.suffix.lower() in SET_SUFFIXES
    )


def discover_prompt_sets(catalog_dir: Path) -> dict[str, Path]:
    """Slug -> file for the sets usable as partitions. A file whose stem is not a slug, or whose stem
    another file also claims (`x.yaml` and `x.csv`), is left out here and reported by `validate_paths`."""
    if not Path(catalog_dir).is_dir():
        return {}
    by_name: dict[str, list[Path]] = {}
    for path in prompt_set_files(catalog_dir):
        by_name.setdefault(path.stem, []).append(path)
    return {name: paths[0] for name, paths in by_name.items() if len(paths) == 1 and is_valid_set_name(name)}


def display_path(path: Path) -> str:
    """A path as messages show it: relative to the working directory when under it (stable reports)."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(resolved)


def project_data_dir(set_file: Path) -> Path | None:
    """`<project>/data` for a set file laid out as `<project>/configs/prompt_sets/<set>.yaml`."""
    folder = Path(set_file).resolve().parent
    return folder.parent.parent / "data" if folder.parent.name == "configs" else None


def default_allowed_roots(set_file: Path) -> list[Path]:
    """The roots local media of `set_file` may live under (see the module doc), before caller extras."""
    project_data = project_data_dir(set_file)
    return [
        Path(set_file).resolve().parent,
        Path.cwd() / "data",
        *([project_data] if project_data else []),
        *load_settings().allowed_roots,
    ]


# ---------------------------------------------------------------------------------------------------
# Problems


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


class _ProblemLog:
    """Problems of one file, each reported once (a bad default or grid value hits many generations)."""

    def __init__(self, file: str):
        self.file = file
        self._problems: list[CatalogProblem] = []
        self._seen: set[tuple[str | None, str]] = set()
        # Every report counts here, repeats included: "did this generation have a problem" must not
        # depend on whether an earlier generation already reported the same one.
        self.reported = 0

    def add(
        self,
        location: str | None,
        message: str,
        *,
        field: str | None = None,
        value: object = None,
        allowed: str | None = None,
    ) -> None:
        self.reported += 1
        if (location, message) not in self._seen:
            self._seen.add((location, message))
            self._problems.append(CatalogProblem(self.file, location, field, value, allowed, message))

    def bad_value(self, location: str | None, field: str, value: Any, allowed: str) -> None:
        self.add(location, f"{field}: got {_shown(value)}, allowed: {allowed}", field=field, value=value, allowed=allowed)

    def unknown_key(self, location: str | None, key: Any, value: Any, allowed: Sequence[str], what: str) -> None:
        allowed_text = ", ".join(allowed)
        self.add(location, f"{key}: unknown {what}, allowed: {allowed_text}", field=str(key), value=value,
                 allowed=allowed_text)

    def sorted(self) -> list[CatalogProblem]:
        """File-wide problems first, then by line/row, in discovery order within a line."""

        def position(problem: CatalogProblem) -> tuple[int, int]:
            if problem.location is None:
                return (0, 0)
            return (1, int(problem.location.rsplit(" ", 1)[1]))

        return sorted(self._problems, key=position)


# ---------------------------------------------------------------------------------------------------
# Drafts: generations as written, before validation


@dataclass
class _Fields:
    """Catalog field values and where each was written (defaults, item key, grid entry, CSV row)."""

    values: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)

    def set(self, name: str, value: Any, where: str) -> None:
        self.values[name] = value
        self.where[name] = where

    def overlaid(self, other: _Fields) -> _Fields:
        return _Fields({**self.values, **other.values}, {**self.where, **other.where})


@dataclass
class _Draft:
    location: str  # where the generation is written: the item, the grid, the CSV row
    line: int
    fields: _Fields


# ---------------------------------------------------------------------------------------------------
# YAML


@dataclass
class _YamlDocument:
    data: Any
    lines: dict[tuple[Any, ...], int]  # path of keys / indexes -> 1-based line

    def line(self, *path: Any) -> int:
        while path not in self.lines:  # an aliased node's children are recorded under its first path
            path = path[:-1]
        return self.lines[path]

    def at(self, *path: Any) -> str:
        return f"line {self.line(*path)}"


def _parse_yaml(text: str, log: _ProblemLog) -> _YamlDocument | None:
    try:
        loader = yaml.SafeLoader(text)  # checks the characters already
        try:
            node = loader.get_single_node()
            if node is None:
                return _YamlDocument(None, {(): 1})
            data = loader.construct_document(node)
            return _YamlDocument(data, _node_lines(node, loader, log))
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = ", ".join(part for part in (exc.context, exc.problem) if part) or str(exc)
        log.add(f"line {mark.line + 1}" if mark else None, f"malformed YAML: {detail}")
    except yaml.YAMLError as exc:  # e.g. a control character: the message spans lines
        log.add(None, f"malformed YAML: {' '.join(str(exc).split())}")
    except RecursionError:
        log.add(None, "malformed YAML: nested too deeply")
    return None


def _node_lines(root: yaml.Node, loader: yaml.SafeLoader, log: _ProblemLog) -> dict[tuple[Any, ...], int]:
    """Line of every mapping key and sequence entry, by path; reports keys written twice in a mapping."""
    lines: dict[tuple[Any, ...], int] = {(): root.start_mark.line + 1}
    visited: set[int] = set()  # each node once: aliases may share (or even contain) a node
    stack: list[tuple[tuple[Any, ...], yaml.Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys_seen = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # a complex key already failed construction
                key = loader.construct_object(key_node)
                line = key_node.start_mark.line + 1
                # A key merged in with `<<: *anchor` lives elsewhere; overriding it is not a repeat.
                written_here = node.start_mark.index <= key_node.start_mark.index <= node.end_mark.index
                if key in keys_seen and written_here:
                    log.add(f"line {line}", f"{key}: written twice in one mapping (the last one would win)",
                            field=str(key))
                if written_here:
                    keys_seen.add(key)
                lines[path + (key,)] = line
                stack.append((path + (key,), value_node))
        elif isinstance(node, yaml.SequenceNode):
            for index, child in enumerate(node.value):
                lines[path + (index,)] = child.start_mark.line + 1
                stack.append((path + (index,), child))
    return lines


def _yaml_drafts(doc: _YamlDocument, log: _ProblemLog) -> tuple[str | None, list[_Draft]]:
    """The description and the generations of a parsed YAML set."""
    data = doc.data
    if data is None:
        return None, []  # an empty file: reported as having no generations
    if not isinstance(data, dict):
        log.add(doc.at(), f"the catalog must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}; "
                f"got {_shown(data)}", value=data, allowed=f"a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
        return None, []
    for key, value in data.items():
        if key not in TOP_LEVEL_KEYS:
            log.unknown_key(doc.at(key), key, value, TOP_LEVEL_KEYS, "top-level key")

    description = data.get("description")
    if description is not None and not isinstance(description, str):
        log.bad_value(doc.at("description"), "description", description, "a string")
        description = None

    defaults = _Fields()
    if data.get("defaults") is not None:
        if isinstance(data["defaults"], dict):
            defaults = _yaml_fields(doc, ("defaults",), data["defaults"], CATALOG_FIELDS, log)
        else:
            log.bad_value(doc.at("defaults"), "defaults", data["defaults"], "a mapping of request fields")

    drafts: list[_Draft] = []
    items = data.get("items")
    if items is not None:
        if isinstance(items, list):
            for index, item in enumerate(items):
                drafts.extend(_yaml_item_drafts(doc, index, item, defaults, log))
        else:
            log.bad_value(doc.at("items"), "items", items, "a list of generations (mappings)")
    if data.get("grid") is not None:
        drafts.extend(_yaml_grid_drafts(doc, data["grid"], defaults, log))
    return description, drafts


def _yaml_fields(
    doc: _YamlDocument, path: tuple[Any, ...], mapping: dict[Any, Any], allowed: Sequence[str], log: _ProblemLog
) -> _Fields:
    """The catalog fields of a mapping; unknown keys are reported; `seeds` is left to the caller."""
    fields = _Fields()
    for key, value in mapping.items():
        if key not in allowed:
            log.unknown_key(doc.at(*path, key), key, value, allowed, "field")
        elif key != "seeds":
            fields.set(key, value, doc.at(*path, key))
    return fields


def _yaml_item_drafts(
    doc: _YamlDocument, index: int, item: Any, defaults: _Fields, log: _ProblemLog
) -> list[_Draft]:
    path = ("items", index)
    if not isinstance(item, dict):
        log.bad_value(doc.at(*path), "items", item, "a mapping with image, prompt and request fields")
        return []
    fields = defaults.overlaid(_yaml_fields(doc, path, item, ITEM_KEYS, log))
    location, line = doc.at(*path), doc.line(*path)
    if "seeds" not in item:
        return [_Draft(location, line, fields)]
    if "seed" in item:  # reported; the seeds are still expanded so their other problems show too
        log.add(doc.at(*path, "seeds"), "seeds: `seed` and `seeds` are both given, allowed: one of them",
                field="seeds", value=item["seeds"], allowed="one of seed | seeds")
    seeds = _yaml_list(doc, path + ("seeds",), "seeds", item["seeds"], log)
    drafts = []
    for seed, where in seeds:
        seeded = _Fields(dict(fields.values), dict(fields.where))
        seeded.set("seed", seed, where)
        drafts.append(_Draft(location, line, seeded))
    return drafts


def _yaml_list(
    doc: _YamlDocument, path: tuple[Any, ...], name: str, value: Any, log: _ProblemLog
) -> list[tuple[Any, str]]:
    """A non-empty list's entries with their locations; [] (and a problem) for anything else."""
    if isinstance(value, list) and value:
        return [(entry, doc.at(*path, index)) for index, entry in enumerate(value)]
    log.bad_value(doc.at(*path), name, value, "a non-empty list")
    return []


def _yaml_grid_drafts(doc: _YamlDocument, grid: Any, defaults: _Fields, log: _ProblemLog) -> list[_Draft]:
    """The cartesian product of the grid's axes: images x prompts x other fields x seeds."""
    if not isinstance(grid, dict):
        log.bad_value(doc.at("grid"), "grid", grid, "a mapping of images, prompts, seeds and request fields")
        return []
    problems_before = log.reported
    for name in ("images", "prompts"):
        if name not in grid:
            log.add(doc.at("grid"), f"grid: `{name}` is missing, allowed: a grid needs both images and prompts",
                    field=name, allowed="a grid with images and prompts")
    axes: list[tuple[str, list[tuple[Any, str]]]] = []
    for key, value in grid.items():
        if key not in GRID_KEYS:
            hint = f" (write `{key}s` as a list)" if f"{key}s" in GRID_LISTS else ""
            log.unknown_key(doc.at("grid", key), f"{key}{hint}", value, GRID_KEYS, "grid field")
        elif key in GRID_LISTS or isinstance(value, list):
            axes.append((GRID_LISTS.get(key, key), _yaml_list(doc, ("grid", key), key, value, log)))
        else:
            axes.append((key, [(value, doc.at("grid", key))]))
    if log.reported > problems_before:
        return []
    # Images outermost and seeds innermost, so the rows of one image and prompt stay together.
    rank = {"image": 0, "prompt": 1, "seed": 3}
    axes.sort(key=lambda axis: rank.get(axis[0], 2))
    size = math.prod(len(entries) for _, entries in axes)
    if size > MAX_GRID_GENERATIONS:
        log.add(doc.at("grid"), f"grid: expands to {size} generations, allowed: at most {MAX_GRID_GENERATIONS}",
                field="grid", value=size, allowed=f"at most {MAX_GRID_GENERATIONS} generations")
        return []
    location, line = doc.at("grid"), doc.line("grid")
    drafts = []
    for combination in itertools.product(*(entries for _, entries in axes)):
        fields = _Fields(dict(defaults.values), dict(defaults.where))
        for (name, _), (value, where) in zip(axes, combination, strict=True):
            fields.set(name, value, where)
        drafts.append(_Draft(location, line, fields))
    return drafts


# ---------------------------------------------------------------------------------------------------
# CSV


def _csv_drafts(text: str, log: _ProblemLog) -> list[_Draft]:
    """One generation per row; empty cells of optional columns take the model's defaults."""
    reader = csv.reader(io.StringIO(text, newline=""))
    drafts: list[_Draft] = []
    columns: list[str | None] | None = None  # None for a column that is ignored (reported in the header)
    row_number = 0
    try:
        for row_number, cells in enumerate(reader, start=1):
            if not any(cell.strip() for cell in cells):
                continue  # blank rows are skipped (and keep their number)
            if columns is None:
                columns = _csv_header(cells, log)
                if columns is None:
                    return []
            else:
                draft = _csv_row(row_number, cells, columns, log)
                if draft is not None:
                    drafts.append(draft)
    except csv.Error as exc:
        log.add(f"row {row_number + 1}", f"malformed CSV: {exc}")
    if columns is None and not log.reported:
        log.add(None, f"empty CSV: expected a header with {', '.join(CSV_REQUIRED)}",
                allowed=f"a header with {', '.join(CSV_REQUIRED)} and optional request fields")
    return drafts


def _csv_header(cells: list[str], log: _ProblemLog) -> list[str | None] | None:
    """Column names (None for unknown or repeated ones); None when rows cannot be read at all."""
    columns: list[str | None] = []
    for number, cell in enumerate(cells, start=1):
        name = cell.strip()
        if not name:
            log.add("row 1", f"column {number} has no name, allowed: {', '.join(CATALOG_FIELDS)}",
                    allowed=", ".join(CATALOG_FIELDS))
            columns.append(None)
        elif name not in CATALOG_FIELDS:
            log.unknown_key("row 1", name, name, CATALOG_FIELDS, "column")
            columns.append(None)
        elif name in columns:
            log.add("row 1", f"{name}: column given twice, allowed: each column once", field=name, value=name,
                    allowed="each column once")
            columns.append(None)
        else:
            columns.append(name)
    missing = [name for name in CSV_REQUIRED if name not in columns]
    for name in missing:
        log.add("row 1", f"{name}: required column is missing, allowed: a header with {', '.join(CSV_REQUIRED)}",
                field=name, allowed=f"a header with {', '.join(CSV_REQUIRED)}")
    return None if missing else columns


def _csv_row(number: int, cells: list[str], columns: list[str | None], log: _ProblemLog) -> _Draft | None:
    location = f"row {number}"
    if len(cells) > len(columns) and any(cell.strip() for cell in cells[len(columns):]):
        log.add(location, f"row has {len(cells)} cells, allowed: at most {len(columns)} (the header's columns)",
                value=len(cells), allowed=f"at most {len(columns)} cells")
        return None
    fields = _Fields()
    for name, cell in zip(columns, cells, strict=False):  # short rows: the missing cells are empty
        text = cell.strip()
        if name is None or (not text and name not in CSV_REQUIRED):
            continue
        if name in CSV_BOOLEANS:
            if text.lower() not in CSV_TRUE + CSV_FALSE:
                log.bad_value(location, name, text, CSV_BOOL_ALLOWED)
                continue
            fields.set(name, text.lower() in CSV_TRUE, location)
        elif name in CSV_INTEGERS and re.fullmatch(r"[+-]?\d+", text):
            fields.set(name, int(text), location)
        else:
            fields.set(name, text, location)  # a non-integer duration/seed is reported with the request
    return _Draft(location, number, fields)


# ---------------------------------------------------------------------------------------------------
# Media: each reference read and inspected once per load


@dataclass(frozen=True)
class _Media:
    url: str  # what the request carries: the resolved absolute path, or the URL / data URI as given
    identity: str  # "sha256:<hex>" or "url:<url>"
    sha256: str | None


class _MediaResolver:
    """Resolves, reads and inspects media references, caching by reference and by resolved file so
    10,000 rows over 20 images cost 20 reads."""

    def __init__(self, base_dir: Path, roots: Sequence[Path]):
        self.base_dir = base_dir
        self.roots = list(roots)
        self._by_ref: dict[tuple[str, str, str], _Media | MediaError] = {}
        self._by_target: dict[tuple[str, str, str], _Media | MediaError] = {}

    def resolve(self, ref: str, kind: str, spec: ModelSpec) -> _Media:
        """The media for `ref`; raises MediaError with a sentence saying what is wrong."""
        key = (kind, spec.name, ref)
        if key not in self._by_ref:
            try:
                self._by_ref[key] = self._resolve(ref, kind, spec)
            except MediaError as exc:
                self._by_ref[key] = exc
        outcome = self._by_ref[key]
        if isinstance(outcome, MediaError):
            raise outcome
        return outcome

    def _resolve(self, ref: str, kind: str, spec: ModelSpec) -> _Media:
        if sources.is_http_url(ref):
            return _Media(ref, f"url:{ref}", None)  # the provider fetches it
        if sources.is_data_uri(ref):
            return self._inspected(ref, ref, kind, spec)
        local = self._local_path(ref)
        if local is None:
            return self._inspected(ref, ref, kind, spec)
        try:
            path = sources.resolve_local_path(local, self.base_dir, self.roots)
            is_file = path.is_file()
        except MediaError:
            roots = ", ".join(dict.fromkeys(display_path(root) for root in self.roots))
            raise MediaError(f"outside the allowed roots ({roots})") from None
        except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, names too long, unknown ~user
            raise MediaError(f"not a usable path: {exc}") from None
        if not is_file:
            raise MediaError(f"no such file: {display_path(path)}")
        return self._inspected(str(path), str(path), kind, spec)

    @staticmethod
    def _local_path(ref: str) -> str | None:
        """The local path a reference names; None for a remote fsspec URL; refuses local disguises."""
        if not sources.has_scheme(ref):
            return ref
        protocol, rest = ref.split("://", 1)
        if protocol.lower() == "file":
            return rest
        if "::" in ref:
            raise MediaError("chained fsspec URLs are not supported: name the file directly")
        try:
            filesystem = fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError, AttributeError) as exc:
            raise MediaError(f"unsupported URL scheme {protocol!r}: {exc}") from None
        if issubclass(filesystem, LocalFileSystem):
            raise MediaError(f"{protocol}:// reaches the local disk: write a path instead")
        return None

    def _inspected(self, url: str, readable: str, kind: str, spec: ModelSpec) -> _Media:
        key = (kind, spec.name, readable)
        if key not in self._by_target:
            try:
                _, info = sources.load_media(readable, kind, spec, allowed_roots=self.roots)
                self._by_target[key] = _Media(url, f"sha256:{info.sha256}", info.sha256)
            except MediaError as exc:
                self._by_target[key] = exc
        outcome = self._by_target[key]
        if isinstance(outcome, MediaError):
            raise outcome
        return outcome


def _media_allowed(kind: str, spec: ModelSpec) -> str:
    if kind == "image":
        limits = (f"{' | '.join(spec.image_formats)}, each side {spec.image_min_side}-{spec.image_max_side} px, "
                  f"at most {spec.image_max_bytes} bytes")
    else:
        limits = (f"{' | '.join(spec.audio_formats)}, {spec.audio_min_seconds:g}-{spec.audio_max_seconds:g} s, "
                  f"at most {spec.audio_max_bytes} bytes")
    return f"a file under an allowed root, an fsspec URL or an http(s) URL ({limits})"


# ---------------------------------------------------------------------------------------------------
# Drafts -> requests


@dataclass
class _Context:
    name: str
    file: str
    media: _MediaResolver
    prices: PriceTable
    log: _ProblemLog


def _build_request(draft: _Draft, ctx: _Context) -> CatalogRequest | None:
    """Validate one generation; None (with its problems logged) when it is not a valid request."""
    values = {name: value for name, value in draft.fields.values.items() if value is not None}  # null = unset
    where = draft.fields.where
    problems_before = ctx.log.reported

    model = values.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or model not in MODELS:
        ctx.log.bad_value(where.get("model", draft.location), "model", model, " | ".join(MODELS))
        return None
    spec = MODELS[model]

    fields = {CATALOG_TO_REQUEST.get(name, name): value for name, value in values.items()}
    media: dict[str, _Media | None] = {"image": None, "audio": None}
    for kind in media:
        ref = values.get(kind)
        if not isinstance(ref, str) or not ref:
            continue  # absent or not text: check_request_fields reports it
        try:
            media[kind] = ctx.media.resolve(ref, kind, spec)
            fields[CATALOG_TO_REQUEST[kind]] = media[kind].url
        except MediaError as exc:
            ctx.log.add(where[kind], f"{kind}: got {_shown(ref)}: {exc}", field=kind, value=ref,
                        allowed=_media_allowed(kind, spec))

    for problem in check_request_fields(spec, fields):
        name = REQUEST_TO_CATALOG.get(problem.field, problem.field)
        ctx.log.bad_value(where.get(name, draft.location), name, problem.value, problem.allowed)
    image, audio = media["image"], media["audio"]
    if ctx.log.reported > problems_before or image is None:
        return None

    request = VideoRequest(**fields)
    audio_identity = audio.identity if audio else None
    seed_derived = request.seed is None
    if seed_derived:
        request = request.with_seed(derive_seed(request, image.identity, audio_identity))
    try:
        usd = ctx.prices.estimate_usd(request.model, request.resolution, request.duration)
    except PriceUnknown as exc:
        ctx.log.add(where.get("resolution", draft.location), f"resolution: {exc}", field="resolution",
                    value=request.resolution, allowed=f"a resolution priced in {ctx.prices.origin}")
        return None
    return CatalogRequest(
        prompt_set=ctx.name,
        source_file=ctx.file,
        source_line=draft.line,
        request=request,
        image_ref=values["image"],
        image_sha256=image.sha256,
        audio_ref=values.get("audio"),
        audio_sha256=audio.sha256 if audio else None,
        seed_derived=seed_derived,
        request_key=request_key(request, image.identity, audio_identity),
        estimated_usd=usd,
    )


def _report_duplicates(requests: list[CatalogRequest], log: _ProblemLog, unit: str) -> list[CatalogRequest]:
    """Keep the first of each request_key; report the others (the same key is the same paid video)."""
    first: dict[str, CatalogRequest] = {}
    for request in requests:
        earlier = first.setdefault(request.request_key, request)
        if earlier is not request:
            log.add(
                f"{unit} {request.source_line}",
                f"duplicate generation: request_key {request.request_key} is also produced by "
                f"{unit} {earlier.source_line}",
                field="request_key", value=request.request_key, allowed="each generation once per set",
            )
    return list(first.values())


# ---------------------------------------------------------------------------------------------------
# Loading


def _read_drafts(path: Path, log: _ProblemLog) -> tuple[str, str | None, list[_Draft]]:
    """The file's sha256, its description and its generations as written."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        log.add(None, f"cannot read the file: {exc.strerror or exc}")
        return "", None, []
    file_sha256 = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        log.add(None, f"not UTF-8 text: byte {exc.start} cannot be decoded")
        return file_sha256, None, []
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return file_sha256, None, _csv_drafts(text, log)
    if suffix in (".yaml", ".yml"):
        document = _parse_yaml(text, log)
        return (file_sha256, *_yaml_drafts(document, log)) if document is not None else (file_sha256, None, [])
    log.bad_value(None, "file type", suffix, " | ".join(SET_SUFFIXES))
    return file_sha256, None, []


def _load(path: Path, allowed_roots: Sequence[Path], prices: PriceTable) -> tuple[PromptSet, list[CatalogProblem]]:
    """Everything valid in a set file, and every problem found in it."""
    path = Path(path)
    log = _ProblemLog(display_path(path))
    if not is_valid_set_name(path.stem):
        log.bad_value(None, "name", path.stem, SLUG_ALLOWED)
    file_sha256, description, drafts = _read_drafts(path, log)
    if not drafts and not log.reported:
        log.add(None, "no generations: add items or a grid (YAML) or rows (CSV)", allowed="at least one generation")

    media = _MediaResolver(path.resolve().parent, [*default_allowed_roots(path), *allowed_roots])
    ctx = _Context(path.stem, log.file, media, prices, log)
    built = [request for draft in drafts if (request := _build_request(draft, ctx)) is not None]
    requests = _report_duplicates(built, log, "row" if path.suffix.lower() == ".csv" else "line")
    return PromptSet(path.stem, path, file_sha256, description, requests), log.sorted()


def load_prompt_set(
    path: Path, *, allowed_roots: Sequence[Path] = (), prices: PriceTable | None = None
) -> PromptSet:
    """Load, expand and validate one set file; raises CatalogError listing every problem.

    YAML: a mapping with optional `description`, `defaults` (any catalog field), `items` (each a
    mapping with `image`, `prompt`, request fields, and `seed` or a `seeds` list) and `grid` (lists
    `images`, `prompts`, optional `seeds`, and any other field as a list or a single value: the
    cartesian product). A field set to null is unset (the model's default applies).
    CSV: a header with `image` and `prompt` and optional request-field columns; one row per
    generation; empty cells take the model's defaults; booleans as true/false/yes/no/1/0.
    """
    prompt_set, problems = _load(path, allowed_roots, prices or PriceTable.load())
    if problems:
        raise CatalogError(problems)
    return prompt_set


# ---------------------------------------------------------------------------------------------------
# Validation reports (`wan-pipeline validate`)


def validate_paths(
    paths: list[Path], *, allowed_roots: Sequence[Path] = (), prices: PriceTable | None = None
) -> list[SetReport]:
    """One report per set file; a folder stands for every set file directly in it."""
    prices = prices or PriceTable.load()
    reports: list[SetReport] = []
    for given in paths:
        given = Path(given)
        if given.is_dir():
            reports.extend(_validate_folder(given, allowed_roots, prices))
        elif given.exists():
            reports.append(_validate_file(given, allowed_roots, prices))
        else:
            problem = CatalogProblem(display_path(given), None, None, None, None, "no such file or folder")
            reports.append(SetReport(given.stem, given, 0, 0.0, [problem]))
    return reports


def _validate_folder(folder: Path, allowed_roots: Sequence[Path], prices: PriceTable) -> list[SetReport]:
    files = prompt_set_files(folder)
    if not files:
        problem = CatalogProblem(display_path(folder), None, None, None, None,
                                 f"no prompt-set files ({', '.join('*' + s for s in SET_SUFFIXES)}) in this folder")
        return [SetReport(folder.name, folder, 0, 0.0, [problem])]
    reports = [_validate_file(path, allowed_roots, prices) for path in files]
    claimed: dict[str, list[SetReport]] = {}
    for report in reports:
        claimed.setdefault(report.name, []).append(report)
    for name, claimants in claimed.items():
        if len(claimants) > 1:
            names = ", ".join(report.path.name for report in claimants)
            for report in claimants:
                report.problems.insert(0, CatalogProblem(
                    display_path(report.path), None, "name", name, "one file per prompt-set name",
                    f"name: prompt set {name!r} is defined by {len(claimants)} files ({names}), allowed: one",
                ))
    return reports


def _validate_file(path: Path, allowed_roots: Sequence[Path], prices: PriceTable) -> SetReport:
    prompt_set, problems = _load(path, allowed_roots, prices)
    return SetReport(
        name=prompt_set.name,
        path=path,
        count=len(prompt_set.requests),
        estimated_usd=prompt_set.estimated_usd,
        problems=problems,
        price_is_estimate=any(
            prices.is_estimate(r.request.model, r.request.resolution) for r in prompt_set.requests
        ),
    )


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _usd(amount: float) -> str:
    """Dollars to the hundredth, or the ten-thousandth where it matters ($0.7875 is one 1080p 5 s video)."""
    text = f"{amount:.4f}"
    return "$" + (text[:-2] + text[-2:].rstrip("0"))


def format_reports(reports: Iterable[SetReport]) -> str:
    """Per set: name, file, generations, estimated USD, then every problem; then a total."""
    reports = list(reports)
    lines = []
    for report in reports:
        mark = "*" if report.price_is_estimate else ""
        status = "ok" if report.ok else f"INVALID, {_counted(len(report.problems), 'problem')}"
        lines.append(
            f"{report.name} ({display_path(report.path)}): {_counted(report.count, 'generation')}, "
            f"est. {_usd(report.estimated_usd)}{mark} -- {status}"
        )
        lines.extend(f"  {problem}" for problem in report.problems)
    invalid = sum(not report.ok for report in reports)
    any_estimate = any(report.price_is_estimate for report in reports)
    lines.append(
        f"total: {_counted(len(reports), 'set')}, {_counted(sum(r.count for r in reports), 'generation')}, "
        f"est. {_usd(sum(r.estimated_usd for r in reports))}{'*' if any_estimate else ''}; "
        + (f"{invalid} invalid" if invalid else "all valid")
    )
    if any_estimate:
        lines.append("* includes prices marked as estimates in the price table (not documented by the provider)")
    return "\n".join(lines)


def validate_command(paths: list[str]) -> int:
    """`wan-pipeline validate [PATH...]`: print the reports; 0 only when every set is valid."""
    targets = [Path(p) for p in paths] or [load_settings().catalog_dir]
    reports = validate_paths(targets)
    print(format_reports(reports))
    return 0 if reports and all(report.ok for report in reports) else 1
