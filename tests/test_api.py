"""The AI/ML API client: pure parsing/retry/poll decisions, then both clients against the emulator."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from wan_pipeline.api import (
    AimlApiClient,
    ApiError,
    AsyncAimlApiClient,
    AuthenticationError,
    ClientConfig,
    CreateNotAccepted,
    CreateOutcomeUnknown,
    CreateTry,
    DeadlineExceeded,
    DownloadExpired,
    DownloadSink,
    DownloadTooLarge,
    Generation,
    GenerationNotFound,
    OutOfCredits,
    PollSchedule,
    RateLimited,
    Reply,
    RequestRejected,
    RetryEvent,
    RetryPolicy,
    ServerError,
    TransportError,
    WaitTimeout,
    build_create_body,
    client_request_id,
    error_from_reply,
    max_video_bytes,
    normalize_status,
    parse_generation,
    parse_retry_after,
    request_error_is_transient,
    request_never_sent,
)
from wan_pipeline.emulator import EmulatorConfig, running_emulator
from wan_pipeline.models import SEED_MAX, WAN_2_6_I2V, RequestInvalid, VideoRequest
from wan_pipeline.settings import Secret, load_settings
from wan_pipeline.sources import MediaError
from wan_pipeline.storage import atomic_writer

HTTP_IMAGE = "https://example.com/first-frame.png"


def png_bytes(width: int = 400, height: int = 400) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "frame.png"
    path.write_bytes(png_bytes())
    return path


# --------------------------------------------------------------------------------------------
# Pure: statuses, generation objects, errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("completed", "completed"),
        ("succeeded", "completed"),
        ("COMPLETED", "completed"),
        ("error", "failed"),
        ("failed", "failed"),
        ("queued", "pending"),
        ("generating", "pending"),
        ("waiting", "pending"),
        ("active", "pending"),
        ("processing", "pending"),
        ("something-new", "pending"),
        ("", "pending"),
        (None, "pending"),
    ],
)
def test_status_normalisation_keeps_raw_status(raw: str | None, normalized: str) -> None:
    assert normalize_status(raw) == normalized
    generation = parse_generation({"id": "g1", "status": raw})
    assert generation.status == normalized
    assert generation.raw_status == (raw or "")
    assert generation.is_terminal == (normalized != "pending")


def test_parse_completed_generation_reads_url_expiry_cost_and_tracing() -> None:
    expires = 1767805107
    url = f"https://cdn.example.com/v/x.mp4?Expires={expires}&OSSAccessKeyId=k&Signature=s"
    generation = parse_generation(
        {
            "id": "V2c",
            "status": "completed",
            "video": {"url": url},
            "meta": {"usage": {"credits_used": 1575000}},
        },
        {"X-Inference-Id": "V2c", "X-Client-Request-Id": "wanp-abc-1.1"},
    )
    assert generation.video_url == url
    assert generation.video_expires_at == datetime.fromtimestamp(expires, UTC)
    assert generation.credits_used == 1_575_000
    assert generation.usd_spent == pytest.approx(0.7875)  # derived: 2,000,000 credits per $
    assert (generation.inference_id, generation.client_request_id) == ("V2c", "wanp-abc-1.1")


def test_parse_cost_from_headers_when_meta_is_absent() -> None:
    generation = parse_generation(
        {"id": "g", "status": "queued"}, {"x-aimlapi-credits-used": "400000", "x-aimlapi-usd-spent": "0.25"}
    )
    assert (generation.credits_used, generation.usd_spent) == (400_000, 0.25)
    assert parse_generation({"id": "g", "status": "queued"}).credits_used is None


def test_parse_error_message_falls_back_to_detail() -> None:
    with_message = parse_generation(
        {"id": "g", "status": "error", "error": {"name": "E", "message": "NSFW input"}}
    )
    assert with_message.error == "NSFW input"
    with_detail = parse_generation(
        {
            "id": "g",
            "status": "failed",
            "error": {"detail": [{"loc": ["body", "duration"], "msg": "bad value", "type": "enum"}]},
        }
    )
    assert with_detail.error == "body.duration: bad value"


def test_parse_refuses_an_answer_without_id() -> None:
    for payload in ({"status": "queued"}, {"id": "", "generation_id": None}, {"id": 42}):
        with pytest.raises(ValueError):
            parse_generation(payload)


@pytest.mark.parametrize(
    ("payload", "generation_id"),
    [
        ({"id": "g1"}, "g1"),
        ({"generation_id": "g2"}, "g2"),  # a sibling model's shape: a paid id is never lost to it
        ({"id": "g1", "generation_id": "other"}, "g1"),  # the documented field wins
        ({"id": None, "generation_id": "g2"}, "g2"),
        ({"id": "g1", "unknown": {"nested": [1, 2]}, "extra": True}, "g1"),  # unknown fields are ignored
    ],
)
def test_the_generation_id_is_read_where_the_sdk_reads_it(payload: dict, generation_id: str) -> None:
    generation = parse_generation({"status": "queued", **payload})
    assert generation.id == generation_id and generation.raw == {"status": "queued", **payload}


URL = "https://cdn.example.com/v.mp4?Expires=1767805107"


@pytest.mark.parametrize(
    ("payload", "video_url"),
    [
        ({"video": {"url": URL}}, URL),
        ({"video": URL}, URL),
        ({"video_url": URL}, URL),
        ({"url": URL}, URL),
        ({"output": {"video_url": URL}}, URL),
        ({"output": {"url": URL}}, URL),
        ({"videos": [{"url": URL}, {"url": "https://second"}]}, URL),
        ({"result": {"video": {"url": URL}}}, URL),
        (
            {"video": {"url": URL}, "video_url": "https://elsewhere", "url": "https://x"},
            URL,
        ),  # documented first
        ({"video": {"url": ""}, "video_url": URL}, URL),
        ({"videos": [], "output": None, "video": 7}, None),
        ({}, None),
    ],
)
def test_the_video_url_is_read_from_the_documented_place_then_sibling_shapes(
    payload: dict, video_url: str | None
) -> None:
    generation = parse_generation({"id": "g", "status": "completed", **payload})
    assert generation.video_url == video_url
    assert (generation.video_expires_at is not None) == (video_url is not None)


@pytest.mark.parametrize(
    ("resolution", "duration_s", "at_least", "at_most"),
    [
        ("720p", 5, 8_000_000, 25_000_000),  # the service's 5 s 720p video is a few MB
        ("1080p", 5, 15_000_000, 40_000_000),
        ("1080p", 15, 60_000_000, 100_000_000),
        ("4k", 5, 15_000_000, 40_000_000),  # unknown: the highest ceiling, never a small cap
    ],
)
def test_video_cap_grows_with_resolution_and_duration(
    resolution: str, duration_s: int, at_least: int, at_most: int
) -> None:
    assert at_least <= max_video_bytes(resolution, duration_s) <= at_most
    assert max_video_bytes(resolution, duration_s, margin=4) > max_video_bytes(resolution, duration_s)
    request = VideoRequest(image_url=HTTP_IMAGE, prompt="p", resolution="720p", duration=5)
    assert ClientConfig(max_download_bytes=1000).max_video_bytes_for(request) == 1000
    assert ClientConfig(video_size_margin=3).max_video_bytes_for(request) == max_video_bytes(
        "720p", 5, margin=3
    )


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, RequestRejected),
        (401, AuthenticationError),
        (403, OutOfCredits),
        (404, GenerationNotFound),
        (429, RateLimited),
        (500, ServerError),
        (503, ServerError),
        (418, ApiError),
    ],
)
def test_error_mapping_by_status(status: int, error_class: type[ApiError]) -> None:
    body = b'{"message": "nope", "requestId": "req-1", "statusCode": "%d"}' % status
    error = error_from_reply(Reply(status, httpx.Headers({"retry-after": "3"}), body))
    assert type(error) is error_class
    assert (error.status_code, error.request_id) == (status, "req-1")
    assert "nope" in str(error)
    if isinstance(error, RateLimited):
        assert error.retry_after_s == 3.0


def test_rejection_keeps_details_but_hides_data_uris_and_the_key() -> None:
    key = Secret("sk-live-not-for-messages")
    echoed = "data:image/png;base64," + "A" * 5000
    body = (
        b'{"message": "Body validation error!", "details": [{"path": ["image_url"], '
        b'"message": "Invalid url ' + echoed.encode() + b' for key sk-live-not-for-messages"}]}'
    )
    error = error_from_reply(Reply(400, httpx.Headers(), body), secret=key)
    assert isinstance(error, RequestRejected)
    assert "Body validation error!" in str(error) and "image_url" in str(error)
    for text in (str(error), repr(error), repr(error.details)):
        assert "AAAAAAAA" not in text
        assert key.reveal() not in text


# --------------------------------------------------------------------------------------------
# Pure: retry and poll timing
# --------------------------------------------------------------------------------------------


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("1.5", now) == 1.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=42), usegmt=True), now) == 42.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=42), usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_retry_policy_full_jitter_bounded_in_tries_and_time() -> None:
    policy = RetryPolicy(max_attempts=4, max_retry_seconds=10.0, backoff_base_s=0.5, backoff_max_s=3.0)
    rng = random.Random(7)
    delays = [policy.delay_before_retry(try_number, 0.0, None, rng) for try_number in (1, 2, 3)]
    for try_number, delay in zip((1, 2, 3), delays, strict=True):
        assert delay is not None and 0.0 <= delay <= min(3.0, 0.5 * 2 ** (try_number - 1))
    assert len({round(policy.backoff_s(5, rng), 6) for _ in range(20)}) > 1  # jittered, not fixed
    assert policy.delay_before_retry(4, 0.0, None, rng) is None  # out of tries
    assert policy.delay_before_retry(1, 0.0, 4.0, rng) == 4.0  # Retry-After wins over backoff
    assert policy.delay_before_retry(1, 8.0, 4.0, rng) is None  # would pass the time budget


@pytest.mark.parametrize(
    ("error", "never_sent", "transient"),
    [
        (httpx.ConnectError("refused"), True, True),
        (httpx.ConnectTimeout("no answer to SYN"), True, True),
        (httpx.PoolTimeout("no free connection"), True, True),
        (httpx.UnsupportedProtocol("ftp://"), True, False),
        (httpx.WriteTimeout("stuck sending"), False, True),
        (httpx.ReadTimeout("late answer"), False, True),
        (httpx.ReadError("connection reset"), False, True),
        (httpx.RemoteProtocolError("disconnected without a response"), False, True),
    ],
)
def test_request_error_classification(error: httpx.RequestError, never_sent: bool, transient: bool) -> None:
    # never_sent decides whether a create may be retried; transient whether a read may be.
    assert request_never_sent(error) is never_sent
    assert request_error_is_transient(error) is transient


def simulate_polls(schedule: PollSchedule, expected_s: float | None, actual_s: float) -> tuple[int, float]:
    """Polls made and detection lag for a generation that completes at `actual_s`."""
    elapsed, polls = 0.0, 0
    while True:
        elapsed += schedule.next_delay(elapsed, polls, expected_s)
        polls += 1
        if elapsed >= actual_s:
            return polls, elapsed - actual_s


@given(expected=st.floats(10, 3000), ratio=st.floats(0.87, 5.0))
def test_poll_lag_stays_near_ten_percent_of_processing_time(expected: float, ratio: float) -> None:
    schedule = PollSchedule(min_interval_s=1.0, max_interval_s=60.0)
    actual = expected * ratio
    _polls, lag = simulate_polls(schedule, expected, actual)
    assert lag <= max(0.1 * actual, schedule.min_interval_s) + 1e-6


# Up to 550 s the 10% interval stays under the 60 s cap that bounds longer generations' lag.
@given(expected=st.floats(20, 550), ratio=st.floats(0.8, 1.14))
def test_poll_count_is_at_most_three_near_the_expected_time(expected: float, ratio: float) -> None:
    polls, _lag = simulate_polls(PollSchedule(), expected, expected * ratio)
    assert polls <= 3


def test_poll_schedule_first_poll_near_expected_then_capped_backoff() -> None:
    schedule = PollSchedule(min_interval_s=1.0, max_interval_s=60.0)
    assert schedule.next_delay(0.0, 0, 172.0) == pytest.approx(0.95 * 172.0)
    assert schedule.next_delay(500.0, 0, 172.0) == 0.0  # overdue and never polled: now
    assert schedule.next_delay(200.0, 1, 172.0) == pytest.approx(20.0)
    assert schedule.next_delay(5000.0, 7, 172.0) == 60.0
    assert schedule.next_delay(3.0, 1, 2.0) == 1.0


@given(actual=st.floats(1, 3000))
def test_with_nothing_learned_yet_polls_probe_fast_then_double(actual: float) -> None:
    """An unmeasured provider: a 5 s server is seen at 5 s, a slow one costs a bounded handful of polls."""
    schedule = PollSchedule(min_interval_s=1.0, max_interval_s=60.0)
    polls, lag = simulate_polls(schedule, None, actual)
    assert schedule.next_delay(0.0, 0, None) == schedule.probe_first_s
    assert lag <= max(actual, schedule.probe_first_s, 0) and lag <= schedule.max_interval_s
    assert polls <= 5 + max(0.0, actual - 80) / 60 + 1


# --------------------------------------------------------------------------------------------
# Pure: request building and validation
# --------------------------------------------------------------------------------------------

VALID_FIELDS = st.fixed_dictionaries(
    {
        "prompt": st.text(min_size=1, max_size=1500).filter(str.strip),
        "resolution": st.sampled_from(WAN_2_6_I2V.resolutions),
        "duration": st.sampled_from(WAN_2_6_I2V.durations),
        "shot_type": st.sampled_from(WAN_2_6_I2V.shot_types),
        "seed": st.integers(0, SEED_MAX),
        "negative_prompt": st.none() | st.text(max_size=500),
        "generate_audio": st.booleans(),
        "enhance_prompt": st.booleans(),
    }
)
INVALID_VALUES = {
    "prompt": st.just("") | st.just("   ") | st.text(min_size=1501, max_size=1600).filter(str.strip),
    "resolution": st.text().filter(lambda v: v not in WAN_2_6_I2V.resolutions),
    "duration": st.integers().filter(lambda v: v not in WAN_2_6_I2V.durations) | st.just("5") | st.just(5.0),
    "shot_type": st.text().filter(lambda v: v not in WAN_2_6_I2V.shot_types),
    "seed": st.integers(max_value=-1) | st.integers(min_value=SEED_MAX + 1) | st.just(True),
    "negative_prompt": st.text(min_size=501, max_size=600),
    "generate_audio": st.sampled_from([0, 1, "yes"]),
    "enhance_prompt": st.sampled_from([0, 1, "no"]),
}


@given(fields=VALID_FIELDS)
def test_valid_requests_build_the_wire_body(fields: dict) -> None:
    request = VideoRequest(image_url=HTTP_IMAGE, **fields)
    body = build_create_body(request)
    assert body["model"] == "alibaba/wan-2-6-i2v"
    assert body["image_url"] == HTTP_IMAGE  # http(s) passes through unchanged
    assert body["duration"] == fields["duration"] and type(body["duration"]) is int
    assert body["seed"] == fields["seed"]
    assert ("negative_prompt" in body) == (fields["negative_prompt"] is not None)
    assert "audio_url" not in body


@given(data=st.data(), fields=VALID_FIELDS, broken=st.sampled_from(sorted(INVALID_VALUES)))
def test_any_invalid_field_is_refused_before_a_body_exists(
    data: st.DataObject, fields: dict, broken: str
) -> None:
    fields[broken] = data.draw(INVALID_VALUES[broken])
    with pytest.raises(RequestInvalid) as refused:
        VideoRequest(image_url=HTTP_IMAGE, **fields)
    assert broken in {problem.field for problem in refused.value.problems}


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=10, deadline=None)
@given(fields=VALID_FIELDS)
def test_local_images_are_sent_as_data_uris(image_path: Path, fields: dict) -> None:
    body = build_create_body(VideoRequest(image_url=image_path.name, **fields), base_dir=image_path.parent)
    assert body["image_url"].startswith("data:image/png;base64,")


def test_client_request_id_from_key_attempt_and_try() -> None:
    assert client_request_id("0123abcd", 2, 3) == "wanp-0123abcd-2.3"
    for bad_key in ("has space", "x" * 130, "slash/"):
        with pytest.raises(ValueError):
            client_request_id(bad_key, 1, 1)


def test_config_never_shows_the_key() -> None:
    config = ClientConfig(api_key="sk-plain-string-key")  # type: ignore[arg-type]
    assert isinstance(config.api_key, Secret)
    assert "sk-plain-string-key" not in repr(config)
    with AimlApiClient(config) as client:
        assert "sk-plain-string-key" not in repr(client)
    async_client = AsyncAimlApiClient(config)
    assert "sk-plain-string-key" not in repr(async_client)
    asyncio.run(async_client.aclose())


# --------------------------------------------------------------------------------------------
# Against the emulator, with both clients
# --------------------------------------------------------------------------------------------

REQUEST_KEY = "0123456789abcdef0123456789abcdef"
CREATE = "POST /v2/video/generations"
GET = "GET /v2/video/generations"


class BlockingAsyncClient:
    """Drives an AsyncAimlApiClient on its own event loop, so one test body exercises both clients."""

    def __init__(self, config: ClientConfig, *, sleep: Callable[[float], None] | None = None, **options: Any):
        self._loop = asyncio.new_event_loop()
        if sleep is not None:
            options["sleep"] = self._async(sleep)
        self.client = AsyncAimlApiClient(config, **options)

    @staticmethod
    def _async(function: Callable[[float], None]) -> Callable[[float], Awaitable[None]]:
        async def call(seconds: float) -> None:
            function(seconds)

        return call

    def __repr__(self) -> str:
        return repr(self.client)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        return lambda *args, **kwargs: self._loop.run_until_complete(method(*args, **kwargs))

    def close(self) -> None:
        self._loop.run_until_complete(self.client.aclose())
        self._loop.close()


@pytest.fixture
def client_config(client_config: ClientConfig, tmp_path: Path) -> ClientConfig:
    """The shared emulator config, allowed to read this test's own files (nothing else is)."""
    return dataclasses.replace(client_config, allowed_roots=(tmp_path,))


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    opened: list[Any] = []

    def make(config: ClientConfig, **options: Any) -> Any:
        client = (
            AimlApiClient(config, **options)
            if request.param == "sync"
            else BlockingAsyncClient(config, **options)
        )
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def make_request(image: Path | str, **overrides: Any) -> VideoRequest:
    fields = {"prompt": "a lighthouse at dusk, waves", "resolution": "720p", "duration": 5, "seed": 7}
    return VideoRequest(image_url=str(image), **{**fields, **overrides})


def counts(emulator: Any, endpoint: str) -> dict[str, int]:
    return dict(emulator.stats()["requests"].get(endpoint, {}))


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def poll_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_submit_poll_download_lifecycle(
    emulator: Any,
    client_config: ClientConfig,
    make_client: Callable[..., Any],
    image_path: Path,
    tmp_path: Path,
) -> None:
    client = make_client(client_config)
    generation = client.submit(make_request(image_path), request_key=REQUEST_KEY)
    assert (generation.raw_status, generation.status) == ("queued", "pending")
    assert generation.client_request_id == f"wanp-{REQUEST_KEY}-1.1"
    assert generation.credits_used and generation.usd_spent == pytest.approx(
        generation.credits_used / 2_000_000
    )

    statuses = [generation.raw_status]
    deadline = time.monotonic() + 10
    while generation.status == "pending" and time.monotonic() < deadline:
        time.sleep(0.03)
        generation = client.get(generation.id)
        statuses.append(generation.raw_status)
    assert "generating" in statuses and statuses[-1] == "completed"
    assert generation.video_expires_at is not None and generation.video_expires_at > datetime.now(UTC)

    destination = tmp_path / "out" / "video.mp4"
    # Capped as the pipeline caps it: by what this request can weigh, not by the 4 GiB ceiling.
    cap = client_config.max_video_bytes_for(make_request(image_path))
    size, sha256 = client.download(generation.video_url, destination, max_bytes=cap)
    data = destination.read_bytes()
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert data[4:8] == b"ftyp"
    assert os.listdir(destination.parent) == ["video.mp4"]  # no temporary leftovers


def test_wait_polls_a_few_times_around_the_expected_time(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    client = make_client(client_config)
    generation = client.submit(make_request(image_path))
    polls: list[Generation] = []
    done = client.wait(
        generation.id, deadline_s=10, expected_seconds=client_config.expected_seconds, on_poll=polls.append
    )
    assert done.status == "completed" and done.video_url
    assert polls[-1] == done and 1 <= len(polls) <= 4
    assert counts(emulator, GET) == {"200": len(polls)}


def test_failed_generation_is_terminal_with_its_error(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    emulator.update_faults(error_rate=1.0)
    client = make_client(client_config)
    generation = client.submit(make_request(image_path))
    done = client.wait(generation.id, deadline_s=10)
    assert (done.raw_status, done.status, done.is_terminal) == ("error", "failed", True)
    assert done.error and done.video_url is None


def test_wait_timeout_carries_the_last_generation(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    client = make_client(client_config)
    generation = client.submit(make_request(image_path))
    with pytest.raises(WaitTimeout) as timed_out:
        client.wait(generation.id, deadline_s=0.0, expected_seconds=30.0)
    assert timed_out.value.generation is not None
    assert timed_out.value.generation.id == generation.id and timed_out.value.generation.status == "pending"
    assert counts(emulator, GET) == {"200": 1}  # one last look at the deadline


def test_dropped_create_is_outcome_unknown_and_was_accepted(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    emulator.update_faults(create_drop_rate=1.0)
    client = make_client(client_config)
    with pytest.raises(CreateOutcomeUnknown, match="answer was lost"):
        client.submit(make_request(image_path))
    assert emulator.stats()["accepted_creates"] == 1  # paid for: exactly why it must not be retried
    poll_until(lambda: counts(emulator, CREATE) == {"dropped": 1})


def test_create_read_timeout_after_sending_is_outcome_unknown(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], tmp_path: Path
) -> None:
    # A ~3 MB noise image keeps the emulator busy decoding well past the 1 ms read timeout.
    noisy = tmp_path / "noise.png"
    Image.frombytes("RGB", (1000, 1000), random.Random(3).randbytes(3_000_000)).save(noisy, format="PNG")
    client = make_client(dataclasses.replace(client_config, read_timeout=0.001))
    with pytest.raises(CreateOutcomeUnknown, match="ReadTimeout"):
        client.submit(make_request(noisy))
    # The emulator finishes (and counts) the request after the client has given up on it.
    poll_until(lambda: sum(counts(emulator, CREATE).values()) == 1)
    assert emulator.stats()["accepted_creates"] == 1


@pytest.mark.parametrize("status", [429, 502, 503])
def test_create_surely_not_accepted_is_retried(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path, status: int
) -> None:
    emulator.update_faults(**{f"create_{status}_rate": 1.0})
    slept: list[float] = []

    def sleep_then_recover(seconds: float) -> None:
        slept.append(seconds)
        emulator.update_faults(**{f"create_{status}_rate": 0.0})

    client = make_client(client_config, sleep=sleep_then_recover)
    generation = client.submit(make_request(image_path), request_key=REQUEST_KEY)
    assert generation.client_request_id == f"wanp-{REQUEST_KEY}-1.2"
    assert counts(emulator, CREATE) == {str(status): 1, "200": 1}
    assert emulator.stats()["accepted_creates"] == 1
    assert len(slept) == 1 and 0 <= slept[0] <= client_config.backoff_base_s


def test_retry_after_is_honoured_then_retries_run_out(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    emulator.update_faults(create_429_rate=1.0, create_429_retry_after_rate=1.0, retry_after_s=0.7)
    slept: list[float] = []
    retries: list[RetryEvent] = []
    client = make_client(client_config, sleep=slept.append, on_retry=retries.append)
    with pytest.raises(CreateNotAccepted) as refused:
        client.submit(make_request(image_path), request_key=REQUEST_KEY)
    assert slept == [0.7, 0.7]
    assert [(event.operation, event.delay_s) for event in retries] == [("create", 0.7), ("create", 0.7)]
    assert "retry-after 0.7 s" in retries[0].reason
    assert refused.value.status_code == 429
    assert refused.value.client_request_id == f"wanp-{REQUEST_KEY}-1.3"
    assert counts(emulator, CREATE) == {"429": client_config.max_attempts}
    assert emulator.stats()["accepted_creates"] == 0


def test_retry_after_past_the_time_budget_gives_up_at_once(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    emulator.update_faults(create_429_rate=1.0, create_429_retry_after_rate=1.0, retry_after_s=30.0)
    slept: list[float] = []
    client = make_client(client_config, sleep=slept.append)
    with pytest.raises(CreateNotAccepted):
        client.submit(make_request(image_path))
    assert slept == [] and counts(emulator, CREATE) == {"429": 1}


def test_create_without_connection_is_retried_then_not_accepted(
    client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    retries: list[RetryEvent] = []
    client = make_client(
        dataclasses.replace(client_config, base_url=closed_port_url()), on_retry=retries.append
    )
    with pytest.raises(CreateNotAccepted, match="ConnectError"):
        client.submit(make_request(image_path))
    assert len(retries) == client_config.max_attempts - 1
    assert all(event.reason.startswith("ConnectError") for event in retries)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_get_retries_transient_statuses(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path, status: int
) -> None:
    client = make_client(
        client_config, sleep=lambda _s: emulator.update_faults(**{f"get_{status}_rate": 0.0})
    )
    generation = client.submit(make_request(image_path))
    emulator.update_faults(**{f"get_{status}_rate": 1.0})
    assert client.get(generation.id).id == generation.id
    assert counts(emulator, GET) == {str(status): 1, "200": 1}


@pytest.mark.parametrize(
    ("status", "error_class"), [(429, RateLimited), (500, ServerError), (503, ServerError)]
)
def test_get_errors_once_retries_run_out(
    emulator: Any,
    client_config: ClientConfig,
    make_client: Callable[..., Any],
    image_path: Path,
    status: int,
    error_class: type[ApiError],
) -> None:
    client = make_client(client_config, sleep=lambda _s: None)
    generation = client.submit(make_request(image_path))
    emulator.update_faults(**{f"get_{status}_rate": 1.0})
    with pytest.raises(error_class) as failed:
        client.get(generation.id)
    assert failed.value.status_code == status
    assert counts(emulator, GET) == {str(status): client_config.max_attempts}


def test_get_without_connection_is_a_transport_error(
    client_config: ClientConfig, make_client: Callable[..., Any]
) -> None:
    client = make_client(
        dataclasses.replace(client_config, base_url=closed_port_url()), sleep=lambda _s: None
    )
    with pytest.raises(TransportError, match="ConnectError"):
        client.get("some-id")


def test_unknown_generation_is_not_found_without_retry(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any]
) -> None:
    with pytest.raises(GenerationNotFound) as missing:
        make_client(client_config).get("no-such-generation")
    assert missing.value.status_code == 404
    assert counts(emulator, GET) == {"404": 1}


def test_wrong_key_is_an_authentication_error_that_hides_the_key(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    wrong = Secret("sk-wrong-key-never-shown-31337")
    client = make_client(dataclasses.replace(client_config, api_key=wrong))
    with pytest.raises(AuthenticationError) as refused:
        client.submit(make_request(image_path))
    assert refused.value.status_code == 401
    assert counts(emulator, CREATE) == {"401": 1} and emulator.stats()["accepted_creates"] == 0
    for text in (str(refused.value), repr(refused.value), repr(client), repr(client_config)):
        assert wrong.reveal() not in text and client_config.api_key.reveal() not in text


def test_local_media_errors_raise_before_any_call(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], tmp_path: Path
) -> None:
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(png_bytes(100, 100))
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    client = make_client(client_config)
    for reference in (tiny, not_image, tmp_path / "missing.png"):
        with pytest.raises(MediaError):
            client.submit(make_request(reference))
    assert emulator.stats()["requests"].get(CREATE, {}) == {}


def test_expired_video_url_is_refreshed_by_polling_again(
    client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path, tmp_path: Path
) -> None:
    config = EmulatorConfig(latency_s=0.2, seed=2, url_ttl_s=0.5, api_key=client_config.api_key.reveal())
    with running_emulator(config) as short_lived:
        client = make_client(dataclasses.replace(client_config, base_url=short_lived.base_url))
        done = client.wait(client.submit(make_request(image_path)).id, deadline_s=10, expected_seconds=0.2)
        assert done.video_expires_at is not None
        poll_until(lambda: time.time() >= done.video_expires_at.timestamp())

        destination = tmp_path / "video.mp4"
        with pytest.raises(DownloadExpired) as expired:
            client.download(done.video_url, destination)
        assert expired.value.status_code == 403
        assert "Signature" not in str(expired.value)  # the signed query stays out of messages
        assert list(tmp_path.iterdir()) == [image_path]  # no final file, no partial

        fresh = client.get(done.id)
        assert fresh.video_url != done.video_url and fresh.video_expires_at > done.video_expires_at
        size, _sha256 = client.download(fresh.video_url, destination)
        assert size == destination.stat().st_size > 0


def test_download_larger_than_declared_limit_writes_nothing(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], tmp_path: Path
) -> None:
    client = make_client(dataclasses.replace(client_config, max_download_bytes=1000))
    with pytest.raises(DownloadTooLarge):
        client.download(f"{emulator.base_url}/_emulator/blob/5000", tmp_path / "big.bin")
    assert list(tmp_path.iterdir()) == []


def test_an_oversize_video_is_refused_by_the_requests_cap_and_nothing_is_kept(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    request = make_request(image_path)
    cap = client_config.max_video_bytes_for(request)
    client = make_client(client_config, sleep=lambda _s: None)
    done = client.wait(client.submit(request).id, deadline_s=10)
    emulator.update_faults(oversize_video_bytes=cap + 1)
    destination = image_path.parent / "out" / "video.mp4"
    destination.parent.mkdir()
    with pytest.raises(DownloadTooLarge):
        client.download(done.video_url, destination, max_bytes=cap)
    assert list(destination.parent.iterdir()) == []


@pytest.mark.parametrize("status", [500, 504])
@pytest.mark.parametrize("charged", [False, True], ids=["not created", "created and charged"])
def test_an_ambiguous_create_is_in_doubt_and_never_retried(
    emulator: Any,
    client_config: ClientConfig,
    make_client: Callable[..., Any],
    image_path: Path,
    status: int,
    charged: bool,
) -> None:
    # The client cannot tell these apart, and must not: both are in doubt, neither is retried.
    emulator.update_faults(**{f"create_{status}{'_after_create' if charged else ''}_rate": 1.0})
    retries: list[RetryEvent] = []
    events: list[CreateTry] = []
    client = make_client(client_config, on_retry=retries.append)
    with pytest.raises(CreateOutcomeUnknown) as unknown:
        client.submit(make_request(image_path), request_key=REQUEST_KEY, on_try=events.append)
    assert counts(emulator, CREATE) == {str(status): 1} and retries == []
    assert unknown.value.created is None and unknown.value.status_code == status
    assert unknown.value.client_request_id == f"wanp-{REQUEST_KEY}-1.1"
    assert [(e.phase, e.created, e.status_code) for e in events] == [
        ("sending", None, None),
        ("answered", None, status),
    ]
    stats = emulator.stats()
    assert stats["accepted_creates"] == int(charged) and (stats["credits_charged"] > 0) == charged


def test_a_revoked_key_is_an_authentication_error_that_bought_nothing(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    emulator.update_faults(auth_fail_after_creates=1)
    client = make_client(client_config)
    client.submit(make_request(image_path))
    with pytest.raises(AuthenticationError) as refused:
        client.submit(make_request(image_path, seed=8), request_key=REQUEST_KEY)
    assert refused.value.created is False and refused.value.client_request_id == f"wanp-{REQUEST_KEY}-1.1"
    assert emulator.stats()["accepted_creates"] == 1


# 8 bytes a second, 2 at a time: every read gets data within the read timeout, so only the
# whole-call deadline can end these calls.
TRICKLE = {"trickle_bytes_per_s": 8.0}


def test_a_trickling_create_answer_hits_its_deadline_and_stays_in_doubt(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    emulator.update_faults(create_trickle_rate=1.0, **TRICKLE)
    client = make_client(dataclasses.replace(client_config, create_deadline_s=0.5))
    with pytest.raises(CreateOutcomeUnknown, match="within") as unknown:
        client.submit(make_request(image_path))
    assert unknown.value.created is None
    assert emulator.stats()["accepted_creates"] == 1  # the server did create it: in doubt is right


def test_a_trickling_poll_answer_hits_its_deadline(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    client = make_client(dataclasses.replace(client_config, get_deadline_s=0.5))
    generation = client.submit(make_request(image_path))
    emulator.update_faults(get_trickle_rate=1.0, **TRICKLE)
    with pytest.raises(DeadlineExceeded, match="0.5 s"):
        client.get(generation.id)
    assert counts(emulator, GET) == {"200": 1}  # not retried: the deadline covers the retries too


def test_a_trickling_download_hits_its_deadline_and_leaves_no_file(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], image_path: Path
) -> None:
    client = make_client(dataclasses.replace(client_config, download_deadline_s=0.5), sleep=lambda _s: None)
    done = client.wait(client.submit(make_request(image_path)).id, deadline_s=10)
    emulator.update_faults(download_trickle_rate=1.0, **TRICKLE)
    destination = image_path.parent / "out" / "video.mp4"
    destination.parent.mkdir()
    with pytest.raises(DeadlineExceeded):
        client.download(done.video_url, destination)
    assert list(destination.parent.iterdir()) == []


def test_download_cut_midway_leaves_no_final_file(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], tmp_path: Path
) -> None:
    # The emulator sends 1 KiB every 0.5 s at this rate: the first chunk arrives, then the read times out.
    emulator.update_faults(download_bytes_per_s=2048)
    client = make_client(dataclasses.replace(client_config, read_timeout=0.2, max_attempts=1))
    destination = tmp_path / "partial.bin"
    with pytest.raises(TransportError, match="ReadTimeout"):
        client.download(f"{emulator.base_url}/_emulator/blob/8192", destination)
    assert list(tmp_path.iterdir()) == []


def test_blob_download_hashes_what_it_streams(
    emulator: Any, client_config: ClientConfig, make_client: Callable[..., Any], tmp_path: Path
) -> None:
    size = 3 * 1024 * 1024 + 17  # several chunks
    destination = tmp_path / "blob.bin"
    written, sha256 = make_client(client_config).download(
        f"{emulator.base_url}/_emulator/blob/{size}", destination
    )
    assert written == size == destination.stat().st_size
    assert sha256 == hashlib.sha256(destination.read_bytes()).hexdigest()


def test_download_never_sends_the_key_to_the_video_host(
    emulator: Any, client_config: ClientConfig, image_path: Path, tmp_path: Path
) -> None:
    seen: dict[str, str | None] = {}

    def record(request: httpx.Request) -> None:
        seen[request.url.path] = request.headers.get("authorization")

    # Even an injected client that carries the key as a default header must not leak it to the CDN.
    bearer = f"Bearer {client_config.api_key.reveal()}"
    http = httpx.Client(headers={"Authorization": bearer}, event_hooks={"request": [record]})
    with http, AimlApiClient(client_config, http_client=http) as client:
        done = client.wait(client.submit(make_request(image_path)).id, deadline_s=10)
        client.download(done.video_url, tmp_path / "video.mp4")
    assert seen["/v2/video/generations"] == bearer
    assert seen[f"/_emulator/videos/{done.id}.mp4"] is None


def test_provider_rejection_maps_to_request_rejected(emulator: Any, client_config: ClientConfig) -> None:
    # The client never sends an invalid body, so post one directly and map the emulator's real answer.
    response = httpx.post(
        f"{emulator.base_url}/v2/video/generations",
        headers={"Authorization": f"Bearer {client_config.api_key.reveal()}"},
        json={"model": "alibaba/wan-2-6-i2v", "prompt": "x", "image_url": HTTP_IMAGE, "resolution": "480p"},
    )
    error = error_from_reply(Reply(response.status_code, response.headers, response.content), what="create")
    assert isinstance(error, RequestRejected) and error.status_code == 400 and error.request_id
    assert "Body validation error!" in error.message and "'480p'" in error.message
    assert error.details and error.details[0]["path"] == ["resolution"]


def test_async_client_bounds_calls_in_flight(
    emulator: Any, client_config: ClientConfig, image_path: Path
) -> None:
    in_flight, peak = 0, 0

    async def started(_request: httpx.Request) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)

    async def answered(_response: httpx.Response) -> None:
        nonlocal in_flight
        in_flight -= 1

    async def scenario() -> list[Generation]:
        http = httpx.AsyncClient(event_hooks={"request": [started], "response": [answered]})
        config = dataclasses.replace(client_config, max_concurrency=2)
        async with http, AsyncAimlApiClient(config, http_client=http) as client:
            return await asyncio.gather(*(client.submit(make_request(image_path, seed=s)) for s in range(6)))

    generations = asyncio.run(scenario())
    assert len({generation.id for generation in generations}) == 6
    assert peak <= 2


def test_api_key_never_reaches_logs_exceptions_reprs_events_or_files(
    emulator: Any,
    client_config: ClientConfig,
    make_client: Callable[..., Any],
    image_path: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("wan_pipeline.api", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    key = client_config.api_key.reveal()
    client = make_client(client_config, sleep=lambda _s: None)
    events: list[CreateTry] = []
    done = client.wait(client.submit(make_request(image_path), on_try=events.append).id, deadline_s=10)
    client.download(done.video_url, tmp_path / "video.mp4")
    errors: list[BaseException] = []
    emulator.update_faults(create_500_rate=1.0, get_503_rate=1.0)
    for call in (
        lambda: client.submit(make_request(image_path), on_try=events.append),
        lambda: client.get(done.id),
    ):
        with pytest.raises(ApiError) as failed:
            call()
        errors.append(failed.value)
    wrong = make_client(dataclasses.replace(client_config, api_key=Secret(key + "-wrong")))
    with pytest.raises(AuthenticationError) as refused:
        wrong.get(done.id)
    errors.append(refused.value)

    assert any(record.name.startswith("httpcore") for record in caplog.records)  # the capture works
    assert any(record.name == "wan_pipeline.api" for record in caplog.records)
    texts = [caplog.text, *(record.getMessage() for record in caplog.records)]
    texts += [str(error) for error in errors] + [repr(error) for error in errors]
    texts += [repr(vars(error)) for error in errors] + [repr(event) for event in events]
    shells = [getattr(c, "client", c) for c in (client, wrong)]  # the async shell inside its wrapper
    texts += [repr(client), repr(wrong), repr(client_config), repr(done)] + [repr(vars(s)) for s in shells]
    assert len(events) == 4
    for text in texts:
        assert key not in text
        assert "base64," not in text  # nor the image the body carried
    for written in tmp_path.rglob("*"):
        assert not written.is_file() or key.encode() not in written.read_bytes()


def test_counted_bytes_over_the_limit_abort_the_atomic_write(tmp_path: Path) -> None:
    # Servers may send no Content-Length (or a wrong one): the count while streaming is the real guard.
    destination = tmp_path / "video.mp4"
    with pytest.raises(DownloadTooLarge), atomic_writer(destination) as handle:
        sink = DownloadSink(handle, max_bytes=10)
        for chunk in (b"12345", b"67890", b"x"):
            sink.write(chunk)
    assert list(tmp_path.iterdir()) == []


def test_config_from_settings_with_overrides() -> None:
    settings = load_settings({"AIMLAPI_API_KEY": "sk-from-env", "AIMLAPI_BASE_URL": "http://127.0.0.1:9/"})
    config = ClientConfig.from_settings(settings, max_attempts=2)
    assert (config.base_url, config.max_attempts) == ("http://127.0.0.1:9", 2)
    assert config.api_key is not None and config.api_key.reveal() == "sk-from-env"


def test_a_local_image_is_encoded_once_until_it_changes(tmp_path, monkeypatch) -> None:
    from PIL import Image

    from wan_pipeline import sources

    path = tmp_path / "frame.png"
    Image.new("RGB", (400, 400), (10, 20, 30)).save(path)
    reads: list[Path] = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real_read(self))

    def wire() -> tuple[str, str | None]:
        return sources.wire_reference(str(path), "image", WAN_2_6_I2V, allowed_roots=[tmp_path])

    first = wire()
    assert first[1] == hashlib.sha256(real_read(path)).hexdigest()
    assert wire() == first and len(reads) == 1
    Image.new("RGB", (500, 400), (200, 20, 30)).save(path)  # edited in place: new size and mtime
    changed_uri, changed_sha256 = wire()
    assert changed_uri != first[0] and len(reads) == 2
    assert base64.b64decode(changed_uri.split(",", 1)[1]) == real_read(path)
    assert changed_sha256 == hashlib.sha256(real_read(path)).hexdigest()
