"""The generation ledger: the durable record of what was bought, and the one place states change.

One row per request_key (a request that appears in two prompt sets is bought once and filed in both;
set membership is its own table). SQLAlchemy Core on SQLite by default (WAL mode) or PostgreSQL
through a URL, with the same code for both.

Every state change is a conditional UPDATE (`WHERE state IN (<allowed sources>)`) whose row count is
checked, so concurrent writers (several processes on one set, a sensor and a run) cannot break the
state machine: the loser of a race gets `IllegalTransition` (or `None` from `claim`), never a silent
overwrite. The legal moves live in one table, `ALLOWED_MOVES`.

Write-ahead around every create: `claim` (planned -> submitting) before the call, then `submitted`
with the generation id, or `in_doubt` when the answer was lost, or back to `planned` when the
request was surely not accepted. A `submitting` row whose owner died is recovered as `in_doubt`,
never `planned`: it may have been paid for.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url

from wan_pipeline.models import usd_from_credits
from wan_pipeline.settings import DEFAULT_LEDGER_URL, Settings


class State(StrEnum):
    PLANNED = "planned"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    GENERATING = "generating"
    COMPLETED = "completed"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"  # the create's outcome is unknown: it may exist and be paid for
    REJECTED = "rejected"  # 400: the request itself is bad


TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.REJECTED})
PENDING_REMOTE = frozenset({State.SUBMITTED, State.GENERATING})

# Every legal move, and only these. A state listed as its own target may be updated in place
# (a repeated poll answer, a refreshed video URL, a recorded download).
ALLOWED_MOVES: dict[State, frozenset[State]] = {
    State.PLANNED: frozenset({State.SUBMITTING}),
    State.SUBMITTING: frozenset({State.SUBMITTED, State.IN_DOUBT, State.PLANNED, State.REJECTED}),
    # The claimant's own late answer still counts after its claim was recovered as abandoned;
    # anyone may requeue an in-doubt row to planned, but only on explicit request.
    State.IN_DOUBT: frozenset({State.IN_DOUBT, State.SUBMITTED, State.PLANNED, State.REJECTED}),
    State.SUBMITTED: frozenset({State.SUBMITTED, State.GENERATING, State.COMPLETED, State.FAILED}),
    State.GENERATING: frozenset({State.GENERATING, State.COMPLETED, State.FAILED}),
    State.COMPLETED: frozenset({State.COMPLETED}),
    State.FAILED: frozenset({State.FAILED, State.PLANNED}),
    State.REJECTED: frozenset({State.PLANNED}),
}

# Raw provider statuses that mean "accepted, waiting in the queue" (not yet generating).
QUEUED_RAW_STATUSES = frozenset({"queued", "waiting", "pending"})
POLL_STATUSES = ("pending", "completed", "failed")

DEFAULT_STALE_AFTER_S = 900.0
SQLITE_BUSY_TIMEOUT_MS = 30_000
CHUNK = 500  # rows per multi-row statement: well under SQLite's bound-parameter limit
_WRITE_OPTION = "wan_ledger_write"
# pg_advisory_xact_lock key serialising table creation by processes that start at the same time.
_DDL_LOCK_KEY = 0x57414E4C  # "WANL"


class IllegalTransition(RuntimeError):
    """A state change the state machine does not allow, or that another writer got to first."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC in and out: SQLite stores naive text, PostgreSQL a timestamptz."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"ledger timestamps must be timezone-aware, got naive {value!r}")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

generations = sa.Table(
    "wan_generations",
    metadata,
    sa.Column("request_key", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("request_json", sa.JSON, nullable=False),
    sa.Column("estimated_usd", sa.Float),
    sa.Column("expected_seconds", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("claim_owner", sa.String(255)),  # hostname:pid:token of the process holding the create
    sa.Column("claimed_at", UtcDateTime()),
    # Provider-defined strings: no length is promised, so none is imposed.
    sa.Column("generation_id", sa.Text),
    sa.Column("raw_status", sa.Text),
    sa.Column("planned_at", UtcDateTime(), nullable=False),
    sa.Column("submitted_at", UtcDateTime()),
    sa.Column("generating_at", UtcDateTime()),  # first poll that saw it generating
    sa.Column("completed_at", UtcDateTime()),  # first poll that saw it terminal
    sa.Column("next_poll_at", UtcDateTime()),
    sa.Column("poll_count", sa.Integer, nullable=False),
    sa.Column("video_url", sa.Text),
    sa.Column("video_expires_at", UtcDateTime()),
    sa.Column("error", sa.Text),
    sa.Column("credits_used", sa.Float),
    sa.Column("usd_spent", sa.Float),
    sa.Column("download_path", sa.Text),
    sa.Column("download_sha256", sa.String(64)),
    sa.Column("download_bytes", sa.BigInteger),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    sa.CheckConstraint(
        "state IN (" + ", ".join(f"'{s.value}'" for s in State) + ")", name="ck_wan_generations_state"
    ),
    sa.Index("ix_wan_generations_state_next_poll", "state", "next_poll_at"),
)

# The primary key (prompt_set, request_key) is the index on prompt_set; the second index serves
# "which sets is this key filed in".
set_members = sa.Table(
    "wan_prompt_set_members",
    metadata,
    sa.Column("prompt_set", sa.String(128), primary_key=True),
    sa.Column("request_key", sa.String(64), sa.ForeignKey(generations.c.request_key), primary_key=True),
    sa.Column("added_at", UtcDateTime(), nullable=False),
    # Set when the set's catalog no longer asks for the key: the row and its history stay, but the
    # set's summaries, sensors and collection see only what the current catalog asks for.
    sa.Column("retired_at", UtcDateTime()),
    sa.Index("ix_wan_prompt_set_members_request_key", "request_key"),
)

_ROW_COLUMNS = tuple(c.name for c in generations.columns)
# What a requeued row forgets: the previous attempt's remote identity, timings and cost.
_REMOTE_ATTEMPT_RESET: dict[str, Any] = {
    "generation_id": None,
    "raw_status": None,
    "submitted_at": None,
    "generating_at": None,
    "completed_at": None,
    "next_poll_at": None,
    "poll_count": 0,
    "video_url": None,
    "video_expires_at": None,
    "credits_used": None,
    "usd_spent": None,
}


@dataclass(frozen=True)
class PlannedRequest:
    request_key: str
    model: str
    request_json: dict[str, Any]
    estimated_usd: float | None
    expected_seconds: float | None


@dataclass(frozen=True)
class PlanResult:
    new: list[str]  # keys recorded now as planned
    known: dict[str, State]  # keys the ledger already had, with their current state


@dataclass(frozen=True)
class Claim:
    """A won claim: this process may now send the create for `request_key` (its `attempt`-th)."""

    request_key: str
    attempt: int
    owner: str


@dataclass(frozen=True)
class LedgerRow:
    request_key: str
    state: State
    model: str
    request_json: dict[str, Any]
    estimated_usd: float | None
    expected_seconds: float | None
    attempts: int
    claim_owner: str | None
    claimed_at: datetime | None
    generation_id: str | None
    raw_status: str | None
    planned_at: datetime
    submitted_at: datetime | None
    generating_at: datetime | None
    completed_at: datetime | None
    next_poll_at: datetime | None
    poll_count: int
    video_url: str | None
    video_expires_at: datetime | None
    error: str | None
    credits_used: float | None
    usd_spent: float | None
    download_path: str | None
    download_sha256: str | None
    download_bytes: int | None
    updated_at: datetime
    prompt_sets: tuple[str, ...] = ()


@dataclass(frozen=True)
class SetSummary:
    prompt_set: str
    counts: dict[State, int]  # every state, zeros included
    usd_spent: float
    credits_used: float
    estimated_usd: float  # of every request in the set
    in_doubt: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _values(states: Iterable[State]) -> list[str]:
    return [State(s).value for s in states]


def _check_legal(from_states: Collection[State], to: State | None) -> None:
    """`to` None means "stay in the current state": legal where the state may be updated in place."""
    for source in map(State, from_states):
        if (to or source) not in ALLOWED_MOVES[source]:
            raise IllegalTransition(f"{source} -> {to or source} is not a legal move")


def _cost(credits_used: float | None, usd_spent: float | None) -> dict[str, float]:
    """The cost columns to write: only what the answer carried, USD derived from credits if absent."""
    usd = usd_spent if usd_spent is not None else usd_from_credits(credits_used)
    values = {"credits_used": credits_used, "usd_spent": usd}
    return {k: v for k, v in values.items() if v is not None}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    # A killed process its parent has not reaped yet is a zombie: it will never finish its call.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _owner_process_gone(owner: str | None, hostname: str) -> bool:
    """True only when the owner ran on this host and its process no longer exists."""
    parts = (owner or "").rsplit(":", 2)
    if len(parts) != 3 or parts[0] != hostname or not parts[1].isdigit():
        return False
    return not _process_alive(int(parts[1]))


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_begin), so the sqlite3 module must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the write lock at BEGIN, so a read-then-write transaction waits for other
    # writers (busy_timeout) instead of failing on a stale snapshot.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE_OPTION) else "BEGIN")


def normalized_url(url: str) -> sa.URL:
    """The SQLAlchemy URL with the driver this project ships for a bare postgresql:// URL."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project ships psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def _create_engine(url: str, schema: str | None) -> Engine:
    parsed = normalized_url(url)
    if parsed.get_backend_name() == "sqlite":
        if schema is not None:
            raise ValueError("a ledger schema is a PostgreSQL feature; SQLite keeps one ledger per file")
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed)
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = sa.create_engine(parsed, pool_pre_ping=True)
    return engine.execution_options(schema_translate_map={None: schema}) if schema else engine


class Ledger:
    """The durable per-generation state. Safe to share between threads and between processes."""

    def __init__(
        self,
        url: str = DEFAULT_LEDGER_URL,
        *,
        schema: str | None = None,
        clock: Callable[[], datetime] = utcnow,
    ):
        """`schema` (PostgreSQL only) keeps the tables in their own schema, created if missing."""
        self._shown_url = make_url(url).render_as_string(hide_password=True)
        self._engine = _create_engine(url, schema)
        self._writer = self._engine.execution_options(**{_WRITE_OPTION: True})
        self._clock = clock
        self._hostname = socket.gethostname()
        self._token = uuid.uuid4().hex[:12]
        self._create_tables(schema)

    @classmethod
    def from_settings(cls, settings: Settings) -> Ledger:
        return cls(settings.ledger_url)

    def __repr__(self) -> str:
        return f"Ledger({self._shown_url!r})"

    @property
    def owner(self) -> str:
        """This process's claim owner; the pid is read each time so a forked child is itself."""
        return f"{self._hostname}:{os.getpid()}:{self._token}"

    def close(self) -> None:
        self._engine.dispose()

    def _create_tables(self, schema: str | None) -> None:
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_DDL_LOCK_KEY)))
                if schema:
                    conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
            metadata.create_all(conn)

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

    # -- planning --------------------------------------------------------------------------------

    def plan(self, prompt_set: str, planned: Iterable[PlannedRequest]) -> PlanResult:
        """Record the requests of a set: new keys as planned, exactly these keys as its current members."""
        unique: dict[str, PlannedRequest] = {}
        for item in planned:
            unique.setdefault(item.request_key, item)
        items = list(unique.values())
        now = self._clock()
        inserted: set[str] = set()
        with self._writing() as conn:
            # In key order: processes planning overlapping sets lock rows in one order (no deadlock).
            for chunk in _chunks(sorted(items, key=lambda p: p.request_key)):
                rows = [
                    {
                        "request_key": p.request_key,
                        "state": State.PLANNED.value,
                        "model": p.model,
                        "request_json": p.request_json,
                        "estimated_usd": p.estimated_usd,
                        "expected_seconds": p.expected_seconds,
                        "attempts": 0,
                        "poll_count": 0,
                        "planned_at": now,
                        "updated_at": now,
                    }
                    for p in chunk
                ]
                statement = _insert_ignoring_conflicts(conn, generations).values(rows)
                inserted.update(conn.execute(statement.returning(generations.c.request_key)).scalars())
                members = [
                    {"prompt_set": prompt_set, "request_key": p.request_key, "added_at": now} for p in chunk
                ]
                conn.execute(_insert_ignoring_conflicts(conn, set_members).values(members))
            # The plan is the whole set: retire every member, then reinstate the planned keys.
            in_set = set_members.c.prompt_set == prompt_set
            conn.execute(set_members.update().where(in_set, set_members.c.retired_at.is_(None)).values(retired_at=now))
            for chunk in _chunks([p.request_key for p in items]):
                conn.execute(
                    set_members.update().where(in_set, set_members.c.request_key.in_(chunk)).values(retired_at=None)
                )
            known = self._states(conn, [p.request_key for p in items if p.request_key not in inserted])
        return PlanResult(new=[p.request_key for p in items if p.request_key in inserted], known=known)

    def _states(self, conn: Connection, keys: Sequence[str]) -> dict[str, State]:
        states: dict[str, State] = {}
        for chunk in _chunks(keys):
            query = sa.select(generations.c.request_key, generations.c.state).where(
                generations.c.request_key.in_(chunk)
            )
            states.update({key: State(state) for key, state in conn.execute(query)})
        return states

    # -- write-ahead around a create -------------------------------------------------------------

    def claim(self, request_key: str) -> Claim | None:
        """planned -> submitting, atomically. None when the row is not planned (someone else has it)."""
        now = self._clock()
        owner = self.owner
        statement = (
            sa.update(generations)
            .where(generations.c.request_key == request_key, generations.c.state == State.PLANNED.value)
            .values(
                state=State.SUBMITTING.value,
                claim_owner=owner,
                claimed_at=now,
                attempts=generations.c.attempts + 1,
                updated_at=now,
            )
            .returning(generations.c.attempts)
        )
        with self._writing() as conn:
            attempt = conn.execute(statement).scalar_one_or_none()
            if attempt is None:
                self._require_row(conn, request_key)
                return None
        return Claim(request_key, attempt, owner)

    def mark_submitted(
        self,
        request_key: str,
        generation_id: str,
        *,
        raw_status: str | None,
        credits_used: float | None,
        usd_spent: float | None,
        next_poll_at: datetime,
        expected_seconds: float | None = None,
    ) -> None:
        """The create answered with an id: the generation exists and is (being) paid for.

        `expected_seconds`, when given, replaces the planned estimate: it is what timed the first
        poll, and later polls must follow the same schedule.
        """
        now = self._clock()
        values = {
            "generation_id": generation_id,
            "raw_status": raw_status,
            "submitted_at": now,
            "next_poll_at": next_poll_at,
            "error": None,
            **_cost(credits_used, usd_spent),
        }
        if expected_seconds is not None:
            values["expected_seconds"] = expected_seconds
        with self._writing() as conn:
            self._move(
                conn, request_key, {State.SUBMITTING, State.IN_DOUBT}, State.SUBMITTED, values, owned=True
            )

    def mark_in_doubt(self, request_key: str, error: str) -> None:
        """The create's answer was lost: it may exist. Resubmitted only on explicit request."""
        with self._writing() as conn:
            self._move(
                conn,
                request_key,
                {State.SUBMITTING, State.IN_DOUBT},
                State.IN_DOUBT,
                {"error": error},
                owned=True,
            )

    def release(self, request_key: str, error: str | None = None) -> None:
        """The create was surely not accepted (nothing was bought): back to planned."""
        with self._writing() as conn:
            self._move(
                conn,
                request_key,
                {State.SUBMITTING, State.IN_DOUBT},
                State.PLANNED,
                {"error": error},
                owned=True,
            )

    def mark_rejected(self, request_key: str, error: str) -> None:
        """The API refused the request itself (400): fixing it makes a new request_key."""
        now = self._clock()
        with self._writing() as conn:
            self._move(
                conn,
                request_key,
                {State.SUBMITTING, State.IN_DOUBT},
                State.REJECTED,
                {"error": error, "completed_at": now},
                owned=True,
            )

    def recover_abandoned(self, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[str]:
        """submitting -> in_doubt for claims whose owner died on this host, or older than `stale_after_s`.

        In doubt, not planned: the dead process may have sent the create and been charged.
        """
        now = self._clock()
        stale_before = now - timedelta(seconds=stale_after_s)
        recovered: list[str] = []
        with self._writing() as conn:
            claims = conn.execute(
                sa.select(generations.c.request_key, generations.c.claim_owner, generations.c.claimed_at)
                .where(generations.c.state == State.SUBMITTING.value)
                .order_by(generations.c.request_key)  # one lock order for concurrent recoverers
            ).all()
            for key, owner, claimed_at in claims:
                if _owner_process_gone(owner, self._hostname):
                    reason = f"process {owner} died while creating it"
                elif claimed_at is None or claimed_at < stale_before:
                    reason = f"claim by {owner} older than {stale_after_s:.0f} s"
                else:
                    continue
                result = conn.execute(
                    sa.update(generations)
                    .where(
                        generations.c.request_key == key,
                        generations.c.state == State.SUBMITTING.value,
                        generations.c.claim_owner == owner,
                    )
                    .values(
                        state=State.IN_DOUBT.value,
                        error=f"create outcome unknown: {reason}",
                        updated_at=now,
                    )
                )
                if result.rowcount == 1:
                    recovered.append(key)
        return recovered

    def requeue(self, request_keys: Iterable[str], *, from_states: Collection[State]) -> list[str]:
        """Explicitly send rows back to planned (e.g. in_doubt for --resubmit-in-doubt, failed for
        --retry-failed). Keys in other states are left alone. Returns the keys requeued."""
        _check_legal(from_states, State.PLANNED)
        keys = list(dict.fromkeys(request_keys))
        now = self._clock()
        requeued: set[str] = set()
        with self._writing() as conn:
            for chunk in _chunks(keys):
                statement = (
                    sa.update(generations)
                    .where(
                        generations.c.request_key.in_(chunk), generations.c.state.in_(_values(from_states))
                    )
                    .values(state=State.PLANNED.value, updated_at=now, **_REMOTE_ATTEMPT_RESET)
                    .returning(generations.c.request_key)
                )
                requeued.update(conn.execute(statement).scalars())
        return [k for k in keys if k in requeued]

    # -- polling ---------------------------------------------------------------------------------

    def record_poll(
        self,
        request_key: str,
        *,
        raw_status: str | None,
        status: str,
        video_url: str | None,
        video_expires_at: datetime | None,
        error: str | None,
        credits_used: float | None,
        usd_spent: float | None,
        next_poll_at: datetime | None,
    ) -> State:
        """Apply one poll answer (`status`: pending | completed | failed). Idempotent for a repeated
        answer. Returns the row's new state."""
        if status not in POLL_STATUSES:
            raise ValueError(f"poll status must be one of {POLL_STATUSES}, got {status!r}")
        if status == "pending" and next_poll_at is None:
            raise ValueError("a pending generation needs a next poll time")
        now = self._clock()
        with self._writing() as conn:
            row = self._require_row(conn, request_key)
            current = State(row.state)
            values: dict[str, Any] = {"raw_status": raw_status, "poll_count": row.poll_count + 1}
            values.update(_cost(credits_used, usd_spent))
            if status == "pending":
                queued = (raw_status or "").lower() in QUEUED_RAW_STATUSES
                target = State.SUBMITTED if queued and current == State.SUBMITTED else State.GENERATING
                values["next_poll_at"] = next_poll_at
                if target == State.GENERATING:
                    values["generating_at"] = row.generating_at or now
            else:
                target = State.COMPLETED if status == "completed" else State.FAILED
                values.update(next_poll_at=None, completed_at=row.completed_at or now, error=error)
                if target == State.COMPLETED:
                    values.update(video_url=video_url, video_expires_at=video_expires_at)
            # The row is read in the same transaction; the conditional update still guards the
            # state in case another writer moved it (PostgreSQL read committed).
            self._move(conn, request_key, {current}, target, values)
        return target

    def postpone_poll(self, request_key: str, next_poll_at: datetime, *, raw_status: str | None = None) -> None:
        """A poll that could not be answered (transient error): ask again later, state unchanged.

        `raw_status`, when given, records what the answer was (e.g. "not_found") for the next poll.
        """
        values: dict[str, Any] = {"next_poll_at": next_poll_at}
        if raw_status is not None:
            values["raw_status"] = raw_status
        with self._writing() as conn:
            self._move(conn, request_key, PENDING_REMOTE, None, values)

    def refresh_video_url(
        self, request_key: str, video_url: str | None, video_expires_at: datetime | None
    ) -> None:
        """A completed generation's new signed URL (the previous one expired)."""
        with self._writing() as conn:
            self._move(
                conn,
                request_key,
                {State.COMPLETED},
                None,
                {"video_url": video_url, "video_expires_at": video_expires_at},
            )

    def due_for_poll(self, now: datetime, limit: int) -> list[LedgerRow]:
        """Pending generations whose next poll time has come, soonest first, at most `limit`."""
        return self._select_rows(
            generations.c.state.in_(_values(PENDING_REMOTE)),
            generations.c.next_poll_at <= now,
            order_by=(generations.c.next_poll_at, generations.c.request_key),
            limit=limit,
        )

    def next_poll_time(self) -> datetime | None:
        with self._reading() as conn:
            return conn.execute(
                sa.select(sa.func.min(generations.c.next_poll_at)).where(
                    generations.c.state.in_(_values(PENDING_REMOTE))
                )
            ).scalar_one()

    # -- downloads -------------------------------------------------------------------------------

    def record_download(self, request_key: str, *, path: str, sha256: str, size_bytes: int) -> None:
        """A completed generation's video is stored and verified at `path`."""
        with self._writing() as conn:
            values = {"download_path": path, "download_sha256": sha256, "download_bytes": size_bytes}
            self._move(conn, request_key, {State.COMPLETED}, None, values)

    # -- queries ---------------------------------------------------------------------------------

    def row(self, request_key: str) -> LedgerRow | None:
        rows = self.rows_for_keys([request_key])
        return rows[0] if rows else None

    def rows_for_keys(self, request_keys: Iterable[str]) -> list[LedgerRow]:
        """The rows of these keys, in the order given; unknown keys are left out."""
        keys = list(dict.fromkeys(request_keys))
        found: dict[str, LedgerRow] = {}
        for chunk in _chunks(keys):
            found.update((r.request_key, r) for r in self._select_rows(generations.c.request_key.in_(chunk)))
        return [found[k] for k in keys if k in found]

    def rows(self, prompt_set: str | None = None, states: Collection[State] | None = None) -> list[LedgerRow]:
        conditions = []
        if states is not None:
            conditions.append(generations.c.state.in_(_values(states)))
        return self._select_rows(*conditions, prompt_set=prompt_set)

    def terminal_rows(self, prompt_set: str) -> list[LedgerRow]:
        return self.rows(prompt_set, TERMINAL)

    def missing_downloads(self, prompt_set: str) -> list[LedgerRow]:
        """Completed generations of the set with no verified download recorded."""
        return self._select_rows(
            generations.c.state == State.COMPLETED.value,
            generations.c.download_sha256.is_(None),
            prompt_set=prompt_set,
        )

    def summary(self, prompt_set: str) -> SetSummary:
        in_set = sa.and_(set_members.c.prompt_set == prompt_set, set_members.c.retired_at.is_(None))
        joined = generations.join(set_members, set_members.c.request_key == generations.c.request_key)
        totals = (
            sa.select(
                generations.c.state,
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(generations.c.usd_spent), 0.0),
                sa.func.coalesce(sa.func.sum(generations.c.credits_used), 0.0),
                sa.func.coalesce(sa.func.sum(generations.c.estimated_usd), 0.0),
            )
            .select_from(joined)
            .where(in_set)
            .group_by(generations.c.state)
        )
        in_doubt = (
            sa.select(generations.c.request_key)
            .select_from(joined)
            .where(in_set, generations.c.state == State.IN_DOUBT.value)
            .order_by(generations.c.request_key)
        )
        with self._reading() as conn:
            grouped = conn.execute(totals).all()
            in_doubt_keys = list(conn.execute(in_doubt).scalars())
        counts = dict.fromkeys(State, 0)
        for state, count, *_ in grouped:
            counts[State(state)] = count
        return SetSummary(
            prompt_set=prompt_set,
            counts=counts,
            usd_spent=float(sum(g[2] for g in grouped)),
            credits_used=float(sum(g[3] for g in grouped)),
            estimated_usd=float(sum(g[4] for g in grouped)),
            in_doubt=in_doubt_keys,
        )

    def observed_processing_seconds(
        self, model: str, resolution: str, duration: int, *, sample: int = 200, minimum: int = 3
    ) -> float | None:
        """Median submit-to-completion time of recent completed generations of this shape.

        None until at least `minimum` have been seen: the poll schedule then probes instead of guessing.
        """
        query = (
            sa.select(generations.c.request_json, generations.c.submitted_at, generations.c.completed_at)
            .where(
                generations.c.model == model,
                generations.c.state == State.COMPLETED.value,
                generations.c.submitted_at.is_not(None),
                generations.c.completed_at.is_not(None),
            )
            .order_by(generations.c.completed_at.desc())
            .limit(sample)
        )
        with self._reading() as conn:
            found = conn.execute(query).all()
        seconds = sorted(
            (completed - submitted).total_seconds()
            for request, submitted, completed in found
            if request.get("resolution") == resolution and request.get("duration") == duration
        )
        if len(seconds) < minimum:
            return None
        return seconds[len(seconds) // 2]

    def prompt_sets(self) -> list[str]:
        with self._reading() as conn:
            query = sa.select(set_members.c.prompt_set).distinct().order_by(set_members.c.prompt_set)
            return list(conn.execute(query).scalars())

    # -- internals -------------------------------------------------------------------------------

    def _select_rows(
        self,
        *conditions: sa.ColumnElement[bool],
        prompt_set: str | None = None,
        order_by: Sequence[sa.ColumnElement[Any]] = (generations.c.planned_at, generations.c.request_key),
        limit: int | None = None,
    ) -> list[LedgerRow]:
        query = sa.select(generations).where(*conditions).order_by(*order_by).limit(limit)
        if prompt_set is not None:
            query = query.join(set_members, set_members.c.request_key == generations.c.request_key).where(
                set_members.c.prompt_set == prompt_set, set_members.c.retired_at.is_(None)
            )
        with self._reading() as conn:
            found = conn.execute(query).mappings().all()
            sets: dict[str, list[str]] = {}
            for chunk in _chunks([r["request_key"] for r in found]):
                membership = sa.select(set_members.c.request_key, set_members.c.prompt_set).where(
                    set_members.c.request_key.in_(chunk)
                )
                for key, name in conn.execute(membership.order_by(set_members.c.prompt_set)):
                    sets.setdefault(key, []).append(name)
        return [
            LedgerRow(
                **{name: r[name] for name in _ROW_COLUMNS if name != "state"},
                state=State(r["state"]),
                prompt_sets=tuple(sets.get(r["request_key"], ())),
            )
            for r in found
        ]

    def _require_row(self, conn: Connection, request_key: str) -> sa.Row[Any]:
        row = conn.execute(sa.select(generations).where(generations.c.request_key == request_key)).first()
        if row is None:
            raise KeyError(f"request {request_key} is not in the ledger")
        return row

    def _move(
        self,
        conn: Connection,
        request_key: str,
        from_states: Collection[State],
        to: State | None,
        values: dict[str, Any],
        *,
        owned: bool = False,
    ) -> None:
        """The one way a row changes: a conditional UPDATE whose row count says who won.

        `to` None updates the row in place (its state unchanged), where `ALLOWED_MOVES` permits it.
        `owned` further requires that this process holds the row's claim, so a claimant whose claim
        was recovered and re-claimed by another process cannot overwrite the new owner's outcome.
        """
        _check_legal(from_states, to)
        conditions = [generations.c.request_key == request_key, generations.c.state.in_(_values(from_states))]
        owner = self.owner
        if owned:
            conditions.append(generations.c.claim_owner == owner)
        if to is not None:
            values = {**values, "state": to.value}
        statement = sa.update(generations).where(*conditions).values(updated_at=self._clock(), **values)
        if conn.execute(statement).rowcount == 1:
            return
        row = self._require_row(conn, request_key)
        if owned and row.state in _values(from_states) and row.claim_owner != owner:
            raise IllegalTransition(f"request {request_key} is claimed by {row.claim_owner}, not by {owner}")
        raise IllegalTransition(
            f"request {request_key}: {row.state} -> {to or row.state} is not allowed here"
        )


def _insert_ignoring_conflicts(conn: Connection, table: sa.Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING in the connection's dialect."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    return dialect_insert(table).on_conflict_do_nothing()


def format_status(ledger: Ledger, sets: list[str] | None = None) -> str:
    """`wan-pipeline status`: per set, counts by state, USD spent and the in-doubt rows."""
    names = sets if sets else ledger.prompt_sets()
    if not names:
        return "The ledger records no prompt sets yet."
    blocks = []
    for name in names:
        summary = ledger.summary(name)
        if summary.total == 0:
            blocks.append(f"== {name}: no requests recorded")
            continue
        lines = [f"== {name}: {summary.total} request(s)"]
        lines += [f"  {state.value:<11} {count:>6}" for state, count in summary.counts.items() if count]
        lines.append(
            f"  USD spent {summary.usd_spent:.4f} ({summary.credits_used:,.0f} credits); "
            f"estimated for the whole set {summary.estimated_usd:.4f}"
        )
        if summary.in_doubt:
            lines.append(
                f"  in doubt ({len(summary.in_doubt)}; may already be paid for, "
                "resubmitted only with --resubmit-in-doubt):"
            )
            for row in ledger.rows_for_keys(summary.in_doubt):
                lines.append(f"    {row.request_key}  attempts={row.attempts}  {row.error or ''}".rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
