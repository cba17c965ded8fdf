"""The emulator's HTTP surface: the provider's two video endpoints, a CDN for the videos, and controls.

API routes (Bearer auth, provider error bodies):
  POST /v2/video/generations                    create; 200 {"id", "status": "queued", "meta": {...}}
  GET  /v2/video/generations?generation_id=ID   poll; queued -> generating -> completed | error
CDN and controls (no auth):
  GET  /_emulator/videos/<id>.mp4?Expires=&Signature=   the signed video (403 expired/bad, 404 unknown)
  GET  /_emulator/blob/<n_bytes>                n deterministic bytes, for download benchmarks
  GET  /_emulator/stats  POST /_emulator/reset  POST /_emulator/faults (JSON of FaultConfig fields)
  GET  /_emulator/info                          {"emulator": "wan-pipeline", "version": ...}; 404 when
                                                `identify` is off (a test's stand-in for another server)
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import random
import re
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wan_pipeline import __version__
from wan_pipeline.emulator.state import CreateRefused, DownloadRefused, EmulatorState, UnknownGeneration
from wan_pipeline.emulator.validation import BodyInvalid, parse_create_body, required_issue
from wan_pipeline.models import usd_from_credits

GENERATIONS_PATH = "/v2/video/generations"
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SERVER_ERRORS = {
    "500": "Internal server error",
    "502": "Bad gateway",
    "503": "Service unavailable",
    "504": "Generation timeout",
}
# Faults that answer an error only after the generation was created and charged.
AFTER_CREATE_ERRORS = {"500_after_create": 500, "504_after_create": 504}
UNAUTHORIZED = "This request requires a valid API key. Pass it as `Authorization: Bearer <key>`."
OUT_OF_CREDITS = "You have run out of credits. Top up your balance to continue."
TOO_MANY_REQUESTS = "Too Many Requests"
STREAM_CHUNK = 1024 * 1024
BLOB_SEED = 0x5EED

# A callable that closes the client connection identified by its (host, port) without answering.
ConnectionDropper = Callable[[tuple[str, int]], bool]


def _timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def provider_error(
    status: int, message: str, request: Request, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The provider's error body. Its documented 429 example carries statusCode as a string: so do we."""
    body = {
        "message": message,
        "path": request.url.path,
        "requestId": str(uuid.uuid4()),
        "statusCode": str(status) if status == 429 else status,
        "timestamp": _timestamp(),
        **extra,
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _cdn_error(status: int, code: str, message: str) -> Response:
    # The video host is an object store (OSS-style XML errors), not the JSON API.
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{uuid.uuid4()}</RequestId></Error>"
    )
    return Response(xml, status_code=status, media_type="application/xml")


def _client_request_id(request: Request) -> str | None:
    """A well-formed X-Client-Request-Id (1-128 chars of [A-Za-z0-9._:-]); others are ignored."""
    value = request.headers.get("x-client-request-id")
    return value if value and CLIENT_REQUEST_ID.fullmatch(value) else None


def _echo_headers(request: Request) -> dict[str, str]:
    client_request_id = _client_request_id(request)
    return {"X-Client-Request-Id": client_request_id} if client_request_id else {}


@functools.cache
def _blob_pattern() -> bytes:
    """1 MiB of seeded pseudo-random bytes, stored twice so that any window of up to 1 MiB is one slice."""
    chunk = random.Random(BLOB_SEED).randbytes(STREAM_CHUNK)
    return chunk + chunk


def _seconds(value: float) -> str:
    return f"{value:g}"


class DroppedResponse:
    """No answer at all: the connection is closed, then we wait for the server to notice."""

    def __init__(self, drop: ConnectionDropper):
        self.drop = drop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.drop(tuple(scope["client"])):
            raise RuntimeError("could not find the client connection to drop")
        while (await receive())["type"] != "http.disconnect":
            pass


def route_key(method: str, path: str) -> str | None:
    """The stats bucket of a request: only the API and video routes are counted."""
    if path == GENERATIONS_PATH and method in ("GET", "POST"):
        return f"{method} {GENERATIONS_PATH}"
    if path.startswith("/_emulator/videos/") and method == "GET":
        return "GET /_emulator/videos"
    return None


class RequestCounter:
    """ASGI middleware: counts each counted request under its response status.

    The count is taken when the response starts, before the client can see it, so a client that
    reads the stats right after an answer always finds that answer counted.
    """

    def __init__(self, app: ASGIApp, state: EmulatorState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = route_key(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if key is None:
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.state.count_request(key, str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) of a single `bytes=a-b` / `bytes=a-` / `bytes=-n` range, or None for the whole body."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first:
        return int(first), min(size, int(last) + 1) if last else size
    return max(0, size - int(last)), size


async def _paced(
    read: Callable[[int, int], bytes], start: int, end: int, rate: float | None, step: int | None = None
) -> AsyncIterator[bytes]:
    """Yield bytes [start, end) in chunks (of `step` bytes when given), no faster than `rate` bytes
    per second when set."""
    loop = asyncio.get_running_loop()
    begun, sent = loop.time(), 0
    if step is None:
        step = STREAM_CHUNK if rate is None else max(1024, min(STREAM_CHUNK, int(rate / 20)))
    for offset in range(start, end, step):
        piece = read(offset, min(step, end - offset))
        yield piece
        sent += len(piece)
        if rate is not None:
            delay = begun + sent / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)


def _trickle_step(bytes_per_s: float) -> int:
    # A few bytes at a time, several times a second: every read gets data, so no read timeout fires.
    return max(1, int(bytes_per_s / 4))


def trickled(response: Response, bytes_per_s: float) -> Response:
    """The same answer (status, headers, body), its body sent a few bytes at a time."""
    body = bytes(response.body)
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-type"}
    return StreamingResponse(
        _paced(lambda at, n: body[at : at + n], 0, len(body), bytes_per_s, _trickle_step(bytes_per_s)),
        status_code=response.status_code,
        headers=headers,
        media_type=response.media_type,
    )


def padded_reader(data: bytes, size: int) -> Callable[[int, int], bytes]:
    """Read `data` padded to `size` bytes with a trailing mp4 `free` box (zeros), never built in memory."""
    pad = size - len(data)
    if pad >= 16:
        # A box's 32-bit size field, or size 1 and a 64-bit size for a pad of 4 GiB or more.
        header = struct.pack(">I4s", pad, b"free") if pad < 2**32 else struct.pack(">I4sQ", 1, b"free", pad)
    else:
        header = b""
    prefix = data + header

    def read(at: int, n: int) -> bytes:
        piece = prefix[at : at + n]
        return piece + bytes(max(min(n, size - at) - len(piece), 0))

    return read


def _bytes_response(
    request: Request,
    size: int,
    read: Callable[[int, int], bytes],
    media_type: str,
    rate: float | None,
    step: int | None = None,
) -> Response:
    """A streamed body with content-length, honouring a single Range like the provider's CDN."""
    headers = {"Accept-Ranges": "bytes"}
    span = _byte_range(request.headers.get("range"), size)
    status, (start, end) = 200, (0, size)
    if span is not None:
        start, end = span
        if start >= size or start >= end:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(
        _paced(read, start, end, rate, step), status_code=status, headers=headers, media_type=media_type
    )


def build_app(state: EmulatorState, drop_connection: ConnectionDropper) -> Starlette:
    config = state.config

    def authorized(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return config.api_key is None or _same_secret(token, config.api_key)

    def answer(endpoint: str, response: Response) -> Response:
        if state.trickles(endpoint):
            return trickled(response, state.faults.trickle_bytes_per_s)
        return response

    async def create_generation(request: Request) -> Response:
        response = await create_answer(request)
        return response if isinstance(response, DroppedResponse) else answer("create", response)

    async def create_answer(request: Request) -> Response | DroppedResponse:
        headers = _echo_headers(request)
        if not authorized(request) or state.key_revoked():
            return provider_error(401, UNAUTHORIZED, request, headers)
        # Rate limiting comes before body validation, upstream failures after it.
        fault = state.create_fault()
        if fault == "429":
            state.count_429("fault")
            retry_after = state.retry_after()
            if retry_after is not None:
                headers["Retry-After"] = _seconds(retry_after)
            return provider_error(429, TOO_MANY_REQUESTS, request, headers)
        try:
            # Decoding and inspecting a (maybe 13 MB) data URI stays off the event loop.
            parsed = await run_in_threadpool(parse_create_body, await request.body())
        except BodyInvalid as exc:
            return provider_error(400, "Body validation error!", request, headers, errors=exc.issues)
        if fault in SERVER_ERRORS:
            return provider_error(int(fault), SERVER_ERRORS[fault], request, headers)
        try:
            generation = state.accept_create(parsed, _client_request_id(request), dropped=fault == "drop")
        except CreateRefused as refused:
            if refused.status == 429:
                # The rate limit and the quota answer like the documented 429 (the body does not say
                # which); Retry-After says how long: a fraction of a second, or up to the hour's end.
                assert refused.retry_after_s is not None
                headers["Retry-After"] = _seconds(refused.retry_after_s)
                return provider_error(429, TOO_MANY_REQUESTS, request, headers)
            message = UNAUTHORIZED if refused.status == 401 else OUT_OF_CREDITS
            return provider_error(refused.status, message, request, headers)
        if fault == "drop":
            # Counted here: no response will start, and the client must find it counted once cut off.
            state.count_request(f"POST {GENERATIONS_PATH}", "dropped")
            return DroppedResponse(drop_connection)
        if fault in AFTER_CREATE_ERRORS:
            status = AFTER_CREATE_ERRORS[fault]
            return provider_error(status, SERVER_ERRORS[str(status)], request, headers)
        credits = generation.credits_used
        headers |= {
            "x-inference-id": generation.id,
            "x-aimlapi-credits-used": str(credits),
            "x-aimlapi-usd-spent": _seconds(usd_from_credits(credits)),
        }
        body = {"id": generation.id, "status": "queued", "meta": {"usage": {"credits_used": credits}}}
        return JSONResponse(body, headers=headers)

    async def get_generation(request: Request) -> Response:
        return answer("get", await get_answer(request))

    async def get_answer(request: Request) -> Response:
        headers = _echo_headers(request)
        if not authorized(request):
            return provider_error(401, UNAUTHORIZED, request, headers)
        fault = state.get_fault()
        if fault == "429":
            return provider_error(429, "Too Many Requests", request, headers)
        if fault in SERVER_ERRORS:
            return provider_error(int(fault), SERVER_ERRORS[fault], request, headers)
        generation_id = request.query_params.get("generation_id")
        if not generation_id:
            issues = [required_issue("generation_id", "string")]
            return provider_error(400, "Query validation error!", request, headers, errors=issues)
        try:
            generation, status = state.poll(generation_id)
        except UnknownGeneration:
            return provider_error(404, f"Generation {generation_id} not found", request, headers)
        body: dict[str, Any] = {"id": generation.id, "status": status}
        if status == "completed":
            body["video"] = {"url": state.video_url(generation, str(request.base_url).rstrip("/"))}
        elif status == "error":
            body["error"] = generation.error()
        return JSONResponse(body, headers=headers | {"x-inference-id": generation.id})

    async def download_video(request: Request) -> Response:
        generation_id = request.path_params["name"].removesuffix(".mp4")
        try:
            recipe = state.authorize_download(
                generation_id, request.query_params.get("Expires"), request.query_params.get("Signature")
            )
        except UnknownGeneration:
            return _cdn_error(404, "NoSuchKey", "The specified key does not exist.")
        except DownloadRefused as exc:
            return _cdn_error(403, "AccessDenied", str(exc))
        data = await asyncio.wrap_future(state.videos.fetch(recipe))
        faults = state.faults
        size = max(len(data), config.video_bytes or 0, faults.oversize_video_bytes or 0)
        if state.trickles("download"):
            rate, step = faults.trickle_bytes_per_s, _trickle_step(faults.trickle_bytes_per_s)
        else:
            rate, step = faults.download_bytes_per_s, None
        return _bytes_response(request, size, padded_reader(data, size), "video/mp4", rate, step)

    async def blob(request: Request) -> Response:
        pattern = _blob_pattern()  # byte i of the blob is pattern[i % STREAM_CHUNK]
        return _bytes_response(
            request,
            request.path_params["n_bytes"],
            lambda at, n: pattern[at % STREAM_CHUNK : at % STREAM_CHUNK + n],
            "application/octet-stream",
            state.faults.download_bytes_per_s,
        )

    async def info(request: Request) -> Response:
        if not config.identify:
            return provider_error(404, "Not Found", request)
        return JSONResponse({"emulator": "wan-pipeline", "version": __version__})

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse({"reset": True})

    async def update_faults(request: Request) -> Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object of FaultConfig fields")
            faults = state.update_faults(**changes)
        except (ValueError, TypeError) as exc:
            return provider_error(400, f"Invalid faults: {exc}", request)
        return JSONResponse(asdict(faults))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return provider_error(exc.status_code, str(exc.detail), request, exc.headers)

    routes = [
        Route(GENERATIONS_PATH, create_generation, methods=["POST"]),
        Route(GENERATIONS_PATH, get_generation, methods=["GET"]),
        Route("/_emulator/videos/{name:str}", download_video, methods=["GET"]),
        Route("/_emulator/blob/{n_bytes:int}", blob, methods=["GET"]),
        Route("/_emulator/info", info, methods=["GET"]),
        Route("/_emulator/stats", stats, methods=["GET"]),
        Route("/_emulator/reset", reset, methods=["POST"]),
        Route("/_emulator/faults", update_faults, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(RequestCounter, state=state)],
        exception_handlers={HTTPException: http_error},
    )


def _same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
