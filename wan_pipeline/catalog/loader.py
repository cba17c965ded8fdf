"""One set file -> a `PromptSet` and every problem in it: size checked, read, parsed by format,
expanded, validated."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Sequence
from pathlib import Path

from wan_pipeline.catalog.csv_format import csv_drafts
from wan_pipeline.catalog.discovery import SET_SUFFIXES, SLUG_ALLOWED, display_path, is_valid_set_name
from wan_pipeline.catalog.drafts import Draft
from wan_pipeline.catalog.limits import DEFAULT_LIMITS, CatalogLimits
from wan_pipeline.catalog.media import MediaResolver, allowed_roots_for
from wan_pipeline.catalog.model import CatalogError, CatalogProblem, PromptSet
from wan_pipeline.catalog.problems import ProblemLog
from wan_pipeline.catalog.requests import BuildContext, build_request, without_duplicates
from wan_pipeline.catalog.yaml_format import parse_yaml, yaml_drafts
from wan_pipeline.pricing import PriceTable


def _read_bounded(path: Path, log: ProblemLog, limits: CatalogLimits) -> bytes | None:
    """The file's bytes, or None (and a problem) when it is not a regular file or is too large.
    The size is checked before reading, and the read stops one byte past the limit (a file that
    grows after the check is refused as well, never read whole)."""
    allowed = f"at most {limits.max_file_bytes} bytes"
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):
            log.add(None, "not a regular file, allowed: a YAML or CSV file", allowed="a regular file")
            return None
        if status.st_size > limits.max_file_bytes:
            log.add(None, f"file size: {status.st_size} bytes, allowed: {allowed}", field="file size",
                    value=status.st_size, allowed=allowed)
            return None
        with path.open("rb") as handle:
            raw = handle.read(limits.max_file_bytes + 1)
    except OSError as exc:
        log.add(None, f"cannot read the file: {exc.strerror or exc}")
        return None
    if len(raw) > limits.max_file_bytes:
        log.add(None, f"file size: more than {limits.max_file_bytes} bytes (it grew while being read), "
                f"allowed: {allowed}", field="file size", value=len(raw), allowed=allowed)
        return None
    return raw


def _read_drafts(path: Path, log: ProblemLog, limits: CatalogLimits) -> tuple[str, str | None, list[Draft]]:
    """The file's sha256, its description and its generations as written."""
    raw = _read_bounded(path, log, limits)
    if raw is None:
        return "", None, []
    file_sha256 = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        log.add(None, f"not UTF-8 text: byte {exc.start} cannot be decoded")
        return file_sha256, None, []
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return file_sha256, None, csv_drafts(text, log, limits)
    if suffix in (".yaml", ".yml"):
        document = parse_yaml(text, log, limits)
        if document is None:
            return file_sha256, None, []
        return (file_sha256, *yaml_drafts(document, log, limits))
    log.bad_value(None, "file type", suffix, " | ".join(SET_SUFFIXES))
    return file_sha256, None, []


def load_with_problems(
    path: Path, allowed_roots: Sequence[Path], prices: PriceTable, limits: CatalogLimits
) -> tuple[PromptSet, list[CatalogProblem]]:
    """Everything valid in a set file, and every problem found in it."""
    path = Path(path)
    log = ProblemLog(display_path(path))
    if not is_valid_set_name(path.stem):
        log.bad_value(None, "name", path.stem, SLUG_ALLOWED)
    file_sha256, description, drafts = _read_drafts(path, log, limits)
    if not drafts and not log.reported:
        log.add(None, "no generations: add items or a grid (YAML) or rows (CSV)", allowed="at least one generation")

    media = MediaResolver(path.resolve().parent, allowed_roots_for(path, allowed_roots))
    ctx = BuildContext(path.stem, log.file, media, prices, log)
    built = [request for draft in drafts if (request := build_request(draft, ctx)) is not None]
    requests = without_duplicates(built, log, "row" if path.suffix.lower() == ".csv" else "line")
    return PromptSet(path.stem, path, file_sha256, description, requests), log.sorted()


def load_prompt_set(
    path: Path,
    *,
    allowed_roots: Sequence[Path] = (),
    prices: PriceTable | None = None,
    limits: CatalogLimits = DEFAULT_LIMITS,
) -> PromptSet:
    """Load, expand and validate one set file; raises CatalogError listing every problem.

    The formats are described in `yaml_format` and `csv_format`; local media may live under the
    roots `media.allowed_roots_for` lists, plus `allowed_roots`. `prices` defaults to the project's
    price table (`PriceTable.load()`), `limits` to the constants of `limits`.
    """
    prompt_set, problems = load_with_problems(path, allowed_roots, prices or PriceTable.load(), limits)
    if problems:
        raise CatalogError(problems)
    return prompt_set
