"""The download sink: hashes what it writes, refuses an oversize body mid-stream, raises a failed
write, and leaves no worker thread (nor staged file) behind, even when its task is cancelled."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from wan_pipeline.api import AimlApiClient, AsyncAimlApiClient, ClientConfig, DownloadTooLarge
from wan_pipeline.api.sink import DownloadSink, live_workers
from wan_pipeline.storage import atomic_writer

URL = "https://cdn.example/v.mp4"
CHUNK = 64 * 1024


def sink_threads() -> list[int]:
    """The sink workers still running their loop (one entry each)."""
    return [1] * live_workers()


def chunks_of(data: bytes, rng: random.Random) -> Iterator[bytes]:
    at = 0
    while at < len(data):
        n = rng.choice([1, 7, 1000, 4096, CHUNK, 300_000])
        yield data[at : at + n]
        at += n


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("buffer_bytes", [1, 5000, 1024 * 1024])
def test_the_sha256_is_of_exactly_the_file_written(tmp_path: Path, mode: str, buffer_bytes: int) -> None:
    rng = random.Random(buffer_bytes)
    data = rng.randbytes(3 * 1024 * 1024 + 17)
    destination = tmp_path / "video.mp4"
    with atomic_writer(destination) as handle, DownloadSink(handle, len(data), buffer_bytes=buffer_bytes) as sink:
        if mode == "sync":
            for chunk in chunks_of(data, rng):
                sink.write(chunk)
            size, sha256 = sink.finish()
        else:

            async def feed() -> tuple[int, str]:
                for chunk in chunks_of(data, rng):
                    await sink.awrite(chunk)
                return await sink.afinish()

            size, sha256 = asyncio.run(feed())
    written = destination.read_bytes()
    assert written == data and size == len(data)
    assert sha256 == hashlib.sha256(written).hexdigest()
    assert sink_threads() == []


class FailingHandle(io.RawIOBase):
    def __init__(self, fail_after: int):
        self.fail_after, self.written = fail_after, 0

    def writable(self) -> bool:
        return True

    def write(self, buffer: Any) -> int:
        if self.written + len(buffer) > self.fail_after:
            raise OSError(28, "No space left on device")
        self.written += len(buffer)
        return len(buffer)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_write_propagates_and_stops_the_worker(mode: str) -> None:
    handle = FailingHandle(fail_after=3 * 1000)
    with pytest.raises(OSError, match="No space"), DownloadSink(handle, 10**9, buffer_bytes=1000) as sink:  # type: ignore[arg-type]
        if mode == "sync":
            for _ in range(100):
                sink.write(b"x" * 500)
            sink.finish()
        else:

            async def feed() -> None:
                for _ in range(100):
                    await sink.awrite(b"x" * 500)
                await sink.afinish()

            asyncio.run(feed())
    assert handle.written == 3000  # nothing written after the failure
    assert sink_threads() == []


# -- through the clients, over an in-memory CDN -------------------------------------------------


def body(n_chunks: int, served: list[int]) -> Iterator[bytes]:
    for i in range(n_chunks):
        served.append(i)
        yield bytes([i % 256]) * CHUNK


async def abody(n_chunks: int, served: list[int]) -> AsyncIterator[bytes]:
    for chunk in body(n_chunks, served):
        yield chunk


@pytest.mark.parametrize("shell", ["sync", "async"])
def test_an_oversize_body_without_a_length_is_cut_off_and_nothing_kept(tmp_path: Path, shell: str) -> None:
    # 64 chunks of 64 KiB (4 MiB, no Content-Length) against a 1.5 MiB limit: refused mid-stream.
    served: list[int] = []
    cap = 3 * 512 * 1024
    destination = tmp_path / "out" / "video.mp4"
    config = ClientConfig(max_attempts=1)

    def cdn(request: httpx.Request) -> httpx.Response:
        stream = body(64, served) if shell == "sync" else abody(64, served)
        return httpx.Response(200, content=stream)

    with pytest.raises(DownloadTooLarge, match="while streaming"):
        if shell == "sync":
            with httpx.Client(transport=httpx.MockTransport(cdn)) as http:
                AimlApiClient(config, http_client=http).download(URL, destination, max_bytes=cap)
        else:

            async def run() -> None:
                async with httpx.AsyncClient(transport=httpx.MockTransport(cdn)) as http:
                    await AsyncAimlApiClient(config, http_client=http).download(URL, destination, max_bytes=cap)

            asyncio.run(run())
    assert len(served) == cap // CHUNK + 1  # stopped at the chunk that crossed the limit
    assert list(destination.parent.iterdir()) == []
    assert sink_threads() == []


def test_a_cancelled_async_download_leaves_no_thread_and_no_staged_file(tmp_path: Path) -> None:
    destination = tmp_path / "out" / "video.mp4"
    seen_during: dict[str, Any] = {}

    async def run() -> None:
        stalled, never = asyncio.Event(), asyncio.Event()

        async def stalling_body() -> AsyncIterator[bytes]:
            for i in range(48):  # 3 MiB: full buffers already handed to the worker
                yield bytes([i]) * CHUNK
            seen_during["threads"] = sink_threads()
            seen_during["files"] = list(destination.parent.iterdir())
            stalled.set()
            await never.wait()
            yield b"never sent"

        def cdn(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=stalling_body())

        async with httpx.AsyncClient(transport=httpx.MockTransport(cdn)) as http:
            client = AsyncAimlApiClient(ClientConfig(), http_client=http)
            task = asyncio.create_task(client.download(URL, destination))
            await stalled.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(run())
    assert len(seen_during["threads"]) == 1  # the download had its worker running...
    assert [p.name.endswith(".part") for p in seen_during["files"]] == [True]  # ...and its staged file
    assert sink_threads() == []
    assert list(destination.parent.iterdir()) == []


def test_both_transports_read_large_slices() -> None:
    # Set on import of the clients (figure 4): fails if httpcore renames or drops the knob.
    import httpcore

    import wan_pipeline.api.clients as clients

    for connection in (httpcore.AsyncHTTP11Connection, httpcore.HTTP11Connection):
        assert "READ_NUM_BYTES" in vars(connection)
        assert connection.READ_NUM_BYTES >= clients.READ_BYTES == 256 * 1024


def test_an_inline_sink_writes_in_the_callers_thread_and_starts_no_worker() -> None:
    # The sync client's sink: every chunk hashed and written by the thread that received it.
    rng = random.Random(7)
    data = rng.randbytes(2 * 1024 * 1024 + 5)
    writers: set[int] = set()

    class RecordingHandle(io.BytesIO):
        def write(self, buffer: Any) -> int:
            writers.add(threading.get_ident())
            return super().write(buffer)

    handle = RecordingHandle()
    with DownloadSink(handle, len(data), buffer_bytes=1000, inline=True) as sink:
        for chunk in chunks_of(data, rng):
            sink.write(chunk)
            assert sink_threads() == []
        size, sha256 = sink.finish()
    assert handle.getvalue() == data and size == len(data)
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert writers == {threading.get_ident()}
    with pytest.raises(DownloadTooLarge, match="while streaming"), DownloadSink(io.BytesIO(), 10, inline=True) as sink:
        sink.write(b"x" * 8)
        sink.write(b"x" * 8)


def test_the_sync_client_hashes_inline(tmp_path: Path, monkeypatch: Any) -> None:
    # 1 MiB in 64 KiB chunks: a sink with a worker would have started it by the fourth chunk.
    import wan_pipeline.api.clients as clients

    data = random.Random(3).randbytes(1024 * 1024 + 3)
    workers_seen: list[int] = []

    class WatchedSink(DownloadSink):
        def write(self, chunk: bytes) -> None:
            super().write(chunk)
            workers_seen.append(live_workers())

    monkeypatch.setattr(clients, "DownloadSink", WatchedSink)

    def cdn(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]))

    destination = tmp_path / "video.mp4"
    with httpx.Client(transport=httpx.MockTransport(cdn)) as http:
        size, sha256 = AimlApiClient(ClientConfig(max_attempts=1), http_client=http).download(URL, destination)
    assert (size, sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert destination.read_bytes() == data
    assert len(workers_seen) == 17 and set(workers_seen) == {0}


class BlockingHandle(io.RawIOBase):
    """Its first write waits until `release` is set."""

    def __init__(self) -> None:
        self.entered, self.release, self.written = threading.Event(), threading.Event(), 0

    def writable(self) -> bool:
        return True

    def write(self, buffer: Any) -> int:
        self.entered.set()
        self.release.wait()
        self.written += len(buffer)
        return len(buffer)


def test_a_task_cancelled_while_waiting_for_the_queue_stops_the_worker_cleanly(monkeypatch: Any) -> None:
    unraisable: list[Any] = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    handle = BlockingHandle()

    async def run() -> None:
        async def feed() -> None:
            with DownloadSink(handle, 10**9, buffer_bytes=1000, queue_depth=2) as sink:  # type: ignore[arg-type]
                for _ in range(100):
                    await sink.awrite(b"x" * 1000)  # only ever waits when the queue is full
                await sink.afinish()

        task = asyncio.create_task(feed())
        await asyncio.to_thread(handle.entered.wait)  # the worker is in its first write...
        assert not task.done()  # ...and the feeder waits for the queue (its only await)
        task.cancel()
        handle.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    # The write under way completed, and at most the queue's buffers (depth 2 + the one written)
    # before the stop: the feeder never got past the full queue.
    assert handle.written in (1000, 2000, 3000)
    assert sink_threads() == [] and unraisable == []
