"""The emulator follows the provider's contract, over real loopback HTTP."""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
import wave
from collections.abc import Iterator
from datetime import datetime

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from wan_pipeline.emulator import (
    EmulatorConfig,
    FaultConfig,
    add_cli_arguments,
    config_from_args,
    running_emulator,
)
from wan_pipeline.models import canonical_json

MODEL = "alibaba/wan-2-6-i2v"
PATH = "/v2/video/generations"
AUTH = {"Authorization": "Bearer test-key"}


def png_uri(width: int = 480, height: int = 360) -> str:
    image = Image.fromarray(
        np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_uri(seconds: float = 4.0, rate: int = 16_000) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        t = np.arange(int(seconds * rate)) / rate
        handle.writeframes((np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16).tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(**fields) -> dict:
    return {
        "model": MODEL,
        "prompt": "a slow pan over a test card",
        "image_url": png_uri(),
        "duration": 5,
    } | fields


@pytest.fixture
def emulator_client(request) -> Iterator[tuple]:
    """(emulator, httpx client) for an EmulatorConfig given by `@pytest.mark.parametrize(indirect)` or defaults."""
    config = getattr(request, "param", None) or EmulatorConfig(latency_s=0.3, small_frames=True)
    with (
        running_emulator(config) as emu,
        httpx.Client(base_url=emu.base_url, headers=AUTH, timeout=10) as client,
    ):
        yield emu, client


def fast(**overrides) -> EmulatorConfig:
    return EmulatorConfig(**({"latency_s": 0.3, "small_frames": True} | overrides))


def wait_terminal(client: httpx.Client, generation_id: str, timeout_s: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = client.get(PATH, params={"generation_id": generation_id})
        assert answer.status_code == 200, answer.text
        if answer.json()["status"] in ("completed", "error"):
            return answer.json()
        time.sleep(0.02)
    raise AssertionError(f"{generation_id} did not finish within {timeout_s} s")


def assert_provider_error(answer: httpx.Response, status: int) -> dict:
    assert answer.status_code == status
    payload = answer.json()
    assert payload["statusCode"] in (status, str(status))
    assert payload["path"] == answer.request.url.path
    uuid.UUID(payload["requestId"])
    datetime.fromisoformat(payload["timestamp"])
    assert payload["message"]
    return payload


def probe(mp4: bytes) -> dict:
    with av.open(io.BytesIO(mp4)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        return {
            "size": (video.codec_context.width, video.codec_context.height),
            "codec": video.codec_context.name,
            "pix_fmt": video.codec_context.pix_fmt,
            "frames": frames,
            "fps": float(video.average_rate),
            "duration": container.duration / 1_000_000,
            "audio": [stream.codec_context.name for stream in container.streams.audio],
            "comment": container.metadata.get("comment"),
        }


@pytest.mark.parametrize("emulator_client", [fast(latency_s=1.0, queued_fraction=0.4)], indirect=True)
def test_generation_goes_queued_generating_completed_by_wall_clock(emulator_client):
    emu, client = emulator_client
    created = client.post(PATH, json=body())
    assert created.status_code == 200
    generation_id = created.json()["id"]
    seen = [created.json()["status"]]
    deadline = time.monotonic() + 15
    while seen[-1] != "completed" and time.monotonic() < deadline:
        status = client.get(PATH, params={"generation_id": generation_id}).json()["status"]
        if status != seen[-1]:
            seen.append(status)
        time.sleep(0.02)
    assert seen == ["queued", "generating", "completed"]
    record = emu.stats()["generations"][generation_id]
    assert record["completes_at"] - record["created_at"] == pytest.approx(1.0)
    assert record["polls"] >= 2


def test_create_answers_like_the_provider(emulator_client):
    _, client = emulator_client
    answer = client.post(PATH, json=body(resolution="1080p"), headers={"X-Client-Request-Id": "run-7:req.1"})
    assert answer.status_code == 200
    generation_id = answer.json()["id"]
    assert answer.json() == {
        "id": generation_id,
        "status": "queued",
        "meta": {"usage": {"credits_used": 1_575_000}},
    }
    assert answer.headers["x-inference-id"] == generation_id
    assert answer.headers["x-aimlapi-credits-used"] == "1575000"
    assert float(answer.headers["x-aimlapi-usd-spent"]) == pytest.approx(0.7875)
    assert answer.headers["x-client-request-id"] == "run-7:req.1"

    # 720p is priced at the emulator's assumed $0.105/s.
    answer = client.post(PATH, json=body(resolution="720p", duration=10))
    assert answer.json()["meta"]["usage"]["credits_used"] == 2_100_000
    assert "x-client-request-id" not in answer.headers
    polled = client.get(
        PATH, params={"generation_id": generation_id}, headers={"X-Client-Request-Id": "poll-1"}
    )
    assert polled.headers["x-inference-id"] == generation_id
    assert polled.headers["x-client-request-id"] == "poll-1"


def test_duration_accepts_integer_or_numeric_string(emulator_client):
    emu, client = emulator_client
    for duration, credits in (("5", 1_575_000), (10, 3_150_000), ("15", 4_725_000)):
        answer = client.post(PATH, json=body(duration=duration))
        assert answer.status_code == 200, answer.text
        assert answer.json()["meta"]["usage"]["credits_used"] == credits
    wrong = assert_provider_error(client.post(PATH, json=body(duration="7")), 400)
    assert wrong["errors"][0]["message"] == "Invalid enum value. Expected 5 | 10 | 15, received '7'"
    wrong = assert_provider_error(client.post(PATH, json=body(duration="five")), 400)
    assert wrong["errors"][0]["message"] == "Expected number, received string"
    assert emu.stats()["accepted_creates"] == 3


@pytest.mark.parametrize(
    ("fields", "path", "message"),
    [
        (
            {"resolution": "480p"},
            ["resolution"],
            "Invalid enum value. Expected '720p' | '1080p', received '480p'",
        ),
        ({"prompt": None}, ["prompt"], "Expected string, received null"),
        (
            {"shot_type": "wide"},
            ["shot_type"],
            "Invalid enum value. Expected 'single' | 'multi', received 'wide'",
        ),
        ({"generate_audio": "yes"}, ["generate_audio"], "Expected boolean, received string"),
        ({"seed": -1}, ["seed"], "Number must be greater than or equal to 0"),
        ({"image_url": png_uri(200, 200)}, ["image_url"], "each side 360-2000 px"),
        ({"image_url": "data:image/png;base64,aGVsbG8="}, ["image_url"], "not a readable image"),
        ({"image_url": "data:image/png;base64,@@@"}, ["image_url"], "malformed data URI"),
        ({"image_url": "data:image/png,rawbytes"}, ["image_url"], "Invalid data URI"),
        ({"image_url": "/etc/passwd"}, ["image_url"], "Invalid url"),
        ({"audio_url": wav_uri(seconds=1)}, ["audio_url"], "allowed: 3-30 s"),
        (
            {"model": "alibaba/wan-9"},
            ["model"],
            "Invalid enum value. Expected 'alibaba/wan-2-6-i2v', received",
        ),
    ],
)
def test_invalid_bodies_get_the_providers_400(emulator_client, fields, path, message):
    emu, client = emulator_client
    payload = assert_provider_error(client.post(PATH, json=body(**fields)), 400)
    assert payload["message"] == "Body validation error!"
    assert payload["errors"][0]["path"] == path
    assert message in payload["errors"][0]["message"]
    assert emu.stats()["accepted_creates"] == 0


def test_every_problem_is_listed_and_missing_fields_are_required(emulator_client):
    _, client = emulator_client
    payload = assert_provider_error(client.post(PATH, json={"model": MODEL, "resolution": "4k"}), 400)
    problems = {tuple(issue["path"]): issue["message"] for issue in payload["errors"]}
    assert problems[("prompt",)] == "Required"
    assert problems[("image_url",)] == "Required"
    assert problems[("resolution",)].startswith("Invalid enum value.")
    assert_provider_error(
        client.post(PATH, content=b"{not json", headers={"Content-Type": "application/json"}), 400
    )
    assert_provider_error(client.post(PATH, json=["a", "list"]), 400)


@pytest.mark.parametrize("emulator_client", [fast(api_key="s3cret-key")], indirect=True)
def test_configured_api_key_is_required_on_api_calls(emulator_client):
    emu, client = emulator_client
    assert "s3cret-key" not in repr(emu.config)
    assert_provider_error(client.post(PATH, json=body(), headers={"Authorization": ""}), 401)
    assert_provider_error(client.post(PATH, json=body(), headers={"Authorization": "Bearer wrong"}), 401)
    assert_provider_error(
        client.get(PATH, params={"generation_id": "x"}, headers={"Authorization": "Basic s3cret-key"}), 401
    )
    good = {"Authorization": "Bearer s3cret-key"}
    created = client.post(PATH, json=body(), headers=good)
    assert created.status_code == 200
    assert client.get(PATH, params={"generation_id": created.json()["id"]}, headers=good).status_code == 200
    assert emu.stats()["requests"]["POST /v2/video/generations"] == {"401": 2, "200": 1}


def test_any_bearer_key_is_accepted_when_none_is_configured_but_the_header_is_required(emulator_client):
    _, client = emulator_client
    assert client.post(PATH, json=body(), headers={"Authorization": "Bearer whatever"}).status_code == 200
    assert_provider_error(httpx.post(str(client.base_url) + PATH, json=body()), 401)


def test_unknown_generation_is_404_and_the_id_is_required(emulator_client):
    _, client = emulator_client
    assert_provider_error(client.get(PATH, params={"generation_id": "V2cdWP9kao8xiofM-OvwG"}), 404)
    payload = assert_provider_error(client.get(PATH), 400)
    assert payload["errors"][0]["path"] == ["generation_id"]


@pytest.mark.parametrize("emulator_client", [fast(url_ttl_s=1.0)], indirect=True)
def test_video_url_expires_with_403_and_a_new_poll_signs_a_fresh_one(emulator_client):
    _, client = emulator_client
    generation_id = client.post(PATH, json=body()).json()["id"]
    first_url = wait_terminal(client, generation_id)["video"]["url"]
    assert first_url.startswith(f"{client.base_url}/_emulator/videos/{generation_id}.mp4?Expires=")
    video = httpx.get(first_url)  # a signed URL needs no API key
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert int(video.headers["content-length"]) == len(video.content)
    assert httpx.get(first_url.replace("Signature=", "Signature=x")).status_code == 403

    deadline = time.monotonic() + 5
    while (refused := httpx.get(first_url)).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused.status_code == 403
    fresh_url = client.get(PATH, params={"generation_id": generation_id}).json()["video"]["url"]
    assert fresh_url != first_url
    assert httpx.get(fresh_url).content == video.content
    assert httpx.get(fresh_url.replace(generation_id, "unknown-id")).status_code == 404


@pytest.mark.parametrize("emulator_client", [fast(faults=FaultConfig(error_rate=1.0))], indirect=True)
def test_error_outcome_carries_name_and_message(emulator_client):
    _, client = emulator_client
    created = client.post(PATH, json=body())
    assert created.status_code == 200  # the failure only shows once the generation ends
    final = wait_terminal(client, created.json()["id"])
    assert final["status"] == "error"
    assert final["error"]["name"] and final["error"]["message"]
    assert "video" not in final


def create_outcomes(client: httpx.Client, count: int) -> list[tuple[int, str | None]]:
    answers = [client.post(PATH, json=body(image_url="https://example.com/a.jpg")) for _ in range(count)]
    return [(answer.status_code, answer.headers.get("retry-after")) for answer in answers]


MIXED_FAULTS = FaultConfig(
    create_429_rate=0.3,
    create_429_retry_after_rate=0.5,
    retry_after_s=2,
    create_500_rate=0.1,
    create_503_rate=0.1,
)


@pytest.mark.parametrize("emulator_client", [fast(seed=11, faults=MIXED_FAULTS)], indirect=True)
def test_create_faults_follow_a_seeded_sequence(emulator_client):
    emu, client = emulator_client
    first = create_outcomes(client, 30)
    accepted = emu.stats()["accepted_creates"]
    emu.reset_stats()  # restarts every seeded stream
    assert create_outcomes(client, 30) == first
    statuses = {status for status, _ in first}
    assert statuses == {200, 429, 500, 503}
    assert {after for status, after in first if status == 429} == {"2", None}
    assert accepted == sum(1 for status, _ in first if status == 200)  # failed creates create nothing

    with running_emulator(fast(seed=12, faults=MIXED_FAULTS)) as other:
        with httpx.Client(base_url=other.base_url, headers=AUTH) as other_client:
            assert create_outcomes(other_client, 30) != first


@pytest.mark.parametrize("code", ["429", "500", "502", "503", "504"])
def test_each_fault_kind_answers_its_status_on_create_and_poll(code):
    faults = FaultConfig(**{f"create_{code}_rate": 1.0, f"get_{code}_rate": 1.0})
    with (
        running_emulator(fast(faults=faults)) as emu,
        httpx.Client(base_url=emu.base_url, headers=AUTH) as client,
    ):
        assert_provider_error(client.post(PATH, json=body()), int(code))
        assert_provider_error(client.get(PATH, params={"generation_id": "any"}), int(code))
        assert emu.stats()["accepted_creates"] == 0


@pytest.mark.parametrize(
    "emulator_client",
    [fast(faults=FaultConfig(create_429_rate=1.0, create_429_retry_after_rate=1.0, retry_after_s=0.5))],
    indirect=True,
)
def test_rate_limit_carries_retry_after_and_the_documented_string_status(emulator_client):
    _, client = emulator_client
    answer = client.post(PATH, json=body())
    payload = assert_provider_error(answer, 429)
    assert payload == payload | {"message": "Too Many Requests", "statusCode": "429"}
    assert answer.headers["retry-after"] == "0.5"


@pytest.mark.parametrize("emulator_client", [fast(faults=FaultConfig(create_drop_rate=1.0))], indirect=True)
def test_dropped_create_is_accepted_but_never_answered(emulator_client):
    emu, client = emulator_client
    request_body = body(image_url="https://example.com/dropped.png")
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(PATH, json=request_body, headers={"X-Client-Request-Id": "lost-1"})
    stats = emu.stats()
    assert stats["accepted_creates"] == 1
    assert stats["requests"]["POST /v2/video/generations"] == {"dropped": 1}
    assert stats["creates_by_body_hash"] == {
        hashlib.sha256(canonical_json(request_body).encode()).hexdigest(): 1
    }
    ((generation_id, record),) = stats["generations"].items()
    assert record["client_request_id"] == "lost-1" and record["response_dropped"]
    assert wait_terminal(client, generation_id)["status"] == "completed"  # it was really created


@pytest.mark.parametrize("status", [500, 504])
def test_an_ambiguous_create_is_created_and_charged_then_answered_with_an_error(status):
    faults = FaultConfig(**{f"create_{status}_after_create_rate": 1.0})
    with (
        running_emulator(fast(faults=faults)) as emu,
        httpx.Client(base_url=emu.base_url, headers=AUTH) as client,
    ):
        assert_provider_error(
            client.post(PATH, json=body(), headers={"X-Client-Request-Id": "amb-1"}), status
        )
        stats = emu.stats()
        assert stats["accepted_creates"] == 1 and stats["credits_charged"] == 1_575_000
        ((generation_id, record),) = stats["generations"].items()
        assert record["client_request_id"] == "amb-1"
        assert wait_terminal(client, generation_id)["status"] == "completed"  # it really exists


@pytest.mark.parametrize(
    "emulator_client", [fast(faults=FaultConfig(auth_fail_after_creates=2))], indirect=True
)
def test_the_key_can_be_revoked_after_some_creates(emulator_client):
    emu, client = emulator_client
    assert [client.post(PATH, json=body(seed=n)).status_code for n in range(4)] == [200, 200, 401, 401]
    assert emu.stats()["accepted_creates"] == 2


@pytest.mark.parametrize(
    "emulator_client", [fast(faults=FaultConfig(auth_fail_after_creates=1, credit_limit=10**9))], indirect=True
)
def test_concurrent_creates_cannot_all_pass_the_accounts_checks(emulator_client):
    # The checks and the create are one step: eight creates at once buy exactly one.
    emu, client = emulator_client
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda n: client.post(PATH, json=body(seed=n)).status_code, range(8)))
    assert sorted(codes) == [200] + [401] * 7
    assert emu.stats()["accepted_creates"] == 1


def raw_chunks(client: httpx.Client, method: str, url: str, **options) -> tuple[int, list[bytes]]:
    with client.stream(method, url, **options) as answer:
        return answer.status_code, list(answer.iter_raw())


@pytest.mark.parametrize(
    "emulator_client",
    [
        fast(
            latency_s=0.0,
            faults=FaultConfig(create_trickle_rate=1.0, get_trickle_rate=1.0, trickle_bytes_per_s=80),
        )
    ],
    indirect=True,
)
def test_trickled_answers_arrive_a_few_bytes_at_a_time_and_stay_whole(emulator_client):
    _, client = emulator_client
    status, chunks = raw_chunks(client, "POST", PATH, json=body(image_url="https://example.com/t.png"))
    assert status == 200 and len(chunks) > 1 and max(map(len, chunks)) <= 20
    generation_id = json.loads(b"".join(chunks))["id"]
    status, chunks = raw_chunks(client, "GET", PATH, params={"generation_id": generation_id})
    assert status == 200 and len(chunks) > 1 and json.loads(b"".join(chunks))["id"] == generation_id


@pytest.mark.parametrize(
    "emulator_client",
    [fast(latency_s=0.0, faults=FaultConfig(oversize_video_bytes=3 * 1024**2))],
    indirect=True,
)
def test_oversize_videos_are_padded_to_the_asked_size_and_still_play(emulator_client):
    _, client = emulator_client
    created = client.post(PATH, json=body(image_url="https://example.com/big.png")).json()
    video = client.get(wait_terminal(client, created["id"])["video"]["url"])
    assert int(video.headers["content-length"]) == len(video.content) == 3 * 1024**2
    assert probe(video.content)["codec"] == "h264"


@pytest.mark.parametrize(
    "emulator_client",
    [fast(latency_s=0.0, small_frames=True, video_bytes=2_500_000,
          faults=FaultConfig(download_bytes_per_s=10_000_000))],
    indirect=True,
)
def test_benchmark_mode_serves_real_size_videos_at_a_capped_rate(emulator_client):
    _, client = emulator_client
    created = client.post(PATH, json=body(image_url="https://example.com/real.png")).json()
    url = wait_terminal(client, created["id"])["video"]["url"]
    started = time.monotonic()
    video = client.get(url)
    elapsed = time.monotonic() - started
    assert int(video.headers["content-length"]) == len(video.content) == 2_500_000
    assert probe(video.content)["codec"] == "h264"
    assert elapsed >= 0.2  # 2.5 MB at 10 MB/s: paced, not sent at loopback speed
    with pytest.raises(ValueError):
        fast(video_bytes=0)


def test_info_names_the_emulator_unless_told_to_pass_for_another_server():
    from wan_pipeline import __version__

    with running_emulator(fast()) as emu:
        answer = httpx.get(f"{emu.base_url}/_emulator/info")
        assert answer.json() == {"emulator": "wan-pipeline", "version": __version__}
    with running_emulator(fast(identify=False)) as emu:
        assert httpx.get(f"{emu.base_url}/_emulator/info").status_code == 404


# body() asks for 1080p 5 s: 1,575,000 credits. The account holds enough for two.
@pytest.mark.parametrize("emulator_client", [fast(faults=FaultConfig(credit_limit=3_150_000))], indirect=True)
def test_out_of_credits_answers_403_and_charges_nothing(emulator_client):
    emu, client = emulator_client
    assert [client.post(PATH, json=body(seed=n)).status_code for n in range(3)] == [200, 200, 403]
    payload = assert_provider_error(client.post(PATH, json=body(seed=9)), 403)
    assert "credits" in payload["message"]
    assert emu.stats()["accepted_creates"] == 2


def test_faults_can_change_at_runtime_over_http_and_in_process(emulator_client):
    emu, client = emulator_client
    changed = client.post("/_emulator/faults", json={"create_503_rate": 1.0})
    assert changed.status_code == 200 and changed.json()["create_503_rate"] == 1.0
    assert client.post(PATH, json=body()).status_code == 503
    assert_provider_error(client.post("/_emulator/faults", json={"create_999_rate": 1.0}), 400)
    assert_provider_error(client.post("/_emulator/faults", json={"create_429_rate": 0.9}), 400)  # sum > 1
    assert_provider_error(client.post("/_emulator/faults", json={"create_500_after_create_rate": 0.5}), 400)
    hostile = {"download_trickle_rate": 1.0, "oversize_video_bytes": 5000, "auth_fail_after_creates": 0}
    assert (
        client.post("/_emulator/faults", json=hostile).json() | hostile
        == client.get("/_emulator/stats").json()["faults"]
    )
    for bad in (
        {"oversize_video_bytes": 1.5},
        {"trickle_bytes_per_s": None},
        {"auth_fail_after_creates": -1},
    ):
        assert_provider_error(client.post("/_emulator/faults", json=bad), 400)
    assert client.post(PATH, json=body()).status_code == 401  # revoked after 0 creates
    client.post("/_emulator/faults", json={"auth_fail_after_creates": None, "download_trickle_rate": 0.0})
    assert emu.update_faults(create_503_rate=0.0).create_503_rate == 0.0
    assert client.post(PATH, json=body()).status_code == 200
    with pytest.raises(ValueError):
        emu.update_faults(get_500_rate=1.5)


@pytest.mark.parametrize(
    "emulator_client", [fast(latency_s=0.5, latency_jitter_s=0.3, seed=5)], indirect=True
)
def test_latency_jitter_is_seeded(emulator_client):
    emu, client = emulator_client

    def latencies() -> list[float]:
        for _ in range(4):
            client.post(PATH, json=body(image_url="https://example.com/j.png"))
        records = emu.stats()["generations"].values()
        return [
            round(r["completes_at"] - r["created_at"], 6)
            for r in sorted(records, key=lambda r: r["created_at"])
        ]

    first = latencies()
    emu.reset_stats()
    assert latencies() == first
    assert all(0.2 <= value <= 0.8 for value in first) and len(set(first)) == 4


@pytest.mark.parametrize("emulator_client", [EmulatorConfig(latency_s=0.0)], indirect=True)
def test_videos_are_real_h264_at_the_requested_size_and_duration(emulator_client):
    _, client = emulator_client
    landscape = client.post(PATH, json=body(resolution="720p", image_url=png_uri(640, 400))).json()["id"]
    portrait = client.post(
        PATH, json=body(resolution="1080p", image_url=png_uri(400, 640), generate_audio=False)
    ).json()["id"]
    # Status follows the clock alone: completed at once, the download waits for the encode.
    assert client.get(PATH, params={"generation_id": portrait}).json()["status"] == "completed"
    wide = probe(httpx.get(wait_terminal(client, landscape)["video"]["url"]).content)
    assert wide == wide | {
        "size": (1280, 720),
        "codec": "h264",
        "pix_fmt": "yuv420p",
        "frames": 150,
        "fps": 30.0,
    }
    assert wide["duration"] == pytest.approx(5.0, abs=1 / 30)
    assert wide["audio"] == ["aac"] and wide["comment"] == "wan-pipeline emulator"
    tall = probe(httpx.get(wait_terminal(client, portrait)["video"]["url"]).content)
    assert tall["size"] == (1080, 1920) and tall["frames"] == 150 and tall["audio"] == []


def test_small_frames_mode_keeps_the_requested_size_and_exact_duration_with_supplied_audio(emulator_client):
    _, client = emulator_client
    with_audio = client.post(
        PATH, json=body(audio_url=wav_uri(4.0), generate_audio=False, duration=10)
    ).json()["id"]
    remote = client.post(PATH, json=body(image_url="https://example.com/mona_lisa.jpg")).json()["id"]
    supplied = probe(httpx.get(wait_terminal(client, with_audio)["video"]["url"]).content)
    assert supplied["size"] == (1920, 1080) and supplied["frames"] == 20  # 2 fps x 10 s, requested size
    assert supplied["duration"] == pytest.approx(10.0, abs=1 / 2) and supplied["audio"] == ["aac"]
    placeholder = probe(httpx.get(wait_terminal(client, remote)["video"]["url"]).content)
    assert placeholder["size"] == (1920, 1080) and placeholder["audio"] == ["aac"]


def test_equal_requests_share_one_encode_which_survives_on_disk(tmp_path):
    same = body(image_url=png_uri(500, 380), seed=1)
    with (
        running_emulator(fast(cache_dir=tmp_path)) as emu,
        httpx.Client(base_url=emu.base_url, headers=AUTH) as client,
    ):
        first, second = (
            client.post(PATH, json=same | {"prompt": prompt}).json()["id"] for prompt in ("a", "b")
        )
        video = httpx.get(wait_terminal(client, first)["video"]["url"]).content
        assert httpx.get(wait_terminal(client, second)["video"]["url"]).content == video
        assert emu.stats()["encodes"] == 1
    assert [path.read_bytes() for path in tmp_path.glob("*.mp4")] == [video]
    with (
        running_emulator(fast(cache_dir=tmp_path)) as emu,
        httpx.Client(base_url=emu.base_url, headers=AUTH) as client,
    ):
        again = client.post(PATH, json=same).json()["id"]
        assert httpx.get(wait_terminal(client, again)["video"]["url"]).content == video
        assert emu.stats()["encodes"] == 0


def test_stats_count_requests_bodies_and_polls(emulator_client):
    emu, client = emulator_client
    same = body(image_url="https://example.com/same.png", seed=42)
    ids = [client.post(PATH, json=same).json()["id"] for _ in range(2)]
    client.post(PATH, json=body(resolution="8k"))
    wait_terminal(client, ids[0])
    deadline = time.monotonic() + 10  # the second one finishes unpolled: watch it in-process
    while emu.stats()["generations"][ids[1]]["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = emu.stats()
    assert client.get("/_emulator/stats").json() == stats
    assert stats["requests"]["POST /v2/video/generations"] == {"200": 2, "400": 1}
    assert stats["creates_by_body_hash"] == {hashlib.sha256(canonical_json(same).encode()).hexdigest(): 2}
    assert stats["generations"][ids[0]]["polls"] == stats["requests"]["GET /v2/video/generations"]["200"]
    assert stats["generations"][ids[1]]["polls"] == 0
    assert stats["accepted_creates"] == 2 and stats["credits_charged"] == 2 * 1_575_000
    assert client.post("/_emulator/reset").status_code == 200
    assert emu.stats()["generations"] == {} and emu.stats()["requests"] == {}
    assert_provider_error(client.get(PATH, params={"generation_id": ids[0]}), 404)


def test_blob_streams_deterministic_bytes_with_length_and_ranges(emulator_client):
    _, client = emulator_client
    size = 3 * 1024 * 1024 + 5
    whole = client.get(f"/_emulator/blob/{size}", headers={"Authorization": ""})
    assert whole.status_code == 200 and int(whole.headers["content-length"]) == size == len(whole.content)
    assert client.get(f"/_emulator/blob/{size}").content == whole.content
    assert len(set(whole.content[:4096])) > 200  # not a constant fill
    part = client.get(f"/_emulator/blob/{size}", headers={"Range": "bytes=1048570-"})
    assert part.status_code == 206 and part.content == whole.content[1048570:]
    assert part.headers["content-range"] == f"bytes 1048570-{size - 1}/{size}"


@pytest.mark.parametrize(
    "emulator_client", [fast(faults=FaultConfig(download_bytes_per_s=200_000))], indirect=True
)
def test_downloads_are_throttled_when_asked(emulator_client):
    _, client = emulator_client
    started = time.monotonic()
    assert len(client.get("/_emulator/blob/100000").content) == 100_000
    assert time.monotonic() - started >= 0.4  # 100 kB at 200 kB/s cannot take less than 0.5 s


def test_a_curl_shaped_like_the_providers_example_works(emulator_client):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    emu, _ = emulator_client
    data = json.dumps(
        {
            "model": MODEL,
            "prompt": "Mona Lisa puts on glasses with her hands.",
            "image_url": "https://raw.githubusercontent.com/aimlapi/api-docs/main/reference-files/mona_lisa_extended.jpg",
            "duration": "5",
        }
    )
    headers = [
        "--header",
        "Authorization: Bearer <YOUR_AIMLAPI_KEY>",
        "--header",
        "Content-Type: application/json",
    ]
    created = subprocess.run(
        [curl, "-sS", "-L", "--request", "POST", "--url", f"{emu.base_url}{PATH}", *headers, "--data", data],
        capture_output=True,
        check=True,
        text=True,
    )
    generation = json.loads(created.stdout)
    assert generation["status"] == "queued" and generation["meta"]["usage"]["credits_used"] == 1_575_000
    polled = subprocess.run(
        [
            curl,
            "-sS",
            "-G",
            f"{emu.base_url}{PATH}",
            "--data-urlencode",
            f"generation_id={generation['id']}",
            *headers,
        ],
        capture_output=True,
        check=True,
        text=True,
    )
    assert json.loads(polled.stdout)["id"] == generation["id"]


def test_cli_flags_build_the_config():
    parser = add_cli_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--port", "9001", "--latency", "0.5", "--seed", "3", "--small-frames", "--create-429-rate", "0.25"]
        + ["--create-drop-rate", "0.1", "--download-bytes-per-s", "1000", "--url-ttl", "60", "--api-key", "k"]
        + ["--create-504-after-create-rate", "0.2", "--get-trickle-rate", "0.5", "--trickle-bytes-per-s", "8"]
        + ["--oversize-video-bytes", "1000000", "--auth-fail-after-creates", "3", "--no-identify"]
    )
    config = config_from_args(args)
    assert (args.host, args.port) == ("127.0.0.1", 9001)
    assert (config.latency_s, config.seed, config.small_frames, config.url_ttl_s, config.api_key) == (
        0.5,
        3,
        True,
        60.0,
        "k",
    )
    assert config.faults == FaultConfig(
        create_429_rate=0.25,
        create_drop_rate=0.1,
        download_bytes_per_s=1000.0,
        create_504_after_create_rate=0.2,
        get_trickle_rate=0.5,
        trickle_bytes_per_s=8.0,
        oversize_video_bytes=1_000_000,
        auth_fail_after_creates=3,
    )
    assert config.identify is False
    assert config_from_args(parser.parse_args([])) == EmulatorConfig()
    with pytest.raises(ValueError):
        config_from_args(parser.parse_args(["--create-500-rate", "0.7", "--create-502-rate", "0.7"]))


def test_python_dash_m_serves_the_emulator():
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "wan_pipeline.emulator", "--port", str(port), "--latency", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}{PATH}", json=body(), headers=AUTH)
                break
            except httpx.ConnectError:
                assert server.poll() is None and time.monotonic() < deadline, "the emulator did not start"
                time.sleep(0.1)
        assert answer.status_code == 200 and answer.json()["status"] == "queued"
    finally:
        server.terminate()
        server.wait(timeout=10)


# -- the provider's create rate limit and the free tier's quota -------------------------------------


def refill_seconds(answer: httpx.Response) -> float:
    return float(answer.headers["retry-after"])


# One token every 10 s, three in the bucket: the test is over long before a fourth one refills.
@pytest.mark.parametrize(
    "emulator_client", [fast(faults=FaultConfig(create_rate_limit_per_s=0.1, create_burst=3))], indirect=True
)
def test_the_token_bucket_answers_429_with_the_seconds_until_the_next_token(emulator_client):
    emu, client = emulator_client
    codes = [client.post(PATH, json=body(seed=n, image_url="https://example.com/a.png")).status_code for n in range(3)]
    refused = client.post(PATH, json=body(seed=9, image_url="https://example.com/a.png"))

    assert codes == [200, 200, 200]
    payload = assert_provider_error(refused, 429)
    assert payload == payload | {"message": "Too Many Requests", "statusCode": "429"}
    assert 9.0 < refill_seconds(refused) <= 10.0  # the wait for one token at 0.1 per second
    stats = emu.stats()
    assert stats["accepted_creates"] == 3
    assert stats["create_429s"] == {"fault": 0, "rate_limit": 1, "quota": 0}
    assert stats["requests"]["POST /v2/video/generations"] == {"200": 3, "429": 1}
    assert 0 <= stats["limits"]["rate_limit_tokens"] < 1


@pytest.mark.parametrize(
    "emulator_client", [fast(faults=FaultConfig(create_rate_limit_per_s=0.1, create_burst=3))], indirect=True
)
def test_concurrent_creates_cannot_all_take_the_last_tokens(emulator_client):
    # The bucket is checked and emptied in the same step as the create: eight at once buy three.
    emu, client = emulator_client
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda n: client.post(PATH, json=body(seed=n, image_url="https://example.com/a.png")), range(8)
        ))
    assert sorted(a.status_code for a in answers) == [200] * 3 + [429] * 5
    assert all("retry-after" in a.headers for a in answers if a.status_code == 429)
    assert emu.stats()["accepted_creates"] == 3 and emu.stats()["create_429s"]["rate_limit"] == 5


def test_without_a_burst_the_bucket_holds_one_seconds_worth():
    assert FaultConfig(create_rate_limit_per_s=20).bucket_size == 20
    assert FaultConfig(create_rate_limit_per_s=0.5).bucket_size == 1
    assert FaultConfig(create_rate_limit_per_s=20, create_burst=5).bucket_size == 5
    for bad in ({"create_rate_limit_per_s": 0}, {"create_burst": 0}, {"create_quota": -1},
                {"create_quota_window_s": 0}):
        with pytest.raises(ValueError):
            FaultConfig(**bad)


@pytest.mark.parametrize("emulator_client", [fast(faults=FaultConfig(create_quota=2))], indirect=True)
def test_the_hourly_quota_answers_429_with_retry_after_up_to_the_hours_end(emulator_client):
    emu, client = emulator_client
    codes = [client.post(PATH, json=body(seed=n, image_url="https://example.com/q.png")).status_code for n in range(2)]
    refused = client.post(PATH, json=body(seed=5, image_url="https://example.com/q.png"))
    invalid = client.post(PATH, json=body(duration=7))  # validated before the quota: still a 400

    assert codes == [200, 200] and invalid.status_code == 400
    payload = assert_provider_error(refused, 429)
    assert payload["statusCode"] == "429" and payload["message"] == "Too Many Requests"
    wait = refused.headers["retry-after"]
    assert wait.isdigit() and 3500 <= int(wait) <= 3600  # whole seconds, until the window's end
    stats = emu.stats()
    assert stats["accepted_creates"] == 2 and stats["create_429s"] == {"fault": 0, "rate_limit": 0, "quota": 1}
    assert stats["limits"]["quota_used"] == 2
    assert stats["limits"]["quota_window_ends_at"] - time.time() == pytest.approx(int(wait), abs=2)


@pytest.mark.parametrize(
    "emulator_client", [fast(faults=FaultConfig(create_quota=1, create_quota_window_s=4.0))], indirect=True
)
def test_the_quota_comes_back_with_the_next_window(emulator_client):
    emu, client = emulator_client
    first = client.post(PATH, json=body(seed=1, image_url="https://example.com/q.png"))
    refused = client.post(PATH, json=body(seed=2, image_url="https://example.com/q.png"))
    assert (first.status_code, refused.status_code) == (200, 429)
    assert 1 <= int(refused.headers["retry-after"]) <= 4
    time.sleep(max(0.0, emu.stats()["limits"]["quota_window_ends_at"] - time.time()) + 0.05)
    assert client.post(PATH, json=body(seed=2, image_url="https://example.com/q.png")).status_code == 200
    assert emu.stats()["accepted_creates"] == 2 and emu.stats()["limits"]["quota_used"] == 1


def test_injected_429s_are_counted_apart_from_the_limits():
    with running_emulator(fast(faults=FaultConfig(create_429_rate=1.0))) as emu:
        with httpx.Client(base_url=emu.base_url, headers=AUTH) as client:
            assert client.post(PATH, json=body()).status_code == 429
        assert emu.stats()["create_429s"] == {"fault": 1, "rate_limit": 0, "quota": 0}
        assert emu.stats()["limits"] == {}


def test_cli_flags_set_the_rate_limit_and_the_quota():
    parser = add_cli_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--create-rate-limit-per-s", "20", "--create-burst", "5", "--create-quota", "100"]
        + ["--create-quota-window-s", "60"]
    )
    assert config_from_args(args).faults == FaultConfig(
        create_rate_limit_per_s=20.0, create_burst=5, create_quota=100, create_quota_window_s=60.0
    )
    assert config_from_args(parser.parse_args([])).faults.create_rate_limit_per_s is None
