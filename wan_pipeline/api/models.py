"""What the API answers: generation objects, read as tolerantly as the provider's own SDK reads them.

The contract fixes `id` and `video.url`; sibling models on the same endpoint have answered with
`generation_id` and other video shapes. A paid id must never be lost to a stricter parser than the
provider's, so each value is looked for in the documented place first, then in the known others;
unknown fields are ignored and kept in `Generation.raw`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from wan_pipeline.models import usd_from_credits

PENDING, COMPLETED, FAILED = "pending", "completed", "failed"
# The contract's table, plus upstream's (DashScope) CANCELED: a cancelled task never completes, and
# reading it as pending would wait on it until the provider forgets it.
_STATUS_MAP = {
    "completed": COMPLETED,
    "succeeded": COMPLETED,
    "error": FAILED,
    "failed": FAILED,
    "canceled": FAILED,
    "cancelled": FAILED,
}


def normalize_status(raw_status: str | None) -> str:
    """completed/succeeded -> completed; error/failed -> failed; anything else (queued...) -> pending."""
    return _STATUS_MAP.get((raw_status or "").strip().lower(), PENDING)


@dataclass(frozen=True)
class Generation:
    id: str
    raw_status: str
    status: str  # "pending" | "completed" | "failed"
    video_url: str | None = None
    video_expires_at: datetime | None = None
    error: str | None = None
    credits_used: float | None = None
    usd_spent: float | None = None
    client_request_id: str | None = None
    inference_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.status in (COMPLETED, FAILED)


def url_expires_at(url: str | None) -> datetime | None:
    """The signed URL's `Expires` query parameter (unix seconds) as a UTC datetime."""
    if not url:
        return None
    values = parse_qs(urlsplit(url).query).get("Expires")
    try:
        return datetime.fromtimestamp(int(values[0]), UTC) if values else None
    except (ValueError, OverflowError, OSError):
        return None


def _number(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _first_item(value: Any) -> Any:
    return value[0] if isinstance(value, Sequence) and not isinstance(value, str) and value else None


# Where a generation id may be, in order: the documented `id`, then what sibling models send.
ID_FIELDS = ("id", "generation_id")
# Where a video URL may be, in order: the documented `video.url` first.
VIDEO_URL_PATHS: tuple[tuple[str | int, ...], ...] = (
    ("video", "url"),
    ("video",),
    ("video_url",),
    ("url",),
    ("output", "video_url"),
    ("output", "url"),
    ("videos", 0, "url"),
    ("result", "video", "url"),
)


def _at(payload: Mapping[str, Any], path: tuple[str | int, ...]) -> Any:
    value: Any = payload
    for step in path:
        value = _first_item(value) if isinstance(step, int) else _mapping(value).get(step)
    return value


def generation_id_of(payload: Mapping[str, Any]) -> str | None:
    """The generation id of an answer: `id`, else `generation_id`; None when neither is a string."""
    return next((found for name in ID_FIELDS if (found := _text(payload.get(name)))), None)


def video_url_of(payload: Mapping[str, Any]) -> str | None:
    return next((found for path in VIDEO_URL_PATHS if (found := _text(_at(payload, path)))), None)


def describe_details(details: Any) -> str:
    """A readable join of validation details, e.g. `[{loc, msg}]` -> "body.duration: not allowed"."""
    if isinstance(details, str):
        return details
    if not isinstance(details, Sequence):
        return ""
    parts = []
    for item in details:
        if isinstance(item, Mapping):
            location = item.get("loc", item.get("path"))
            if isinstance(location, Sequence) and not isinstance(location, str):
                location = ".".join(str(part) for part in location)
            message = item.get("msg", item.get("message", ""))
            parts.append(f"{location}: {message}" if location else str(message))
        else:
            parts.append(str(item))
    return "; ".join(part for part in parts if part)


def generation_error(payload: Mapping[str, Any]) -> str | None:
    """`error.message`, falling back to the `error.detail[]` messages."""
    error = payload.get("error")
    if error is None:
        return None
    if isinstance(error, str):
        return error
    error = _mapping(error)
    return error.get("message") or describe_details(error.get("detail")) or error.get("name") or None


def parse_generation(
    payload: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    *,
    client_request_id: str | None = None,
) -> Generation:
    """A generation object (POST and GET answers share it) plus the tracing and cost headers."""
    heads = {key.lower(): value for key, value in (headers or {}).items()}
    generation_id = generation_id_of(payload)
    if generation_id is None:
        raise ValueError("the answer holds no generation id")
    raw_status = str(payload.get("status") or "")
    video_url = video_url_of(payload)
    usage = _mapping(_mapping(payload.get("meta")).get("usage"))
    credits = _number(usage.get("credits_used"))
    if credits is None:
        credits = _number(heads.get("x-aimlapi-credits-used"))
    usd = _number(usage.get("usd_spent"))
    if usd is None:
        usd = _number(heads.get("x-aimlapi-usd-spent"))
    if usd is None:
        usd = usd_from_credits(credits)
    return Generation(
        id=generation_id,
        raw_status=raw_status,
        status=normalize_status(raw_status),
        video_url=video_url,
        video_expires_at=url_expires_at(video_url),
        error=generation_error(payload),
        credits_used=credits,
        usd_spent=usd,
        client_request_id=heads.get("x-client-request-id") or client_request_id,
        inference_id=heads.get("x-inference-id"),
        raw=dict(payload),
    )


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, read in full (and bounded); for a failed download only the status."""

    status_code: int
    headers: httpx.Headers
    content: bytes = b""

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json_object(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.content)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
