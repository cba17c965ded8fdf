"""What the emulator is told to do: timing, auth, URL lifetime, frame size and injected faults.

Both configs are frozen and validated on construction, so a bad rate fails at startup (or at
`update_faults`) instead of producing a silently skewed fault mix.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

CREATE_FAULTS = ("429", "500", "502", "503", "504", "drop", "500_after_create", "504_after_create")
GET_FAULTS = ("429", "500", "502", "503", "504")


# FaultConfig fields that are not rates, by kind (everything else is a probability in [0, 1]).
_POSITIVE_OR_NONE = frozenset({"download_bytes_per_s", "credit_limit", "create_rate_limit_per_s"})
_COUNTS = frozenset({"oversize_video_bytes", "auth_fail_after_creates", "create_burst", "create_quota"})
_POSITIVE = frozenset({"trickle_bytes_per_s", "create_quota_window_s"})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class FaultConfig:
    """Fault rates are probabilities per request; one seeded draw per request picks at most one fault."""

    create_429_rate: float = 0.0
    create_429_retry_after_rate: float = 0.0  # fraction of create 429s that carry Retry-After
    retry_after_s: float = 1.0
    create_500_rate: float = 0.0
    create_502_rate: float = 0.0
    create_503_rate: float = 0.0
    create_504_rate: float = 0.0
    # The create is accepted (generation exists, credits charged) but the connection is closed unanswered.
    create_drop_rate: float = 0.0
    # The ambiguous creates of the contract: accepted and charged, then answered 500 or 504.
    create_500_after_create_rate: float = 0.0
    create_504_after_create_rate: float = 0.0
    get_429_rate: float = 0.0
    get_500_rate: float = 0.0
    get_502_rate: float = 0.0
    get_503_rate: float = 0.0
    get_504_rate: float = 0.0
    error_rate: float = 0.0  # accepted generations that end in status `error`
    download_bytes_per_s: float | None = None  # throttle for video and blob downloads; None = full speed
    # The account's credits: a create that would spend past them answers 403 (out of credits).
    credit_limit: float | None = None
    # Hostile servers. A trickled answer (drawn per request, independently of the faults above)
    # sends its body a few bytes at a time at `trickle_bytes_per_s`: no per-read timeout fires.
    create_trickle_rate: float = 0.0
    get_trickle_rate: float = 0.0
    download_trickle_rate: float = 0.0
    trickle_bytes_per_s: float = 4.0
    # Videos padded to this many bytes (an mp4 `free` box at the end: still a valid mp4).
    oversize_video_bytes: int | None = None
    # After this many accepted creates, every create answers 401 (a key revoked mid-run).
    auth_fail_after_creates: int | None = None
    # The provider's create rate limit: a token bucket refilled at this many creates per second,
    # holding `create_burst` tokens (None: one second's worth); a create finding it empty answers
    # 429 with Retry-After = seconds until the next token (fractional, e.g. "0.037").
    create_rate_limit_per_s: float | None = None
    create_burst: int | None = None
    # The free tier's quota: this many accepted creates per fixed window of `create_quota_window_s`
    # (an hour; windows count from the emulator's start or reset); beyond it 429 with Retry-After =
    # whole seconds until the window ends.
    create_quota: int | None = None
    create_quota_window_s: float = 3600.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _POSITIVE_OR_NONE:
                if value is not None and not (_is_number(value) and value > 0):
                    raise ValueError(f"{f.name} must be a positive number or None, got {value!r}")
            elif f.name in _COUNTS:
                if value is not None and not (
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0
                ):
                    raise ValueError(f"{f.name} must be a whole number >= 0 or None, got {value!r}")
            elif f.name in _POSITIVE:
                if not (_is_number(value) and value > 0):
                    raise ValueError(f"{f.name} must be a positive number, got {value!r}")
            elif f.name == "retry_after_s":
                if not (_is_number(value) and value >= 0):
                    raise ValueError(f"retry_after_s must be a number >= 0, got {value!r}")
            elif not (_is_number(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{f.name} must be a number between 0 and 1, got {value!r}")
        for endpoint, outcomes in (("create", self.create_faults()), ("get", self.get_faults())):
            total = sum(rate for _, rate in outcomes)
            if total > 1.0 + 1e-9:
                raise ValueError(f"the {endpoint} fault rates add up to {total:g}; at most 1 is possible")
        if self.create_burst == 0:
            raise ValueError("create_burst must be at least 1 (or None: one second's worth)")

    @property
    def bucket_size(self) -> int:
        """Tokens the create bucket holds (only meaningful with a rate limit)."""
        if self.create_burst is not None:
            return self.create_burst
        return max(1, math.ceil(self.create_rate_limit_per_s or 1))

    def create_faults(self) -> tuple[tuple[str, float], ...]:
        return tuple((name, getattr(self, f"create_{name}_rate")) for name in CREATE_FAULTS)

    def get_faults(self) -> tuple[tuple[str, float], ...]:
        return tuple((name, getattr(self, f"get_{name}_rate")) for name in GET_FAULTS)

    def updated(self, **changes: Any) -> FaultConfig:
        """A copy with some fields changed; unknown names are an error, not ignored."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault fields {unknown}; known: {sorted(known)}")
        return replace(self, **changes)


@dataclass(frozen=True)
class EmulatorConfig:
    latency_s: float = 3.0  # create -> completed
    latency_jitter_s: float = 0.0  # uniform +/- jitter, seeded
    queued_fraction: float = 0.2  # share of the latency spent `queued` before `generating`
    # None accepts any Bearer key (the header is still required). Never shown in repr.
    api_key: str | None = field(default=None, repr=False)
    seed: int = 0  # seeds every random decision: faults, Retry-After, error outcomes, jitter
    url_ttl_s: float = 3600.0  # lifetime of a signed video URL
    # Benchmark mode: frames 72 px on the short side at 8 fps instead of the requested resolution at 30 fps.
    small_frames: bool = False
    # Benchmark mode: serve every video padded to this many bytes (a trailing mp4 `free` box: still a
    # valid mp4), like the real service's files (a 5 s 720p video is a few MB). None: the encode's size.
    # With `faults.download_bytes_per_s` (a per-connection cap) it gives real transfer times.
    video_bytes: int | None = None
    cache_dir: str | Path | None = None  # optional on-disk cache of encodes (an in-memory LRU is always on)
    # GET /_emulator/info names the emulator; False answers 404 there, as another server would.
    identify: bool = True
    faults: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.latency_jitter_s < 0:
            raise ValueError("latency_s and latency_jitter_s must be >= 0")
        if not 0.0 <= self.queued_fraction <= 1.0:
            raise ValueError(f"queued_fraction must be between 0 and 1, got {self.queued_fraction!r}")
        if self.url_ttl_s <= 0:
            raise ValueError(f"url_ttl_s must be > 0, got {self.url_ttl_s!r}")
        if self.video_bytes is not None and not (
            isinstance(self.video_bytes, int) and not isinstance(self.video_bytes, bool) and self.video_bytes > 0
        ):
            raise ValueError(f"video_bytes must be a whole number > 0 or None, got {self.video_bytes!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be None (accept any key) or a non-empty string")


# (flag, EmulatorConfig field, type, help) for the non-fault settings.
_CONFIG_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--latency", "latency_s", float, "seconds from create to completed"),
    ("--jitter", "latency_jitter_s", float, "uniform +/- jitter on the latency, seeded"),
    ("--queued-fraction", "queued_fraction", float, "share of the latency spent in `queued`"),
    ("--api-key", "api_key", str, "accept only this Bearer key (default: any key)"),
    ("--seed", "seed", int, "seed for every random decision (faults, jitter)"),
    ("--url-ttl", "url_ttl_s", float, "lifetime of signed video URLs in seconds"),
    ("--cache-dir", "cache_dir", str, "directory for an on-disk cache of encoded videos"),
    ("--video-bytes", "video_bytes", int, "benchmark mode: serve videos padded to this many bytes (real-size files)"),
)


_FAULT_HELP = {
    "download_bytes_per_s": "per-connection cap on video and blob downloads in bytes/s (e.g. 12500000 = 100 Mbit/s)",
    "create_rate_limit_per_s": "token-bucket create limit: creates per second; beyond it 429 + Retry-After",
    "create_burst": "tokens the create bucket holds (default: one second's worth)",
    "create_quota": "accepted creates per quota window (free tier); beyond it 429 + Retry-After to the window's end",
    "create_quota_window_s": "length of the fixed quota window in seconds (default: an hour)",
}


def _fault_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_cli_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --host, --port, the EmulatorConfig flags and one flag per FaultConfig field."""
    defaults = EmulatorConfig()
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    for flag, name, kind, text in _CONFIG_FLAGS:
        parser.add_argument(flag, dest=name, type=kind, default=getattr(defaults, name), help=text)
    parser.add_argument(
        "--small-frames",
        dest="small_frames",
        action="store_true",
        help="benchmark mode: requested frame size at 2 fps (cheap encodes), exact duration",
    )
    parser.add_argument(
        "--no-identify",
        dest="identify",
        action="store_false",
        help="answer 404 on /_emulator/info, like another implementation of the API",
    )
    group = parser.add_argument_group("fault injection (rates are probabilities per request)")
    for f in fields(FaultConfig):
        group.add_argument(
            _fault_flag(f.name),
            dest=f.name,
            type=int if f.name in _COUNTS else float,
            default=getattr(defaults.faults, f.name),
            metavar="RATE" if f.name.endswith("_rate") else "N",
            help=_FAULT_HELP.get(f.name),
        )
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    faults = FaultConfig(**{f.name: getattr(args, f.name) for f in fields(FaultConfig)})
    settings = {name: getattr(args, name) for _, name, _, _ in _CONFIG_FLAGS}
    return EmulatorConfig(
        small_frames=bool(args.small_frames), identify=bool(args.identify), faults=faults, **settings
    )
