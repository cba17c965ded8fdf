"""Where a streamed download goes: counted as it arrives, hashed and written, in order.

Two ways, one per client:
- with a worker (the async client): the thread that receives the body (the event loop, shared by
  every download) only counts each chunk against the size limit and appends it to a buffer; full
  buffers (`BUFFER_BYTES`) go through a bounded queue (`QUEUE_DEPTH` buffers) to one worker thread
  of the download's own, which hashes and writes them. hashlib and file writes release the GIL on
  buffers this large, so the hashing and writing overlap with receiving the next bytes. Memory stays
  bounded: the buffer being filled, the queued ones and the one being written, a few MiB a download.
- inline (the sync client, `inline=True`): each chunk is hashed and written by the thread that
  received it. Concurrent sync downloads each have a thread of their own already, so they overlap
  with each other; a second thread per download only doubled the threads taking turns at the GIL
  (figure 4, 64 x 6 MB 8 at a time: 0.63 of a bare copy with a worker, 0.79 inline).

Guarantees: the sha256 is of exactly the bytes written, in order; a body past `max_bytes` raises
`DownloadTooLarge` at the chunk that crosses it (nothing of that chunk is written); a failed write
is raised by the next `write` (inline, or that waits for the queue), or by `finish`; leaving the
`with` block (an error, a cancelled task) stops the worker before the file is closed: queued
buffers are dropped, the one being written completes, the thread is joined.
"""

from __future__ import annotations

import _thread
import asyncio
import hashlib
import queue
import threading
from collections import deque
from concurrent.futures import Future
from typing import IO

from wan_pipeline.api.errors import DownloadTooLarge

# Chosen by measurement (benchmarks/bench_download.py, 64 x 6 MB, 8 at a time; 64 KiB to 4 MiB
# tried): 64-256 KiB best, 1 MiB slower, 4 MiB much slower (the last 4 MiB of a 6 MB video are
# hashed after it was received, nothing overlaps) and 5x the memory.
BUFFER_BYTES = 256 * 1024
QUEUE_DEPTH = 4


_STOP = object()
_live = 0  # workers whose loop has not returned (see `live_workers`)
_live_lock = threading.Lock()


def live_workers() -> int:
    """How many sink workers are still running their loop (tests: none once every sink closed)."""
    return _live


class _Stopped(Exception):
    """A buffer dropped because the download stopped (never raised to a caller)."""


class DownloadSink:
    """Counts, hashes and writes a streamed body, refusing to go past `max_bytes`.

    Use as a context manager around the streaming loop: `write(chunk)` (sync) or
    `await awrite(chunk)` (async) for each chunk, then `finish()` / `await afinish()` for
    (bytes, sha256). The handle is only written by the worker (inline: by `write`); close it after
    the block. A sink never closed keeps its worker waiting for buffers.
    """

    def __init__(
        self,
        handle: IO[bytes],
        max_bytes: int,
        *,
        buffer_bytes: int | None = None,
        queue_depth: int | None = None,
        inline: bool = False,
    ):
        buffer_bytes = BUFFER_BYTES if buffer_bytes is None else buffer_bytes
        queue_depth = QUEUE_DEPTH if queue_depth is None else queue_depth
        if buffer_bytes < 1 or queue_depth < 1:
            raise ValueError("buffer_bytes and queue_depth must be at least 1")
        self._handle = handle
        self._max_bytes = max_bytes
        self._buffer_bytes = buffer_bytes
        self._depth = queue_depth
        self._digest = hashlib.sha256()
        self._buffer: list[bytes] = []  # chunks as received: handed over as they are, never copied
        self._buffered = 0
        self._pending: deque[Future[None]] = deque()
        self._queue: queue.SimpleQueue[object] | None = None  # the worker's, from the first full buffer
        self._exited = threading.Lock()  # held while the worker runs
        self._stopped = False
        self._failed: BaseException | None = None
        self._inline = inline
        self.size = 0

    def __enter__(self) -> DownloadSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- receiving side ------------------------------------------------------------------------

    def _take(self, chunk: bytes) -> list[bytes] | None:
        """Count `chunk`; the chunks to hand to the worker once they fill a buffer (inline: none,
        `chunk` is written and hashed now)."""
        self.size += len(chunk)
        if self.size > self._max_bytes:
            raise DownloadTooLarge(f"video exceeded the {self._max_bytes}-byte limit while streaming")
        if self._inline:
            self._handle.write(chunk)
            self._digest.update(chunk)
            return None
        self._buffer.append(chunk)
        self._buffered += len(chunk)
        if self._buffered < self._buffer_bytes:
            return None
        buffer, self._buffer, self._buffered = self._buffer, [], 0
        return buffer

    def _submit(self, buffer: list[bytes]) -> None:
        if self._failed is not None:
            raise self._failed
        if self._queue is None:
            # A bare thread: `threading.Thread.start` would wait for it to be scheduled, and on a
            # busy machine that wait, once per download, cost more than the hashing it offloads.
            global _live
            self._queue = queue.SimpleQueue()
            self._exited.acquire()
            with _live_lock:
                _live += 1  # counted from here: the thread may not have started yet
            _thread.start_new_thread(self._run, (self._queue,))
        done: Future[None] = Future()
        self._pending.append(done)
        self._queue.put((buffer, done))
        while self._pending and self._pending[0].done():  # reap, and raise a failed write early
            self._pending.popleft().result()

    def write(self, chunk: bytes) -> None:
        buffer = self._take(chunk)
        if buffer is not None:
            self._submit(buffer)
            if len(self._pending) > self._depth:
                self._pending.popleft().result()

    async def awrite(self, chunk: bytes) -> None:
        buffer = self._take(chunk)
        if buffer is not None:
            self._submit(buffer)
            if len(self._pending) > self._depth:
                await asyncio.wrap_future(self._pending.popleft())

    def _flush(self) -> None:
        if self._buffer:
            buffer, self._buffer, self._buffered = self._buffer, [], 0
            self._submit(buffer)

    def finish(self) -> tuple[int, str]:
        """Wait for every buffer to be written; (bytes, sha256)."""
        self._flush()
        while self._pending:
            self._pending.popleft().result()
        self.close()
        return self.result()

    async def afinish(self) -> tuple[int, str]:
        self._flush()
        while self._pending:
            await asyncio.wrap_future(self._pending.popleft())
        self.close()
        return self.result()

    def result(self) -> tuple[int, str]:
        return self.size, self._digest.hexdigest()

    def close(self) -> None:
        """Stop the worker: buffers not yet started are dropped, the one being written completes.
        Blocks for at most that one write (a local staged file), so it is called from the event
        loop as well."""
        self._stopped = True
        worker_queue, self._queue = self._queue, None
        if worker_queue is not None:
            worker_queue.put(_STOP)
            self._exited.acquire()  # released by the worker as its last step
            self._exited.release()

    # -- worker side ---------------------------------------------------------------------------

    def _run(self, worker_queue: queue.SimpleQueue[object]) -> None:
        global _live
        try:
            while (item := worker_queue.get()) is not _STOP:
                buffer, done = item  # type: ignore[misc]
                if not done.set_running_or_notify_cancel():  # its awaiting task was cancelled
                    self._failed = self._failed or _Stopped()  # nothing after a gap is written
                    continue
                if self._stopped or self._failed is not None:
                    done.set_exception(_Stopped())
                    continue
                try:
                    write, update = self._handle.write, self._digest.update
                    for chunk in buffer:
                        write(chunk)
                        update(chunk)
                except BaseException as exc:
                    self._failed = exc
                    done.set_exception(exc)
                else:
                    done.set_result(None)
        finally:
            with _live_lock:
                _live -= 1
            self._exited.release()
