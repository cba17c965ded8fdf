"""The create pacer (`wan_pipeline.api.pacing`): AIMD on 429s, Retry-After as one shared pause, and
the stop at a quota. Pure: every test drives it with a fake clock, nothing sleeps."""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from wan_pipeline.api import ClientConfig, CreateNotAccepted, CreateTry, NotifyTry
from wan_pipeline.api.errors import CreatesPaused
from wan_pipeline.api.models import Reply
from wan_pipeline.api.pacing import AsyncCreateGate, CreatePacer, PacingPolicy, Refused, Ticket
from wan_pipeline.api.protocol import ApiProtocol, AwaitTurn, HttpCall
from wan_pipeline.models import VideoRequest

WALL = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pacer(clock: FakeClock, **policy: Any) -> CreatePacer:
    return CreatePacer(PacingPolicy(**policy), clock=clock, wall_clock=lambda: WALL + timedelta(seconds=clock.now))


def test_unpaced_until_the_first_429_only_the_window_bounds_creates() -> None:
    clock = FakeClock()
    p = pacer(clock, max_concurrency=3)
    tickets = [p.started(clock.now) for _ in range(3)]
    assert p.rate is None and p.wait_s(clock.now) == math.inf  # three in flight: wait for an answer
    clock.now += 0.1
    p.accepted(tickets[0], clock.now)
    assert p.wait_s(clock.now) == 0.0 and p.in_flight == 2


def test_a_burst_of_429s_from_one_overload_cuts_once() -> None:
    clock = FakeClock()
    p = pacer(clock, max_concurrency=8)
    tickets = [p.started(clock.now) for _ in range(8)]
    clock.now += 0.5
    for ticket in tickets[:4]:
        p.accepted(ticket, clock.now)
    for ticket in tickets[4:]:  # all sent before the first cut: one epoch
        p.rate_limited(ticket, clock.now, None)
    assert p.counts.decreases == 1 and p.counts.rate_limited == 4
    # The first cut starts from what the provider accepted: 4 in the 0.5 s since the first send.
    assert p.rate == pytest.approx(8.0 * 0.85)
    assert p.window < 8

    late = p.started(clock.now)  # sent after the cut: its 429 is news, and cuts again
    clock.now += 0.1
    p.rate_limited(late, clock.now, None)
    assert p.counts.decreases == 2 and p.rate == pytest.approx(8.0 * 0.85**2)


def test_retry_after_pauses_every_create_of_the_pacer() -> None:
    clock = FakeClock()
    p = pacer(clock)
    first, second = p.started(clock.now), p.started(clock.now)
    clock.now += 0.2
    p.rate_limited(first, clock.now, 2.0)
    # Not only the 429's own task waits: no create at all goes out before the pause ends.
    assert p.wait_s(clock.now) == pytest.approx(2.0)
    clock.now += 1.5
    assert p.wait_s(clock.now) == pytest.approx(0.5)
    p.rate_limited(second, clock.now, 0.1)  # a shorter pause never shortens the one in force
    assert p.wait_s(clock.now) == pytest.approx(0.5)
    clock.now += 0.5
    assert p.wait_s(clock.now) == pytest.approx(0.0)


def test_after_a_cut_creates_are_spaced_and_the_rate_grows_additively() -> None:
    clock = FakeClock()
    p = pacer(clock, max_concurrency=8, increase_fraction=0.05, probe_doubling_s=1000.0)
    ticket = p.started(clock.now)
    clock.now += 1.0
    p.accepted(ticket, clock.now)
    ticket = p.started(clock.now)
    p.rate_limited(ticket, clock.now, None)
    rate = p.rate
    assert rate is not None
    p.started(clock.now)
    assert p.wait_s(clock.now) == pytest.approx(1.0 / rate)  # the next one waits its spacing

    # One second of accepted creates at the paced rate raises it by ~increase_fraction x the base rate.
    base = rate / 0.85
    for _ in range(round(rate)):
        clock.now += 1.0 / rate
        p.accepted(Ticket(clock.now - 0.05), clock.now)
    assert p.rate == pytest.approx(rate + 0.05 * base, rel=0.1)
    assert p.counts.decreases == 1


def test_a_wait_past_the_limit_stops_creating_and_says_until_when() -> None:
    clock = FakeClock()
    p = pacer(clock, max_wait_s=60.0)
    in_flight, refused = p.started(clock.now), p.started(clock.now)
    stop = p.rate_limited(refused, clock.now, 3600.0)
    assert stop is not None and p.stop is stop
    assert stop.until == WALL + timedelta(seconds=clock.now + 3600.0)
    assert "2026-12-01 13:01:40 UTC" in stop.describe()
    assert p.wait_s(clock.now) is None  # nothing is sent any more
    p.accepted(in_flight, clock.now)  # a create already in flight still counts as bought
    assert p.counts.accepted == 1 and p.wait_s(clock.now + 7200) is None
    p.rate_limited(p.started(clock.now), clock.now, 60.0)  # a wait at the limit would be waited
    assert p.stop is stop


@pytest.mark.parametrize("bad", [{"max_concurrency": 0}, {"rate_decrease": 1.0}, {"increase_fraction": 0},
                                 {"max_wait_s": -1}, {"min_concurrency": 9}])
def test_policies_are_checked(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PacingPolicy(**bad)


# -- the pacer against a token bucket, in simulated time ------------------------------------------------


class TokenBucket:
    """The provider's create limit as the emulator implements it."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self.tokens, self.at = rate, burst, float(burst), 0.0

    def take(self, now: float) -> float | None:
        """None: accepted; else the Retry-After of the 429."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.rate


def ride(count: int, rate: float, burst: int, round_trip_s: float, seed: int = 0) -> dict[str, float]:
    """`count` creates through one pacer (8 at most in flight, each 429 tried again) against a token
    bucket, in simulated time: what a run of the submission sees, without the network."""
    rng = random.Random(seed)
    clock = FakeClock()
    clock.now = 0.0
    p = CreatePacer(PacingPolicy(max_concurrency=8), clock=clock)
    bucket = TokenBucket(rate, burst)
    events: list[tuple[float, int, Ticket | None, float | None]] = [(0.0, 0, None, None)]
    waiting, calls, refused, accepted, last, order = count, 0, 0, 0, 0.0, 1
    while events:
        clock.now, _, ticket, retry_after = heapq.heappop(events)
        if ticket is not None:
            if retry_after is None:
                p.accepted(ticket, clock.now)
                accepted, last = accepted + 1, clock.now
            else:
                p.rate_limited(ticket, clock.now, retry_after)
                refused, waiting = refused + 1, waiting + 1
        while waiting:
            wait = p.wait_s(clock.now)
            if wait is None or wait == math.inf:
                break
            if wait > 0:
                heapq.heappush(events, (clock.now + wait, order, None, None))
                order += 1
                break
            sent = p.started(clock.now)
            waiting, calls = waiting - 1, calls + 1
            trip = round_trip_s * rng.uniform(0.7, 1.3)
            answer = bucket.take(clock.now + trip / 2)
            heapq.heappush(events, (clock.now + trip, order, sent, answer))
            order += 1
    return {"accepted_per_r": accepted / last / rate, "share_429": refused / calls, "accepted": accepted}


@pytest.mark.parametrize(
    ("rate", "burst", "round_trip_s"),
    [(20, 20, 0.12), (20, 5, 0.12), (20, 20, 0.03), (20, 20, 0.3), (50, 50, 0.12)],
)
def test_the_pacer_rides_a_token_bucket_at_its_rate_with_few_429s(rate: float, burst: int, round_trip_s: float) -> None:
    result = ride(500, rate, burst, round_trip_s)
    assert result["accepted"] == 500
    assert result["accepted_per_r"] >= 0.9
    assert result["share_429"] <= 0.10


def test_without_the_pacer_the_same_bucket_refuses_most_creates() -> None:
    # The comparison that makes the test above mean something: 8 creates in flight, every 429 tried
    # again at once (a client that only retries) gets most of its calls refused.
    bucket, calls, accepted, now = TokenBucket(20, 20), 0, 0, 0.0
    while accepted < 500:
        now += 0.12 / 8
        calls += 1
        accepted += bucket.take(now) is None
    assert (calls - accepted) / calls > 0.5


# -- the asyncio gate, on the same fake clock -----------------------------------------------------------


def test_the_gate_sleeps_the_shared_pause_once_and_refuses_after_a_stop() -> None:
    clock = FakeClock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    async def scenario() -> tuple[Any, ...]:
        gate = AsyncCreateGate(pacer(clock, max_wait_s=60.0), sleep)
        first = await gate.acquire()
        second = await gate.acquire()
        assert isinstance(first, Ticket) and isinstance(second, Ticket) and slept == []
        await gate.release(first, status=429, retry_after_s=1.5)
        # This task's own backoff (0.2 s) and the pause (1.5 s) are one sleep, not two.
        third = await gate.acquire(not_before_s=0.2)
        assert slept == [1.5] and isinstance(third, Ticket)
        await gate.release(second, status=429, retry_after_s=3600.0)
        refused = await gate.acquire()
        return third, refused, gate

    third, refused, gate = asyncio.run(scenario())
    assert isinstance(refused, Refused) and refused.stop is gate.pacer.stop
    assert "creating resumes after" in refused.reason and slept == [1.5]


def test_a_create_waiting_for_a_place_in_the_window_gets_it_on_release() -> None:
    clock = FakeClock()

    async def scenario() -> list[str]:
        gate = AsyncCreateGate(pacer(clock, max_concurrency=1))
        held = await gate.acquire()
        assert isinstance(held, Ticket)
        order: list[str] = []

        async def waiter() -> None:
            turn = await gate.acquire()
            order.append("waiter got a turn" if isinstance(turn, Ticket) else "refused")

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0)  # the waiter is parked: the window is full
        order.append("released")
        await gate.release(held, status=200)
        await task
        return order

    assert asyncio.run(scenario()) == ["released", "waiter got a turn"]


def test_a_pause_longer_than_the_creates_time_limit_refuses_at_once() -> None:
    clock = FakeClock()

    async def scenario() -> Any:
        gate = AsyncCreateGate(pacer(clock))
        ticket = await gate.acquire()
        assert isinstance(ticket, Ticket)
        await gate.release(ticket, status=429, retry_after_s=30.0)
        return await gate.acquire(time_limit_s=10.0)

    refused = asyncio.run(scenario())
    assert isinstance(refused, Refused) and refused.stop is None and "outlasts" in refused.reason


# -- the protocol: the turn comes before the try is announced -------------------------------------------


def test_a_refused_turn_is_never_announced_and_surely_created_nothing() -> None:
    protocol = ApiProtocol(ClientConfig(base_url="https://api.example"), clock=FakeClock())
    steps = protocol.submit(
        VideoRequest(image_url="https://example.com/frame.png", prompt="p", seed=1),
        request_key="0123456789abcdef0123456789abcdef",
        on_try=lambda event: None,
    )
    action = next(steps)
    assert isinstance(action, AwaitTurn) and action.not_before_s == 0
    stop = pacer(FakeClock()).rate_limited(Ticket(0.0), 0.0, 3600.0)
    with pytest.raises(CreatesPaused) as paused:
        steps.send(Refused(stop.describe(), stop))
    assert paused.value.created is False and paused.value.until == stop.until
    assert isinstance(paused.value, CreateNotAccepted)


def test_a_429_retry_waits_in_the_next_turn_not_in_a_sleep() -> None:
    clock = FakeClock()
    protocol = ApiProtocol(ClientConfig(base_url="https://api.example", max_attempts=3), clock=clock)
    steps = protocol.submit(
        VideoRequest(image_url="https://example.com/frame.png", prompt="p", seed=1),
        request_key="0123456789abcdef0123456789abcdef",
        on_try=lambda event: None,
    )
    kinds: list[Any] = []
    action = next(steps)
    answers = iter([Reply(429, {"retry-after": "2"}, b"{}"), Reply(200, {}, b'{"id": "gen-1", "status": "queued"}')])
    while True:
        kinds.append(action)
        if isinstance(action, AwaitTurn):
            outcome: Any = Ticket(clock.now)
        elif isinstance(action, HttpCall):
            assert isinstance(action.ticket, Ticket)  # the shell hands the turn back with the answer
            outcome = next(answers)
        else:
            outcome = None
        try:
            action = steps.send(outcome)
        except StopIteration as done:
            generation = done.value
            break
    turns = [a.not_before_s for a in kinds if isinstance(a, AwaitTurn)]
    notified = [a.event for a in kinds if isinstance(a, NotifyTry)]
    assert generation.id == "gen-1" and turns == [0.0, 2.0]
    assert [(e.phase, e.try_number) for e in notified] == [("sending", 1), ("answered", 1), ("sending", 2), ("answered", 2)]
    assert all(isinstance(e, CreateTry) for e in notified)


def test_a_provider_that_refuses_everything_without_retry_after_stops_the_pacer_too() -> None:
    clock = FakeClock()
    p = pacer(clock, max_wait_s=60.0)
    for _ in range(5):  # 429s without a Retry-After, 20 s apart, nothing accepted in between
        p.rate_limited(p.started(clock.now), clock.now, None)
        clock.now += 20.0
    assert p.stop is not None and p.stop.until is None and p.wait_s(clock.now) is None
    assert "no Retry-After" in p.stop.describe()

    q = pacer(FakeClock(), max_wait_s=60.0)  # one accepted create in between starts the count again
    q.rate_limited(q.started(100.0), 100.0, None)
    q.accepted(q.started(150.0), 150.0)
    q.rate_limited(q.started(200.0), 200.0, None)
    assert q.stop is None
