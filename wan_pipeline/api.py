"""Client for the AI/ML API video endpoints: submit, get, wait and download (contract in the shared reference).

Sans-IO: everything that decides what to send, how to read the answer, which error it is and
whether to try again lives in `ApiProtocol`, whose operations are generators that *yield* actions
(`HttpCall`, `FetchTo`, `Sleep`) and receive their outcomes. `AimlApiClient` (httpx.Client) and
`AsyncAimlApiClient` (httpx.AsyncClient) only perform those actions, so both behave identically.

Money rule: a create is retried only where it was surely not accepted (429, 502, 503, connection
never established). A create whose answer was lost raises `CreateOutcomeUnknown` at once: the API
has no idempotency key, and paying twice is worse than asking.

The API key is sent only in the Authorization header of API calls: never to the video host, never
in a repr, a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx

from wan_pipeline.api_retry import (
    CREATE_AMBIGUOUS_STATUSES,
    CREATE_RETRY_STATUSES,
    READ_RETRY_STATUSES,
    PollSchedule,
    RetryEvent,
    RetryPolicy,
    parse_retry_after,
    request_error_is_transient,
    request_never_sent,
)
from wan_pipeline.models import DEFAULT_MODEL, VideoRequest, canonical_json, get_model, usd_from_credits
from wan_pipeline.settings import DEFAULT_BASE_URL, Secret, Settings
from wan_pipeline.sources import wire_reference
from wan_pipeline.storage import atomic_writer

log = logging.getLogger("wan_pipeline.api")

GENERATIONS_PATH = "/v2/video/generations"
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_REQUEST_ID_PREFIX = "wanp"
EXPIRED_URL_STATUSES = frozenset({403, 404, 410})

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    base_url: str = DEFAULT_BASE_URL
    api_key: Secret | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    write_timeout: float = 60.0
    max_attempts: int = 5
    max_retry_seconds: float = 120.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    max_concurrency: int = 8  # async client: semaphore on in-flight API calls
    max_download_bytes: int = 4 * 1024**3
    poll_max_interval_s: float = 60.0
    poll_min_interval_s: float = 1.0
    expected_seconds: float | None = None  # overrides ModelSpec's expected processing time
    # Local media must resolve under one of these (or the submit's base_dir); empty = no restriction.
    allowed_roots: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        # A plain string key would show in repr(): hold it as a Secret whatever the caller passed.
        if self.api_key is not None and not isinstance(self.api_key, Secret):
            object.__setattr__(self, "api_key", Secret(self.api_key))
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if self.max_attempts < 1 or self.max_concurrency < 1:
            raise ValueError("max_attempts and max_concurrency must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ClientConfig:
        values: dict[str, Any] = {
            "base_url": settings.base_url,
            "api_key": settings.api_key,
            "allowed_roots": tuple(settings.allowed_roots),
        }
        return cls(**{**values, **overrides})

    @property
    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout,
            read=self.read_timeout,
            write=self.write_timeout,
            pool=self.connect_timeout,
        )

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.max_retry_seconds, self.backoff_base_s, self.backoff_max_s)

    @property
    def poll_schedule(self) -> PollSchedule:
        return PollSchedule(min_interval_s=self.poll_min_interval_s, max_interval_s=self.poll_max_interval_s)

    def expected_seconds_for(self, request: VideoRequest | None = None) -> float:
        """Expected processing time: the override, else the model's estimate for this request."""
        if self.expected_seconds is not None:
            return self.expected_seconds
        if request is None:
            spec = get_model(DEFAULT_MODEL)
            return spec.expected_processing_seconds(spec.default_resolution, spec.default_duration)
        return request.spec.expected_processing_seconds(request.resolution, request.duration)


# --------------------------------------------------------------------------------------------
# Generation objects
# --------------------------------------------------------------------------------------------

PENDING, COMPLETED, FAILED = "pending", "completed", "failed"
# The contract's table, plus upstream's (DashScope) CANCELED: a cancelled task never completes, and
# reading it as pending would wait on it until the provider forgets it.
_STATUS_MAP = {
    "completed": COMPLETED,
    "succeeded": COMPLETED,
    "error": FAILED,
    "failed": FAILED,
    "canceled": FAILED,
    "cancelled": FAILED,
}


def normalize_status(raw_status: str | None) -> str:
    """completed/succeeded -> completed; error/failed -> failed; anything else (queued...) -> pending."""
    return _STATUS_MAP.get((raw_status or "").strip().lower(), PENDING)


@dataclass(frozen=True)
class Generation:
    id: str
    raw_status: str
    status: str  # "pending" | "completed" | "failed"
    video_url: str | None = None
    video_expires_at: datetime | None = None
    error: str | None = None
    credits_used: float | None = None
    usd_spent: float | None = None
    client_request_id: str | None = None
    inference_id: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.status in (COMPLETED, FAILED)


def url_expires_at(url: str | None) -> datetime | None:
    """The signed URL's `Expires` query parameter (unix seconds) as a UTC datetime."""
    if not url:
        return None
    values = parse_qs(urlsplit(url).query).get("Expires")
    try:
        return datetime.fromtimestamp(int(values[0]), UTC) if values else None
    except (ValueError, OverflowError, OSError):
        return None


def _number(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def describe_details(details: Any) -> str:
    """A readable join of validation details, e.g. `[{loc, msg}]` -> "body.duration: not allowed"."""
    if isinstance(details, str):
        return details
    if not isinstance(details, Sequence):
        return ""
    parts = []
    for item in details:
        if isinstance(item, Mapping):
            location = item.get("loc", item.get("path"))
            if isinstance(location, Sequence) and not isinstance(location, str):
                location = ".".join(str(part) for part in location)
            message = item.get("msg", item.get("message", ""))
            parts.append(f"{location}: {message}" if location else str(message))
        else:
            parts.append(str(item))
    return "; ".join(part for part in parts if part)


def generation_error(payload: Mapping[str, Any]) -> str | None:
    """`error.message`, falling back to the `error.detail[]` messages."""
    error = payload.get("error")
    if error is None:
        return None
    if isinstance(error, str):
        return error
    error = _mapping(error)
    return error.get("message") or describe_details(error.get("detail")) or error.get("name") or None


def parse_generation(
    payload: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    *,
    client_request_id: str | None = None,
) -> Generation:
    """A generation object (POST and GET answers share it) plus the tracing and cost headers."""
    heads = {key.lower(): value for key, value in (headers or {}).items()}
    generation_id = payload.get("id")
    if not isinstance(generation_id, str) or not generation_id:
        raise ValueError("the answer holds no generation id")
    raw_status = str(payload.get("status") or "")
    video_url = _mapping(payload.get("video")).get("url") or None
    usage = _mapping(_mapping(payload.get("meta")).get("usage"))
    credits = _number(usage.get("credits_used"))
    if credits is None:
        credits = _number(heads.get("x-aimlapi-credits-used"))
    usd = _number(usage.get("usd_spent"))
    if usd is None:
        usd = _number(heads.get("x-aimlapi-usd-spent"))
    if usd is None:
        usd = usd_from_credits(credits)
    return Generation(
        id=generation_id,
        raw_status=raw_status,
        status=normalize_status(raw_status),
        video_url=video_url,
        video_expires_at=url_expires_at(video_url),
        error=generation_error(payload),
        credits_used=credits,
        usd_spent=usd,
        client_request_id=heads.get("x-client-request-id") or client_request_id,
        inference_id=heads.get("x-inference-id"),
        raw=dict(payload),
    )


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    """A call to the AI/ML API (or the video host) that did not give what was asked."""

    def __init__(self, message: str, *, status_code: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id

    def __str__(self) -> str:
        text = self.message
        if self.status_code is not None:
            text += f" [HTTP {self.status_code}]"
        if self.request_id:
            text += f" [request id {self.request_id}]"
        return text


class RequestRejected(ApiError):
    """400: the provider refused the body; fix the request, do not retry."""

    def __init__(self, message: str, *, details: Any = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.details = details


class AuthenticationError(ApiError):
    """401: missing or invalid API key."""


class OutOfCredits(ApiError):
    """403 on an API call: the account cannot pay; stop submitting."""


class GenerationNotFound(ApiError):
    """404: the provider does not know this generation id."""


class RateLimited(ApiError):
    """429 that outlasted the retries."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class ServerError(ApiError):
    """5xx that outlasted the retries."""


class CreateNotAccepted(ApiError):
    """A create that surely created nothing (429/502/503/no connection) after the retries ran out."""

    def __init__(self, message: str, *, client_request_id: str, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.client_request_id = client_request_id


class CreateOutcomeUnknown(ApiError):
    """A create whose answer was lost (timeout after sending, dropped connection, 500, 504).

    The generation may exist and be billed; the API cannot list generations or dedupe requests, so
    this is recorded as in doubt and resubmitted only on explicit request.
    """

    def __init__(self, message: str, *, client_request_id: str, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.client_request_id = client_request_id


class DownloadExpired(ApiError):
    """The signed video URL answered 403/404/410: poll the generation again for a fresh URL."""


class DownloadTooLarge(ApiError):
    """The video is larger than `max_download_bytes` (declared or counted); nothing was kept."""


class WaitTimeout(ApiError):
    """The generation was still pending at the wait's deadline."""

    def __init__(self, message: str, *, generation: Generation | None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.generation = generation


class TransportError(ApiError):
    """A network failure (timeout, refused or dropped connection) that outlasted the retries."""


_ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    400: RequestRejected,
    401: AuthenticationError,
    403: OutOfCredits,
    404: GenerationNotFound,
    422: RequestRejected,
    429: RateLimited,
}

_DATA_URI = re.compile(r"data:([\w.+/-]*);base64,[A-Za-z0-9+/=_-]*")


def redact(text: str, secret: Secret | None = None) -> str:
    """Hide data-URI payloads (a provider may echo the body) and the API key from a message."""
    text = _DATA_URI.sub(lambda m: f"data:{m.group(1)};base64,<{len(m.group(0))} chars>", text)
    if secret:
        text = text.replace(secret.reveal(), "***")
    return text


def _redact_value(value: Any, secret: Secret | None) -> Any:
    if isinstance(value, str):
        return redact(value, secret)
    if isinstance(value, Mapping):
        return {key: _redact_value(item, secret) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(item, secret) for item in value]
    return value


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, read in full (API answers are small); for a failed download only the status."""

    status_code: int
    headers: httpx.Headers
    content: bytes = b""

    @classmethod
    def from_response(cls, response: httpx.Response) -> Reply:
        return cls(response.status_code, response.headers, response.content)

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    def json_object(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.content)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


def error_from_reply(reply: Reply, *, secret: Secret | None = None, what: str = "API call") -> ApiError:
    """The typed error for a non-2xx API answer, with the provider's message (redacted)."""
    payload = reply.json_object() or {}
    message = payload.get("message")
    if isinstance(message, list):
        message = "; ".join(str(item) for item in message)
    details = payload.get("details", payload.get("detail", payload.get("errors")))
    described = describe_details(details)
    if not message:
        message = described or reply.content[:200].decode("utf-8", "replace").strip()
    elif described and described not in message:
        message = f"{message}: {described}"
    message = redact(f"{what} failed: {message or httpx.codes.get_reason_phrase(reply.status_code)}", secret)
    request_id = payload.get("requestId") or reply.headers.get("x-request-id")
    common: dict[str, Any] = {"status_code": reply.status_code, "request_id": request_id}
    error_class = _ERRORS_BY_STATUS.get(
        reply.status_code, ServerError if reply.status_code >= 500 else ApiError
    )
    if error_class is RequestRejected:
        return RequestRejected(message, details=_redact_value(details, secret), **common)
    if error_class is RateLimited:
        return RateLimited(message, retry_after_s=_retry_after(reply), **common)
    return error_class(message, **common)


def _retry_after(reply: Reply) -> float | None:
    return parse_retry_after(reply.headers.get("retry-after"), datetime.now(UTC))


def _describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def url_for_logs(url: str) -> str:
    """A URL without its query: signed-URL signatures stay out of logs and messages."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


# --------------------------------------------------------------------------------------------
# Actions the protocol yields, and the shared download bookkeeping
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpCall:
    """An authorized call to the API (path relative to the base URL). The outcome is a `Reply`."""

    method: str
    path: str
    headers: Mapping[str, str] = field(repr=False)  # holds the Authorization header
    json: Any = field(default=None, repr=False)  # may hold base64 media
    params: Mapping[str, str] | None = None


@dataclass(frozen=True)
class FetchTo:
    """Stream `url` (no credentials) into `destination`; the outcome is (bytes, sha256) or a `Reply`."""

    url: str = field(repr=False)
    destination: str | os.PathLike[str]
    max_bytes: int


@dataclass(frozen=True)
class Sleep:
    seconds: float


Action = HttpCall | FetchTo | Sleep
Steps = Generator[Action, Any, T]


def refused_download(response: httpx.Response, max_bytes: int) -> Reply | None:
    """A non-200 answer as a `Reply` for the protocol to map, or None when the body may be streamed.

    A declared size over the limit raises `DownloadTooLarge` before anything is written.
    """
    if response.status_code != 200:
        return Reply(response.status_code, response.headers)
    declared = _number(response.headers.get("content-length"))
    if declared is not None and declared > max_bytes:
        raise DownloadTooLarge(f"video declares {int(declared)} bytes, more than the {max_bytes}-byte limit")
    return None


class DownloadSink:
    """Counts, hashes and writes streamed chunks, refusing to go past the size limit."""

    def __init__(self, handle: IO[bytes], max_bytes: int):
        self._handle = handle
        self._max_bytes = max_bytes
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise DownloadTooLarge(f"video exceeded the {self._max_bytes}-byte limit while streaming")
        self._digest.update(chunk)
        self._handle.write(chunk)

    def result(self) -> tuple[int, str]:
        return self.size, self._digest.hexdigest()


def download_request(
    http: httpx.Client | httpx.AsyncClient, url: str, timeout: httpx.Timeout
) -> httpx.Request:
    """A GET for a signed video URL. An injected client's default Authorization header is removed:
    the key must never reach a CDN."""
    request = http.build_request("GET", url, timeout=timeout)
    request.headers.pop("authorization", None)
    return request


def download_error(reply: Reply, url: str) -> ApiError:
    where = url_for_logs(url)
    if reply.status_code in EXPIRED_URL_STATUSES:
        return DownloadExpired(
            f"video URL {where} refused the download (expired signed link?): poll the generation for a fresh URL",
            status_code=reply.status_code,
        )
    error_class = ServerError if reply.status_code >= 500 else ApiError
    return error_class(f"download of {where} failed", status_code=reply.status_code)


# --------------------------------------------------------------------------------------------
# The protocol: request building, parsing, error mapping, retries, polling
# --------------------------------------------------------------------------------------------


def build_create_body(
    request: VideoRequest, *, base_dir: Path | None = None, allowed_roots: Sequence[Path] = ()
) -> dict[str, Any]:
    """The create body; local and fsspec media are read, checked and inlined as data URIs."""
    spec = request.spec
    image = wire_reference(request.image_url, "image", spec, base_dir=base_dir, allowed_roots=allowed_roots)
    audio = None
    if request.audio_url is not None:
        audio = wire_reference(
            request.audio_url, "audio", spec, base_dir=base_dir, allowed_roots=allowed_roots
        )
    return request.body(image, audio)


def body_key(body: Mapping[str, Any]) -> str:
    """Stands in for a request key: 32 hex chars of sha256 over the canonical body."""
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()[:32]


def client_request_id(request_key: str, attempt: int, try_number: int) -> str:
    """`wanp-<request_key>-<attempt>.<try>`: traces each HTTP try of each paid attempt."""
    value = f"{CLIENT_REQUEST_ID_PREFIX}-{request_key}-{attempt}.{try_number}"
    if not CLIENT_REQUEST_ID.fullmatch(value):
        raise ValueError(
            f"client request id {value!r} must be 1-128 characters of [A-Za-z0-9._:-]: check the request key"
        )
    return value


@dataclass(frozen=True)
class _Retry:
    reason: str
    retry_after_s: float | None = None


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

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", **(extra or {})}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key.reveal()}"
        return headers

    # -- retry loop ---------------------------------------------------------------------------

    def _retry_steps(
        self,
        operation: str,
        make_action: Callable[[int], Action],
        judge: Callable[[Any, int], _Retry | None],
    ) -> Steps[tuple[Any, int]]:
        """Try until `judge` accepts the outcome (or raises); past the budget, hand back the last outcome.

        The outcome is whatever the action produced, or the `httpx.RequestError` it raised; it is
        returned with the number of tries made.
        """
        started = self._clock()
        try_number = 1
        while True:
            action = make_action(try_number)
            try:
                outcome = yield action
            except httpx.RequestError as exc:
                outcome = exc
            retry = judge(outcome, try_number)
            if retry is None:
                return outcome, try_number
            delay = self.policy.delay_before_retry(
                try_number, self._clock() - started, retry.retry_after_s, self._rng
            )
            if delay is None:
                log.warning("%s: giving up after %d tries (%s)", operation, try_number, retry.reason)
                return outcome, try_number
            event = RetryEvent(operation, try_number, delay, retry.reason)
            log.warning(
                "%s: try %d failed (%s); retrying in %.2f s", operation, try_number, retry.reason, delay
            )
            if self._on_retry is not None:
                self._on_retry(event)
            yield Sleep(delay)
            try_number += 1

    @staticmethod
    def _retry_for_reply(reply: Reply, statuses: frozenset[int]) -> _Retry | None:
        if reply.status_code not in statuses:
            return None
        retry_after = _retry_after(reply)
        reason = f"HTTP {reply.status_code}"
        if retry_after is not None:
            reason += f", retry-after {retry_after:g} s"
        return _Retry(reason, retry_after)

    def _judge_read(self, outcome: Any, try_number: int) -> _Retry | None:
        if isinstance(outcome, httpx.RequestError):
            if request_error_is_transient(outcome):
                return _Retry(_describe_exception(outcome))
            return None
        if isinstance(outcome, Reply):
            return self._retry_for_reply(outcome, READ_RETRY_STATUSES)
        return None

    # -- create -------------------------------------------------------------------------------

    def submit(
        self,
        request: VideoRequest,
        *,
        request_key: str | None = None,
        attempt: int = 1,
        base_dir: Path | None = None,
    ) -> Steps[Generation]:
        """Build and check everything first (media errors raise here, before any call), then create."""
        roots = tuple(self.config.allowed_roots) + ((Path(base_dir),) if base_dir is not None else ())
        body = build_create_body(request, base_dir=base_dir, allowed_roots=roots)
        key = request_key or body_key(body)
        client_request_id(key, attempt, 1)  # validates the key before anything is sent
        return self._create_steps(body, key, attempt)

    def _create_steps(self, body: dict[str, Any], key: str, attempt: int) -> Steps[Generation]:
        def make_action(try_number: int) -> HttpCall:
            request_id = client_request_id(key, attempt, try_number)
            log.info("create: sending %s", request_id)
            return HttpCall(
                "POST", GENERATIONS_PATH, self._headers({"X-Client-Request-Id": request_id}), body
            )

        def judge(outcome: Any, try_number: int) -> _Retry | None:
            return self._judge_create(outcome, client_request_id(key, attempt, try_number))

        outcome, tries = yield from self._retry_steps("create", make_action, judge)
        request_id = client_request_id(key, attempt, tries)
        if isinstance(outcome, httpx.RequestError):
            raise CreateNotAccepted(
                f"create not accepted: could not reach {self.config.base_url} in {tries} tries "
                f"({_describe_exception(outcome)})",
                client_request_id=request_id,
            )
        reply: Reply = outcome
        if reply.status_code in CREATE_RETRY_STATUSES:
            error = error_from_reply(reply, secret=self.config.api_key, what="create")
            raise CreateNotAccepted(
                f"create not accepted in {tries} tries: {error.message}",
                client_request_id=request_id,
                status_code=reply.status_code,
                request_id=error.request_id,
            )
        if not reply.is_success:
            raise error_from_reply(reply, secret=self.config.api_key, what="create")
        sent_id = reply.headers.get("x-client-request-id") or request_id
        try:
            generation = parse_generation(reply.json_object() or {}, reply.headers, client_request_id=sent_id)
        except ValueError:
            raise CreateOutcomeUnknown(
                f"create answered HTTP {reply.status_code} without a readable generation id: "
                "it may have been accepted",
                client_request_id=sent_id,
                status_code=reply.status_code,
            ) from None
        log.info("create: %s accepted as generation %s (%s)", sent_id, generation.id, generation.raw_status)
        return generation

    def _judge_create(self, outcome: Any, request_id: str) -> _Retry | None:
        if isinstance(outcome, httpx.RequestError):
            if request_never_sent(outcome):
                return _Retry(_describe_exception(outcome)) if request_error_is_transient(outcome) else None
            raise CreateOutcomeUnknown(
                f"create {request_id} was sent but its answer was lost ({_describe_exception(outcome)}): "
                "the generation may exist and be billed; not retried",
                client_request_id=request_id,
            )
        if outcome.status_code in CREATE_AMBIGUOUS_STATUSES:
            error = error_from_reply(outcome, secret=self.config.api_key, what="create")
            raise CreateOutcomeUnknown(
                f"create {request_id} answered HTTP {outcome.status_code}: the generation may exist and be "
                f"billed; not retried ({error.message})",
                client_request_id=request_id,
                status_code=outcome.status_code,
                request_id=error.request_id,
            )
        return self._retry_for_reply(outcome, CREATE_RETRY_STATUSES)

    # -- get ----------------------------------------------------------------------------------

    def get(self, generation_id: str) -> Steps[Generation]:
        call = HttpCall("GET", GENERATIONS_PATH, self._headers(), params={"generation_id": generation_id})
        outcome, _tries = yield from self._retry_steps("get", lambda _try: call, self._judge_read)
        if isinstance(outcome, httpx.RequestError):
            raise TransportError(
                f"get {generation_id} failed, retries exhausted: {_describe_exception(outcome)}"
            )
        if not outcome.is_success:
            raise error_from_reply(outcome, secret=self.config.api_key, what=f"get {generation_id}")
        try:
            generation = parse_generation(outcome.json_object() or {}, outcome.headers)
        except ValueError as exc:
            raise ApiError(
                f"get {generation_id}: unreadable answer ({exc})", status_code=outcome.status_code
            ) from None
        log.debug("get: generation %s is %s", generation.id, generation.raw_status)
        return generation

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
                    f"generation {generation_id} still {generation.raw_status or 'pending'} after "
                    f"{deadline_s:g} s ({polls} polls)",
                    generation=generation,
                )

    # -- download -----------------------------------------------------------------------------

    def download(self, url: str, destination: str | os.PathLike[str]) -> Steps[tuple[int, str]]:
        action = FetchTo(url, destination, self.config.max_download_bytes)
        outcome, _tries = yield from self._retry_steps("download", lambda _try: action, self._judge_read)
        if isinstance(outcome, httpx.RequestError):
            raise TransportError(
                f"download of {url_for_logs(url)} failed, retries exhausted: {_describe_exception(outcome)}"
            )
        if isinstance(outcome, Reply):
            raise download_error(outcome, url)
        size, sha256 = outcome
        log.info("download: %s -> %s (%d bytes)", url_for_logs(url), destination, size)
        return size, sha256


# --------------------------------------------------------------------------------------------
# The clients: perform the protocol's actions with httpx
# --------------------------------------------------------------------------------------------


def _client_repr(client: AimlApiClient | AsyncAimlApiClient) -> str:
    key = "set" if client.config.api_key else "none"
    return f"{type(client).__name__}(base_url={client.config.base_url!r}, api_key={key})"


class AimlApiClient:
    """Synchronous client. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        http_client: httpx.Client | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.config = config or ClientConfig()
        self._protocol = ApiProtocol(self.config, clock=clock, rng=rng, on_retry=on_retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.config.timeout)
        self._sleep = sleep

    def __repr__(self) -> str:
        return _client_repr(self)

    def __enter__(self) -> AimlApiClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def submit(
        self,
        request: VideoRequest,
        *,
        request_key: str | None = None,
        attempt: int = 1,
        base_dir: Path | None = None,
    ) -> Generation:
        return self._run(
            self._protocol.submit(request, request_key=request_key, attempt=attempt, base_dir=base_dir)
        )

    def get(self, generation_id: str) -> Generation:
        return self._run(self._protocol.get(generation_id))

    def download(self, url: str, destination: str | os.PathLike[str]) -> tuple[int, str]:
        return self._run(self._protocol.download(url, destination))

    def wait(
        self,
        generation_id: str,
        *,
        deadline_s: float,
        expected_seconds: float | None = None,
        on_poll: Callable[[Generation], None] | None = None,
    ) -> Generation:
        steps = self._protocol.wait(
            generation_id, deadline_s=deadline_s, expected_seconds=expected_seconds, on_poll=on_poll
        )
        return self._run(steps)

    def _run(self, steps: Steps[T]) -> T:
        outcome: Any = None
        error: httpx.RequestError | None = None
        try:
            while True:
                try:
                    action = steps.send(outcome) if error is None else steps.throw(error)
                except StopIteration as done:
                    return done.value
                outcome, error = None, None
                try:
                    outcome = self._perform(action)
                except httpx.RequestError as exc:
                    error = exc
        finally:
            steps.close()

    def _perform(self, action: Action) -> Any:
        if isinstance(action, Sleep):
            self._sleep(action.seconds)
            return None
        if isinstance(action, FetchTo):
            return self._fetch(action)
        request = self._http.build_request(
            action.method,
            self._protocol.url(action.path),
            headers=action.headers,
            json=action.json,
            params=action.params,
            timeout=self.config.timeout,
        )
        return Reply.from_response(self._http.send(request))

    def _fetch(self, action: FetchTo) -> tuple[int, str] | Reply:
        request = download_request(self._http, action.url, self.config.timeout)
        response = self._http.send(request, stream=True, auth=None, follow_redirects=True)
        try:
            refused = refused_download(response, action.max_bytes)
            if refused is not None:
                return refused
            with atomic_writer(action.destination) as handle:
                sink = DownloadSink(handle, action.max_bytes)
                for chunk in response.iter_bytes():
                    sink.write(chunk)
            return sink.result()
        finally:
            response.close()


class AsyncAimlApiClient:
    """Asynchronous client: same operations and behaviour; at most `max_concurrency` API calls in flight."""

    def __init__(
        self,
        config: ClientConfig | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ):
        self.config = config or ClientConfig()
        self._protocol = ApiProtocol(self.config, clock=clock, rng=rng, on_retry=on_retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.config.timeout)
        self._sleep = sleep
        self._in_flight = asyncio.Semaphore(self.config.max_concurrency)

    def __repr__(self) -> str:
        return _client_repr(self)

    async def __aenter__(self) -> AsyncAimlApiClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def submit(
        self,
        request: VideoRequest,
        *,
        request_key: str | None = None,
        attempt: int = 1,
        base_dir: Path | None = None,
    ) -> Generation:
        steps = self._protocol.submit(request, request_key=request_key, attempt=attempt, base_dir=base_dir)
        return await self._run(steps)

    async def get(self, generation_id: str) -> Generation:
        return await self._run(self._protocol.get(generation_id))

    async def download(self, url: str, destination: str | os.PathLike[str]) -> tuple[int, str]:
        return await self._run(self._protocol.download(url, destination))

    async def wait(
        self,
        generation_id: str,
        *,
        deadline_s: float,
        expected_seconds: float | None = None,
        on_poll: Callable[[Generation], None] | None = None,
    ) -> Generation:
        steps = self._protocol.wait(
            generation_id, deadline_s=deadline_s, expected_seconds=expected_seconds, on_poll=on_poll
        )
        return await self._run(steps)

    async def _run(self, steps: Steps[T]) -> T:
        outcome: Any = None
        error: httpx.RequestError | None = None
        try:
            while True:
                try:
                    action = steps.send(outcome) if error is None else steps.throw(error)
                except StopIteration as done:
                    return done.value
                outcome, error = None, None
                try:
                    outcome = await self._perform(action)
                except httpx.RequestError as exc:
                    error = exc
        finally:
            steps.close()

    async def _perform(self, action: Action) -> Any:
        if isinstance(action, Sleep):
            await self._sleep(action.seconds)
            return None
        if isinstance(action, FetchTo):
            return await self._fetch(action)
        request = self._http.build_request(
            action.method,
            self._protocol.url(action.path),
            headers=action.headers,
            json=action.json,
            params=action.params,
            timeout=self.config.timeout,
        )
        async with self._in_flight:
            return Reply.from_response(await self._http.send(request))

    async def _fetch(self, action: FetchTo) -> tuple[int, str] | Reply:
        request = download_request(self._http, action.url, self.config.timeout)
        response = await self._http.send(request, stream=True, auth=None, follow_redirects=True)
        try:
            refused = refused_download(response, action.max_bytes)
            if refused is not None:
                return refused
            # Writes are synchronous: local disks and fsspec buffers absorb a chunk quickly.
            with atomic_writer(action.destination) as handle:
                sink = DownloadSink(handle, action.max_bytes)
                async for chunk in response.aiter_bytes():
                    sink.write(chunk)
            return sink.result()
        finally:
            await response.aclose()
