"""A purchase belongs to an API (issue 8, problem 1): what one scope bought is invisible to another.

Also the scope of an API base URL: its normalized origin, without a network call for a remote API.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
from ledger_worker import T0, LedgerTarget, answer, claim, planned, send, submit

from wan_pipeline import scopes
from wan_pipeline.ledger import KnownRequest, Ledger, State
from wan_pipeline.scopes import EMULATOR_SCOPE, api_origin, api_scope

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
REAL = "https://api.aimlapi.com"
K1, K2 = "11" * 16, "22" * 16


def complete(ledger: Ledger, key: str, prompt_set: str) -> None:
    submit(ledger, key, prompt_set=prompt_set)
    ledger.record_poll(
        key, raw_status="completed", status="completed", video_url="https://cdn.example/v.mp4",
        video_expires_at=None, error=None, credits_used=None, usd_spent=None, next_poll_at=None,
    )  # fmt: skip
    ledger.record_video(prompt_set, key, path=f"/out/{prompt_set}/{key}.mp4", sha256="ab" * 32, size_bytes=9)


def test_what_the_emulator_bought_is_invisible_to_another_api(target: LedgerTarget) -> None:
    emulator = target.open()  # scope "emulator"
    emulator.plan("shots", [planned(K1), planned(K2)])
    complete(emulator, K1, "shots")
    submit(emulator, K2, prompt_set="shots")

    real = target.open(scope=REAL)
    assert real.known([K1, K2]) == {}  # nothing to reuse: the real API never made these
    assert real.rows() == [] and real.rows("shots") == []
    progress = real.progress("shots")  # the same set, through the other API
    assert (progress.counts[State.PLANNED], progress.total, progress.collected) == (2, 2, 0)
    assert real.due_for_poll(T0, limit=10) == [] and real.next_poll_time() is None
    assert real.stored_videos([K1, K2]) == {}
    assert real.attempts() == []

    plan = real.plan("shots", [planned(K1), planned(K2)])
    assert plan.new == [K1, K2] and plan.known == {}  # both bought again, for real
    assert claim(real, K1) == 1  # its own attempt 1, whatever the emulator did
    answer(real, K1, True)
    # The emulator's rows did not move, and each scope sees only its own purchases.
    assert emulator.known([K1, K2]) == {K1: KnownRequest(State.COMPLETED, 1), K2: KnownRequest(State.SUBMITTED, 1)}
    assert [r.state for r in real.rows("shots")] == [State.SUBMITTED, State.PLANNED]
    assert {a.api_scope for a in real.attempts()} == {REAL}
    assert len(real.attempts(all_scopes=True)) == 3
    assert real.scopes() == [EMULATOR_SCOPE, REAL]
    assert [r.request_key for r in emulator.due_for_poll(T0, limit=10)] == [K2]


def test_for_scope_sees_the_same_database_through_another_api(target: LedgerTarget) -> None:
    emulator = target.open()
    emulator.plan("shots", [planned(K1)])
    send(emulator, K1)

    real = emulator.for_scope(REAL)
    assert real.scope == REAL and emulator.scope == EMULATOR_SCOPE
    assert real.known([K1]) == {}
    assert real.prompt_sets() == ["shots"] and real.set_members("shots") == [K1]  # memberships are shared
    assert real.for_scope(EMULATOR_SCOPE).row(K1).state is State.SUBMITTING
    assert REAL in repr(real)


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("https://api.aimlapi.com", "https://api.aimlapi.com"),
        ("HTTPS://API.AimlApi.COM/v2/video/generations?x=1#f", "https://api.aimlapi.com"),
        ("https://api.aimlapi.com:443/", "https://api.aimlapi.com"),
        ("http://api.example:80/v1", "http://api.example"),
        ("https://api.example:8443/v1", "https://api.example:8443"),
        ("http://api.example:443", "http://api.example:443"),  # 443 is not http's default
        ("  https://user:pw@api.example/  ", "https://api.example"),  # no credentials in a scope
        ("http://[::1]:8080/v2", "http://[::1]:8080"),
        ("https://[2001:DB8::1]:443/v1", "https://[2001:db8::1]"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ],
)
def test_api_origin_normalizes_what_identifies_an_api(url: str, origin: str) -> None:
    assert api_origin(url) == origin


def test_api_origin_refuses_a_url_without_a_host() -> None:
    with pytest.raises(ValueError, match="no host"):
        api_origin("/v2/video")


def test_a_remote_api_is_its_origin_without_any_network_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a remote API must not be probed")

    monkeypatch.setattr(httpx, "get", no_network)
    assert api_scope("https://API.aimlapi.com:443/v1/") == "https://api.aimlapi.com"
    assert api_scope("http://192.0.2.10:8000/") == "http://192.0.2.10:8000"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_loopback_url_where_nothing_listens_is_its_origin() -> None:
    port = _free_port()
    assert api_scope(f"http://127.0.0.1:{port}/v2/") == f"http://127.0.0.1:{port}"
    assert api_scope(f"http://localhost:{port}") == f"http://localhost:{port}"


class _Announcing(BaseHTTPRequestHandler):
    body = b'{"emulator": "wan-pipeline"}'

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        found = self.path == scopes.EMULATOR_INFO_PATH
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body if found else b"{}")

    def log_message(self, *args: object) -> None:
        pass


class _Other(_Announcing):
    body = b'{"emulator": "someone-else"}'


@pytest.mark.parametrize(("handler", "emulator"), [(_Announcing, True), (_Other, False)])
def test_every_loopback_emulator_is_one_scope_and_another_local_server_is_its_origin(
    handler: type[BaseHTTPRequestHandler], emulator: bool
) -> None:
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/"
        assert api_scope(url) == (EMULATOR_SCOPE if emulator else f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
