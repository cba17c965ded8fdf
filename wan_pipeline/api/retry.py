"""When to try an API call again, and when to poll a generation next: pure timing decisions.

Nothing here sleeps or sends anything. The clients (and the completion sensor, which stores each
generation's next poll time in the ledger) ask these objects for a delay and act on it themselves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

# A create answered with these was surely not accepted: trying again cannot buy the video twice.
CREATE_RETRY_STATUSES = frozenset({429, 502, 503})
# A create answered with these may exist upstream anyway: never retried (see CreateOutcomeUnknown).
CREATE_AMBIGUOUS_STATUSES = frozenset({500, 504})
# Reads are idempotent, so every transient status is worth another try.
READ_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def request_never_sent(exc: httpx.RequestError) -> bool:
    """No byte reached the server: no connection was established or taken from the pool, or the URL
    scheme is not one httpx can send to."""
    return isinstance(
        exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout | httpx.UnsupportedProtocol
    )


def request_error_is_transient(exc: httpx.RequestError) -> bool:
    """Network trouble that another try may not meet (unlike a bad URL scheme or a local protocol bug)."""
    return isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP-date; None if absent/unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT by definition
        when = when.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


@dataclass(frozen=True)
class RetryEvent:
    """One decision to try again, reported to `on_retry` hooks (and logged)."""

    operation: str  # "create" | "get" | "download"
    try_number: int  # the try that failed, 1-based
    delay_s: float  # what the client will wait before the next try
    reason: str  # "HTTP 503", "ConnectError: ...", with "retry-after" when the server asked


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in tries AND in total time, honouring Retry-After."""

    max_attempts: int = 5
    max_retry_seconds: float = 120.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0

    def backoff_s(self, try_number: int, rng: random.Random) -> float:
        """Full jitter: uniform over [0, min(cap, base * 2^(try-1))], so many clients do not retry in step."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (try_number - 1))
        return rng.uniform(0.0, ceiling)

    def delay_before_retry(
        self, try_number: int, elapsed_s: float, retry_after_s: float | None, rng: random.Random
    ) -> float | None:
        """The wait before try `try_number + 1`, or None when the tries or the time budget are spent."""
        if try_number >= self.max_attempts:
            return None
        delay = retry_after_s if retry_after_s is not None else self.backoff_s(try_number, rng)
        if elapsed_s + delay > self.max_retry_seconds:
            return None
        return delay


@dataclass(frozen=True)
class PollSchedule:
    """When to poll a generation next, from how long it has run and how long it should take.

    The first poll lands just before the expected processing time (`first_poll_fraction`), so a
    generation that finishes on time costs one or two polls. Past that point the interval is a
    fixed fraction of the elapsed time (`lag_fraction`): the detection lag stays under ~10% of the
    processing time while the interval grows geometrically, bounded by the min/max intervals.

    With no expectation at all (`expected_s=None`: a provider whose speed nothing has measured yet),
    it probes: first after `probe_first_s`, then doubling the elapsed time, so a fast server is seen
    fast and a slow one costs a handful of polls until the ledger has learned its processing time.
    """

    min_interval_s: float = 1.0
    max_interval_s: float = 60.0
    first_poll_fraction: float = 0.95
    lag_fraction: float = 0.1
    probe_first_s: float = 5.0

    def next_delay(self, elapsed_s: float, polls_so_far: int, expected_s: float | None) -> float:
        """Seconds from now until the next poll; `elapsed_s` counts from the submit (or the wait's start)."""
        if expected_s is None:
            if polls_so_far == 0:
                return max(self.probe_first_s - elapsed_s, 0.0)
            return min(max(elapsed_s, self.min_interval_s), self.max_interval_s)
        first_poll_at = self.first_poll_fraction * expected_s
        floor = self.min_interval_s if polls_so_far else 0.0
        if elapsed_s < first_poll_at:
            return max(first_poll_at - elapsed_s, floor)
        if polls_so_far == 0:
            return 0.0  # already overdue and never looked at: look now
        return min(max(self.lag_fraction * elapsed_s, self.min_interval_s), self.max_interval_s)
