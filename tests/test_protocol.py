"""The sans-IO protocol, table-driven: replies and transport errors in; actions, CreateTry events
and outcomes out. No sockets: a script answers each HTTP action the protocol yields."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from wan_pipeline.api import (
    AnswerTooLarge,
    ApiError,
    ApiProtocol,
    AuthenticationError,
    CallDeadline,
    ClientConfig,
    CreateNotAccepted,
    CreateOutcomeUnknown,
    CreateTry,
    DeadlineExceeded,
    FetchTo,
    Generation,
    GenerationNotFound,
    HttpCall,
    NotifyTry,
    OutOfCredits,
    Reply,
    RequestRejected,
    ServerError,
    Sleep,
    TransportError,
)
from wan_pipeline.api.pacing import Ticket
from wan_pipeline.api.protocol import AwaitTurn
from wan_pipeline.models import VideoRequest
from wan_pipeline.sources import MediaChanged, MediaError

KEY = "0123456789abcdef0123456789abcdef"
HTTP_IMAGE = "https://example.com/first-frame.png"


def reply(status: int, body: Any = None, **headers: str) -> Reply:
    content = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
    return Reply(status, httpx.Headers(headers), content)


def accepted(**fields: Any) -> Reply:
    return reply(200, {"status": "queued", **({"id": "gen-1"} if not fields else fields)})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Script:
    """Answers the protocol's actions from a list; records every action and CreateTry event."""

    def __init__(self, answers: list[Any], clock: FakeClock):
        self.answers: Iterator[Any] = iter(answers)
        self.clock = clock
        self.actions: list[Any] = []

    @property
    def events(self) -> list[CreateTry]:
        return [action.event for action in self.actions if isinstance(action, NotifyTry)]

    def kinds(self) -> list[str]:
        """The actions in order; a create's turn shows as the retry wait it carries ("sleep"), if any."""
        names = {HttpCall: "call", FetchTo: "fetch", Sleep: "sleep", AwaitTurn: "sleep"}
        return [
            f"{action.event.phase}.{action.event.try_number}"
            if isinstance(action, NotifyTry)
            else names[type(action)]
            for action in self.actions
            if not (isinstance(action, AwaitTurn) and action.not_before_s == 0)
        ]

    def run(self, steps: Any) -> Any:
        outcome: Any = None
        error: BaseException | None = None
        while True:
            try:
                action = steps.send(outcome) if error is None else steps.throw(error)
            except StopIteration as done:
                return done.value
            self.actions.append(action)
            outcome, error = None, None
            if isinstance(action, Sleep):
                self.clock.now += action.seconds
            elif isinstance(action, AwaitTurn):  # no pacer: the turn is the retry's own wait
                self.clock.now += action.not_before_s
                outcome = Ticket(self.clock.now)
            elif isinstance(action, HttpCall | FetchTo):
                answer = next(self.answers)
                if isinstance(answer, BaseException):
                    error = answer
                else:
                    outcome = answer


def protocol(clock: FakeClock, **config: Any) -> ApiProtocol:
    settings = {"base_url": "https://api.example", "max_attempts": 3, "backoff_base_s": 0.5, **config}
    return ApiProtocol(ClientConfig(**settings), clock=clock, rng=random.Random(0))


def submit(answers: list[Any], **config: Any) -> tuple[Script, Generation | None, BaseException | None]:
    clock = FakeClock()
    script = Script(answers, clock)
    steps = protocol(clock, **config).submit(
        VideoRequest(image_url=HTTP_IMAGE, prompt="p", seed=1),
        request_key=KEY,
        attempt=2,
        on_try=lambda event: None,
    )
    try:
        return script, script.run(steps), None
    except (ApiError, MediaError) as exc:
        return script, None, exc


# One create try answered: (answer, CreateTry.created, the error raised or None, retried?)
SINGLE_ANSWERS = [
    pytest.param(accepted(), True, None, False, id="200 with id"),
    pytest.param(
        reply(201, {"generation_id": "gen-1", "status": "queued"}), True, None, False, id="201 generation_id"
    ),
    pytest.param(reply(200, {"status": "queued"}), None, CreateOutcomeUnknown, False, id="200 without id"),
    pytest.param(reply(200, b"<html>"), None, CreateOutcomeUnknown, False, id="200 not JSON"),
    pytest.param(reply(400, {"message": "Body validation error!"}), False, RequestRejected, False, id="400"),
    pytest.param(reply(401, {"message": "no key"}), False, AuthenticationError, False, id="401"),
    pytest.param(reply(403, {"message": "out of credits"}), False, OutOfCredits, False, id="403"),
    pytest.param(reply(404, {"message": "?"}), False, GenerationNotFound, False, id="404"),
    pytest.param(reply(409, {"message": "conflict"}), False, ApiError, False, id="other 4xx"),
    pytest.param(reply(422, {"message": "bad"}), False, RequestRejected, False, id="422"),
    pytest.param(reply(500, {"message": "boom"}), None, CreateOutcomeUnknown, False, id="500"),
    pytest.param(reply(504, {"message": "Generation timeout"}), None, CreateOutcomeUnknown, False, id="504"),
    pytest.param(reply(501, {"message": "?"}), None, ServerError, False, id="other 5xx"),
    pytest.param(reply(429, {"message": "Too Many Requests"}), False, CreateNotAccepted, True, id="429"),
    pytest.param(reply(502, {}), False, CreateNotAccepted, True, id="502"),
    pytest.param(reply(503, {}), False, CreateNotAccepted, True, id="503"),
    pytest.param(httpx.ConnectError("refused"), False, CreateNotAccepted, True, id="ConnectError"),
    pytest.param(httpx.ConnectTimeout("slow"), False, CreateNotAccepted, True, id="ConnectTimeout"),
    pytest.param(httpx.PoolTimeout("busy"), False, CreateNotAccepted, True, id="PoolTimeout"),
    pytest.param(httpx.UnsupportedProtocol("ftp"), False, CreateNotAccepted, False, id="UnsupportedProtocol"),
    pytest.param(httpx.ReadTimeout("lost"), None, CreateOutcomeUnknown, False, id="ReadTimeout"),
    pytest.param(httpx.WriteTimeout("half sent"), None, CreateOutcomeUnknown, False, id="WriteTimeout"),
    pytest.param(httpx.RemoteProtocolError("dropped"), None, CreateOutcomeUnknown, False, id="dropped"),
    pytest.param(AnswerTooLarge("huge"), None, CreateOutcomeUnknown, False, id="answer too large"),
    pytest.param(
        CallDeadline("slow", sent=True), None, CreateOutcomeUnknown, False, id="deadline after sending"
    ),
    pytest.param(
        CallDeadline("slow", sent=False), False, CreateNotAccepted, False, id="deadline before sending"
    ),
]


@pytest.mark.parametrize(("answer", "created", "error", "retried"), SINGLE_ANSWERS)
def test_each_create_answer_class_says_whether_money_moved(
    answer: Any, created: bool | None, error: type[ApiError] | None, retried: bool
) -> None:
    # A retried answer is followed by a success, so the retry itself shows in the actions.
    script, generation, raised = submit([answer, accepted()])
    first = script.events[:2]
    assert [(e.phase, e.try_number) for e in first] == [("sending", 1), ("answered", 1)]
    assert first[0].client_request_id == first[1].client_request_id == f"wanp-{KEY}-2.1"
    assert first[1].created is created
    assert first[1].status_code == (answer.status_code if isinstance(answer, Reply) else None)
    assert first[1].detail
    if retried:
        assert script.kinds() == [
            "sending.1",
            "call",
            "answered.1",
            "sleep",
            "sending.2",
            "call",
            "answered.2",
        ]
        assert raised is None and generation is not None
    elif error is None:
        assert raised is None and generation is not None and generation.id == "gen-1"
        assert first[1].generation_id == "gen-1" and first[1].detail == "accepted"
        assert script.kinds() == ["sending.1", "call", "answered.1"]
    else:
        assert type(raised) is error
        assert raised.created is created
        assert raised.client_request_id == f"wanp-{KEY}-2.1"
        assert script.kinds() == ["sending.1", "call", "answered.1"]


@pytest.mark.parametrize(
    ("answers", "error"),
    [
        ([reply(503, {})] * 3, CreateNotAccepted),
        ([reply(429, {}), reply(502, {}), httpx.ConnectError("down")], CreateNotAccepted),
        ([reply(503, {}), reply(500, {})], CreateOutcomeUnknown),
        ([httpx.ConnectError("down"), httpx.ReadTimeout("lost")], CreateOutcomeUnknown),
    ],
)
def test_retries_report_each_try_before_the_wait_and_end_with_the_last_meaning(
    answers: list[Any], error: type[ApiError]
) -> None:
    script, _, raised = submit(answers)
    tries = len(answers)
    expected: list[str] = []
    for number in range(1, tries + 1):
        expected += [f"sending.{number}", "call", f"answered.{number}"] + (
            ["sleep"] if number < tries else []
        )
    assert script.kinds() == expected
    assert type(raised) is error
    assert raised.client_request_id == f"wanp-{KEY}-2.{tries}"
    assert raised.created is script.events[-1].created
    headers = [a.headers["X-Client-Request-Id"] for a in script.actions if isinstance(a, HttpCall)]
    assert headers == [e.client_request_id for e in script.events if e.phase == "sending"]


def test_the_create_deadline_bounds_tries_and_waits_together() -> None:
    # Retry-After asks for more than the deadline leaves: give up now rather than overrun it.
    script, _, raised = submit(
        [reply(429, {}, **{"retry-after": "20"})], create_deadline_s=10, max_retry_seconds=1000
    )
    assert isinstance(raised, CreateNotAccepted) and script.kinds() == ["sending.1", "call", "answered.1"]
    # Within the deadline, each try gets only the time that is left.
    script, generation, _ = submit(
        [reply(503, {}, **{"retry-after": "3"}), accepted()], create_deadline_s=10, max_retry_seconds=1000
    )
    calls = [a for a in script.actions if isinstance(a, HttpCall)]
    assert generation is not None and [c.time_limit_s for c in calls] == [10, 7]


def test_the_key_is_never_in_an_action() -> None:
    clock = FakeClock()
    steps = protocol(clock, api_key="sk-never-in-actions").submit(
        VideoRequest(image_url=HTTP_IMAGE, prompt="p")
    )
    script = Script([accepted()], clock)
    script.run(steps)
    assert "sk-never-in-actions" not in repr(script.actions)
    assert all(
        "authorization" not in {k.lower() for k in a.headers}
        for a in script.actions
        if isinstance(a, HttpCall)
    )


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (400, 400), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("given_as", ["path", "file-url", "data-uri"])
def test_media_that_changed_since_validation_is_refused_before_any_call(
    tmp_path: Path, given_as: str
) -> None:
    validated, now = png((1, 2, 3)), png((200, 0, 0))
    path = tmp_path / "frame.png"
    path.write_bytes(now)
    ref = {
        "path": str(path),
        "file-url": f"file://{path}",
        "data-uri": "data:image/png;base64," + base64.b64encode(now).decode(),
    }[given_as]
    proto = protocol(FakeClock(), allowed_roots=(tmp_path,))
    request = VideoRequest(image_url=ref, prompt="p")
    with pytest.raises(MediaChanged, match="^image changed since it was validated: ") as refused:
        proto.submit(request, media_sha256={"image": hashlib.sha256(validated).hexdigest()})
    assert refused.value.created is False
    # The same bytes as validated pass (and http(s) references are not the client's to check).
    proto.submit(request, media_sha256={"image": hashlib.sha256(now).hexdigest(), "audio": None})
    proto.submit(VideoRequest(image_url=HTTP_IMAGE, prompt="p"), media_sha256={"image": "0" * 64})


def test_submit_roots_add_to_the_configured_ones_and_nothing_local_is_allowed_without_any(
    tmp_path: Path,
) -> None:
    path = tmp_path / "frame.png"
    path.write_bytes(png((1, 2, 3)))
    request = VideoRequest(image_url=str(path), prompt="p")
    with pytest.raises(MediaError, match="WAN_PIPELINE_ALLOWED_ROOTS"):
        protocol(FakeClock()).submit(request)
    with pytest.raises(MediaError, match="outside the allowed roots"):
        protocol(FakeClock(), allowed_roots=(tmp_path / "elsewhere",)).submit(request)
    protocol(FakeClock(), allowed_roots=(tmp_path / "elsewhere",)).submit(request, allowed_roots=[tmp_path])
    protocol(FakeClock()).submit(VideoRequest(image_url="frame.png", prompt="p"), base_dir=tmp_path)


@pytest.mark.parametrize(
    ("operation", "answer", "error", "retried"),
    [
        ("get", CallDeadline("slow", sent=True), DeadlineExceeded, False),
        ("get", httpx.ReadTimeout("lost"), TransportError, True),
        ("get", reply(503, {}), ServerError, True),
        ("get", reply(404, {}), GenerationNotFound, False),
        ("download", CallDeadline("slow", sent=True), DeadlineExceeded, False),
        ("download", httpx.RemoteProtocolError("cut"), TransportError, True),
    ],
)
def test_reads_retry_transient_failures_but_not_their_own_deadline(
    operation: str, answer: Any, error: type[ApiError], retried: bool
) -> None:
    clock = FakeClock()
    proto = protocol(clock, max_attempts=2)
    steps = proto.get("gen-1") if operation == "get" else proto.download("https://cdn.example/v.mp4", "v.mp4")
    script = Script([answer, answer], clock)
    with pytest.raises(error):
        script.run(steps)
    assert script.kinds().count("sleep") == (1 if retried else 0)


def test_download_cap_is_the_smaller_of_the_request_and_the_ceiling() -> None:
    clock = FakeClock()
    proto = protocol(clock, max_download_bytes=1000)
    for asked, cap in ((None, 1000), (10, 10), (10**9, 1000)):
        script = Script([(5, "ab")], clock)
        script.run(proto.download("https://cdn.example/v.mp4", "v.mp4", max_bytes=asked))
        assert script.actions[0].max_bytes == cap
