"""Experiments over a prompt set: the experiment table, side-by-side comparison sheets, reproductions.

- `experiment_table`: one row per generation with every request field, the outcome, cost, timings
  and the quality metrics of its video (from its sidecar), written per set as
  `<output>/<set>/experiment.parquet` and `experiment.csv` (`pd.read_parquet(path)` reads it back).
- `comparison_layout` / `write_comparison_sheets`: per source image, a grid whose rows and columns
  are the two request fields that vary most (prompts by seeds, say), each cell a labelled middle
  frame (the video's preview, `wan_pipeline.previews`), failing cells outlined in red. Further
  varying fields, and grids larger than a page, make more pages; pages are drawn one at a time
  (memory is bounded by one page of small previews).
- `plan_reproductions` / `reproduce`: the exact request rebuilt from a video's sidecar (its image
  checked against the recorded sha256), bought again as a new attempt of the same key (reason
  `reproduction`; the original row, video and sidecar are left as they are), stored under
  `<output>/<set>/reproductions/`, and compared frame by frame with the original.

Nothing here calls the API except `reproduce`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps
from upath import UPath

from wan_pipeline.catalog import CatalogRequest, allowed_roots_for
from wan_pipeline.ledger import (
    AttemptClaim,
    AttemptOutcome,
    AttemptReason,
    AttemptRow,
    ClaimLost,
    Ledger,
    LedgerRow,
    State,
    TryAnswer,
)
from wan_pipeline.media import SHEET_RESAMPLE, png_bytes, probe_video
from wan_pipeline.models import VideoRequest, request_key
from wan_pipeline.previews import preview_images
from wan_pipeline.quality import Closeness, QualityThresholds, closeness
from wan_pipeline.safe_text import printable
from wan_pipeline.sources import MediaError, resolve_local_path
from wan_pipeline.storage import KEY, VideoStore, atomic_writer, file_sha256, staged_file, write_atomically
from wan_pipeline.submission import try_recorder

TABLE_NAME = "experiment"
QUALITY_COLUMNS = (
    "first_frame_ssim", "first_frame_psnr_db", "motion", "longest_frozen_s", "longest_blank_s", "blank_fraction", "audio_rms_dbfs",
)
# Every column of the experiment table, in order.
EXPERIMENT_COLUMNS = (
    "prompt_set", "request_key", "image_ref", "image_sha256", "audio_ref", "audio_sha256", "model", "prompt",
    "negative_prompt", "seed", "seed_derived", "resolution", "duration", "shot_type", "generate_audio",
    "enhance_prompt", "source_file", "source_line", "state", "generation_id", "error", "attempts",
    "reproductions", "estimated_usd", "usd_spent", "usd_all_attempts", "credits_used", "planned_at",
    "submitted_at", "completed_at", "processing_s", "video_path", "video_sha256", "width", "height",
    "duration_s", "has_audio", "quality_passed", "quality_failures", *QUALITY_COLUMNS,
)
# Request fields a grid may vary, in the order they are preferred as rows (then as columns).
GRID_FIELDS = (
    "prompt", "negative_prompt", "audio_ref", "shot_type", "resolution", "duration", "generate_audio",
    "enhance_prompt", "seed",
)
MAX_ROWS, MAX_COLUMNS = 8, 8  # cells per page
# Pages drawn at once: Pillow releases the GIL while it decodes previews, shrinks them and encodes
# the PNG, most of a page's time (5,000 cells on 2 cores: 16.4 s one at a time, 11.1 s two, 13.2 s three).
SHEET_WORKERS = 2
CELL_WIDTH, ROW_LABEL_WIDTH, HEADER_HEIGHT, LABEL_HEIGHT, MARGIN = 240, 200, 36, 18, 4
BACKGROUND, TEXT, FAIL, MISSING = (24, 24, 24), (235, 235, 235), (220, 40, 40), (90, 90, 90)


# ---------------------------------------------------------------------------------------------------
# The experiment table


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def experiment_frame(
    requests: Sequence[CatalogRequest],
    rows: Iterable[LedgerRow],
    attempt_rows: Iterable[AttemptRow],
    sidecars: dict[str, dict[str, Any] | None],
) -> pd.DataFrame:
    """One row per generation of `requests` (in their order). Pure: everything read is passed in."""
    by_key = {row.request_key: row for row in rows}
    spent: dict[str, float] = {}
    reproductions: dict[str, int] = {}
    for attempt in attempt_rows:
        spent[attempt.request_key] = spent.get(attempt.request_key, 0.0) + (attempt.usd_spent or 0.0)
        if attempt.reason == AttemptReason.REPRODUCTION and attempt.outcome == AttemptOutcome.CREATED:
            reproductions[attempt.request_key] = reproductions.get(attempt.request_key, 0) + 1
    records = []
    for request in requests:
        key, video = request.request_key, request.request
        row = by_key.get(key)
        sidecar = sidecars.get(key) or {}
        probe = sidecar.get("video") or {}
        quality = sidecar.get("quality") or {}
        processing = (
            (row.completed_at - row.submitted_at).total_seconds()
            if row and row.completed_at and row.submitted_at and row.state is State.COMPLETED
            else None
        )
        records.append({
            "prompt_set": request.prompt_set, "request_key": key, "image_ref": request.image_ref,
            "image_sha256": request.image_sha256, "audio_ref": request.audio_ref, "audio_sha256": request.audio_sha256,
            "model": video.model, "prompt": video.prompt, "negative_prompt": video.negative_prompt, "seed": video.seed,
            "seed_derived": request.seed_derived, "resolution": video.resolution, "duration": video.duration,
            "shot_type": video.shot_type, "generate_audio": video.generate_audio, "enhance_prompt": video.enhance_prompt,
            "source_file": request.source_file, "source_line": request.source_line,
            "state": str(row.state) if row else "not_planned", "generation_id": row.generation_id if row else None,
            "error": row.error if row else None, "attempts": row.attempts if row else 0,
            "reproductions": reproductions.get(key, 0), "estimated_usd": request.estimated_usd,
            "usd_spent": row.usd_spent if row else None, "usd_all_attempts": spent.get(key, 0.0),
            "credits_used": row.credits_used if row else None, "planned_at": _iso(row.planned_at) if row else None,
            "submitted_at": _iso(row.submitted_at) if row else None,
            "completed_at": _iso(row.completed_at) if row else None, "processing_s": processing,
            "video_path": sidecar.get("_path"), "video_sha256": probe.get("sha256"), "width": probe.get("width"),
            "height": probe.get("height"), "duration_s": probe.get("duration_s"), "has_audio": probe.get("has_audio"),
            "quality_passed": quality.get("passed") if quality else None,
            "quality_failures": "; ".join(quality.get("failures") or []) if quality else None,
            **{name: quality.get(name) for name in QUALITY_COLUMNS},
        })
    frame = pd.DataFrame.from_records(records, columns=list(EXPERIMENT_COLUMNS))
    for name in ("seed", "duration", "source_line", "attempts", "reproductions"):
        frame[name] = frame[name].astype("int64")
    for name in ("width", "height"):
        frame[name] = frame[name].astype("Int64")
    for name in ("seed_derived", "generate_audio", "enhance_prompt"):
        frame[name] = frame[name].astype(bool)
    for name in ("has_audio", "quality_passed"):
        frame[name] = frame[name].astype("boolean")
    for name in ("estimated_usd", "usd_spent", "usd_all_attempts", "credits_used", "processing_s", "duration_s",
                 *QUALITY_COLUMNS):
        frame[name] = frame[name].astype("float64")
    return frame


def read_sidecars(store: VideoStore, requests: Sequence[CatalogRequest]) -> dict[str, dict[str, Any] | None]:
    """Each request's sidecar in its set's folder (with `_path`: its video), or None."""
    found: dict[str, dict[str, Any] | None] = {}
    for request in requests:
        sidecar = store.read_sidecar(request.prompt_set, request.request_key)
        if sidecar is not None:
            sidecar = {**sidecar, "_path": str(store.video_path(request.prompt_set, request.request_key))}
        found[request.request_key] = sidecar
    return found


def experiment_table(ledger: Ledger, store: VideoStore, requests: Sequence[CatalogRequest]) -> pd.DataFrame:
    """The experiment table of these requests, from the ledger (this API's) and the sidecars."""
    keys = [r.request_key for r in requests]
    return experiment_frame(
        requests, ledger.rows_for_keys(keys), ledger.attempts(request_keys=keys), read_sidecars(store, requests)
    )


def write_experiment_table(store: VideoStore, prompt_set: str, frame: pd.DataFrame) -> tuple[str, str]:
    """`<output>/<set>/experiment.parquet` and `.csv`, each written atomically. Returns both paths."""
    folder = store.set_dir(prompt_set)
    parquet, csv = folder / f"{TABLE_NAME}.parquet", folder / f"{TABLE_NAME}.csv"
    with atomic_writer(parquet) as handle:
        frame.to_parquet(handle, index=False)
    write_atomically(csv, frame.to_csv(index=False).encode())
    return str(parquet), str(csv)


# ---------------------------------------------------------------------------------------------------
# Comparison sheets


@dataclass(frozen=True)
class SheetCell:
    row: int
    column: int
    request_key: str
    label: str
    video_path: str | None  # None: no stored video (failed, pending)
    video_sha256: str | None  # the stored video's, which names its preview
    state: str
    failures: tuple[str, ...] = ()

    @property
    def failing(self) -> bool:
        return bool(self.failures) or self.state != str(State.COMPLETED)


@dataclass(frozen=True)
class SheetPage:
    image_ref: str
    row_field: str | None
    column_field: str | None
    row_values: tuple[Any, ...]
    column_values: tuple[Any, ...]
    fixed: tuple[tuple[str, Any], ...]  # the other varying fields' values on this page
    cells: tuple[SheetCell, ...]
    number: int = 1  # of this image's pages
    of: int = 1

    @property
    def title(self) -> str:
        parts = [f"image {self.image_ref}"] + [f"{name} {_shown(value)}" for name, value in self.fixed]
        if self.of > 1:
            parts.append(f"page {self.number}/{self.of}")
        return " | ".join(parts)


def _shown(value: Any) -> str:
    return printable("-" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value), 120)


def _preview_name(sha256: Any) -> str | None:
    """The table's video hash if it can name a preview: not NaN (no hash), nor what a hand-edited
    sidecar may hold (a sheet draws that cell's placeholder instead of failing)."""
    return sha256 if isinstance(sha256, str) and KEY.fullmatch(sha256) else None


def _distinct(values: Iterable[Any]) -> list[Any]:
    seen: dict[str, Any] = {}
    for value in values:
        seen.setdefault(repr(value), value)
    return list(seen.values())


def _chunks(values: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [values[i : i + size] for i in range(0, len(values), size)] or [values]


def comparison_layout(
    frame: pd.DataFrame, *, max_rows: int = MAX_ROWS, max_columns: int = MAX_COLUMNS
) -> list[SheetPage]:
    """Pages of comparison sheets for an experiment table: per image, rows and columns are the two
    grid fields with the most distinct values (ties: `GRID_FIELDS` order; the earlier is the row).

    Linear in the rows: each row is placed by looking its values up (values compare by `repr`, so
    NaN, None and 1 vs 1.0 stay distinct and equal to themselves), never by scanning every page."""
    pages: list[SheetPage] = []
    records = frame.to_dict("records")
    by_image: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_image.setdefault(repr(record["image_ref"]), []).append(record)
    for group in by_image.values():
        image_ref = group[0]["image_ref"]
        values = {name: _distinct(r.get(name) for r in group) for name in GRID_FIELDS}
        varying = sorted((n for n in GRID_FIELDS if len(values[n]) > 1), key=lambda n: (-len(values[n]), GRID_FIELDS.index(n)))
        axes = sorted(varying[:2], key=GRID_FIELDS.index)
        row_field = axes[0] if len(axes) == 2 else None
        column_field = axes[-1] if axes else None
        others = [n for n in varying if n not in axes]
        rows = values[row_field] if row_field else [None]
        columns = values[column_field] if column_field else [None]
        row_at = {repr(v): i for i, v in enumerate(rows)}
        column_at = {repr(v): i for i, v in enumerate(columns)}
        # {the other fields' values: {(row chunk, column chunk): cells}}, members in table order
        placed: dict[tuple[str, ...], dict[tuple[int, int], list[SheetCell]]] = {}
        for r in group:
            row_index = row_at[repr(r.get(row_field))] if row_field else 0
            column_index = column_at[repr(r.get(column_field))] if column_field else 0
            failures = tuple(f for f in str(r.get("quality_failures") or "").split("; ") if f)
            column_value = r.get(column_field) if column_field else None
            label = f"{r['request_key'][:8]} " + (f"{column_field} {_shown(column_value)}" if column_field else "")
            path = r.get("video_path") if r.get("state") == str(State.COMPLETED) else None
            cell = SheetCell(row_index % max_rows, column_index % max_columns, r["request_key"], label.strip(), path,
                             _preview_name(r.get("video_sha256")), str(r.get("state")), failures)
            chunk = (row_index // max_rows, column_index // max_columns)
            placed.setdefault(tuple(repr(r.get(n)) for n in others), {}).setdefault(chunk, []).append(cell)
        row_chunks, column_chunks = _chunks(rows, max_rows), _chunks(columns, max_columns)
        image_pages: list[SheetPage] = []
        for combination in itertools.product(*(values[n] for n in others)):
            chunks = placed.get(tuple(repr(v) for v in combination))
            if chunks is None:
                continue  # no row has these values
            for i, row_chunk in enumerate(row_chunks):
                for j, column_chunk in enumerate(column_chunks):
                    image_pages.append(SheetPage(
                        image_ref=str(image_ref), row_field=row_field, column_field=column_field,
                        row_values=tuple(row_chunk) if row_field else (),
                        column_values=tuple(column_chunk) if column_field else (),
                        fixed=tuple(zip(others, combination, strict=True)), cells=tuple(chunks.get((i, j), ())),
                    ))
        count = len(image_pages)
        pages += [replace(p, number=i + 1, of=count) for i, p in enumerate(image_pages)]
    return pages


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _cell_video(cell: SheetCell) -> tuple[str, str] | None:
    """(sha256, path) of the cell's stored video; None without one (or without its recorded hash)."""
    if cell.video_path is None or cell.video_sha256 is None:
        return None
    return cell.video_sha256, cell.video_path


def render_comparison_page(page: SheetPage, store: VideoStore, *, cell_width: int = CELL_WIDTH) -> bytes:
    """PNG of one page: column headers on top, row labels on the left, a middle frame per cell
    (the video's preview in `store`, made there if it is missing)."""
    inner = cell_width - 2 * MARGIN
    frame_height = round(inner * 9 / 16)
    cell_height = MARGIN + frame_height + LABEL_HEIGHT
    columns = max(1, len(page.column_values))
    rows = max(1, len(page.row_values))
    left = ROW_LABEL_WIDTH if page.row_field else 0
    sheet = Image.new("RGB", (left + columns * cell_width, HEADER_HEIGHT + rows * cell_height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((MARGIN, 2), _fit(draw, page.title, font, sheet.width - 2 * MARGIN), fill=TEXT, font=font)
    for index, value in enumerate(page.column_values):
        text = _fit(draw, f"{page.column_field} {_shown(value)}", font, inner)
        draw.text((left + index * cell_width + MARGIN, HEADER_HEIGHT - 16), text, fill=TEXT, font=font)
    for index, value in enumerate(page.row_values):
        top = HEADER_HEIGHT + index * cell_height
        words, lines = f"{page.row_field}: {_shown(value)}".split(), [""]
        for word in words:  # wrap the label (prompts are long) in the label column
            candidate = f"{lines[-1]} {word}".strip()
            if draw.textlength(candidate, font=font) <= ROW_LABEL_WIDTH - 2 * MARGIN or not lines[-1]:
                lines[-1] = candidate
            elif len(lines) < frame_height // 14:
                lines.append(word)
            else:
                lines[-1] = _fit(draw, lines[-1] + " " + word, font, ROW_LABEL_WIDTH - 2 * MARGIN)
                break
        for number, line in enumerate(lines):
            draw.text((MARGIN, top + MARGIN + number * 14), line, fill=TEXT, font=font)
    previews = preview_images(store, [_cell_video(cell) for cell in page.cells])
    for cell, preview in zip(page.cells, previews, strict=True):
        x = left + cell.column * cell_width + MARGIN
        y = HEADER_HEIGHT + cell.row * cell_height + MARGIN
        if preview is None:
            draw.rectangle((x, y, x + inner - 1, y + frame_height - 1), fill=MISSING)
            draw.text((x + inner / 2, y + frame_height / 2), cell.state if cell.state != "completed" else "no video",
                      fill=TEXT, font=font, anchor="mm")
        else:
            picture = ImageOps.contain(preview, (inner, frame_height), SHEET_RESAMPLE)
            sheet.paste(picture, (x + (inner - picture.width) // 2, y + (frame_height - picture.height) // 2))
        if cell.failing:
            draw.rectangle((x - 2, y - 2, x + inner + 1, y + frame_height + 1), outline=FAIL, width=3)
            reason = ", ".join(f.split(":")[0] for f in cell.failures) or cell.state
            draw.text((x + 4, y + 4), _fit(draw, f"FAIL {reason}", font, inner - 8), fill=FAIL, font=font)
        draw.text((x, y + frame_height + LABEL_HEIGHT / 2), _fit(draw, cell.label, font, inner), fill=TEXT,
                  font=font, anchor="lm")
    return png_bytes(sheet)


def sheet_name(page: SheetPage) -> str:
    """A file name from the image's content and the page (never from free text)."""
    digest = hashlib.sha256(repr((page.image_ref, page.fixed)).encode()).hexdigest()[:10]
    return f"comparison_{digest}_p{page.number}.png"


def write_comparison_sheets(
    store: VideoStore, prompt_set: str, frame: pd.DataFrame, *, on_page: Callable[[SheetPage, bytes], None] | None = None
) -> list[str]:
    """Draw and write every page, `SHEET_WORKERS` at a time (a few in memory at once); `on_page` sees
    each PNG in page order (the UI shows the first)."""
    folder = store.set_dir(prompt_set)

    def draw(page: SheetPage) -> tuple[UPath, bytes]:
        png = render_comparison_page(page, store)
        return write_atomically(folder / sheet_name(page), png), png

    written: list[str] = []

    def finish(page: SheetPage, drawn: Future[tuple[UPath, bytes]]) -> None:
        path, png = drawn.result()
        if on_page is not None:
            on_page(page, png)
        written.append(str(path))

    with ThreadPoolExecutor(SHEET_WORKERS) as pool:
        in_flight: deque[tuple[SheetPage, Future[tuple[UPath, bytes]]]] = deque()
        for page in comparison_layout(frame):
            in_flight.append((page, pool.submit(draw, page)))
            if len(in_flight) > SHEET_WORKERS:
                finish(*in_flight.popleft())
        while in_flight:
            finish(*in_flight.popleft())
    return written


# ---------------------------------------------------------------------------------------------------
# Reproductions


class ReproductionRefused(ValueError):
    """Nothing was bought: the request cannot be rebuilt exactly (or is not a completed purchase)."""


@dataclass(frozen=True)
class ReproductionPlan:
    prompt_set: str
    request: CatalogRequest  # rebuilt from the sidecar; its key is the original's
    original_path: str
    original_sha256: str
    attempt: int  # the attempt number the reproduction will be sent as (or was bought as, when resumed)
    # A reproduction bought earlier whose video was never stored (the command died, or its wait timed
    # out): it is re-attached by its generation id, never bought again.
    resume_generation_id: str | None = None

    @property
    def estimated_usd(self) -> float:
        return 0.0 if self.resume_generation_id else self.request.estimated_usd

    def describe(self) -> str:
        video = self.request.request
        what = (
            f"attempt {self.attempt} already bought (generation {self.resume_generation_id}), its video not stored "
            "yet: resumed, $0" if self.resume_generation_id else f"attempt {self.attempt}, est. ${self.estimated_usd:.4f}"
        )
        return (
            f"{self.prompt_set}/{self.request.request_key}: seed {video.seed}, {video.resolution} {video.duration}s"
            f"{' with audio' if video.generate_audio else ''}, {what}"
        )


@dataclass
class ReproductionResult:
    plan: ReproductionPlan
    generation_id: str | None = None
    usd_spent: float | None = None
    path: str | None = None
    closeness: Closeness | None = None
    quality: dict[str, Any] | None = None
    error: str | None = None


def _media(
    ref: dict[str, Any] | None, kind: str, key: str, source_file: Path, allowed_roots: Sequence[Path]
) -> tuple[str | None, str | None, str | None]:
    """(reference to send, identity for the key, sha256) of a sidecar's media, checked against its hash."""
    if ref is None:
        return None, None, None
    source, recorded = str(ref.get("source")), ref.get("sha256")
    if source.startswith(("http://", "https://")) or recorded is None:
        return source, f"url:{source}", None
    try:
        path = resolve_local_path(source, source_file.parent, allowed_roots_for(source_file, allowed_roots))
    except MediaError as exc:
        raise ReproductionRefused(f"{source}: the {kind} of {key} cannot be read: {exc}") from None
    if not path.is_file():
        raise ReproductionRefused(f"{path}: the {kind} of {key} is gone; nothing was bought")
    _, now = file_sha256(str(path))
    if now != recorded:
        raise ReproductionRefused(
            f"{path}: the {kind} changed since {key} was bought (recorded sha256 {recorded[:16]}..., now "
            f"{now[:16]}...): reproducing it would not ask for the same thing; nothing was bought"
        )
    return str(path), f"sha256:{now}", now


def rebuild_request(
    sidecar: dict[str, Any], prompt_set: str, *, allowed_roots: Sequence[Path] = (), estimated_usd: float = 0.0
) -> CatalogRequest:
    """The exact request a sidecar records, its media checked against their sha256 and its key recomputed."""
    key = str(sidecar["request_key"])
    fields = dict(sidecar["request"])
    source_file = Path(sidecar["source"]["file"])
    image, image_identity, image_sha = _media(fields.pop("image_url", None), "source image", key, source_file, allowed_roots)
    audio, audio_identity, audio_sha = _media(fields.pop("audio_url", None), "audio", key, source_file, allowed_roots)
    if image is None or image_identity is None:
        raise ReproductionRefused(f"{key}: its sidecar records no source image")
    request = VideoRequest(image_url=image, audio_url=audio, **fields)
    rebuilt = request_key(request, image_identity, audio_identity)
    if rebuilt != key:
        raise ReproductionRefused(f"{key}: the sidecar's request rebuilds as {rebuilt}, not as itself; nothing was bought")
    return CatalogRequest(
        prompt_set=prompt_set, source_file=str(source_file), source_line=int(sidecar["source"].get("line") or 0),
        request=request, image_ref=str(sidecar["request"]["image_url"]["source"]), image_sha256=image_sha,
        audio_ref=(sidecar["request"].get("audio_url") or {}).get("source"), audio_sha256=audio_sha,
        seed_derived=bool(sidecar.get("seed_derived")), request_key=key, estimated_usd=estimated_usd,
    )


def plan_reproductions(
    ledger: Ledger, store: VideoStore, target: str, *, allowed_roots: Sequence[Path] = ()
) -> list[ReproductionPlan]:
    """What `reproduce <target>` would buy: the request key's stored video, or every stored video of
    the set named. Reads only; raises `ReproductionRefused` naming what stops it."""
    sets = ledger.prompt_sets()
    if target in sets:
        keys = ledger.set_members(target)
        stored = ledger.stored_videos(keys)
        wanted = [(key, next(v for v in stored[key] if v.prompt_set == target)) for key in keys
                  if any(v.prompt_set == target for v in stored.get(key, []))]
        if not wanted:
            raise ReproductionRefused(f"{target}: the set has no stored video to reproduce (from {ledger.scope})")
    else:
        row = ledger.row(target)
        if row is None:
            raise ReproductionRefused(f"{target}: neither a prompt set nor a request key bought from {ledger.scope}")
        stored = ledger.stored_videos([target]).get(target, [])
        if not stored:
            raise ReproductionRefused(f"{target}: no stored video to compare a reproduction with (state {row.state})")
        wanted = [(target, stored[0])]
    rows = {row.request_key: row for row in ledger.rows_for_keys(k for k, _ in wanted)}
    plans = []
    for key, video in wanted:
        row = rows[key]
        if row.state is not State.COMPLETED:
            raise ReproductionRefused(f"{key}: only a completed generation is reproduced (it is {row.state})")
        sidecar = store.read_sidecar(video.prompt_set, key)
        if sidecar is None:
            raise ReproductionRefused(f"{key}: no provenance sidecar beside {video.path}; nothing was bought")
        request = rebuild_request(
            sidecar, video.prompt_set, allowed_roots=allowed_roots, estimated_usd=row.estimated_usd or 0.0
        )
        if row.request_json and row.request_json != sidecar["request"]:
            raise ReproductionRefused(f"{key}: the ledger and the sidecar disagree on the request; nothing was bought")
        plan = ReproductionPlan(video.prompt_set, request, video.path, video.sha256, row.attempts + 1)
        latest = max(ledger.attempts(request_keys=[key]), key=lambda a: a.attempt)
        if latest.reason == AttemptReason.REPRODUCTION and latest.attempt == row.attempts:
            plan = _after_earlier_reproduction(store, plan, latest)
        plans.append(plan)
    return plans


PROVIDER_FAILED = "failed at the provider"


def _after_earlier_reproduction(store: VideoStore, plan: ReproductionPlan, latest: AttemptRow) -> ReproductionPlan:
    """The plan given the key's latest attempt, an earlier reproduction: resume one that was bought and
    not stored; refuse while one is open or in doubt (it may be paid for); else buy the next."""
    key = plan.request.request_key
    if latest.outcome is None:
        raise ReproductionRefused(
            f"{key}: reproduction attempt {latest.attempt} is still being created (claimed "
            f"{latest.claimed_at.isoformat(timespec='seconds')}); nothing was bought"
        )
    if latest.outcome == AttemptOutcome.IN_DOUBT:
        raise ReproductionRefused(
            f"{key}: reproduction attempt {latest.attempt} is in doubt (sent, answer lost; client request id "
            f"{latest.client_request_id}): it may be bought already; ask the provider before buying it again"
        )
    resumable = latest.outcome == AttemptOutcome.CREATED and latest.generation_id and not (
        latest.error or ""
    ).startswith(PROVIDER_FAILED)
    earlier = replace(plan, attempt=latest.attempt)
    if resumable and not reproduction_path(store, earlier).exists():
        return replace(earlier, resume_generation_id=latest.generation_id)
    return plan


def reproduction_path(store: VideoStore, plan: ReproductionPlan) -> Any:
    return store.set_dir(plan.prompt_set) / "reproductions" / f"{plan.request.request_key}.attempt{plan.attempt}.mp4"


def reproduce(
    ledger: Ledger,
    client: Any,  # wan_pipeline.api.AimlApiClient
    store: VideoStore,
    plan: ReproductionPlan,
    *,
    deadline_s: float,
    run_id: str | None = None,
    thresholds: QualityThresholds | None = None,
) -> ReproductionResult:
    """Buy `plan` again (write-ahead per try, as a new attempt with reason `reproduction`), wait for it,
    store it under `reproductions/` with a sidecar, and measure how close it is to the original."""
    from wan_pipeline.api import RequestRejected

    request, key, attempt = plan.request, plan.request.request_key, plan.attempt
    claim = AttemptClaim(plan.prompt_set, AttemptReason.REPRODUCTION, run_id)
    sent: list[int] = []
    result = ReproductionResult(plan)

    on_try = try_recorder(
        lambda number, request_id: ledger.reproduction_try_sending(key, attempt, number, request_id, claim),
        lambda number, answer: ledger.reproduction_try_answered(key, attempt, number, answer),
        sent,
    )

    if plan.resume_generation_id is not None:
        result.generation_id = plan.resume_generation_id
        return _finish_reproduction(ledger, client, store, plan, result, plan.resume_generation_id, None,
                                    deadline_s=deadline_s, thresholds=thresholds)
    roots = allowed_roots_for(Path(request.source_file))
    try:
        generation = client.submit(
            request.request, request_key=key, attempt=attempt, allowed_roots=roots,
            media_sha256={"image": request.image_sha256, "audio": request.audio_sha256}, on_try=on_try,
        )
    except ClaimLost as exc:
        raise ReproductionRefused(f"{key}: {exc}") from None
    except BaseException as exc:
        message = printable(f"{type(exc).__name__}: {exc}", 500)
        created = getattr(exc, "created", "unexpected")
        if created is False and sent:
            outcome = AttemptOutcome.REJECTED if isinstance(exc, RequestRejected) else AttemptOutcome.NOT_ACCEPTED
            ledger.finish_attempt(key, attempt, outcome, message)
        elif sent:
            ledger.settle_abandoned_attempt(key, attempt, message)  # in doubt: a try was sent, unanswered
        if created == "unexpected":
            raise
        result.error = f"not bought: {message}" if created is False else f"in doubt: {message}"
        return result
    ledger.reproduction_try_answered(
        key, attempt, sent[-1],
        TryAnswer(True, detail="accepted", generation_id=generation.id, raw_status=generation.raw_status,
                  credits_used=generation.credits_used, usd_spent=generation.usd_spent),
    )
    result.generation_id, result.usd_spent = generation.id, generation.usd_spent
    cost = {"credits_used": generation.credits_used, "usd_spent": generation.usd_spent}
    return _finish_reproduction(ledger, client, store, plan, result, generation.id, cost,
                                deadline_s=deadline_s, thresholds=thresholds)


def _finish_reproduction(
    ledger: Ledger,
    client: Any,
    store: VideoStore,
    plan: ReproductionPlan,
    result: ReproductionResult,
    generation_id: str,
    cost: dict[str, Any] | None,
    *,
    deadline_s: float,
    thresholds: QualityThresholds | None,
) -> ReproductionResult:
    """Wait for a bought reproduction, store it beside the set's videos, measure it against the original."""
    from wan_pipeline.api import max_video_bytes
    from wan_pipeline.collection import expects_audio, measure_quality

    request, key, attempt = plan.request, plan.request.request_key, plan.attempt
    try:
        final = client.wait(generation_id, deadline_s=deadline_s)
    except Exception as exc:
        result.error = printable(f"bought, not stored yet (rerun to resume): {type(exc).__name__}: {exc}", 500)
        ledger.note_attempt_error(key, attempt, result.error)
        return result
    if final.status != "completed" or not final.video_url:
        result.error = printable(f"{PROVIDER_FAILED}: generation {generation_id} ended {final.raw_status}: "
                                 f"{final.error or ''}", 500)
        ledger.note_attempt_error(key, attempt, result.error)
        return result
    destination = reproduction_path(store, plan)
    try:
        with staged_file(destination) as staged:
            size, sha = client.download(
                final.video_url, staged.path,
                max_bytes=max_video_bytes(request.request.resolution, request.request.duration),
            )
            probe = probe_video(staged.path).to_dict()
            staged.publish()
    except Exception as exc:
        result.error = printable(f"bought, not stored yet (rerun to resume): {type(exc).__name__}: {exc}", 500)
        ledger.note_attempt_error(key, attempt, result.error)
        return result
    result.path = str(destination)
    result.quality = measure_quality(request, destination, thresholds or QualityThresholds.from_env())
    result.closeness = closeness(plan.original_path, destination, same_sha256=sha == plan.original_sha256)
    sidecar = {
        "reproduction_of": {"request_key": key, "prompt_set": plan.prompt_set, "video": plan.original_path,
                            "sha256": plan.original_sha256},
        "attempt": attempt, "reason": str(AttemptReason.REPRODUCTION), "generation_id": generation_id,
        "api": {"scope": ledger.scope}, "request": request.provenance_request(), "seed": request.request.seed,
        "cost": {**(cost or {"resumed": True}), "estimated_usd": request.estimated_usd},
        "stored_at": datetime.now(UTC).isoformat(),
        "video": {"sha256": sha, "bytes": size, **{k: probe[k] for k in ("width", "height", "duration_s", "fps", "codec",
                                                                           "has_audio", "audio_codec")}},
        "quality": result.quality, "closeness": result.closeness.to_dict(),
        "expects_audio": expects_audio(request),
    }
    write_atomically(destination.with_suffix(".json"), json.dumps(sidecar, indent=2, sort_keys=True, default=str).encode())
    return result


__all__ = [
    "EXPERIMENT_COLUMNS", "GRID_FIELDS", "ReproductionPlan", "ReproductionRefused", "ReproductionResult",
    "SheetCell", "SheetPage", "comparison_layout", "experiment_frame", "experiment_table", "plan_reproductions",
    "rebuild_request", "render_comparison_page", "reproduce", "write_comparison_sheets", "write_experiment_table",
]
