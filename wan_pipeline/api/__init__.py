"""Client for the AI/ML API video endpoints: submit, get, wait and download (contract in the shared reference).

In the shape of httpx and the Stainless-generated SDKs, one idea per module:

- `config`: `ClientConfig` (where, timeouts, whole-call deadlines, size caps) and `max_video_bytes`;
- `errors`: typed errors; every create error says whether money may have moved (`created`);
- `models`: generation objects, parsed as tolerantly as the provider's SDK parses them;
- `protocol`: the sans-IO core (what to send, what an answer means, retries, `CreateTry` events);
- `auth`: `BearerAuth`, the one place the API key lives;
- `clients`: `AimlApiClient` and `AsyncAimlApiClient`, which only perform the protocol's actions;
- `retry`: retry and poll timing, pure decisions;
- `pacing`: riding the provider's create rate limit (AIMD, a shared Retry-After pause, the quota stop).

The API key is sent only in the Authorization header of API calls: never to the video host, never
in a repr, a log line or an exception message.
"""

from wan_pipeline.api.auth import BearerAuth
from wan_pipeline.api.clients import AimlApiClient, AsyncAimlApiClient, DownloadSink
from wan_pipeline.api.config import ClientConfig, max_video_bytes
from wan_pipeline.api.errors import (
    AnswerTooLarge,
    ApiError,
    AuthenticationError,
    CallDeadline,
    CreateNotAccepted,
    CreateOutcomeUnknown,
    CreatesPaused,
    DeadlineExceeded,
    DownloadExpired,
    DownloadTooLarge,
    GenerationNotFound,
    OutOfCredits,
    RateLimited,
    RequestRejected,
    ServerError,
    TransportError,
    WaitTimeout,
    error_from_reply,
    redact,
    url_for_logs,
)
from wan_pipeline.api.models import Generation, Reply, normalize_status, parse_generation, url_expires_at
from wan_pipeline.api.pacing import AsyncCreateGate, CreatePacer, PacerStop, PacingPolicy
from wan_pipeline.api.protocol import (
    ApiProtocol,
    AwaitTurn,
    CreateTry,
    FetchTo,
    HttpCall,
    NotifyTry,
    Sleep,
    build_create_body,
    client_request_id,
)
from wan_pipeline.api.retry import (
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

__all__ = [
    "CREATE_AMBIGUOUS_STATUSES",
    "CREATE_RETRY_STATUSES",
    "READ_RETRY_STATUSES",
    "AimlApiClient",
    "AnswerTooLarge",
    "ApiError",
    "ApiProtocol",
    "AsyncAimlApiClient",
    "AsyncCreateGate",
    "AuthenticationError",
    "AwaitTurn",
    "BearerAuth",
    "CallDeadline",
    "ClientConfig",
    "CreateNotAccepted",
    "CreateOutcomeUnknown",
    "CreatePacer",
    "CreateTry",
    "CreatesPaused",
    "DeadlineExceeded",
    "DownloadExpired",
    "DownloadSink",
    "DownloadTooLarge",
    "FetchTo",
    "Generation",
    "GenerationNotFound",
    "HttpCall",
    "NotifyTry",
    "OutOfCredits",
    "PacerStop",
    "PacingPolicy",
    "PollSchedule",
    "RateLimited",
    "Reply",
    "RequestRejected",
    "RetryEvent",
    "RetryPolicy",
    "ServerError",
    "Sleep",
    "TransportError",
    "WaitTimeout",
    "build_create_body",
    "client_request_id",
    "error_from_reply",
    "max_video_bytes",
    "normalize_status",
    "parse_generation",
    "parse_retry_after",
    "redact",
    "request_error_is_transient",
    "request_never_sent",
    "url_expires_at",
    "url_for_logs",
]
