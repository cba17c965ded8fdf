"""Riding the provider's create rate limit: AIMD pacing, one shared pause, and a stop at the quota.

`CreatePacer` is the pure decision core (no sleeping, no I/O, an injected clock): it decides when
the next create may be sent. `AsyncCreateGate` is its asyncio shell, owned by one async client, so
every in-flight create of a run goes through the same pacer (each run has its own; the Dagster
`aimlapi` pool bounds how many runs share the provider at once).

How it paces:
- Unpaced until the provider first answers 429: no limit is assumed, only `max_concurrency`.
- A 429 starts a congestion *epoch*: the send rate is cut multiplicatively (the first time, from
  the rate the provider actually accepted over the last `measure_s`), and the concurrency window
  too. Answers to creates sent before the cut belong to the old epoch and cut nothing again, so a
  burst of 429s from one overload costs one decrease, as in TCP.
- Every accepted create raises the rate additively (`increase_per_s` per second of accepted
  creates, a fraction of the rate at the last cut) and the window by 1/window (+1 per window).
- `Retry-After` is a pause shared by every create of the pacer: nothing is sent before it ends.
- A `Retry-After` longer than `max_wait_s` (a free-tier hourly quota answers with up to an hour)
  stops the pacer: no further create is sent, and `stop` says until when the provider refuses. So
  does a provider that refuses every create for longer than `max_wait_s` without a `Retry-After`
  (then `stop.until` is None: it did not say).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# Waits shorter than this are no wait (float rounding of clock sums must not cost another sleep).
TOLERANCE_S = 1e-6


@dataclass(frozen=True)
class PacingPolicy:
    max_concurrency: int = 8  # the window's ceiling (and its start)
    min_concurrency: int = 1
    window_decrease: float = 0.75  # window x this on a 429 epoch
    rate_decrease: float = 0.85  # rate x this on a 429 epoch
    increase_fraction: float = 0.05  # additive increase: this x the rate at the last cut, per second
    min_rate_per_s: float = 0.05
    measure_s: float = 1.0  # accepted creates counted over (at most) this long for the first cut
    # The additive increase doubles for every this long without a 429: a rate cut too deep (or a
    # provider that raised its limit) is probed back up in seconds, not minutes.
    probe_doubling_s: float = 4.0
    max_wait_s: float = 60.0  # a longer Retry-After stops creating instead of waiting

    def __post_init__(self) -> None:
        if self.max_concurrency < 1 or not 1 <= self.min_concurrency <= self.max_concurrency:
            raise ValueError("need 1 <= min_concurrency <= max_concurrency")
        for name in ("window_decrease", "rate_decrease"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be between 0 and 1")
        positive = (self.increase_fraction, self.min_rate_per_s, self.measure_s, self.probe_doubling_s)
        if min(positive) <= 0 or self.max_wait_s < 0:
            raise ValueError("increase_fraction, min_rate_per_s and measure_s must be positive, max_wait_s >= 0")


@dataclass(frozen=True)
class Ticket:
    """One create sent under the pacer: when (its epoch is decided by it)."""

    sent_at: float


@dataclass(frozen=True)
class PacerStop:
    """The provider refuses creates for longer than the pacer will wait (a quota, typically)."""

    retry_after_s: float | None  # None: the provider refused every create for `max_wait_s` without one
    until: datetime | None  # UTC: when the provider said creates are accepted again (None: it did not say)
    reason: str

    def describe(self) -> str:
        if self.until is None or self.retry_after_s is None:
            return f"{self.reason}: the provider sent no Retry-After, so when creates resume is unknown"
        return (
            f"{self.reason}: the provider asks to wait {self.retry_after_s:,.0f} s, creating resumes after "
            f"{self.until.strftime('%Y-%m-%d %H:%M:%S')} UTC"
        )


@dataclass
class PacerCounts:
    sent: int = 0
    accepted: int = 0
    rate_limited: int = 0  # 429 answers
    decreases: int = 0


class CreatePacer:
    """When the next create may be sent, from the answers to the previous ones. Pure: the caller
    reports each send (`started`) and each answer (`accepted`, `rate_limited`, `other`)."""

    def __init__(
        self,
        policy: PacingPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.policy = policy or PacingPolicy()
        self._clock = clock
        self._wall_clock = wall_clock
        self.window = float(self.policy.max_concurrency)
        self.rate: float | None = None  # creates per second; None = not paced (no 429 seen yet)
        self.in_flight = 0
        self.paused_until = -math.inf
        self.stop: PacerStop | None = None
        self.counts = PacerCounts()
        self._next_send_at = -math.inf
        self._first_sent_at: float | None = None
        self._epoch_started = -math.inf
        self._rtt_s: float | None = None  # smoothed time from send to answer
        self._increase_per_s = 0.0
        self._accepted_at: deque[float] = deque()
        self._refused_since: float | None = None  # the first 429 since the last accepted create

    def now(self) -> float:
        return self._clock()

    @property
    def concurrency(self) -> int:
        return max(self.policy.min_concurrency, min(self.policy.max_concurrency, int(self.window)))

    def wait_s(self, now: float) -> float | None:
        """Seconds until a create may be sent: 0 now, `math.inf` until an in-flight create answers,
        None never (stopped)."""
        if self.stop is not None:
            return None
        if self.in_flight >= self.concurrency:
            return math.inf
        return max(self.paused_until - now, self._next_send_at - now, 0.0)

    def started(self, now: float) -> Ticket:
        """A create is sent now (the caller checked `wait_s(now) == 0`)."""
        self.in_flight += 1
        self.counts.sent += 1
        if self._first_sent_at is None:
            self._first_sent_at = now
        if self.rate is not None:
            self._next_send_at = max(now, self._next_send_at) + 1.0 / self.rate
        return Ticket(now)

    def accepted(self, ticket: Ticket, now: float) -> None:
        self._finish()
        sample = max(now - ticket.sent_at, 0.0)
        self._rtt_s = sample if self._rtt_s is None else 0.875 * self._rtt_s + 0.125 * sample
        self.counts.accepted += 1
        self._refused_since = None
        self._accepted_at.append(now)
        while self._accepted_at and self._accepted_at[0] < now - self.policy.measure_s:
            self._accepted_at.popleft()
        if self.rate is not None:
            probing = 2.0 ** min((now - self._epoch_started) / self.policy.probe_doubling_s, 10.0)
            # `rate` accepts a second: + increase_per_s (x probing) a second
            self.rate += self._increase_per_s * probing / self.rate
        self.window = min(self.policy.max_concurrency, self.window + 1.0 / max(self.window, 1.0))

    def rate_limited(self, ticket: Ticket, now: float, retry_after_s: float | None) -> PacerStop | None:
        """A 429: pause everyone for Retry-After, cut once per epoch; a wait past `max_wait_s` stops."""
        self._finish()
        self.counts.rate_limited += 1
        reason = "creating stopped by the provider's rate limit (429)"
        if retry_after_s is not None and retry_after_s > self.policy.max_wait_s:
            if self.stop is None:
                until = self._wall_clock() + timedelta(seconds=retry_after_s)
                self.stop = PacerStop(retry_after_s, until, reason)
            return self.stop
        if self._refused_since is None:
            self._refused_since = now
        elif retry_after_s is None and now - self._refused_since > self.policy.max_wait_s:
            # Every create refused for longer than the pacer waits, and no word on how long: a quota
            # that does not say so. Stop rather than crawl at the minimum rate until the deadline.
            if self.stop is None:
                self.stop = PacerStop(None, None, f"{reason} for {now - self._refused_since:,.0f} s")
            return self.stop
        if retry_after_s is not None:
            self.paused_until = max(self.paused_until, now + retry_after_s)
        if ticket.sent_at >= self._epoch_started:  # sent after the last cut: this overload is news
            self._decrease(now)
        return None

    def other(self, ticket: Ticket, now: float) -> None:
        """Any other answer (or none): the slot is free, the pace unchanged."""
        self._finish()

    def _finish(self) -> None:
        self.in_flight = max(self.in_flight - 1, 0)

    def _decrease(self, now: float) -> None:
        policy = self.policy
        self.counts.decreases += 1
        self._epoch_started = now
        if self.rate is None:
            # What the provider accepted lately, per second (over less than `measure_s` early in a run).
            span = min(policy.measure_s, max(now - (self._first_sent_at or now), 0.05))
            # (Before any answer was an acceptance, one per span: a guess the probing corrects.)
            measured = max(sum(1 for t in self._accepted_at if t >= now - span), 1) / span
            base = max(measured, policy.min_rate_per_s)
        else:
            base = self.rate
        self.rate = max(base * policy.rate_decrease, policy.min_rate_per_s)
        self._increase_per_s = policy.increase_fraction * base
        # Never below what the new rate needs in flight: the window bounds a slowing provider, the
        # rate bounds a rate limit, and a window cut under rate x round trip would do the rate's job twice.
        window = self.window * policy.window_decrease
        if self._rtt_s is not None:
            needed = math.ceil(self.rate * self._rtt_s) + 1
            window = max(window, float(min(needed, policy.max_concurrency)))
        self.window = max(float(policy.min_concurrency), window)


@dataclass(frozen=True)
class Refused:
    """The gate will not let this create be sent: the pacer stopped, or the wait outlasts its time."""

    reason: str
    stop: PacerStop | None = None


class AsyncCreateGate:
    """The pacer for the creates of one asyncio client: `acquire` waits for a turn, `release` reports
    the answer. Every create of the client waits on the same pause, pace and window.

    Timed waits go through `sleep` (the client's, so a test can stand in for time); a wait for a
    free place in the window waits for a `release`. The event loop runs one task at a time, so the
    pacer's state needs no lock: the condition only wakes the tasks waiting for a place.
    """

    def __init__(self, pacer: CreatePacer, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.pacer = pacer
        self._sleep = sleep
        self._released = asyncio.Condition()

    async def acquire(self, not_before_s: float = 0.0, time_limit_s: float = math.inf) -> Ticket | Refused:
        """A turn to send one create, at least `not_before_s` from now (the create's own retry wait,
        slept together with the shared pause), or `Refused` when the pacer stopped or the wait would
        outlast `time_limit_s`."""
        pacer = self.pacer
        start = pacer.now()
        awake_at = start  # once a sleep until T returned, it is at least T for this task
        now = start
        while True:
            wait = pacer.wait_s(now)
            if wait is None:
                assert pacer.stop is not None
                return Refused(pacer.stop.describe(), pacer.stop)
            if wait == math.inf:
                async with self._released:
                    await self._released.wait()
                now = max(pacer.now(), awake_at)
                continue
            wait = max(wait, not_before_s - (now - start))
            if wait <= TOLERANCE_S:
                return pacer.started(pacer.now())  # the send's real time: the pace counts from it
            if now + wait - start > time_limit_s:
                return Refused(
                    f"the provider's rate-limit pause ({wait:.1f} s) outlasts the create's time limit"
                )
            awake_at = now + wait
            await self._sleep(wait)
            now = max(pacer.now(), awake_at)

    async def release(self, ticket: Ticket, *, status: int | None, retry_after_s: float | None = None) -> None:
        """The answer to a create sent with `ticket`: its HTTP status (None: no answer)."""
        now = self.pacer.now()
        if status == 429:
            self.pacer.rate_limited(ticket, now, retry_after_s)
        elif status is not None and 200 <= status < 300:
            self.pacer.accepted(ticket, now)
        else:
            self.pacer.other(ticket, now)
        async with self._released:
            self._released.notify_all()
