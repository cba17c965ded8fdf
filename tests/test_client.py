"""The client shells over an in-memory transport (httpx.MockTransport): how they perform the
protocol's `NotifyTry`, where the key goes, and nothing else (the protocol has its own tests)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from wan_pipeline.api import (
    AimlApiClient,
    AsyncAimlApiClient,
    BearerAuth,
    ClientConfig,
    CreateOutcomeUnknown,
    CreateTry,
    Generation,
)
from wan_pipeline.models import VideoRequest
from wan_pipeline.settings import Secret

KEY = "sk-shell-test-5c1d"
REQUEST = VideoRequest(image_url="https://example.com/frame.png", prompt="p", seed=1)


class HookFailed(Exception):
    pass


class Server:
    """Answers every create with the given statuses in turn (the last repeats), recording requests."""

    def __init__(self, *statuses: int):
        self.statuses = list(statuses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return httpx.Response(status, json={"id": "gen-1", "status": "queued"} if status == 200 else {})


def config() -> ClientConfig:
    return ClientConfig(
        base_url="https://api.example", api_key=Secret(KEY), backoff_base_s=0.001, max_attempts=3
    )


def submit_with(
    shell: str,
    server: Callable[[httpx.Request], httpx.Response],
    on_try: Callable[[CreateTry], None],
    settings: ClientConfig | None = None,
) -> Generation:
    transport = httpx.MockTransport(server)
    settings = settings or config()
    if shell == "sync":
        with httpx.Client(transport=transport) as http:
            return AimlApiClient(settings, http_client=http).submit(REQUEST, request_key="k1", on_try=on_try)

    async def run() -> Generation:
        async with httpx.AsyncClient(transport=transport) as http:
            return await AsyncAimlApiClient(settings, http_client=http).submit(
                REQUEST, request_key="k1", on_try=on_try
            )

    return asyncio.run(run())


SHELLS = ["sync", "async"]


@pytest.mark.parametrize("shell", SHELLS)
def test_a_failing_sending_hook_stops_the_try_before_it_is_sent(shell: str) -> None:
    server = Server(200)

    def refuse(event: CreateTry) -> None:
        raise HookFailed(event.phase)

    with pytest.raises(HookFailed, match="sending"):
        submit_with(shell, server, refuse)
    assert server.requests == []


@pytest.mark.parametrize("shell", SHELLS)
def test_a_failing_answered_hook_propagates_before_any_retry(shell: str) -> None:
    server = Server(503, 200)
    seen: list[CreateTry] = []

    def record(event: CreateTry) -> None:
        seen.append(event)
        if event.phase == "answered":
            raise HookFailed("ledger down")

    with pytest.raises(HookFailed):
        submit_with(shell, server, record)
    assert len(server.requests) == 1  # the 503 was not retried past a hook that could not record it
    assert [(e.phase, e.created) for e in seen] == [("sending", None), ("answered", False)]


@pytest.mark.parametrize("shell", SHELLS)
def test_each_try_is_announced_with_the_id_it_sends_and_judged(shell: str) -> None:
    server = Server(502, 200)
    seen: list[CreateTry] = []
    generation = submit_with(shell, server, seen.append)
    sent_ids = [request.headers["x-client-request-id"] for request in server.requests]
    assert sent_ids == ["wanp-k1-1.1", "wanp-k1-1.2"]
    assert [(e.phase, e.client_request_id, e.created) for e in seen] == [
        ("sending", "wanp-k1-1.1", None),
        ("answered", "wanp-k1-1.1", False),
        ("sending", "wanp-k1-1.2", None),
        ("answered", "wanp-k1-1.2", True),
    ]
    assert seen[-1].generation_id == generation.id == "gen-1"
    assert all(request.headers["authorization"] == f"Bearer {KEY}" for request in server.requests)


def test_the_async_client_runs_the_hook_off_the_event_loop() -> None:
    threads: list[int] = []
    loop_thread = threading.get_ident()  # asyncio.run drives the loop on this thread
    submit_with("async", Server(200), lambda _event: threads.append(threading.get_ident()))
    assert threads and all(thread != loop_thread for thread in threads)


def test_bearer_auth_signs_a_request_without_showing_the_key() -> None:
    auth = BearerAuth(Secret(KEY))
    request = next(auth.auth_flow(httpx.Request("GET", "https://api.example/x")))
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(auth) and KEY not in repr(vars(auth))


def test_downloads_carry_no_credentials_even_from_a_client_that_has_them(tmp_path: Any) -> None:
    seen: list[httpx.Request] = []

    def cdn(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"mp4 bytes")

    credentials: dict[str, Any] = {
        "headers": {"Authorization": "Bearer leaked"},
        "auth": BearerAuth(Secret(KEY)),
    }
    with httpx.Client(transport=httpx.MockTransport(cdn), **credentials) as http:
        assert (
            AimlApiClient(config(), http_client=http).download(
                "https://cdn.example/v.mp4", tmp_path / "v.mp4"
            )[0]
            == 9
        )
    assert "authorization" not in seen[0].headers


@pytest.mark.parametrize("shell", SHELLS)
def test_an_oversized_create_answer_is_cut_off_and_left_in_doubt(shell: str) -> None:
    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "gen-1", "status": "queued", "padding": "x" * 5000})

    seen: list[CreateTry] = []
    small = dataclasses.replace(config(), max_answer_bytes=1000)
    with pytest.raises(CreateOutcomeUnknown) as unknown:
        submit_with(shell, huge, seen.append, small)
    assert unknown.value.created is None and "AnswerTooLarge" in seen[-1].detail
