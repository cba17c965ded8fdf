"""How the client talks to the API: where, with which key, how long it waits and how much it reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from wan_pipeline.api.pacing import PacingPolicy
from wan_pipeline.api.retry import PollSchedule, RetryPolicy
from wan_pipeline.models import DEFAULT_MODEL, VideoRequest, get_model
from wan_pipeline.settings import DEFAULT_BASE_URL, Secret, Settings

# What a generated video may weigh, per second, at most: H.264 at 30 fps runs a few Mbit/s
# (the service's 5 s 720p video is a few MB); these ceilings are several times that.
CEILING_BITS_PER_S = {"720p": 10_000_000, "1080p": 20_000_000}
VIDEO_SIZE_MARGIN = 2.0
# Container overhead and very short clips: no video cap is ever below this.
VIDEO_SIZE_FLOOR_BYTES = 8 * 1024**2


def max_video_bytes(
    resolution: str,
    duration_s: float,
    *,
    margin: float = VIDEO_SIZE_MARGIN,
    floor_bytes: int = VIDEO_SIZE_FLOOR_BYTES,
) -> int:
    """The download cap for a video of this resolution and duration:
    ceiling bitrate x duration x margin + floor (5 s at 720p: 20.9 MB; 15 s at 1080p: 83.4 MB).

    A resolution this table does not know gets the highest ceiling: a cap too generous is a
    nuisance, one too small throws away a paid video.
    """
    if duration_s <= 0 or margin <= 0:
        raise ValueError("duration_s and margin must be positive")
    bits_per_s = CEILING_BITS_PER_S.get(resolution, max(CEILING_BITS_PER_S.values()))
    return int(bits_per_s / 8 * duration_s * margin) + floor_bytes


@dataclass(frozen=True)
class ClientConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: Secret | None = None
    # httpx timeouts: each bounds one connect, one read or one write, not a whole call.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    write_timeout: float = 60.0
    # Whole-operation limits, retries and waits included, and enforced between the chunks of a
    # body (a server trickling a byte a second never trips a per-read timeout).
    create_deadline_s: float = 120.0
    get_deadline_s: float = 60.0
    download_deadline_s: float = 600.0
    max_attempts: int = 5
    max_retry_seconds: float = 120.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_concurrency: int = 8  # async client: semaphore on in-flight API calls
    # API answers are small JSON objects; anything bigger is a broken or hostile server.
    max_answer_bytes: int = 1024**2
    # Ceiling for any download; a download for a known request is capped by `max_video_bytes`.
    max_download_bytes: int = 4 * 1024**3
    video_size_margin: float = VIDEO_SIZE_MARGIN
    poll_max_interval_s: float = 60.0
    poll_min_interval_s: float = 1.0
    expected_seconds: float | None = None  # overrides ModelSpec's expected processing time
    # Local media must resolve under one of these (or the submit's base_dir); none = nothing local.
    allowed_roots: tuple[Path, ...] = ()
    # Async creates ride the provider's rate limit (api.pacing): AIMD on 429s, Retry-After as a pause
    # shared by the client's creates; a Retry-After longer than this stops creating (a quota).
    pace_creates: bool = True
    rate_limit_max_wait_s: float = 60.0

    def __post_init__(self) -> None:
        # A plain string key would show in repr(): hold it as a Secret whatever the caller passed.
        if self.api_key is not None and not isinstance(self.api_key, Secret):
            object.__setattr__(self, "api_key", Secret(self.api_key))
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.max_attempts < 1 or self.max_concurrency < 1:
            raise ValueError("max_attempts and max_concurrency must be at least 1")
        deadlines = (self.create_deadline_s, self.get_deadline_s, self.download_deadline_s)
        if min(deadlines) <= 0 or self.max_answer_bytes < 1 or self.max_download_bytes < 1:
            raise ValueError("deadlines and byte limits must be positive")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ClientConfig:
        values: dict[str, Any] = {
            "base_url": settings.base_url,
            "api_key": settings.api_key,
            "allowed_roots": tuple(settings.allowed_roots),
        }
        return cls(**{**values, **overrides})

    @property
    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.write_timeout,
            pool=self.connect_timeout,
        )

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.max_retry_seconds, self.backoff_base_s, self.backoff_max_s)

    @property
    def pacing_policy(self) -> PacingPolicy:
        return PacingPolicy(max_concurrency=self.max_concurrency, max_wait_s=self.rate_limit_max_wait_s)

    @property
    def poll_schedule(self) -> PollSchedule:
        return PollSchedule(min_interval_s=self.poll_min_interval_s, max_interval_s=self.poll_max_interval_s)

    def max_video_bytes_for(self, request: VideoRequest) -> int:
        """The download cap for the video this request buys (never above `max_download_bytes`)."""
        cap = max_video_bytes(request.resolution, request.duration, margin=self.video_size_margin)
        return min(cap, self.max_download_bytes)

    def expected_seconds_for(self, request: VideoRequest | None = None) -> float:
        """Expected processing time: the override, else the model's estimate for this request."""
        if self.expected_seconds is not None:
            return self.expected_seconds
        if request is None:
            spec = get_model(DEFAULT_MODEL)
            return spec.expected_processing_seconds(spec.default_resolution, spec.default_duration)
        return request.spec.expected_processing_seconds(request.resolution, request.duration)
