"""The sans-IO protocol: what to send, what an answer means, whether to try again.

Operations are generators that *yield* actions (`HttpCall`, `FetchTo`, `Sleep`, `NotifyTry`) and
receive their outcomes (or have the transport's `httpx.RequestError` thrown in). The client shells
only perform actions, so both behave identically and tests drive this module with no sockets.

Money rule: a create is retried only where it was surely not accepted (429, 502, 503, connection
never established). A create whose answer was lost raises `CreateOutcomeUnknown` at once: the API
has no idempotency key, and paying twice is worse than asking. Each create try is announced
before it is sent and judged (`CreateTry`) before any retry wait, so a ledger can record it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx

from wan_pipeline.api.config import ClientConfig
from wan_pipeline.api.errors import (
    ApiError,
    CallDeadline,
    CreateNotAccepted,
    CreateOutcomeUnknown,
    CreatesPaused,
    DeadlineExceeded,
    TransportError,
    WaitTimeout,
    describe_exception,
    download_error,
    error_from_reply,
    retry_after,
    url_for_logs,
)
from wan_pipeline.api.models import Generation, Reply, parse_generation
from wan_pipeline.api.pacing import Refused, Ticket
from wan_pipeline.api.retry import (
    CREATE_AMBIGUOUS_STATUSES,
    CREATE_RETRY_STATUSES,
    READ_RETRY_STATUSES,
    RetryEvent,
    request_error_is_transient,
    request_never_sent,
)
from wan_pipeline.models import VideoRequest, canonical_json
from wan_pipeline.safe_text import printable
from wan_pipeline.sources import check_unchanged, wire_reference

log = logging.getLogger("wan_pipeline.api")

GENERATIONS_PATH = "/v2/video/generations"
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_REQUEST_ID_PREFIX = "wanp"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Per-try create notifications
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateTry:
    """One HTTP try of a create: announced before it is sent, then judged once answered."""

    try_number: int  # 1-based HTTP try within this attempt
    client_request_id: str  # the X-Client-Request-Id sent on this try: wanp-<key>-<attempt>.<try>
    phase: Literal["sending", "answered"]
    created: bool | None = None  # answered only: True accepted, False surely not created, None may have been
    status_code: int | None = None  # answered with an HTTP status
    detail: str = ""  # short printable reason: "HTTP 503", "ConnectError: ...", "accepted"
    generation_id: str | None = None  # answered and created


# Called before each try is sent and when its answer is judged. The async client runs it in a worker
# thread, or, when it has one, awaits its async form `anotify(event)` on the event loop instead.
TryHook = Callable[[CreateTry], None]


# --------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpCall:
    """An authorized call to the API (path relative to the base URL). The outcome is a `Reply`.

    The shell must finish it (answer read in full) within `time_limit_s`, or raise `CallDeadline`,
    and refuse an answer over `max_bytes` (`AnswerTooLarge`).
    """

    method: str
    path: str
    headers: Mapping[str, str]
    time_limit_s: float
    max_bytes: int
    json: Any = field(default=None, repr=False)  # may hold base64 media
    params: Mapping[str, str] | None = None
    # A create try's turn from `AwaitTurn`: the shell hands it back to its pacer with the answer.
    ticket: Ticket | None = field(default=None, repr=False)


@dataclass(frozen=True)
class FetchTo:
    """Stream `url` (no credentials) into `destination` within `time_limit_s`; the outcome is
    (bytes, sha256) or a `Reply` for a non-200 answer. Past `max_bytes` the shell raises
    `DownloadTooLarge` and keeps nothing under `destination`."""

    url: str = field(repr=False)
    destination: str | os.PathLike[str]
    max_bytes: int
    time_limit_s: float


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class AwaitTurn:
    """Create only, before a try is announced: wait at least `not_before_s` (the retry's backoff) and
    for the client's pacer (the pause and window every create of the client shares), at most
    `time_limit_s`. The outcome is a `Ticket` to carry on the try's `HttpCall`, or `Refused`: do not
    send (the try is then never announced, so nothing is recorded as sent)."""

    not_before_s: float
    time_limit_s: float


@dataclass(frozen=True)
class NotifyTry:
    """Call `hook(event)` (it may write to a database); if it raises, the operation stops there."""

    hook: TryHook = field(repr=False)
    event: CreateTry


Action = HttpCall | FetchTo | Sleep | NotifyTry | AwaitTurn
Steps = Generator[Action, Any, T]


# --------------------------------------------------------------------------------------------
# Request building
# --------------------------------------------------------------------------------------------


def build_create_body(
    request: VideoRequest,
    *,
    base_dir: Path | None = None,
    allowed_roots: Sequence[Path] = (),
    media_sha256: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """The create body; local and fsspec media are read, checked and inlined as data URIs.

    With `media_sha256`, the bytes inlined must be the ones the request key was computed from
    (`MediaChanged` otherwise): a key names a paid result, and must not name other media.
    """
    wired: dict[str, str | None] = {"image": request.image_url, "audio": request.audio_url}
    for kind, ref in wired.items():
        if ref is not None:
            wired[kind], sent_sha256 = wire_reference(
                ref, kind, request.spec, base_dir=base_dir, allowed_roots=allowed_roots
            )
            check_unchanged(ref, kind, sent_sha256, media_sha256)
    image = wired["image"]
    assert image is not None  # a VideoRequest always has an image
    return request.body(image, wired["audio"])


def body_key(body: Mapping[str, Any]) -> str:
    """Stands in for a request key: 32 hex chars of sha256 over the canonical body."""
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()[:32]


def client_request_id(request_key: str, attempt: int, try_number: int) -> str:
    """`wanp-<request_key>-<attempt>.<try>`: traces each HTTP try of each paid attempt."""
    value = f"{CLIENT_REQUEST_ID_PREFIX}-{request_key}-{attempt}.{try_number}"
    if not CLIENT_REQUEST_ID.fullmatch(value):
        raise ValueError(
            f"client request id {printable(value)} must be 1-128 characters of [A-Za-z0-9._:-]: "
            "check the request key"
        )
    return value


# --------------------------------------------------------------------------------------------
# Judging outcomes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    reason: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Verdict:
    """What one try's outcome means: a result, or an error raised now or once retries run out."""

    value: Any = None
    error: ApiError | None = None
    retry: Retry | None = None  # the try may be repeated; `error` is raised when it cannot be
    answered: CreateTry | None = None  # create only: the event reported before any retry wait


def _retry_for_status(reply: Reply, statuses: frozenset[int]) -> Retry | None:
    if reply.status_code not in statuses:
        return None
    wait = retry_after(reply)
    reason = f"HTTP {reply.status_code}"
    if wait is not None:
        reason += f", retry-after {wait:g} s"
    return Retry(reason, wait)


class ApiProtocol:
    """What to send and what an answer means, for both clients. Operations are generators of actions."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
    ):
        self.config = config
        self.policy = config.retry_policy
        self.schedule = config.poll_schedule
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_retry = on_retry

    def url(self, path: str) -> str:
        return self.config.base_url + path

    def _call(
        self,
        method: str,
        time_limit_s: float,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        ticket: Ticket | None = None,
    ) -> HttpCall:
        """A call to the generations endpoint; its answer is capped at `max_answer_bytes`."""
        return HttpCall(
            method,
            GENERATIONS_PATH,
            {"Accept": "application/json", **(headers or {})},
            time_limit_s=time_limit_s,
            max_bytes=self.config.max_answer_bytes,
            json=json,
            params=params,
            ticket=ticket,
        )

    # -- retry loop ---------------------------------------------------------------------------

    def _retry_steps(
        self,
        operation: str,
        deadline_s: float,
        one_try: Callable[[int, float], Steps[Any]],
        judge: Callable[[Any, int], Verdict],
        on_try: TryHook | None = None,
        *,
        wait_in_try: bool = False,
    ) -> Steps[Any]:
        """Try until a verdict is final, within `deadline_s` for everything (tries and waits).

        `one_try(try_number, seconds_left)` yields one try's actions and returns its outcome; a
        transport error thrown into it is the outcome too. The answered event (create) is
        reported before any wait, so a refusal is on record before the client sleeps. With
        `wait_in_try` (creates) the wait before a retry is not a `Sleep`: it is handed to the next
        try, `one_try(try_number, seconds_left, wait_s)`, which waits for its turn under the pacer.
        """
        started = self._clock()
        try_number = 1
        delay = 0.0
        while True:
            seconds_left = deadline_s - (self._clock() - started)
            try:
                if wait_in_try:
                    outcome = yield from one_try(try_number, seconds_left, delay)  # type: ignore[call-arg]
                else:
                    outcome = yield from one_try(try_number, seconds_left)
            except httpx.RequestError as exc:
                outcome = exc
            verdict = judge(outcome, try_number)
            if on_try is not None and verdict.answered is not None:
                yield NotifyTry(on_try, verdict.answered)
            if verdict.retry is None:
                if verdict.error is not None:
                    raise verdict.error
                return verdict.value
            elapsed = self._clock() - started
            delay = self.policy.delay_before_retry(
                try_number, elapsed, verdict.retry.retry_after_s, self._rng
            )
            if delay is not None and elapsed + delay >= deadline_s:
                delay = None  # the next try would start with no time left
            assert verdict.error is not None  # a retryable verdict names what to raise at the end
            if delay is None:
                log.warning("%s: giving up after %d tries (%s)", operation, try_number, verdict.retry.reason)
                raise verdict.error
            log.warning(
                "%s: try %d failed (%s); retrying in %.2f s",
                operation,
                try_number,
                verdict.retry.reason,
                delay,
            )
            if self._on_retry is not None:
                self._on_retry(RetryEvent(operation, try_number, delay, verdict.retry.reason))
            if not wait_in_try:
                yield Sleep(delay)
            try_number += 1

    # -- create -------------------------------------------------------------------------------

    def submit(
        self,
        request: VideoRequest,
        *,
        request_key: str | None = None,
        attempt: int = 1,
        base_dir: Path | None = None,
        allowed_roots: Sequence[Path] = (),
        media_sha256: Mapping[str, str | None] | None = None,
        on_try: TryHook | None = None,
    ) -> Steps[Generation]:
        """Build and check everything first (media errors raise here, before any call), then create."""
        roots = (*self.config.allowed_roots, *allowed_roots)
        body = build_create_body(request, base_dir=base_dir, allowed_roots=roots, media_sha256=media_sha256)
        key = request_key or body_key(body)
        client_request_id(key, attempt, 1)  # validates the key before anything is sent
        return self._create_steps(body, key, attempt, on_try)

    def _create_steps(
        self, body: dict[str, Any], key: str, attempt: int, on_try: TryHook | None
    ) -> Steps[Generation]:
        def one_try(try_number: int, seconds_left: float, wait_s: float) -> Steps[Any]:
            request_id = client_request_id(key, attempt, try_number)
            waited_from = self._clock()
            # The turn comes before the try is announced: a create waiting out a pause is not "sending".
            turn = yield AwaitTurn(wait_s, seconds_left)
            if isinstance(turn, Refused):
                return turn
            seconds_left -= self._clock() - waited_from
            if on_try is not None:
                yield NotifyTry(on_try, CreateTry(try_number, request_id, "sending"))
            log.info("create: sending %s", request_id)
            call = self._call(
                "POST", seconds_left, headers={"X-Client-Request-Id": request_id}, json=body, ticket=turn
            )
            return (yield call)

        def judge(outcome: Any, try_number: int) -> Verdict:
            return self.judge_create(outcome, client_request_id(key, attempt, try_number), try_number)

        generation: Generation = yield from self._retry_steps(
            "create", self.config.create_deadline_s, one_try, judge, on_try, wait_in_try=True
        )
        log.info(
            "create: %s accepted as generation %s (%s)",
            generation.client_request_id,
            generation.id,
            printable(generation.raw_status, 40),
        )
        return generation

    def judge_create(
        self, outcome: Reply | httpx.RequestError | Refused, request_id: str, try_number: int
    ) -> Verdict:
        """What one create try's outcome means for money, and whether another try is safe."""
        if isinstance(outcome, Refused):  # never sent, never announced: no answered event either
            stop = outcome.stop
            return Verdict(
                error=CreatesPaused(
                    f"create {request_id} not sent: {outcome.reason}",
                    client_request_id=request_id,
                    until=stop.until if stop else None,
                    retry_after_s=stop.retry_after_s if stop else None,
                )
            )

        def verdict(
            created: bool | None,
            detail: str,
            error: ApiError | None = None,
            *,
            value: Generation | None = None,
            retry: Retry | None = None,
        ) -> Verdict:
            status = outcome.status_code if isinstance(outcome, Reply) else None
            generation_id = value.id if value is not None else None
            event = CreateTry(try_number, request_id, "answered", created, status, detail, generation_id)
            return Verdict(value=value, error=error, retry=retry, answered=event)

        if isinstance(outcome, httpx.RequestError):
            described = describe_exception(outcome)
            if isinstance(outcome, CallDeadline) and not outcome.sent:
                return verdict(
                    False,
                    described,
                    CreateNotAccepted(
                        f"create {request_id} not sent: {described}", client_request_id=request_id
                    ),
                )
            if isinstance(outcome, CallDeadline) or not request_never_sent(outcome):
                return verdict(
                    None,
                    described,
                    CreateOutcomeUnknown(
                        f"create {request_id} was sent but its answer was lost ({described}): "
                        "the generation may exist and be billed; not retried",
                        client_request_id=request_id,
                    ),
                )
            error = CreateNotAccepted(
                f"create not accepted: could not reach {printable(self.config.base_url)} in {try_number} tries "
                f"({described})",
                client_request_id=request_id,
            )
            retry = Retry(described) if request_error_is_transient(outcome) else None
            return verdict(False, described, error, retry=retry)

        reply = outcome
        detail = f"HTTP {reply.status_code}"
        if reply.status_code in CREATE_AMBIGUOUS_STATUSES:
            said = error_from_reply(reply, secret=self.config.api_key, what="create")
            return verdict(
                None,
                detail,
                CreateOutcomeUnknown(
                    f"create {request_id} answered HTTP {reply.status_code}: the generation may exist and be "
                    f"billed; not retried ({said.message})",
                    client_request_id=request_id,
                    status_code=reply.status_code,
                    request_id=said.request_id,
                ),
            )
        retry = _retry_for_status(reply, CREATE_RETRY_STATUSES)
        if retry is not None:
            said = error_from_reply(reply, secret=self.config.api_key, what="create")
            error = CreateNotAccepted(
                f"create not accepted in {try_number} tries: {said.message}",
                client_request_id=request_id,
                status_code=reply.status_code,
                request_id=said.request_id,
                retry_after_s=retry.retry_after_s,
            )
            return verdict(False, detail, error, retry=retry)
        if not reply.is_success:
            # Any other 4xx is a refusal (nothing created); any other 5xx may hide a created task.
            created = None if reply.status_code >= 500 else False
            error = error_from_reply(
                reply,
                secret=self.config.api_key,
                what="create",
                created=created,
                client_request_id=request_id,
            )
            return verdict(created, detail, error)
        sent_id = reply.headers.get("x-client-request-id") or request_id
        try:
            generation = parse_generation(reply.json_object() or {}, reply.headers, client_request_id=sent_id)
        except ValueError:
            return verdict(
                None,
                f"{detail} without a generation id",
                CreateOutcomeUnknown(
                    f"create answered HTTP {reply.status_code} without a readable generation id: "
                    "it may have been accepted",
                    client_request_id=request_id,
                    status_code=reply.status_code,
                ),
            )
        return verdict(True, "accepted", value=generation)

    # -- get ----------------------------------------------------------------------------------

    def get(self, generation_id: str) -> Steps[Generation]:
        what = f"get {printable(generation_id, 80)}"

        def one_try(_try: int, seconds_left: float) -> Steps[Any]:
            return (yield self._call("GET", seconds_left, params={"generation_id": generation_id}))

        def judge(outcome: Any, _try: int) -> Verdict:
            if isinstance(outcome, httpx.RequestError):
                return self._judge_transport(what, outcome, self.config.get_deadline_s)
            retry = _retry_for_status(outcome, READ_RETRY_STATUSES)
            if retry is not None or not outcome.is_success:
                return Verdict(
                    error=error_from_reply(outcome, secret=self.config.api_key, what=what), retry=retry
                )
            try:
                return Verdict(value=parse_generation(outcome.json_object() or {}, outcome.headers))
            except ValueError as exc:
                return Verdict(
                    error=ApiError(f"{what}: unreadable answer ({exc})", status_code=outcome.status_code)
                )

        generation: Generation = yield from self._retry_steps(
            "get", self.config.get_deadline_s, one_try, judge
        )
        log.debug("get: generation %s is %s", generation.id, printable(generation.raw_status, 40))
        return generation

    @staticmethod
    def _judge_transport(what: str, error: httpx.RequestError, deadline_s: float) -> Verdict:
        """A read's transport error: retried when transient, except its own deadline (no time is left)."""
        if isinstance(error, CallDeadline):
            return Verdict(error=DeadlineExceeded(f"{what} did not finish within its {deadline_s:g} s limit"))
        described = describe_exception(error)
        retry = Retry(described) if request_error_is_transient(error) else None
        return Verdict(error=TransportError(f"{what} failed, retries exhausted: {described}"), retry=retry)

    # -- wait ---------------------------------------------------------------------------------

    def wait(
        self,
        generation_id: str,
        *,
        deadline_s: float,
        expected_seconds: float | None = None,
        on_poll: Callable[[Generation], None] | None = None,
    ) -> Steps[Generation]:
        """Poll on `PollSchedule` until the generation is terminal or `deadline_s` (from now) passes."""
        expected = expected_seconds if expected_seconds is not None else self.config.expected_seconds_for()
        started = self._clock()
        deadline = started + deadline_s
        polls = 0
        while True:
            delay = self.schedule.next_delay(self._clock() - started, polls, expected)
            delay = min(delay, max(deadline - self._clock(), 0.0))
            if delay > 0:
                yield Sleep(delay)
            generation = yield from self.get(generation_id)
            polls += 1
            if on_poll is not None:
                on_poll(generation)
            if generation.is_terminal:
                log.info("wait: generation %s is %s after %d polls", generation_id, generation.status, polls)
                return generation
            if self._clock() >= deadline:
                raise WaitTimeout(
                    f"generation {printable(generation_id, 80)} still "
                    f"{printable(generation.raw_status or 'pending', 40)} after {deadline_s:g} s ({polls} polls)",
                    generation=generation,
                )

    # -- download -----------------------------------------------------------------------------

    def download(
        self, url: str, destination: str | os.PathLike[str], *, max_bytes: int | None = None
    ) -> Steps[tuple[int, str]]:
        """Stream a video to `destination`; at most `max_bytes` (never above `max_download_bytes`)."""
        cap = min(max_bytes or self.config.max_download_bytes, self.config.max_download_bytes)
        what = f"download of {url_for_logs(url)}"

        def one_try(_try: int, seconds_left: float) -> Steps[Any]:
            return (yield FetchTo(url, destination, cap, seconds_left))

        def judge(outcome: Any, _try: int) -> Verdict:
            if isinstance(outcome, httpx.RequestError):
                return self._judge_transport(what, outcome, self.config.download_deadline_s)
            if isinstance(outcome, Reply):
                return Verdict(
                    error=download_error(outcome, url), retry=_retry_for_status(outcome, READ_RETRY_STATUSES)
                )
            return Verdict(value=outcome)

        size, sha256 = yield from self._retry_steps(
            "download", self.config.download_deadline_s, one_try, judge
        )
        log.info("download: %s -> %s (%d bytes)", what, printable(destination), size)
        return size, sha256
