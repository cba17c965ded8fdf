"""Typed errors, and what each create error means for money.

Like openai-python's `_exceptions.py`, status errors and connection errors are separate classes.
Every error `submit` raises also says whether money may have moved (`created`): False (surely
nothing was created), None (the generation may exist and be billed) or, for an accepted create,
no error at all. Submission acts on `created` alone instead of judging the failure again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from wan_pipeline.api.models import Reply, describe_details
from wan_pipeline.api.retry import parse_retry_after
from wan_pipeline.safe_text import printable
from wan_pipeline.settings import Secret

if TYPE_CHECKING:
    from wan_pipeline.api.models import Generation

EXPIRED_URL_STATUSES = frozenset({403, 404, 410})


class ApiError(Exception):
    """A call to the AI/ML API (or the video host) that did not give what was asked.

    `created` is set on every error a create raises: False when surely nothing was bought, None
    when the generation may exist and be billed. `client_request_id` names the try it concerns.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        created: bool | None = None,
        client_request_id: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.created = created
        self.client_request_id = client_request_id

    def __str__(self) -> str:
        text = self.message
        if self.status_code is not None:
            text += f" [HTTP {self.status_code}]"
        if self.request_id:
            text += f" [request id {printable(self.request_id, 80)}]"
        return text


class RequestRejected(ApiError):
    """400/422: the provider refused the body; fix the request, do not retry."""

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
    """A create that surely created nothing (429/502/503/no connection) after the retries ran out;
    `retry_after_s` is what the last answer's Retry-After asked for, if it did."""

    def __init__(
        self, message: str, *, client_request_id: str, retry_after_s: float | None = None, **kwargs: Any
    ):
        super().__init__(message, client_request_id=client_request_id, created=False, **kwargs)
        self.retry_after_s = retry_after_s


class CreatesPaused(CreateNotAccepted):
    """A create never sent: the client's pacer stopped creating (the provider's rate limit asked for
    a wait longer than it will make, typically a quota until the hour's end, `until` in UTC), or its
    shared pause outlasted the create's time limit."""

    def __init__(self, message: str, *, client_request_id: str, until: datetime | None = None, **kwargs: Any):
        super().__init__(message, client_request_id=client_request_id, **kwargs)
        self.until = until


class CreateOutcomeUnknown(ApiError):
    """A create whose answer was lost (timeout after sending, dropped connection, 500, 504).

    The generation may exist and be billed; the API cannot list generations or dedupe requests, so
    this is recorded as in doubt and resubmitted only on explicit request.
    """

    def __init__(self, message: str, *, client_request_id: str, **kwargs: Any):
        super().__init__(message, client_request_id=client_request_id, created=None, **kwargs)


class DownloadExpired(ApiError):
    """The signed video URL answered 403/404/410: poll the generation again for a fresh URL."""


class DownloadTooLarge(ApiError):
    """The video is larger than the download's cap (declared or counted); nothing was kept."""


class WaitTimeout(ApiError):
    """The generation was still pending at the wait's deadline."""

    def __init__(self, message: str, *, generation: Generation | None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.generation = generation


class TransportError(ApiError):
    """A network failure (timeout, refused or dropped connection) that outlasted the retries."""


class DeadlineExceeded(TransportError):
    """A get or download that did not finish within its whole-operation time limit."""


class AnswerTooLarge(httpx.DecodingError):
    """An API answer bigger than `max_answer_bytes`: a broken or hostile server. As a transport
    error, a create that meets it was sent and stays in doubt."""


class CallDeadline(httpx.TimeoutException):
    """Raised by a client shell when a call's time limit passes; `sent` says whether any byte of
    the request had gone out (a create cut before that surely created nothing)."""

    def __init__(self, message: str, *, sent: bool, request: httpx.Request | None = None):
        super().__init__(message, request=request)
        self.sent = sent


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


def error_from_reply(
    reply: Reply, *, secret: Secret | None = None, what: str = "API call", **extra: Any
) -> ApiError:
    """The typed error for a non-2xx API answer, with the provider's message redacted and made
    printable (one bounded line: a server may send escape sequences or megabytes)."""
    payload = reply.json_object() or {}
    message = payload.get("message")
    if isinstance(message, list):
        message = "; ".join(str(item) for item in message)
    details = payload.get("details", payload.get("detail", payload.get("errors")))
    described = describe_details(details)
    if not message:
        message = described or reply.content[:400].decode("utf-8", "replace").strip()
    elif described and described not in str(message):
        message = f"{message}: {described}"
    said = printable(redact(str(message or httpx.codes.get_reason_phrase(reply.status_code)), secret))
    request_id = payload.get("requestId") or reply.headers.get("x-request-id")
    common: dict[str, Any] = {
        "status_code": reply.status_code,
        "request_id": str(request_id) if request_id is not None else None,
        **extra,
    }
    error_class = _ERRORS_BY_STATUS.get(
        reply.status_code, ServerError if reply.status_code >= 500 else ApiError
    )
    message = f"{what} failed: {said}"
    if error_class is RequestRejected:
        return RequestRejected(message, details=_redact_value(details, secret), **common)
    if error_class is RateLimited:
        return RateLimited(message, retry_after_s=retry_after(reply), **common)
    return error_class(message, **common)


def retry_after(reply: Reply) -> float | None:
    return parse_retry_after(reply.headers.get("retry-after"), datetime.now(UTC))


def describe_exception(exc: BaseException) -> str:
    text = printable(exc, 120)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def url_for_logs(url: str) -> str:
    """A URL without its query: signed-URL signatures stay out of logs and messages."""
    parts = urlsplit(url)
    return printable(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))


def download_error(reply: Reply, url: str) -> ApiError:
    where = url_for_logs(url)
    if reply.status_code in EXPIRED_URL_STATUSES:
        return DownloadExpired(
            f"video URL {where} refused the download (expired signed link?): poll the generation for a fresh URL",
            status_code=reply.status_code,
        )
    error_class = ServerError if reply.status_code >= 500 else ApiError
    return error_class(f"download of {where} failed", status_code=reply.status_code)
