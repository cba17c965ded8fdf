"""CSV prompt sets: a header with `image` and `prompt` and optional request-field columns, one row
per generation; empty cells take the model's defaults; booleans as true/false/yes/no/1/0. Rows are
numbered as a spreadsheet shows them (the header is row 1, blank rows keep their number)."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator

from wan_pipeline.catalog.drafts import CATALOG_FIELDS, Draft, Fields
from wan_pipeline.catalog.limits import CatalogLimits
from wan_pipeline.catalog.problems import ProblemLog

CSV_REQUIRED = ("image", "prompt")
CSV_INTEGERS = ("duration", "seed")
CSV_BOOLEANS = ("generate_audio", "enhance_prompt")
CSV_TRUE, CSV_FALSE = ("true", "yes", "1"), ("false", "no", "0")
CSV_BOOL_ALLOWED = "true | false | yes | no | 1 | 0"
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


class _MalformedCsv(Exception):
    def __init__(self, row: int, reason: csv.Error):
        super().__init__(row, reason)
        self.row, self.reason = row, reason


def _rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """(row number, cells) of every non-blank row; _MalformedCsv names the row the reader stopped at."""
    # Lines cut as `newline=""` would cut them, as views of `text`: an io.StringIO would hold a
    # second, four-byte-per-character copy of a file that may be MAX_FILE_BYTES long.
    reader = csv.reader(match.group() for match in _LINE.finditer(text))
    number = 0
    try:
        for number, cells in enumerate(reader, start=1):
            if any(cell.strip() for cell in cells):
                yield number, cells
    except csv.Error as exc:
        raise _MalformedCsv(number + 1, exc) from None


def csv_drafts(text: str, log: ProblemLog, limits: CatalogLimits) -> list[Draft]:
    """One generation per row, counted first: none when the rows are more than a set may hold."""
    try:
        # A first pass only counts, so an oversized file costs a parse, not 100,000s of drafts.
        generations = sum(1 for _ in _rows(text)) - 1  # the header is not a generation
        if generations > limits.max_generations:
            log.too_many(None, "rows", generations, limits.max_generations)
            return []
        drafts: list[Draft] = []
        columns: list[str | None] | None = None  # None for a column that is ignored (reported in the header)
        for row_number, cells in _rows(text):
            if columns is None:
                columns = _csv_header(cells, log)
                if columns is None:
                    return []
            elif (draft := _csv_row(row_number, cells, columns, log)) is not None:
                drafts.append(draft)
    except _MalformedCsv as exc:
        log.add(f"row {exc.row}", f"malformed CSV: {exc.reason}")
        return []
    if columns is None:
        log.add(None, f"empty CSV: expected a header with {', '.join(CSV_REQUIRED)}",
                allowed=f"a header with {', '.join(CSV_REQUIRED)} and optional request fields")
    return drafts


def _csv_header(cells: list[str], log: ProblemLog) -> list[str | None] | None:
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


def _csv_row(number: int, cells: list[str], columns: list[str | None], log: ProblemLog) -> Draft | None:
    location = f"row {number}"
    if len(cells) > len(columns) and any(cell.strip() for cell in cells[len(columns):]):
        log.add(location, f"row has {len(cells)} cells, allowed: at most {len(columns)} (the header's columns)",
                value=len(cells), allowed=f"at most {len(columns)} cells")
        return None
    fields = Fields()
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
    return Draft(location, number, fields)
