"""The ledger's state machine: the one place a purchase's state changes, scoped to one API.

A `Ledger` is bound to an API scope (see `wan_pipeline.scopes`): everything it plans, claims, polls
and reuses belongs to that API, so a result bought from one API never counts as bought on another.

Every state change is a conditional UPDATE (`WHERE state IN (<allowed sources>)`) whose row count is
checked, so concurrent writers (several processes on one set, a sensor and a run) cannot break the
state machine: the loser of a race gets `IllegalTransition` (or `ClaimLost`), never a silent
overwrite. The legal moves live in one table, `ALLOWED_MOVES`.

Write-ahead around every HTTP try of a create (the client reports each try, see `CreateTry`):
- before a try is sent, `try_sending` claims the row (planned -> submitting, a new attempt row on
  the first try) and records the try; a lost race raises `ClaimLost` and the try is not sent;
- when its answer arrives, `try_answered` records it: accepted -> submitted with the generation id;
  surely not created (400, 401, 403, 429, 502, 503, refused connection) -> the claim is released
  to planned at once, before any retry wait; may have been created (500, 504, lost answer) -> in doubt.
So a process that dies leaves in doubt only a try that was sent and never answered, and
`recover_abandoned` can tell those from claims that never sent anything.

`record_tries` does the same for many tries in one transaction (a group commit: submission's
`TryLog` batches the claims waiting at once and the accepted answers that arrived meanwhile), and
`record_polls` applies many poll answers in one; both check what the one-row calls check.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from wan_pipeline.ledger.database import WRITE_OPTION, create_engine, shown_url, upgrade
from wan_pipeline.ledger.schema import (
    AttemptOutcome,
    AttemptReason,
    State,
    VideoSource,
    attempts,
    create_tries,
    generations,
    set_members,
    set_videos,
    utcnow,
)
from wan_pipeline.models import usd_from_credits
from wan_pipeline.settings import DEFAULT_LEDGER_URL

TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.REJECTED})
PENDING_REMOTE = frozenset({State.SUBMITTED, State.GENERATING})
PENDING = frozenset({State.SUBMITTING, *PENDING_REMOTE})

# Every legal move, and only these. A state listed as its own target may be updated in place
# (a repeated poll answer, a refreshed video URL).
ALLOWED_MOVES: dict[State, frozenset[State]] = {
    State.PLANNED: frozenset({State.SUBMITTING}),
    State.SUBMITTING: frozenset(
        {State.SUBMITTING, State.SUBMITTED, State.IN_DOUBT, State.PLANNED, State.REJECTED}
    ),
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
CHUNK = 500  # rows per multi-row statement: well under SQLite's bound-parameter limit
# Incremental collection: a set's finished videos are collected while the rest still run, in
# batches: once COLLECT_BATCH of them wait, or the longest-waiting one has waited COLLECT_EARLY_AFTER
# (so a 500-set makes a run every few seconds at most, not one per video). The last ones, once every
# generation is terminal, are collected at once.
COLLECT_EARLY_AFTER = timedelta(seconds=2)
COLLECT_BATCH = 25


class IllegalTransition(RuntimeError):
    """A state change the state machine does not allow, or that another writer got to first."""


class _BatchConflict(Exception):
    """A batched write found a row other than as it read it: redo the batch one row at a time."""


class ClaimLost(RuntimeError):
    """Another process holds (or has finished) this request's create: this try must not be sent."""


@dataclass(frozen=True)
class PlannedRequest:
    request_key: str
    model: str
    request_json: dict[str, Any]
    estimated_usd: float | None
    expected_seconds: float | None


@dataclass(frozen=True)
class KnownRequest:
    state: State
    attempts: int


@dataclass(frozen=True)
class PlanResult:
    new: list[str]  # keys recorded now as planned
    known: dict[str, KnownRequest]  # keys the ledger already had in this scope


@dataclass(frozen=True)
class AttemptClaim:
    """Who makes an attempt and why: written on the attempt row with the claim."""

    prompt_set: str
    reason: AttemptReason = AttemptReason.FIRST
    run_id: str | None = None


@dataclass(frozen=True)
class TryAnswer:
    """What one HTTP try of a create came back with (see `wan_pipeline.api.CreateTry`)."""

    created: bool | None
    status_code: int | None = None
    detail: str = ""
    generation_id: str | None = None
    raw_status: str | None = None
    credits_used: float | None = None
    usd_spent: float | None = None


@dataclass(frozen=True)
class TrySending:
    """One HTTP try about to be sent, for `record_tries` (see `try_sending`)."""

    request_key: str
    attempt: int
    try_number: int
    client_request_id: str
    claim: AttemptClaim


@dataclass(frozen=True)
class AcceptedTry:
    """A try the provider accepted, for `record_tries` (see `try_answered` with created True)."""

    request_key: str
    attempt: int
    try_number: int
    answer: TryAnswer
    next_poll_at: datetime
    expected_seconds: float | None = None


@dataclass(frozen=True)
class PollAnswer:
    """One poll's outcome, for `record_polls`: an answer (`record_poll`'s arguments, `postpone` False)
    or a poll to ask again later with the state unchanged (`postpone_poll`: `next_poll_at`, and
    `raw_status` when given)."""

    request_key: str
    status: str | None = None  # pending | completed | failed; None with postpone
    raw_status: str | None = None
    video_url: str | None = None
    video_expires_at: datetime | None = None
    error: str | None = None
    credits_used: float | None = None
    usd_spent: float | None = None
    next_poll_at: datetime | None = None
    postpone: bool = False


@dataclass(frozen=True)
class LedgerRow:
    api_scope: str
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
    updated_at: datetime
    prompt_sets: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredVideo:
    prompt_set: str
    request_key: str
    path: str
    sha256: str
    size_bytes: int
    source: VideoSource
    copied_from_set: str | None


@dataclass(frozen=True)
class SetProgress:
    """Where a prompt set stands in one API scope: the one answer the sensor, `run` and `status` use."""

    prompt_set: str
    counts: dict[State, int]  # every state, zeros included, over the set's current members
    collected: int  # completed and stored in the set's folder
    fingerprint: str  # changes whenever any generation of the set changes state
    oldest_uncollected_at: datetime | None = None  # when the longest-waiting uncollected video completed
    oldest_pending_since: datetime | None = None  # submit time of the longest-running pending one
    in_doubt: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def pending(self) -> int:
        """Being submitted or still running at the provider."""
        return sum(self.counts[s] for s in PENDING)

    @property
    def bought(self) -> int:
        """Members whose current attempt the provider accepted (whatever became of it since)."""
        return sum(self.counts[s] for s in (*PENDING_REMOTE, State.COMPLETED, State.FAILED))

    @property
    def uncollected(self) -> int:
        return self.counts[State.COMPLETED] - self.collected

    @property
    def ready_to_collect(self) -> bool:
        """Every generation is terminal (or needs a person: in doubt, not submitted)."""
        return self.total > 0 and self.pending == 0

    @property
    def done(self) -> bool:
        """Nothing more will happen without a person: nothing pending, everything finished is stored."""
        return self.pending == 0 and self.uncollected == 0

    def collection_due(self, now: datetime, *, in_flight: bool = False) -> str | None:
        """"final" once every generation is terminal; "partial" while some still run and finished
        videos wait uncollected (COLLECT_BATCH of them, or one for COLLECT_EARLY_AFTER); None otherwise,
        and always while a collection run of the set is in flight (one at a time: it would download
        the same videos). The caller asks once per fingerprint (the sensor's cursor and run keys)."""
        if in_flight or self.total == 0:
            return None
        if self.ready_to_collect:
            return "final"
        if self.uncollected <= 0:
            return None
        if self.uncollected >= COLLECT_BATCH:
            return "partial"
        oldest = self.oldest_uncollected_at
        return "partial" if oldest is not None and now - oldest >= COLLECT_EARLY_AFTER else None

    def should_collect(self, now: datetime) -> bool:
        """Ready, or finished videos have waited long enough to be collected while the rest run (see
        `collection_due`): a slow generation must not keep the set's paid videos from being stored."""
        return self.collection_due(now) is not None


@dataclass(frozen=True)
class AttemptRow:
    api_scope: str
    request_key: str
    attempt: int
    prompt_set: str
    reason: str
    run_id: str | None
    claimed_at: datetime
    outcome: str | None
    finished_at: datetime | None
    generation_id: str | None
    client_request_id: str | None
    credits_used: float | None
    usd_spent: float | None
    estimated_usd: float | None
    error: str | None


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


def _update_many(conn: Connection, statement: Any, params: Sequence[dict[str, Any]]) -> bool:
    """Run a parametrised UPDATE for each parameter set; True when each updated exactly one row.

    One executemany where the driver reports its total row count (SQLite), else one execute each
    (psycopg2), all in the caller's transaction.
    """
    if not params:
        return True
    if conn.dialect.supports_sane_multi_rowcount:
        return conn.execute(statement, list(params)).rowcount == len(params)
    return all([conn.execute(statement, p).rowcount == 1 for p in params])


def _insert_ignoring_conflicts(conn: Connection, table: sa.Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING in the connection's dialect."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    return dialect_insert(table).on_conflict_do_nothing()


def _upsert(conn: Connection, table: sa.Table, values: dict[str, Any], keys: Sequence[str]) -> None:
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(table).values(**values)
    updates = {k: v for k, v in values.items() if k not in keys}
    conn.execute(statement.on_conflict_do_update(index_elements=list(keys), set_=updates))


@dataclass(frozen=True)
class _BatchStatements:
    claim: Any
    reclaim: Any
    open_attempt: Any
    attempt_request_id: Any
    insert_try: Any
    answer_try: Any
    close_created: Any
    submitted: Any


@functools.cache
def _batch_statements() -> _BatchStatements:
    """The group commit's statements, built once: everything varying is a bound parameter (building
    and cache-keying a statement cost more CPU than running it). No IN lists where a statement runs
    as an executemany (those take no expanding parameters)."""

    def param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
        return sa.bindparam(name, type_=column.type)

    g, a, t = generations.c, attempts.c, create_tries.c
    float_ = sa.Float()

    def claim(later_try: bool) -> Any:
        condition = [
            g.api_scope == sa.bindparam("b_scope"),
            g.request_key.in_(sa.bindparam("b_keys", expanding=True)),
            g.state == State.PLANNED.value,
            g.attempts == sa.bindparam("b_expected"),
        ]
        if later_try:  # a later try re-claims the row its own earlier try released
            condition.append(g.claim_owner == sa.bindparam("b_owner"))
        return (
            sa.update(generations)
            .where(*condition)
            .values(
                state=State.SUBMITTING.value, claim_owner=sa.bindparam("b_owner"),
                claimed_at=param("b_now", g.claimed_at), attempts=sa.bindparam("b_attempt"), error=None,
                updated_at=param("b_now", g.updated_at),
            )  # fmt: skip
            .returning(g.request_key, g.estimated_usd)
        )

    open_attempt = attempts.insert().values(
        api_scope=sa.bindparam("b_scope"), request_key=sa.bindparam("b_key"), attempt=sa.bindparam("b_attempt"),
        prompt_set=sa.bindparam("b_set"), reason=sa.bindparam("b_reason"), run_id=sa.bindparam("b_run"),
        claim_owner=sa.bindparam("b_owner"), claimed_at=param("b_now", a.claimed_at),
        estimated_usd=param("b_estimate", a.estimated_usd), client_request_id=sa.bindparam("b_request_id"),
    )  # fmt: skip
    attempt_key = [a.api_scope == sa.bindparam("b_scope"), a.request_key == sa.bindparam("b_key"),
                   a.attempt == sa.bindparam("b_attempt")]  # fmt: skip
    attempt_request_id = attempts.update().where(*attempt_key).values(client_request_id=sa.bindparam("b_request_id"))
    insert_try = create_tries.insert().values(
        api_scope=sa.bindparam("b_scope"), request_key=sa.bindparam("b_key"), attempt=sa.bindparam("b_attempt"),
        try_number=sa.bindparam("b_try"), client_request_id=sa.bindparam("b_request_id"),
        sent_at=param("b_now", t.sent_at),
    )  # fmt: skip
    answer_try = (
        create_tries.update()
        .where(t.api_scope == sa.bindparam("b_scope"), t.request_key == sa.bindparam("b_key"),
               t.attempt == sa.bindparam("b_attempt"), t.try_number == sa.bindparam("b_try"))
        .values(
            answered_at=param("b_now", t.answered_at), created=True, status_code=sa.bindparam("b_status"),
            generation_id=sa.bindparam("b_generation"), credits_used=param("b_try_credits", t.credits_used),
            usd_spent=param("b_try_usd", t.usd_spent), detail=sa.bindparam("b_detail"),
        )
    )  # fmt: skip
    close_created = (
        attempts.update()
        .where(
            *attempt_key,
            sa.or_(a.outcome.is_(None), a.outcome == AttemptOutcome.IN_DOUBT.value),
            a.claim_owner == sa.bindparam("b_owner"),
        )
        .values(
            outcome=AttemptOutcome.CREATED.value, finished_at=param("b_now", a.finished_at), error=None,
            generation_id=sa.bindparam("b_generation"),
            credits_used=sa.func.coalesce(sa.bindparam("b_credits", type_=float_), a.credits_used),
            usd_spent=sa.func.coalesce(sa.bindparam("b_usd", type_=float_), a.usd_spent),
        )
    )  # fmt: skip
    claimed_by_me = sa.and_(
        sa.or_(g.state == State.SUBMITTING.value, g.state == State.IN_DOUBT.value),
        g.claim_owner == sa.bindparam("b_owner"),
    )
    submitted = (
        sa.update(generations)
        .where(
            g.api_scope == sa.bindparam("b_scope"), g.request_key == sa.bindparam("b_key"),
            g.attempts == sa.bindparam("b_attempt"), sa.or_(claimed_by_me, g.state == State.PLANNED.value),
        )
        .values(
            state=State.SUBMITTED.value, generation_id=sa.bindparam("b_generation"),
            raw_status=sa.bindparam("b_raw"), submitted_at=param("b_now", g.submitted_at),
            next_poll_at=param("b_poll", g.next_poll_at), error=None,
            credits_used=sa.bindparam("b_credits", type_=float_), usd_spent=sa.bindparam("b_usd", type_=float_),
            expected_seconds=sa.func.coalesce(sa.bindparam("b_expected", type_=float_), g.expected_seconds),
            updated_at=param("b_now", g.updated_at),
        )
    )  # fmt: skip
    return _BatchStatements(claim(False), claim(True), open_attempt, attempt_request_id, insert_try,
                            answer_try, close_created, submitted)  # fmt: skip


class Ledger:
    """The durable per-generation state of one API scope. Safe to share between threads and processes."""

    def __init__(
        self,
        url: str = DEFAULT_LEDGER_URL,
        *,
        scope: str,
        schema: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        _engine: Engine | None = None,
    ):
        """`schema` (PostgreSQL only) keeps the tables in their own schema, created if missing.

        The schema is upgraded to the newest migration on open (a no-op when it is current).
        """
        if not scope:
            raise ValueError("a ledger is always bound to an API scope")
        self.scope = scope
        self._url, self._schema = url, schema
        self._shown_url = shown_url(url)
        if _engine is None:
            _engine = create_engine(url, schema)
            upgrade(_engine, schema=schema, shown=self._shown_url)
        self._engine = _engine
        self._writer = self._engine.execution_options(**{WRITE_OPTION: True})
        self._clock = clock
        self._hostname = socket.gethostname()
        self._token = uuid.uuid4().hex[:12]

    def for_scope(self, scope: str) -> Ledger:
        """The same database seen from another API scope (shares the connection pool)."""
        return Ledger(self._url, scope=scope, schema=self._schema, clock=self._clock, _engine=self._engine)

    def __repr__(self) -> str:
        return f"Ledger({self._shown_url!r}, scope={self.scope!r})"

    @property
    def owner(self) -> str:
        """This process's claim owner; the pid is read each time so a forked child is itself."""
        return f"{self._hostname}:{os.getpid()}:{self._token}"

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

    def _key(self, table: sa.Table, request_key: str) -> sa.ColumnElement[bool]:
        return sa.and_(table.c.api_scope == self.scope, table.c.request_key == request_key)

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
                        "api_scope": self.scope,
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
                # Parameter lists, not one multi-row VALUES: SQLAlchemy caches the statement and batches
                # the rows itself (compiling a 500-row VALUES clause took longer than running it).
                statement = _insert_ignoring_conflicts(conn, generations).returning(generations.c.request_key)
                inserted.update(conn.execute(statement, rows).scalars())
                members = [
                    {"prompt_set": prompt_set, "request_key": p.request_key, "added_at": now} for p in chunk
                ]
                conn.execute(_insert_ignoring_conflicts(conn, set_members), members)
            # The plan is the whole set: retire every member, then reinstate the planned keys.
            in_set = set_members.c.prompt_set == prompt_set
            conn.execute(set_members.update().where(in_set, set_members.c.retired_at.is_(None)).values(retired_at=now))
            for chunk in _chunks([p.request_key for p in items]):
                conn.execute(
                    set_members.update().where(in_set, set_members.c.request_key.in_(chunk)).values(retired_at=None)
                )
            known = self._known(conn, [p.request_key for p in items if p.request_key not in inserted])
        return PlanResult(new=[p.request_key for p in items if p.request_key in inserted], known=known)

    def known(self, request_keys: Iterable[str]) -> dict[str, KnownRequest]:
        """What this scope already holds for these keys (absent: never planned here). Writes nothing."""
        with self._reading() as conn:
            return self._known(conn, list(dict.fromkeys(request_keys)))

    def _known(self, conn: Connection, keys: Sequence[str]) -> dict[str, KnownRequest]:
        found: dict[str, KnownRequest] = {}
        for chunk in _chunks(keys):
            query = sa.select(generations.c.request_key, generations.c.state, generations.c.attempts).where(
                generations.c.api_scope == self.scope, generations.c.request_key.in_(chunk)
            )
            found.update({key: KnownRequest(State(state), n) for key, state, n in conn.execute(query)})
        return found

    # -- write-ahead around every HTTP try of a create -------------------------------------------

    def try_sending(
        self, request_key: str, attempt: int, try_number: int, client_request_id: str, claim: AttemptClaim
    ) -> None:
        """Claim the row for this try and record the try, in one transaction, before it is sent.

        The first try of an attempt claims a planned row whose previous attempt is `attempt - 1` and
        opens the attempt's row; a later try re-claims the row its own earlier try released. Anything
        else (another process claimed or finished it meanwhile) raises `ClaimLost`: do not send.
        """
        now = self._clock()
        owner = self.owner
        expected_attempts = attempt - 1 if try_number == 1 else attempt
        condition = [
            self._key(generations, request_key),
            generations.c.state == State.PLANNED.value,
            generations.c.attempts == expected_attempts,
        ]
        if try_number > 1:
            condition.append(generations.c.claim_owner == owner)
        with self._writing() as conn:
            claimed = conn.execute(
                sa.update(generations)
                .where(*condition)
                .values(
                    state=State.SUBMITTING.value,
                    claim_owner=owner,
                    claimed_at=now,
                    attempts=attempt,
                    error=None,
                    updated_at=now,
                )
            ).rowcount
            if claimed != 1:
                row = self._require_row(conn, request_key)
                raise ClaimLost(
                    f"request {request_key} is {row.state} (attempt {row.attempts}, claimed by "
                    f"{row.claim_owner or 'nobody'}): not sending attempt {attempt} try {try_number}"
                )
            if try_number == 1:
                estimate = conn.execute(
                    sa.select(generations.c.estimated_usd).where(self._key(generations, request_key))
                ).scalar_one()
                conn.execute(
                    attempts.insert().values(
                        api_scope=self.scope,
                        request_key=request_key,
                        attempt=attempt,
                        prompt_set=claim.prompt_set,
                        reason=AttemptReason(claim.reason).value,
                        run_id=claim.run_id,
                        claim_owner=owner,
                        claimed_at=now,
                        estimated_usd=estimate,
                    )
                )
            conn.execute(
                create_tries.insert().values(
                    api_scope=self.scope,
                    request_key=request_key,
                    attempt=attempt,
                    try_number=try_number,
                    client_request_id=client_request_id,
                    sent_at=now,
                )
            )
            conn.execute(
                attempts.update()
                .where(self._key(attempts, request_key), attempts.c.attempt == attempt)
                .values(client_request_id=client_request_id)
            )

    def try_answered(
        self,
        request_key: str,
        attempt: int,
        try_number: int,
        answer: TryAnswer,
        *,
        next_poll_at: datetime | None = None,
        expected_seconds: float | None = None,
    ) -> State:
        """Record a try's answer and what it means, in one transaction. Returns the row's new state.

        created True: submitted with the generation id (the first poll at `next_poll_at`);
        created False: the claim is released to planned now, before any retry wait (the attempt stays
        open until `finish_attempt`); created None: in doubt.
        """
        now = self._clock()
        with self._writing() as conn:
            if not self._record_try_answer(conn, request_key, attempt, try_number, answer, now):
                raise IllegalTransition(
                    f"request {request_key}: attempt {attempt} try {try_number} was never recorded as sent"
                )
            if answer.created is True:
                if answer.generation_id is None or next_poll_at is None:
                    raise ValueError("an accepted create needs its generation id and a first poll time")
                return self._submitted(conn, request_key, attempt, answer, now, next_poll_at, expected_seconds)
            if answer.created is False:
                self._move(conn, request_key, {State.SUBMITTING}, State.PLANNED, {"error": answer.detail}, owned=True)
                return State.PLANNED
            error = f"create outcome unknown: {answer.detail}"
            self._move(conn, request_key, {State.SUBMITTING, State.IN_DOUBT}, State.IN_DOUBT, {"error": error}, owned=True)
            self._close_attempt(conn, request_key, attempt, AttemptOutcome.IN_DOUBT, now, error=error, owner=self.owner)
            return State.IN_DOUBT

    def record_accepted_try(self, request_key: str, attempt: int, try_number: int, answer: TryAnswer) -> None:
        """Only the try's row: where an accepted create's id is kept when recording all of it failed,
        so that settling the attempt finds it (see `_settle`)."""
        with self._writing() as conn:
            self._record_try_answer(conn, request_key, attempt, try_number, answer, self._clock())

    # -- group commit: many tries' write-ahead records in one transaction --------------------------

    def record_tries(
        self, accepted: Sequence[AcceptedTry] = (), sending: Sequence[TrySending] = ()
    ) -> list[ClaimLost | None]:
        """`try_answered` for accepted tries and `try_sending` for tries about to be sent, all in one
        transaction (group commit): the answers first, then the claims. Returns, per try of `sending`,
        None (claimed and recorded: send it) or the `ClaimLost` that says not to send it.

        The same rows and checks as the one-try calls, written with a few multi-row statements. A
        database error, or an accepted try that was never recorded as sent (`IllegalTransition`),
        rolls the whole transaction back and is raised: nothing of it is recorded, nothing may be sent.
        """
        for item in accepted:
            if item.answer.created is not True or item.answer.generation_id is None:
                raise ValueError("record_tries records accepted answers only, each with its generation id")
        if not accepted and not sending:
            return []
        now = self._clock()
        with self._writing() as conn:
            if accepted:
                self._accept_many(conn, accepted, now)
            return self._claim_many(conn, sending, now) if sending else []

    def _accept_many(self, conn: Connection, accepted: Sequence[AcceptedTry], now: datetime) -> None:
        statements = _batch_statements()
        common = {"b_scope": self.scope, "b_owner": self.owner, "b_now": now}
        params = []
        for item in accepted:
            answer = item.answer
            cost = _cost(answer.credits_used, answer.usd_spent)
            params.append({
                **common, "b_key": item.request_key, "b_attempt": item.attempt, "b_try": item.try_number,
                "b_status": answer.status_code, "b_generation": answer.generation_id, "b_raw": answer.raw_status,
                "b_detail": answer.detail, "b_try_credits": answer.credits_used, "b_try_usd": answer.usd_spent,
                "b_credits": cost.get("credits_used"), "b_usd": cost.get("usd_spent"),
                "b_poll": item.next_poll_at, "b_expected": item.expected_seconds,
            })  # fmt: skip
        if not _update_many(conn, statements.answer_try, params):
            raise IllegalTransition("an accepted try of this batch was never recorded as sent")
        # The attempt is a purchase whatever happened to the row meanwhile (see `_submitted`); a row
        # another attempt has claimed since keeps that attempt (no row updated: not an error).
        conn.execute(statements.close_created, params)
        conn.execute(statements.submitted, params)

    def _claim_many(self, conn: Connection, sending: Sequence[TrySending], now: datetime) -> list[ClaimLost | None]:
        statements = _batch_statements()
        common = {"b_scope": self.scope, "b_owner": self.owner, "b_now": now}
        # One conditional UPDATE per (previous attempt, first try or not): typically one for the batch.
        groups: dict[tuple[int, bool], list[str]] = {}
        for item in sending:
            expected = item.attempt - 1 if item.try_number == 1 else item.attempt
            groups.setdefault((expected, item.try_number > 1), []).append(item.request_key)
        won: dict[str, float | None] = {}  # key -> its estimate
        for (expected, later_try), keys in groups.items():
            statement = statements.reclaim if later_try else statements.claim
            # In key order: concurrent claimers lock rows in one order.
            for chunk in _chunks(sorted(keys)):
                found = conn.execute(statement, {**common, "b_keys": list(chunk), "b_expected": expected,
                                                 "b_attempt": expected + (0 if later_try else 1)})  # fmt: skip
                won.update(tuple(row) for row in found)
        winners = [item for item in sending if item.request_key in won]
        rows = [
            {**common, "b_key": i.request_key, "b_attempt": i.attempt, "b_try": i.try_number,
             "b_request_id": i.client_request_id, "b_set": i.claim.prompt_set,
             "b_reason": AttemptReason(i.claim.reason).value, "b_run": i.claim.run_id,
             "b_estimate": won[i.request_key]}
            for i in winners
        ]  # fmt: skip
        first = [row for row in rows if row["b_try"] == 1]
        if first:
            conn.execute(statements.open_attempt, first)
        later = [row for row in rows if row["b_try"] > 1]
        if later:
            conn.execute(statements.attempt_request_id, later)
        if rows:
            conn.execute(statements.insert_try, rows)
        outcomes: list[ClaimLost | None] = []
        for item in sending:
            if item.request_key in won:
                outcomes.append(None)
                continue
            row = self._require_row(conn, item.request_key)
            outcomes.append(ClaimLost(
                f"request {item.request_key} is {row.state} (attempt {row.attempts}, claimed by "
                f"{row.claim_owner or 'nobody'}): not sending attempt {item.attempt} try {item.try_number}"
            ))  # fmt: skip
        return outcomes

    def _record_try_answer(
        self, conn: Connection, request_key: str, attempt: int, try_number: int, answer: TryAnswer, now: datetime
    ) -> bool:
        return conn.execute(
            create_tries.update()
            .where(
                self._key(create_tries, request_key),
                create_tries.c.attempt == attempt,
                create_tries.c.try_number == try_number,
            )
            .values(
                answered_at=now,
                created=answer.created,
                status_code=answer.status_code,
                generation_id=answer.generation_id,
                credits_used=answer.credits_used,
                usd_spent=answer.usd_spent,
                detail=answer.detail,
            )
        ).rowcount == 1

    def _submitted(
        self,
        conn: Connection,
        request_key: str,
        attempt: int,
        answer: TryAnswer,
        now: datetime,
        next_poll_at: datetime,
        expected_seconds: float | None,
    ) -> State:
        """An accepted create: the attempt is a purchase whatever happened to the row meanwhile.

        The row becomes submitted with the id when this attempt is still its latest: claimed by this
        process (also after recovery called it in doubt), or requeued for a resubmit that nobody has
        claimed yet (the late answer saves buying it again). A row another attempt has claimed since
        keeps that attempt; this one stays on record with its id and cost, so no spend is hidden.
        """
        cost = _cost(answer.credits_used, answer.usd_spent)
        self._close_attempt(
            conn, request_key, attempt, AttemptOutcome.CREATED, now,
            generation_id=answer.generation_id, replace_in_doubt=True, owner=self.owner, **cost,
        )
        values: dict[str, Any] = {
            "state": State.SUBMITTED.value,
            "generation_id": answer.generation_id,
            "raw_status": answer.raw_status,
            "submitted_at": now,
            "next_poll_at": next_poll_at,
            "error": None,
            "credits_used": cost.get("credits_used"),
            "usd_spent": cost.get("usd_spent"),
            "updated_at": now,
        }
        if expected_seconds is not None:
            values["expected_seconds"] = expected_seconds
        claimed_by_me = sa.and_(
            generations.c.state.in_(_values({State.SUBMITTING, State.IN_DOUBT})),
            generations.c.claim_owner == self.owner,
        )
        still_latest = sa.and_(
            self._key(generations, request_key),
            generations.c.attempts == attempt,
            sa.or_(claimed_by_me, generations.c.state == State.PLANNED.value),
        )
        if conn.execute(sa.update(generations).where(still_latest).values(**values)).rowcount == 1:
            return State.SUBMITTED
        return State(self._require_row(conn, request_key).state)

    def finish_attempt(self, request_key: str, attempt: int, outcome: AttemptOutcome, error: str) -> None:
        """Close an attempt that created nothing (its tries were answered "not created", or none was
        sent). A rejected request (400) moves to rejected; otherwise the row stays planned, with why."""
        if outcome not in (AttemptOutcome.REJECTED, AttemptOutcome.NOT_ACCEPTED):
            raise ValueError(f"finish_attempt closes attempts that created nothing, not {outcome}")
        now = self._clock()
        owner = self.owner
        with self._writing() as conn:
            self._close_attempt(conn, request_key, attempt, outcome, now, error=error, owner=self.owner)
            mine = [
                self._key(generations, request_key),
                generations.c.attempts == attempt,
                generations.c.claim_owner == owner,
                generations.c.state.in_(_values({State.PLANNED, State.SUBMITTING})),
            ]
            target = State.REJECTED if outcome is AttemptOutcome.REJECTED else State.PLANNED
            extra = {"completed_at": now} if target is State.REJECTED else {}
            conn.execute(
                sa.update(generations).where(*mine).values(state=target.value, error=error, updated_at=now, **extra)
            )

    # -- reproductions: a completed request bought again, its video and row left as they are ------

    def reproduction_try_sending(
        self, request_key: str, attempt: int, try_number: int, client_request_id: str, claim: AttemptClaim
    ) -> None:
        """Write-ahead for one HTTP try of a reproduction: a new attempt of a completed request.

        The row stays completed (its generation id, video and cost are the original's); only its
        attempt counter moves, in a conditional UPDATE (`completed` and at `attempt - 1`), so two
        processes never send the same reproduction. A later try needs this process's attempt still
        open. Anything else raises `ClaimLost`: do not send.
        """
        if AttemptReason(claim.reason) is not AttemptReason.REPRODUCTION:
            raise ValueError("a reproduction attempt is recorded with reason 'reproduction'")
        now, owner = self._clock(), self.owner
        with self._writing() as conn:
            if try_number == 1:
                claimed = conn.execute(
                    sa.update(generations)
                    .where(
                        self._key(generations, request_key),
                        generations.c.state == State.COMPLETED.value,
                        generations.c.attempts == attempt - 1,
                    )
                    .values(attempts=attempt, updated_at=now)
                ).rowcount
                if claimed == 1:
                    estimate = conn.execute(
                        sa.select(generations.c.estimated_usd).where(self._key(generations, request_key))
                    ).scalar_one()
                    conn.execute(
                        attempts.insert().values(
                            api_scope=self.scope, request_key=request_key, attempt=attempt,
                            prompt_set=claim.prompt_set, reason=AttemptReason.REPRODUCTION.value,
                            run_id=claim.run_id, claim_owner=owner, claimed_at=now, estimated_usd=estimate,
                        )
                    )
            else:
                claimed = conn.execute(
                    sa.select(sa.func.count()).select_from(attempts).where(
                        self._key(attempts, request_key), attempts.c.attempt == attempt,
                        attempts.c.claim_owner == owner, attempts.c.outcome.is_(None),
                    )
                ).scalar_one()
            if claimed != 1:
                row = self._require_row(conn, request_key)
                raise ClaimLost(
                    f"request {request_key} is {row.state} at attempt {row.attempts}: not sending reproduction "
                    f"attempt {attempt} try {try_number} (only a completed request is reproduced, one at a time)"
                )
            conn.execute(
                create_tries.insert().values(
                    api_scope=self.scope, request_key=request_key, attempt=attempt, try_number=try_number,
                    client_request_id=client_request_id, sent_at=now,
                )
            )
            conn.execute(
                attempts.update()
                .where(self._key(attempts, request_key), attempts.c.attempt == attempt)
                .values(client_request_id=client_request_id)
            )

    def reproduction_try_answered(self, request_key: str, attempt: int, try_number: int, answer: TryAnswer) -> None:
        """Record a reproduction try's answer: accepted closes the attempt as created (its id and cost
        on the attempt row: spend is summed from there); may have been created closes it in doubt;
        surely not leaves it open for the next try (or `finish_attempt`). The row is never touched."""
        now = self._clock()
        with self._writing() as conn:
            self._record_try_answer(conn, request_key, attempt, try_number, answer, now)
            if answer.created is True:
                self._close_attempt(
                    conn, request_key, attempt, AttemptOutcome.CREATED, now,
                    generation_id=answer.generation_id, replace_in_doubt=True,
                    **_cost(answer.credits_used, answer.usd_spent),
                )
            elif answer.created is None:
                self._close_attempt(
                    conn, request_key, attempt, AttemptOutcome.IN_DOUBT, now,
                    error=f"create outcome unknown: {answer.detail}",
                )

    def note_attempt_error(self, request_key: str, attempt: int, error: str) -> None:
        """What became of a created attempt the row does not follow (a reproduction that failed at the
        provider, or whose video could not be stored): said on the attempt row."""
        with self._writing() as conn:
            conn.execute(
                attempts.update()
                .where(self._key(attempts, request_key), attempts.c.attempt == attempt)
                .values(error=error)
            )

    def note_not_sent(self, request_key: str, error: str) -> None:
        """A planned request that could not be sent at all (its image changed, say): say why on the row."""
        with self._writing() as conn:
            conn.execute(
                sa.update(generations)
                .where(self._key(generations, request_key), generations.c.state == State.PLANNED.value)
                .values(error=error, updated_at=self._clock())
            )

    def settle_abandoned_attempt(self, request_key: str, attempt: int, reason: str) -> State | None:
        """This process's own attempt ended without an answer being recorded (an unexpected error, a
        cancellation): settle it by its tries, as `recover_abandoned` would after a crash."""
        now = self._clock()
        with self._writing() as conn:
            row = self._require_row(conn, request_key)
            if row.state != State.SUBMITTING.value or row.claim_owner != self.owner or row.attempts != attempt:
                # Not the row's claim (released, or a reproduction, which never claims the row): the
                # attempt alone is settled, in doubt if one of its tries was sent and never answered.
                outcome = AttemptOutcome.IN_DOUBT if self._unanswered_try(conn, request_key, attempt) else AttemptOutcome.NOT_ACCEPTED
                conn.execute(
                    attempts.update()
                    .where(
                        self._key(attempts, request_key),
                        attempts.c.attempt == attempt,
                        attempts.c.outcome.is_(None),
                        attempts.c.claim_owner == self.owner,
                    )
                    .values(outcome=outcome.value, finished_at=now, error=reason)
                )
                return None
            return self._settle(conn, row, reason, now)

    def _settle(self, conn: Connection, row: Any, reason: str, now: datetime) -> State:
        """Decide an abandoned claim by its tries: accepted -> submitted (the id was recorded), sent and
        unanswered (or answered 500/504) -> in doubt, nothing sent -> planned."""
        key, attempt = row.request_key, row.attempts
        tries = conn.execute(
            sa.select(create_tries)
            .where(self._key(create_tries, key), create_tries.c.attempt == attempt)
            .order_by(create_tries.c.try_number)
        ).all()
        accepted = [t for t in tries if t.created is True and t.generation_id]
        unanswered = [t for t in tries if t.answered_at is None or t.created is None]
        guard = [self._key(generations, key), generations.c.state == State.SUBMITTING.value,
                 generations.c.claim_owner == row.claim_owner]
        if accepted:
            last = accepted[-1]
            cost = _cost(last.credits_used, last.usd_spent)
            conn.execute(
                sa.update(generations).where(*guard).values(
                    state=State.SUBMITTED.value, generation_id=last.generation_id,
                    submitted_at=last.answered_at or now, next_poll_at=now, error=None, updated_at=now, **cost,
                )
            )
            self._close_attempt(conn, key, attempt, AttemptOutcome.CREATED, now,
                                generation_id=last.generation_id, **cost)
            return State.SUBMITTED
        if unanswered:
            sent = unanswered[-1]
            error = (f"create outcome unknown: {reason} after sending try {sent.try_number} "
                     f"(client request id {sent.client_request_id})")
            conn.execute(sa.update(generations).where(*guard).values(state=State.IN_DOUBT.value, error=error, updated_at=now))
            self._close_attempt(conn, key, attempt, AttemptOutcome.IN_DOUBT, now, error=error)
            return State.IN_DOUBT
        if not tries:
            # A claim is recorded with its first try in one transaction, so a claim without any try
            # was made before tries were recorded (a legacy row): it may well have been sent.
            error = f"create outcome unknown: {reason}; claimed before tries were recorded"
            conn.execute(sa.update(generations).where(*guard).values(state=State.IN_DOUBT.value, error=error, updated_at=now))
            self._close_attempt(conn, key, attempt, AttemptOutcome.IN_DOUBT, now, error=error)
            return State.IN_DOUBT
        error = f"not created: {reason}; every try was answered 'not created'"
        conn.execute(sa.update(generations).where(*guard).values(state=State.PLANNED.value, error=error, updated_at=now))
        self._close_attempt(conn, key, attempt, AttemptOutcome.NOT_ACCEPTED, now, error=error)
        return State.PLANNED

    def _unanswered_try(self, conn: Connection, request_key: str, attempt: int) -> bool:
        """Was a try of this attempt sent and never answered (or answered 'may have been created')?"""
        return conn.execute(
            sa.select(sa.func.count()).select_from(create_tries).where(
                self._key(create_tries, request_key), create_tries.c.attempt == attempt,
                sa.or_(create_tries.c.answered_at.is_(None), create_tries.c.created.is_(None)),
            )
        ).scalar_one() > 0

    def _close_attempt(
        self,
        conn: Connection,
        request_key: str,
        attempt: int,
        outcome: AttemptOutcome,
        now: datetime,
        *,
        error: str | None = None,
        generation_id: str | None = None,
        replace_in_doubt: bool = False,
        owner: str | None = None,
        **cost: float,
    ) -> None:
        """`owner`: close it only if that process made the attempt (None: recovery, on a dead owner's behalf)."""
        open_or_doubt = attempts.c.outcome.is_(None)
        if replace_in_doubt:
            open_or_doubt = sa.or_(open_or_doubt, attempts.c.outcome == AttemptOutcome.IN_DOUBT.value)
        if owner is not None:
            open_or_doubt = sa.and_(open_or_doubt, attempts.c.claim_owner == owner)
        values: dict[str, Any] = {"outcome": outcome.value, "finished_at": now, "error": error, **cost}
        if generation_id is not None:
            values["generation_id"] = generation_id
        conn.execute(
            attempts.update()
            .where(self._key(attempts, request_key), attempts.c.attempt == attempt, open_or_doubt)
            .values(**values)
        )

    def recover_abandoned(self, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> list[str]:
        """Settle claims whose owner died on this host, or older than `stale_after_s`, by their tries.

        In doubt only where a try was sent and never answered: a claim that sent nothing goes back to
        planned, one whose create was accepted becomes submitted with the recorded id. Open attempts of
        dead owners whose claim was already released (killed during a retry wait) are closed.
        Returns the keys moved to in doubt.
        """
        now = self._clock()
        stale_before = now - timedelta(seconds=stale_after_s)
        in_doubt: list[str] = []
        with self._writing() as conn:
            claims = conn.execute(
                sa.select(generations)
                .where(generations.c.api_scope == self.scope, generations.c.state == State.SUBMITTING.value)
                .order_by(generations.c.request_key)  # one lock order for concurrent recoverers
            ).all()
            for row in claims:
                if _owner_process_gone(row.claim_owner, self._hostname):
                    reason = f"process {row.claim_owner} died"
                elif row.claimed_at is None or row.claimed_at < stale_before:
                    reason = f"claim by {row.claim_owner} older than {stale_after_s:.0f} s"
                else:
                    continue
                if self._settle(conn, row, reason, now) is State.IN_DOUBT:
                    in_doubt.append(row.request_key)
            dangling = conn.execute(
                sa.select(attempts.c.request_key, attempts.c.attempt, attempts.c.claim_owner).where(
                    attempts.c.api_scope == self.scope, attempts.c.outcome.is_(None)
                )
            ).all()
            claimed_now = {(r.request_key, r.attempts) for r in claims}
            for key, attempt, owner in dangling:
                if (key, attempt) not in claimed_now and _owner_process_gone(owner, self._hostname):
                    if self._unanswered_try(conn, key, attempt):  # a reproduction killed mid-create
                        self._close_attempt(
                            conn, key, attempt, AttemptOutcome.IN_DOUBT, now,
                            error=f"create outcome unknown: process {owner} died after sending a try",
                        )
                        continue
                    self._close_attempt(
                        conn, key, attempt, AttemptOutcome.NOT_ACCEPTED, now,
                        error=f"process {owner} died between tries; every try sent was answered 'not created'",
                    )
        return in_doubt

    def requeue(self, request_keys: Iterable[str], *, from_states: Collection[State]) -> list[str]:
        """Explicitly send rows back to planned (e.g. in_doubt for --resubmit-in-doubt, failed for
        --retry-failed). Keys in other states are left alone. Returns the keys requeued. The attempts
        table keeps every earlier attempt, its generation id and its cost."""
        _check_legal(from_states, State.PLANNED)
        keys = list(dict.fromkeys(request_keys))
        now = self._clock()
        requeued: set[str] = set()
        reset = {
            "generation_id": None, "raw_status": None, "submitted_at": None, "generating_at": None,
            "completed_at": None, "next_poll_at": None, "poll_count": 0, "video_url": None,
            "video_expires_at": None, "credits_used": None, "usd_spent": None,
        }
        with self._writing() as conn:
            for chunk in _chunks(keys):
                statement = (
                    sa.update(generations)
                    .where(
                        generations.c.api_scope == self.scope,
                        generations.c.request_key.in_(chunk),
                        generations.c.state.in_(_values(from_states)),
                    )
                    .values(state=State.PLANNED.value, updated_at=now, **reset)
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
        answer. A cost the answer carries is the current attempt's. Returns the row's new state."""
        if status not in POLL_STATUSES:
            raise ValueError(f"poll status must be one of {POLL_STATUSES}, got {status!r}")
        if status == "pending" and next_poll_at is None:
            raise ValueError("a pending generation needs a next poll time")
        now = self._clock()
        cost = _cost(credits_used, usd_spent)
        with self._writing() as conn:
            row = self._require_row(conn, request_key)
            current = State(row.state)
            values: dict[str, Any] = {"raw_status": raw_status, "poll_count": row.poll_count + 1, **cost}
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
            if cost:
                conn.execute(
                    attempts.update()
                    .where(self._key(attempts, request_key), attempts.c.attempt == row.attempts)
                    .values(**cost)
                )
        return target

    def record_polls(self, answers: Sequence[PollAnswer]) -> list[State | Exception]:
        """Many polls' outcomes (`record_poll` or, with `postpone`, `postpone_poll`) in one transaction.

        The same checks as the one-row calls: each row is read in the transaction, its move checked
        against `ALLOWED_MOVES` and written by a conditional UPDATE (several rows to a statement).
        Returns, per answer, the row's new state or the exception the one-row call would have raised
        (`IllegalTransition`, `KeyError`, `ValueError`): those answers are not applied, the others
        are. A row another writer moved between the read and the write (PostgreSQL read committed)
        sends the whole batch through the one-row calls instead.
        """
        if not answers:
            return []
        try:
            with self._writing() as conn:
                return self._record_polls(conn, answers, self._clock())
        except _BatchConflict:
            pass
        outcomes: list[State | Exception] = []
        for answer in answers:
            try:
                outcomes.append(self._record_one_poll(answer))
            except (IllegalTransition, KeyError, ValueError) as exc:
                outcomes.append(exc)
        return outcomes

    def _record_one_poll(self, answer: PollAnswer) -> State:
        if answer.postpone:
            if answer.next_poll_at is None:
                raise ValueError("a postponed poll needs its next poll time")
            self.postpone_poll(answer.request_key, answer.next_poll_at, raw_status=answer.raw_status)
            row = self.row(answer.request_key)
            return row.state if row is not None else State.SUBMITTED
        return self.record_poll(
            answer.request_key, raw_status=answer.raw_status, status=answer.status or "",
            video_url=answer.video_url, video_expires_at=answer.video_expires_at, error=answer.error,
            credits_used=answer.credits_used, usd_spent=answer.usd_spent, next_poll_at=answer.next_poll_at,
        )  # fmt: skip

    def _record_polls(self, conn: Connection, answers: Sequence[PollAnswer], now: datetime) -> list[State | Exception]:
        keys = list(dict.fromkeys(a.request_key for a in answers))
        columns = (generations.c.request_key, generations.c.state, generations.c.attempts, generations.c.poll_count,
                   generations.c.generating_at, generations.c.completed_at)  # fmt: skip
        current: dict[str, Any] = {}
        for chunk in _chunks(keys):
            query = sa.select(*columns).where(generations.c.api_scope == self.scope, generations.c.request_key.in_(chunk))
            current.update((r.request_key, r) for r in conn.execute(query))
        outcomes: list[State | Exception] = []
        # Rows grouped by the columns they write (one executemany each); the state they were read in
        # is the condition, so a row moved meanwhile is detected by the row count.
        updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        costs: list[dict[str, Any]] = []
        seen: dict[str, Any] = {}
        for answer in answers:
            row = seen.get(answer.request_key) or current.get(answer.request_key)
            try:
                if row is None:
                    raise KeyError(f"request {answer.request_key} is not in the ledger for {self.scope}")
                target, values, cost = self._poll_values(answer, row, now)
            except (IllegalTransition, KeyError, ValueError) as exc:
                outcomes.append(exc)
                continue
            if answer.request_key in seen:  # the same row twice in a batch: rare; keep it simple
                raise _BatchConflict
            seen[answer.request_key] = row
            params = {"b_key": answer.request_key, "b_from": row.state, "b_now": now,
                      **{f"b_{name}": value for name, value in values.items()}}  # fmt: skip
            updates.setdefault(tuple(sorted(values)), []).append(params)
            if cost:
                costs.append({"b_key": answer.request_key, "b_attempt": row.attempts,
                              "b_credits": cost.get("credits_used"), "b_usd": cost.get("usd_spent")})  # fmt: skip
            outcomes.append(target)
        for names, params in updates.items():
            statement = (
                sa.update(generations)
                .where(
                    generations.c.api_scope == self.scope,
                    generations.c.request_key == sa.bindparam("b_key"),
                    generations.c.state == sa.bindparam("b_from"),
                )
                .values(
                    updated_at=sa.bindparam("b_now", type_=generations.c.updated_at.type),
                    **{name: sa.bindparam(f"b_{name}", type_=generations.c[name].type) for name in names},
                )
            )
            if not _update_many(conn, statement, params):
                raise _BatchConflict
        if costs:
            statement = (
                attempts.update()
                .where(
                    attempts.c.api_scope == self.scope,
                    attempts.c.request_key == sa.bindparam("b_key"),
                    attempts.c.attempt == sa.bindparam("b_attempt"),
                )
                .values(
                    credits_used=sa.func.coalesce(sa.bindparam("b_credits", type_=sa.Float), attempts.c.credits_used),
                    usd_spent=sa.func.coalesce(sa.bindparam("b_usd", type_=sa.Float), attempts.c.usd_spent),
                )
            )
            conn.execute(statement, costs)
        return outcomes

    def _poll_values(self, answer: PollAnswer, row: Any, now: datetime) -> tuple[State, dict[str, Any], dict[str, float]]:
        """What `record_poll` (or `postpone_poll`) writes for this answer on a row read as `row`."""
        current = State(row.state)
        if answer.postpone:
            if answer.next_poll_at is None:
                raise ValueError("a postponed poll needs its next poll time")
            if current not in PENDING_REMOTE:
                raise IllegalTransition(f"request {answer.request_key}: {current} -> {current} is not allowed here")
            values: dict[str, Any] = {"next_poll_at": answer.next_poll_at}
            if answer.raw_status is not None:
                values["raw_status"] = answer.raw_status
            return current, values, {}
        status = answer.status
        if status not in POLL_STATUSES:
            raise ValueError(f"poll status must be one of {POLL_STATUSES}, got {status!r}")
        if status == "pending" and answer.next_poll_at is None:
            raise ValueError("a pending generation needs a next poll time")
        cost = _cost(answer.credits_used, answer.usd_spent)
        values = {"raw_status": answer.raw_status, "poll_count": row.poll_count + 1, **cost}
        if status == "pending":
            queued = (answer.raw_status or "").lower() in QUEUED_RAW_STATUSES
            target = State.SUBMITTED if queued and current == State.SUBMITTED else State.GENERATING
            values["next_poll_at"] = answer.next_poll_at
            if target == State.GENERATING:
                values["generating_at"] = row.generating_at or now
        else:
            target = State.COMPLETED if status == "completed" else State.FAILED
            values.update(next_poll_at=None, completed_at=row.completed_at or now, error=answer.error)
            if target == State.COMPLETED:
                values.update(video_url=answer.video_url, video_expires_at=answer.video_expires_at)
        if target not in ALLOWED_MOVES[current]:
            raise IllegalTransition(f"request {answer.request_key}: {current} -> {target} is not allowed here")
        values["state"] = target.value
        return target, values, cost

    def postpone_poll(self, request_key: str, next_poll_at: datetime, *, raw_status: str | None = None) -> None:
        """A poll that could not be answered (transient error): ask again later, state unchanged.

        `raw_status`, when given, records what the answer was (e.g. "not_found") for the next poll.
        """
        values: dict[str, Any] = {"next_poll_at": next_poll_at}
        if raw_status is not None:
            values["raw_status"] = raw_status
        with self._writing() as conn:
            self._move(conn, request_key, PENDING_REMOTE, None, values)

    def refresh_video_url(self, request_key: str, video_url: str | None, video_expires_at: datetime | None) -> None:
        """A completed generation's new signed URL (the previous one expired)."""
        with self._writing() as conn:
            self._move(
                conn, request_key, {State.COMPLETED}, None, {"video_url": video_url, "video_expires_at": video_expires_at}
            )

    def due_for_poll(self, now: datetime, limit: int) -> list[LedgerRow]:
        """Pending generations of this scope whose next poll time has come, soonest first, at most `limit`."""
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
                    generations.c.api_scope == self.scope, generations.c.state.in_(_values(PENDING_REMOTE))
                )
            ).scalar_one()

    # -- videos in the store ---------------------------------------------------------------------

    def record_video(
        self,
        prompt_set: str,
        request_key: str,
        *,
        path: str,
        sha256: str,
        size_bytes: int,
        source: VideoSource = VideoSource.DOWNLOAD,
        copied_from_set: str | None = None,
    ) -> None:
        """A completed generation's video is stored and verified in `prompt_set`'s folder at `path`."""
        with self._writing() as conn:
            row = self._require_row(conn, request_key)
            if row.state != State.COMPLETED.value:
                raise IllegalTransition(f"request {request_key} is {row.state}: only a completed video is stored")
            _upsert(
                conn,
                set_videos,
                {
                    "api_scope": self.scope,
                    "prompt_set": prompt_set,
                    "request_key": request_key,
                    "path": path,
                    "sha256": sha256,
                    "size_bytes": size_bytes,
                    "source": VideoSource(source).value,
                    "copied_from_set": copied_from_set,
                    "recorded_at": self._clock(),
                },
                ("api_scope", "prompt_set", "request_key"),
            )

    def note_collection_problem(self, request_key: str, error: str) -> None:
        """Why a completed generation's video could not be stored (it stays completed, to be retried)."""
        with self._writing() as conn:
            self._move(conn, request_key, {State.COMPLETED}, None, {"error": error})

    def stored_videos(self, request_keys: Iterable[str]) -> dict[str, list[StoredVideo]]:
        """Every recorded copy of these keys in this scope, in any set's folder, oldest first."""
        keys = list(dict.fromkeys(request_keys))
        found: dict[str, list[StoredVideo]] = {}
        with self._reading() as conn:
            for chunk in _chunks(keys):
                query = (
                    sa.select(set_videos)
                    .where(set_videos.c.api_scope == self.scope, set_videos.c.request_key.in_(chunk))
                    .order_by(set_videos.c.recorded_at, set_videos.c.prompt_set)
                )
                for r in conn.execute(query):
                    found.setdefault(r.request_key, []).append(
                        StoredVideo(r.prompt_set, r.request_key, r.path, r.sha256, r.size_bytes,
                                    VideoSource(r.source), r.copied_from_set)
                    )
        return found

    # -- queries ---------------------------------------------------------------------------------

    def row(self, request_key: str) -> LedgerRow | None:
        rows = self.rows_for_keys([request_key])
        return rows[0] if rows else None

    def rows_for_keys(self, request_keys: Iterable[str]) -> list[LedgerRow]:
        """The rows of these keys in this scope, in the order given; unknown keys are left out."""
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

    def progress(self, prompt_set: str) -> SetProgress:
        """The set's current members in this scope: counts by state, what is stored, what waits.

        A member this scope has never planned counts as planned (nothing was bought for it here).
        """
        member = sa.and_(set_members.c.prompt_set == prompt_set, set_members.c.retired_at.is_(None))
        joined = set_members.outerjoin(
            generations,
            sa.and_(generations.c.api_scope == self.scope, generations.c.request_key == set_members.c.request_key),
        ).outerjoin(
            set_videos,
            sa.and_(
                set_videos.c.api_scope == self.scope,
                set_videos.c.prompt_set == set_members.c.prompt_set,
                set_videos.c.request_key == set_members.c.request_key,
            ),
        )
        query = (
            sa.select(
                set_members.c.request_key,
                generations.c.state,
                generations.c.completed_at,
                generations.c.submitted_at,
                set_videos.c.sha256,
            )
            .select_from(joined)
            .where(member)
            .order_by(set_members.c.request_key)
        )
        with self._reading() as conn:
            found = conn.execute(query).all()
        counts = dict.fromkeys(State, 0)
        digest = hashlib.sha256()
        collected, in_doubt = 0, []
        oldest_uncollected: datetime | None = None
        oldest_pending: datetime | None = None
        for key, state, completed_at, submitted_at, stored_sha in found:
            state = State(state) if state else State.PLANNED
            counts[state] += 1
            stored = state is State.COMPLETED and stored_sha is not None
            collected += stored
            digest.update(f"{key}:{state}\n".encode())
            if state is State.IN_DOUBT:
                in_doubt.append(key)
            if state is State.COMPLETED and not stored and completed_at is not None:
                oldest_uncollected = min(filter(None, (oldest_uncollected, completed_at)))
            if state in PENDING_REMOTE and submitted_at is not None:
                oldest_pending = min(filter(None, (oldest_pending, submitted_at)))
        return SetProgress(
            prompt_set, counts, collected, digest.hexdigest()[:16], oldest_uncollected, oldest_pending, in_doubt
        )

    def attempts(
        self,
        *,
        all_scopes: bool = False,
        run_id: str | None = None,
        request_keys: Iterable[str] | None = None,
    ) -> list[AttemptRow]:
        """Attempts in claim order: this scope's (or every scope's), optionally of one run or some keys."""
        conditions = [] if all_scopes else [attempts.c.api_scope == self.scope]
        if run_id is not None:
            conditions.append(attempts.c.run_id == run_id)
        query = sa.select(attempts).where(*conditions).order_by(attempts.c.claimed_at, attempts.c.id)
        with self._reading() as conn:
            if request_keys is None:
                found = conn.execute(query).all()
            else:
                found = []
                for chunk in _chunks(list(dict.fromkeys(request_keys))):
                    found += conn.execute(query.where(attempts.c.request_key.in_(chunk))).all()
        return [AttemptRow(**{name: r._mapping[name] for name in AttemptRow.__dataclass_fields__}) for r in found]

    def try_rows(self, request_key: str) -> list[Any]:
        """Every HTTP try of every attempt of a key in this scope, in order."""
        with self._reading() as conn:
            return conn.execute(
                sa.select(create_tries)
                .where(self._key(create_tries, request_key))
                .order_by(create_tries.c.attempt, create_tries.c.try_number)
            ).all()

    def scopes(self) -> list[str]:
        """Every API scope with requests in this database."""
        with self._reading() as conn:
            return list(conn.execute(sa.select(generations.c.api_scope).distinct().order_by(generations.c.api_scope)).scalars())

    def observed_processing_seconds(
        self, model: str, resolution: str, duration: int, *, sample: int = 200, minimum: int = 3
    ) -> float | None:
        """Median submit-to-completion time of recent completed generations of this shape in this scope.

        None until at least `minimum` have been seen: the poll schedule then probes instead of guessing.
        """
        query = (
            sa.select(generations.c.request_json, generations.c.submitted_at, generations.c.completed_at)
            .where(
                generations.c.api_scope == self.scope,
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
        """Every set the ledger has a membership for (whatever the scope)."""
        with self._reading() as conn:
            query = sa.select(set_members.c.prompt_set).distinct().order_by(set_members.c.prompt_set)
            return list(conn.execute(query).scalars())

    def set_members(self, prompt_set: str) -> list[str]:
        with self._reading() as conn:
            query = (
                sa.select(set_members.c.request_key)
                .where(set_members.c.prompt_set == prompt_set, set_members.c.retired_at.is_(None))
                .order_by(set_members.c.request_key)
            )
            return list(conn.execute(query).scalars())

    # -- internals -------------------------------------------------------------------------------

    def _select_rows(
        self,
        *conditions: sa.ColumnElement[bool],
        prompt_set: str | None = None,
        order_by: Sequence[sa.ColumnElement[Any]] = (generations.c.planned_at, generations.c.request_key),
        limit: int | None = None,
    ) -> list[LedgerRow]:
        query = (
            sa.select(generations)
            .where(generations.c.api_scope == self.scope, *conditions)
            .order_by(*order_by)
            .limit(limit)
        )
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
        row = conn.execute(sa.select(generations).where(self._key(generations, request_key))).first()
        if row is None:
            raise KeyError(f"request {request_key} is not in the ledger for {self.scope}")
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
        conditions = [self._key(generations, request_key), generations.c.state.in_(_values(from_states))]
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
        raise IllegalTransition(f"request {request_key}: {row.state} -> {to or row.state} is not allowed here")


_ROW_COLUMNS = tuple(c.name for c in generations.columns)
