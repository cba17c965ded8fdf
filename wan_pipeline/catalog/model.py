"""What a catalog load produces: problems, generations (`CatalogRequest`) and their DataFrame view,
sets and their validation reports."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from wan_pipeline.catalog.limits import MESSAGE_LIMIT, PATH_LIMIT
from wan_pipeline.models import REQUEST_FIELDS, VideoRequest
from wan_pipeline.safe_text import printable


@dataclass(frozen=True)
class CatalogProblem:
    """One thing wrong with a catalog, located precisely enough to fix it without searching."""

    file: str
    location: str | None  # "line 12" (YAML), "row 7" (CSV), None for the whole file
    field: str | None
    value: object  # as written (raw: print it only through `printable`)
    allowed: str | None
    message: str  # the full sentence, starting with the field when there is one

    def __str__(self) -> str:
        # Both parts go through `printable`: a newline in a file name or an ESC in a quoted value
        # must neither reach a terminal raw nor split one problem over two lines.
        file, message = printable(self.file, PATH_LIMIT), printable(self.message, MESSAGE_LIMIT)
        if self.location is None:
            return f"{file}: {message}"
        # `file:12:` for YAML lines (as compilers print them); `file:row 7:` for CSV rows.
        return f"{file}:{self.location.removeprefix('line ')}: {message}"


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
    # What was loaded, so a caller that validates and then plans does not load the file twice.
    prompt_set: PromptSet | None = field(default=None, repr=False, compare=False)

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
