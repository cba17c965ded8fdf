"""Run the emulator: embedded in a background thread (`running_emulator`) or in the foreground (`serve`)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from wan_pipeline.emulator.app import build_app
from wan_pipeline.emulator.config import EmulatorConfig, FaultConfig
from wan_pipeline.emulator.state import EmulatorState

STARTUP_TIMEOUT_S = 10.0
# Throttled downloads could otherwise hold a shutdown for as long as they last.
GRACEFUL_SHUTDOWN_S = 2


def _build_server(state: EmulatorState, **uvicorn_options: Any) -> uvicorn.Server:
    def drop_connection(client: tuple[str, int]) -> bool:
        # ASGI has no "abort without answering": find the connection's transport and close it.
        # `server` is bound below, before any request can arrive.
        for connection in list(server.server_state.connections):
            if getattr(connection, "client", None) == client:
                connection.transport.close()
                return True
        return False

    app = build_app(state, drop_connection)
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **uvicorn_options)
    )
    return server


class RunningEmulator:
    """Handle on an emulator running in this process."""

    def __init__(self, base_url: str, state: EmulatorState):
        self.base_url = base_url
        self._state = state

    def __repr__(self) -> str:
        return f"RunningEmulator({self.base_url!r})"

    @property
    def config(self) -> EmulatorConfig:
        return self._state.config

    @property
    def faults(self) -> FaultConfig:
        return self._state.faults

    def stats(self) -> dict[str, Any]:
        """The same document as GET /_emulator/stats."""
        return self._state.stats()

    def reset_stats(self) -> None:
        """Forget generations and counters and restart the seeded random streams (POST /_emulator/reset)."""
        self._state.reset()

    def update_faults(self, **fields: Any) -> FaultConfig:
        """Change fault rates at runtime (POST /_emulator/faults); returns the new FaultConfig."""
        return self._state.update_faults(**fields)


@contextlib.contextmanager
def running_emulator(
    config: EmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[RunningEmulator]:
    """Serve the emulator from a background thread; port 0 picks a free port. Returns once it accepts."""
    state = EmulatorState(config or EmulatorConfig())
    # Binding here (not in uvicorn) tells us the port before the server starts.
    sock = socket.create_server((host, port))
    bound_port = sock.getsockname()[1]
    # log_config=None: an embedded server must not reconfigure the host process's logging.
    server = _build_server(state, log_config=None, log_level="warning", access_log=False)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="emulator-server", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the emulator did not start on {host}:{bound_port}")
            time.sleep(0.005)
        yield RunningEmulator(f"http://{host}:{bound_port}", state)
    finally:
        server.should_exit = True
        thread.join(timeout=GRACEFUL_SHUTDOWN_S + 5)
        sock.close()
        state.close()


def serve(config: EmulatorConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve in the foreground until interrupted (Ctrl-C)."""
    state = EmulatorState(config)
    try:
        _build_server(state, host=host, port=port, log_level="info").run()
    finally:
        state.close()
