"""The two client shells: perform the protocol's actions with httpx.Client or httpx.AsyncClient.

Everything that decides lives in `protocol`; what the shells share (request building, time and
size limits, download bookkeeping) lives in `_ClientBase` and the helpers here, so a shell is only
the loop that performs actions and the sync or async way of reading a body.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpcore
import httpx

from wan_pipeline.api.auth import BearerAuth
from wan_pipeline.api.config import ClientConfig
from wan_pipeline.api.errors import AnswerTooLarge, CallDeadline, DownloadTooLarge, retry_after
from wan_pipeline.api.models import Generation, Reply
from wan_pipeline.api.pacing import AsyncCreateGate, CreatePacer, PacerStop, Ticket
from wan_pipeline.api.protocol import (
    Action,
    ApiProtocol,
    AwaitTurn,
    FetchTo,
    HttpCall,
    NotifyTry,
    Sleep,
    Steps,
    TryHook,
)
from wan_pipeline.api.retry import RetryEvent
from wan_pipeline.api.sink import DownloadSink
from wan_pipeline.models import VideoRequest
from wan_pipeline.storage import atomic_writer

T = TypeVar("T")


class CallBudget:
    """One call's time limit: per-read httpx timeouts never reach past it, and the clock is checked
    between the chunks of a body (httpx's timeouts are per read: a trickle never trips them).

    It also notes, from httpcore's trace, whether the request's first byte was sent: a create cut
    off before that surely created nothing.
    """

    def __init__(
        self, time_limit_s: float, timeout: httpx.Timeout, clock: Callable[[], float] = time.monotonic
    ):
        self.time_limit_s = time_limit_s
        self._clock = clock
        self._ends_at = clock() + time_limit_s
        self._timeout = timeout
        self.sent = False

    def remaining(self) -> float:
        return self._ends_at - self._clock()

    def timeout(self) -> httpx.Timeout:
        left = max(self.remaining(), 0.001)
        base = self._timeout

        def bounded(value: float | None) -> float:
            return left if value is None else min(value, left)

        return httpx.Timeout(
            connect=bounded(base.connect),
            read=bounded(base.read),
            write=bounded(base.write),
            pool=bounded(base.pool),
        )

    def check(self) -> None:
        if self.remaining() <= 0:
            raise self.expired()

    def expired(self) -> CallDeadline:
        return CallDeadline(f"no complete answer within {self.time_limit_s:.3g} s", sent=self.sent)

    def _note(self, name: str) -> None:
        if name.endswith("send_request_headers.started"):
            self.sent = True

    def trace(self, name: str, info: Mapping[str, Any]) -> None:
        self._note(name)

    async def atrace(self, name: str, info: Mapping[str, Any]) -> None:
        self._note(name)


class AnswerBuffer:
    """Collects an API answer's chunks, refusing to go past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max_bytes:
            raise AnswerTooLarge(f"the answer exceeded {self._max_bytes} bytes")
        self._chunks.append(chunk)

    def reply(self, response: httpx.Response) -> Reply:
        return Reply(response.status_code, response.headers, b"".join(self._chunks))


def refused_download(response: httpx.Response, max_bytes: int) -> Reply | None:
    """A non-200 answer as a `Reply` for the protocol to map, or None when the body may be streamed.

    A declared size over the limit raises `DownloadTooLarge` before anything is written.
    """
    if response.status_code != 200:
        return Reply(response.status_code, response.headers)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise DownloadTooLarge(f"video declares {int(declared)} bytes, more than the {max_bytes}-byte limit")
    return None


# httpcore's HTTP/1.1 connections read their socket 64 KiB at a time. For the async one each read
# is a trip through anyio and the event loop: that alone held an async download to ~0.65 of a sync
# one; for the sync one, each read is a pass through httpcore's and httpx's iterators (figure 4,
# 64 x 6 MB 8 at a time: the sync client at 0.79 of a plain httpx copy, 1.04 reading 256 KiB).
# The kernel hands over up to 256 KiB at a time; read as much. A read returns what has arrived (it
# never waits for more), so small answers are unaffected. Class-wide: every httpx client of the
# process reads this way (nothing smaller is ever set back).
READ_BYTES = 256 * 1024
for _connection in (httpcore.AsyncHTTP11Connection, httpcore.HTTP11Connection):
    if getattr(_connection, "READ_NUM_BYTES", READ_BYTES) < READ_BYTES:
        _connection.READ_NUM_BYTES = READ_BYTES


def download_request(http: httpx.Client | httpx.AsyncClient, url: str, budget: CallBudget) -> httpx.Request:
    """A GET for a signed video URL. An injected client's default Authorization header is removed:
    the key must never reach a CDN."""
    request = http.build_request(
        "GET", url, timeout=budget.timeout(), extensions={"trace": _trace_of(http, budget)}
    )
    request.headers.pop("authorization", None)
    return request


def _trace_of(http: httpx.Client | httpx.AsyncClient, budget: CallBudget) -> Callable[..., Any]:
    return budget.atrace if isinstance(http, httpx.AsyncClient) else budget.trace


class _Stepper:
    """Drives the protocol's steps: iterating yields each action to perform; the shell sets
    `outcome` (or `error`, a transport error the protocol judges) before asking for the next one.
    On leaving the `with` block, however, the steps are closed."""

    def __init__(self, steps: Steps[Any]):
        self._steps = steps
        self.outcome: Any = None
        self.error: httpx.RequestError | None = None
        self.result: Any = None

    def __enter__(self) -> _Stepper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._steps.close()

    def __iter__(self) -> Iterator[Action]:
        while True:
            outcome, error = self.outcome, self.error
            self.outcome, self.error = None, None
            try:
                action = self._steps.send(outcome) if error is None else self._steps.throw(error)
            except StopIteration as done:
                self.result = done.value
                return
            yield action


class _ClientBase:
    def __init__(
        self,
        config: ClientConfig | None,
        on_retry: Callable[[RetryEvent], None] | None,
        clock: Callable[[], float],
        rng: random.Random | None,
    ):
        self.config = config or ClientConfig()
        self._protocol = ApiProtocol(self.config, clock=clock, rng=rng, on_retry=on_retry)
        self._auth = BearerAuth(self.config.api_key) if self.config.api_key else None

    def __repr__(self) -> str:
        key = "set" if self.config.api_key else "none"
        return f"{type(self).__name__}(base_url={self.config.base_url!r}, api_key={key})"

    def _submit_steps(self, request: VideoRequest, **options: Any) -> Steps[Generation]:
        return self._protocol.submit(request, **options)

    def _budget(self, time_limit_s: float) -> CallBudget:
        return CallBudget(time_limit_s, self.config.timeout)

    def _api_request(
        self, http: httpx.Client | httpx.AsyncClient, action: HttpCall, budget: CallBudget
    ) -> httpx.Request:
        return http.build_request(
            action.method,
            self._protocol.url(action.path),
            headers=action.headers,
            json=action.json,
            params=action.params,
            timeout=budget.timeout(),
            extensions={"trace": _trace_of(http, budget)},
        )


class AimlApiClient(_ClientBase):
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
        super().__init__(config, on_retry, clock, rng)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.config.timeout, auth=self._auth)
        self._sleep = sleep

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
        allowed_roots: Sequence[Path] = (),
        media_sha256: Mapping[str, str | None] | None = None,
        on_try: TryHook | None = None,
    ) -> Generation:
        """Create one generation. `on_try` is called before each HTTP try is sent and after its
        answer is judged (before any retry wait); if it raises, so does `submit`."""
        return self._run(
            self._submit_steps(
                request,
                request_key=request_key,
                attempt=attempt,
                base_dir=base_dir,
                allowed_roots=allowed_roots,
                media_sha256=media_sha256,
                on_try=on_try,
            )
        )

    def get(self, generation_id: str) -> Generation:
        return self._run(self._protocol.get(generation_id))

    def download(
        self, url: str, destination: str | os.PathLike[str], *, max_bytes: int | None = None
    ) -> tuple[int, str]:
        return self._run(self._protocol.download(url, destination, max_bytes=max_bytes))

    def wait(
        self,
        generation_id: str,
        *,
        deadline_s: float,
        expected_seconds: float | None = None,
        on_poll: Callable[[Generation], None] | None = None,
    ) -> Generation:
        return self._run(
            self._protocol.wait(
                generation_id, deadline_s=deadline_s, expected_seconds=expected_seconds, on_poll=on_poll
            )
        )

    def _run(self, steps: Steps[T]) -> T:
        with _Stepper(steps) as stepper:
            for action in stepper:
                try:
                    stepper.outcome = self._perform(action)
                except httpx.RequestError as exc:
                    stepper.error = exc
        return stepper.result

    def _perform(self, action: Action) -> Any:
        if isinstance(action, NotifyTry):
            return action.hook(action.event)
        if isinstance(action, Sleep):
            return self._sleep(action.seconds)
        if isinstance(action, AwaitTurn):  # one create at a time: its own backoff is all the pacing
            if action.not_before_s > 0:
                self._sleep(action.not_before_s)
            return Ticket(time.monotonic())
        budget = self._budget(action.time_limit_s)
        budget.check()
        if isinstance(action, FetchTo):
            return self._fetch(action, budget)
        response = self._http.send(
            self._api_request(self._http, action, budget), stream=True, auth=self._auth
        )
        try:
            answer = AnswerBuffer(action.max_bytes)
            for chunk in response.iter_bytes():
                budget.check()
                answer.add(chunk)
            return answer.reply(response)
        finally:
            response.close()

    def _fetch(self, action: FetchTo, budget: CallBudget) -> tuple[int, str] | Reply:
        request = download_request(self._http, action.url, budget)
        response = self._http.send(request, stream=True, auth=None, follow_redirects=True)
        try:
            refused = refused_download(response, action.max_bytes)
            if refused is not None:
                return refused
            # Hashed and written by this thread as received: a caller downloading several at a time
            # runs a thread for each, and those overlap (see `wan_pipeline.api.sink`).
            with atomic_writer(action.destination) as handle, DownloadSink(handle, action.max_bytes, inline=True) as sink:
                for chunk in response.iter_bytes():
                    budget.check()
                    sink.write(chunk)
                done = sink.finish()
            return done
        finally:
            response.close()


class AsyncAimlApiClient(_ClientBase):
    """Asynchronous client: same operations and behaviour; at most `max_concurrency` API calls in flight.

    Its creates share one pacer (`create_gate`, see `pacing`): a 429 slows every create of the
    client (AIMD), a `Retry-After` pauses them all, and one past `rate_limit_max_wait_s` stops them
    (`create_stop` says until when). Each run's client has its own pacer.
    """

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
        super().__init__(config, on_retry, clock, rng)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.config.timeout, auth=self._auth)
        self._sleep = sleep
        self._in_flight = asyncio.Semaphore(self.config.max_concurrency)
        self.create_gate: AsyncCreateGate | None = (
            AsyncCreateGate(CreatePacer(self.config.pacing_policy, clock=clock), sleep)
            if self.config.pace_creates
            else None
        )

    @property
    def create_stop(self) -> PacerStop | None:
        """Set once the provider asked for a longer wait than the client makes: no create is sent after."""
        return self.create_gate.pacer.stop if self.create_gate is not None else None

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
        allowed_roots: Sequence[Path] = (),
        media_sha256: Mapping[str, str | None] | None = None,
        on_try: TryHook | None = None,
    ) -> Generation:
        """Create one generation. `on_try` runs before each HTTP try is sent and after its answer is
        judged; if it raises, so does `submit`. It runs in a worker thread (it may write to a
        database), unless it has an async form, `anotify(event)`, which is awaited on the event loop
        instead (it must not block the loop: it may wait for a group commit)."""
        return await self._run(
            self._submit_steps(
                request,
                request_key=request_key,
                attempt=attempt,
                base_dir=base_dir,
                allowed_roots=allowed_roots,
                media_sha256=media_sha256,
                on_try=on_try,
            )
        )

    async def get(self, generation_id: str) -> Generation:
        return await self._run(self._protocol.get(generation_id))

    async def download(
        self, url: str, destination: str | os.PathLike[str], *, max_bytes: int | None = None
    ) -> tuple[int, str]:
        return await self._run(self._protocol.download(url, destination, max_bytes=max_bytes))

    async def wait(
        self,
        generation_id: str,
        *,
        deadline_s: float,
        expected_seconds: float | None = None,
        on_poll: Callable[[Generation], None] | None = None,
    ) -> Generation:
        return await self._run(
            self._protocol.wait(
                generation_id, deadline_s=deadline_s, expected_seconds=expected_seconds, on_poll=on_poll
            )
        )

    async def _run(self, steps: Steps[T]) -> T:
        held: list[Ticket] = []  # a turn taken and not yet handed back with an answer
        try:
            with _Stepper(steps) as stepper:
                for action in stepper:
                    try:
                        stepper.outcome = await self._perform(action, held)
                    except httpx.RequestError as exc:
                        stepper.error = exc
            return stepper.result
        finally:
            if held and self.create_gate is not None:  # announced, then stopped before sending
                await self.create_gate.release(held.pop(), status=None)

    async def _perform(self, action: Action, held: list[Ticket]) -> Any:
        if isinstance(action, NotifyTry):
            anotify = getattr(action.hook, "anotify", None)
            if anotify is not None:  # its async form, awaited on the loop (a group commit, say)
                return await anotify(action.event)
            return await asyncio.to_thread(action.hook, action.event)
        if isinstance(action, Sleep):
            return await self._sleep(action.seconds)
        if isinstance(action, AwaitTurn):
            if self.create_gate is None:
                if action.not_before_s > 0:
                    await self._sleep(action.not_before_s)
                return Ticket(time.monotonic())
            turn = await self.create_gate.acquire(action.not_before_s, action.time_limit_s)
            if isinstance(turn, Ticket):
                held.append(turn)
            return turn
        if isinstance(action, HttpCall) and action.ticket is not None and self.create_gate is not None:
            status, wait = None, None
            try:
                reply = await self._perform_call(action)
                status, wait = reply.status_code, retry_after(reply)
                return reply
            finally:
                if action.ticket in held:
                    held.remove(action.ticket)
                    await self.create_gate.release(action.ticket, status=status, retry_after_s=wait)
        return await self._perform_call(action)

    async def _perform_call(self, action: HttpCall | FetchTo) -> Any:
        budget = self._budget(action.time_limit_s)
        budget.check()
        try:
            # The whole call, connect to last byte, however the server paces it.
            async with asyncio.timeout(budget.remaining()):
                if isinstance(action, FetchTo):
                    return await self._fetch(action, budget)
                async with self._in_flight:
                    return await self._call(action, budget)
        except TimeoutError:
            raise budget.expired() from None

    async def _call(self, action: HttpCall, budget: CallBudget) -> Reply:
        response = await self._http.send(
            self._api_request(self._http, action, budget), stream=True, auth=self._auth
        )
        try:
            answer = AnswerBuffer(action.max_bytes)
            async for chunk in response.aiter_bytes():
                answer.add(chunk)
            return answer.reply(response)
        finally:
            await response.aclose()

    async def _fetch(self, action: FetchTo, budget: CallBudget) -> tuple[int, str] | Reply:
        request = download_request(self._http, action.url, budget)
        response = await self._http.send(request, stream=True, auth=None, follow_redirects=True)
        try:
            refused = refused_download(response, action.max_bytes)
            if refused is not None:
                return refused
            # The event loop only receives and counts; the sink's worker thread hashes and writes
            # (the staged file is on local disk, or in memory). Cancelled, the sink stops its thread and
            # the staged file is removed.
            with atomic_writer(action.destination) as handle, DownloadSink(handle, action.max_bytes) as sink:
                async for chunk in response.aiter_bytes():
                    await sink.awrite(chunk)
                done = await sink.afinish()
            return done
        finally:
            await response.aclose()
