"""Start the project's services as separate processes for tests: the emulator, `dagster-webserver` and
`dagster-daemon run`, each on loopback, in its own process group, its output captured to a log file.

Every process is terminated (the whole group: a code server and its run workers go with it) and reaped
at teardown; readiness is polled with a deadline (the emulator's /_emulator/info, the webserver's
GraphQL workspace, the daemon's heartbeats as GraphQL reports them), never assumed after a sleep.
Binaries are found next to `sys.executable`, so a fresh clone's `.venv` finds its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WEBSERVER = BIN / "dagster-webserver"
DAEMON = BIN / "dagster-daemon"
STARTUP_DEADLINE_S = 90.0
STOP_GRACE_S = 15.0
LOG_TAIL_CHARS = 4000

# The daemons this project relies on: sensors, the run queue, and run monitoring (which frees the pool
# slots of runs that ended without releasing them).
REQUIRED_DAEMONS = ("SENSOR", "QUEUED_RUN_COORDINATOR", "MONITORING")

T = TypeVar("T")

DAEMON_HEALTH = """
query DaemonHealth {
  instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } }
}
"""
LOCATION_STATUS = """
query LocationStatus {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
  }
}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    """One started process (the leader of its own process group) and the file its output goes to."""

    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return text[-chars:]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ServiceDied(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after a grace period; always reaped."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # Whatever the leader left behind in its group (a code server, a run worker) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


class ServiceDied(AssertionError):
    pass


def start_service(name: str, argv: list[str], *, env: dict[str, str], log_dir: Path, cwd: Path = REPO) -> Service:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Service(name, process, log_path)


def service_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a service: `base` (default: this process's), this checkout first on
    PYTHONPATH (the venv may hold another checkout's editable install), plus `extra`."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def graphql(client: httpx.Client, query: str, **variables: Any) -> dict[str, Any]:
    response = client.post("/graphql", json={"query": query, "variables": variables})
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


@dataclass
class Services:
    """The running processes of a test, their logs, and the clients to reach them."""

    log_dir: Path
    started: list[Service] = field(default_factory=list)
    emulator_url: str = ""
    webserver_url: str = ""

    def add(self, service: Service) -> Service:
        self.started.append(service)
        return service

    def get(self, name: str) -> Service:
        return next(s for s in self.started if s.name == name)

    def check_alive(self) -> None:
        for service in self.started:
            service.check_alive()

    def tails(self, chars: int = LOG_TAIL_CHARS) -> str:
        return "\n".join(f"----- {s.name} ({s.log_path}) -----\n{s.tail(chars)}" for s in self.started)

    def wait_for(self, what: str, probe: Callable[[], T | None], *, deadline_s: float, every_s: float = 0.5) -> T:
        """Poll `probe` until it returns something truthy (returned), failing with the services' log tails
        at the deadline or as soon as a service died."""
        deadline = time.monotonic() + deadline_s
        last: Any = None
        while True:
            self.check_alive()
            last = probe()
            if last:
                return last
            if time.monotonic() > deadline:
                pytest.fail(f"not within {deadline_s:.0f} s: {what}\n{self.tails()}")
            time.sleep(every_s)

    def stop(self) -> None:
        for service in reversed(self.started):
            service.stop()

    # -- the processes ---------------------------------------------------------------------------

    def start_emulator(self, env: dict[str, str], *args: str) -> str:
        """`python -m wan_pipeline.emulator` on a free port; returns its base URL once it answers."""
        port = free_port()
        self.add(start_service(
            "emulator", [sys.executable, "-m", "wan_pipeline.emulator", "--port", str(port), *args],
            env=env, log_dir=self.log_dir,
        ))
        self.emulator_url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                return httpx.get(f"{self.emulator_url}/_emulator/info", timeout=2.0).status_code == 200
            except httpx.TransportError:
                return False

        self.wait_for("the emulator answers /_emulator/info", answers, deadline_s=STARTUP_DEADLINE_S, every_s=0.2)
        return self.emulator_url

    def start_webserver(self, env: dict[str, str], workspace: Path) -> str:
        port = free_port()
        self.add(start_service(
            "webserver", [str(WEBSERVER), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)],
            env=env, log_dir=self.log_dir,
        ))
        self.webserver_url = f"http://127.0.0.1:{port}"
        return self.webserver_url

    def start_daemon(self, env: dict[str, str], workspace: Path) -> Service:
        return self.add(start_service("daemon", [str(DAEMON), "run", "-w", str(workspace)], env=env, log_dir=self.log_dir))

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.webserver_url, timeout=30.0)

    def wait_until_loaded(self, client: httpx.Client) -> str:
        """Poll /server_info, then GraphQL, until the code location is loaded; returns its name."""

        def loaded() -> str | None:
            try:
                if client.get("/server_info").status_code != 200:
                    return None
                workspace = graphql(client, LOCATION_STATUS)["workspaceOrError"]
            except httpx.TransportError:
                return None
            entries = workspace.get("locationEntries") or []
            for entry in entries:
                error = entry.get("locationOrLoadError") or {}
                if error.get("__typename") == "PythonError":
                    pytest.fail(f"code location {entry['name']} failed to load: {error['message']}\n{self.tails()}")
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return entries[0]["name"]
            return None

        return self.wait_for("the webserver loads the code location", loaded, deadline_s=STARTUP_DEADLINE_S)

    def wait_until_daemons_healthy(self, client: httpx.Client, daemons: Iterable[str] = REQUIRED_DAEMONS) -> None:
        """The daemon's heartbeats, as the UI's Deployment > Daemons page reads them."""
        wanted = set(daemons)

        def healthy() -> bool:
            statuses = graphql(client, DAEMON_HEALTH)["instance"]["daemonHealth"]["allDaemonStatuses"]
            return wanted <= {s["daemonType"] for s in statuses if s["healthy"]}

        self.wait_for(f"daemons {sorted(wanted)} report healthy", healthy, deadline_s=STARTUP_DEADLINE_S)


@contextlib.contextmanager
def running_services(log_dir: Path) -> Iterator[Services]:
    """A `Services` whose processes are always stopped and reaped on exit."""
    services = Services(log_dir)
    try:
        yield services
    finally:
        services.stop()


def templated_instance_config(source: Path, target: Path, **overrides: dict[str, Any]) -> dict[str, Any]:
    """Copy a dagster.yaml, merging `overrides` (top-level section -> nested mapping) into it."""
    config = yaml.safe_load(source.read_text())

    def merge(into: dict[str, Any], changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(config, overrides)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return config
