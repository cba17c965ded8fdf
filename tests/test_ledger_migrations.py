"""A versioned schema (issue 8, problem 7): Alembic migrations applied at open, a ledger made by the
code before this change upgraded with every row kept, and a clear error for a newer ledger.

`fixtures/ledger/ledger_aa9253d.sqlite` was made by commit aa9253d (before scopes and migrations);
`ledger_aa9253d_postgresql.sql` is the same ledger's PostgreSQL DDL, filled here with the SQLite rows.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from ledger_worker import (
    POSTGRES_URL_ENV,
    LedgerTarget,
    claim,
    planned,
    wait_for,
)

from wan_pipeline.ledger import HEAD_REVISION, KnownRequest, LedgerVersionError, State, normalized_url
from wan_pipeline.ledger.database import VERSION_TABLE, create_engine, current_revision, upgrade
from wan_pipeline.ledger.schema import metadata

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
FIXTURES = Path(__file__).with_name("fixtures") / "ledger"
SQLITE_FIXTURE = FIXTURES / "ledger_aa9253d.sqlite"
POSTGRES_DDL = FIXTURES / "ledger_aa9253d_postgresql.sql"
WORKER = Path(__file__).with_name("ledger_worker.py")
REPO = Path(__file__).resolve().parents[1]

K = {n: f"{n:02d}" * 16 for n in range(1, 7)}
LEGACY_STATES = {1: "completed", 2: "completed", 3: "generating", 4: "in_doubt", 5: "failed", 6: "planned"}


def _drop_schema(url: str, schema: str) -> None:
    engine = sa.create_engine(normalized_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def _old_postgres_ledger(url: str, schema: str) -> None:
    """The aa9253d ledger on PostgreSQL: its DDL run in `schema`, the SQLite fixture's rows copied in."""
    source = sa.create_engine(f"sqlite:///{SQLITE_FIXTURE}")
    engine = sa.create_engine(normalized_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
            conn.exec_driver_sql(f'SET search_path TO "{schema}"')
            conn.exec_driver_sql(POSTGRES_DDL.read_text())
            with source.connect() as old:
                for name in ("wan_generations", "wan_prompt_set_members"):  # parents first
                    table = sa.Table(name, sa.MetaData(), autoload_with=old)
                    into = sa.Table(name, sa.MetaData(), autoload_with=conn, schema=schema)
                    rows = [
                        {k: v.replace(tzinfo=UTC) if isinstance(v, datetime) else v for k, v in row.items()}
                        for row in old.execute(sa.select(table)).mappings()
                    ]
                    conn.execute(into.insert(), rows)
    finally:
        source.dispose()
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def old_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerTarget]:
    """A ledger made by aa9253d, not yet opened by this code."""
    if request.param == "sqlite":
        copy = tmp_path / "ledger.sqlite"
        shutil.copyfile(SQLITE_FIXTURE, copy)
        yield LedgerTarget(f"sqlite:///{copy}")
        return
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} not set")
    schema = f"test_upgrade_{uuid.uuid4().hex[:12]}"
    try:
        _old_postgres_ledger(url, schema)
        yield LedgerTarget(url, schema)
    finally:
        _drop_schema(url, schema)


def revision(where: LedgerTarget) -> str | None:
    engine = create_engine(where.url, where.schema)
    try:
        with engine.connect() as conn:
            return current_revision(conn, where.schema)
    finally:
        engine.dispose()


def test_an_old_ledger_is_upgraded_at_open_and_keeps_every_row(old_ledger: LedgerTarget) -> None:
    assert revision(old_ledger) is None  # made by create_all: no version table
    ledger = old_ledger.open()  # the API in use: the emulator
    legacy = ledger.for_scope("legacy")
    assert revision(old_ledger) == HEAD_REVISION

    rows = {r.request_key: r for r in legacy.rows()}
    assert {k: r.state.value for k, r in rows.items()} == {K[n]: s for n, s in LEGACY_STATES.items()}
    assert [rows[K[n]].generation_id for n in range(1, 7)] == ["gen-a", "gen-b", "gen-c", None, "gen-e", None]
    assert rows[K[1]].request_json["prompt"] == "a pour of coffee"
    assert rows[K[1]].planned_at == datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    assert rows[K[1]].usd_spent == 0.5 and rows[K[4]].usd_spent is None
    # Set memberships are kept, shared key included.
    assert legacy.prompt_sets() == ["product_shots", "seaside"]
    assert legacy.set_members("product_shots") == [K[1], K[2], K[3], K[4]]
    assert legacy.set_members("seaside") == [K[3], K[4], K[5], K[6]]
    assert rows[K[3]].prompt_sets == ("product_shots", "seaside")

    # One legacy attempt per attempted row, with the cost the row recorded.
    made = {a.request_key: a for a in legacy.attempts()}
    assert sorted(made) == [K[n] for n in range(1, 6)]
    assert {k: (a.attempt, a.outcome, a.generation_id, a.usd_spent, a.credits_used) for k, a in made.items()} == {
        K[1]: (1, "created", "gen-a", 0.5, 1_000_000.0),
        K[2]: (1, "created", "gen-b", 0.5, 1_000_000.0),
        K[3]: (1, "created", "gen-c", 0.5, 1_000_000.0),
        K[4]: (1, "in_doubt", None, None, None),
        K[5]: (1, "created", "gen-e", 0.5, 1_000_000.0),
    }
    assert made[K[5]].prompt_set == "seaside"  # the only set it was in
    assert all(a.api_scope == "legacy" for a in made.values())

    # The downloaded video moved to wan_set_videos, under the set whose folder held it.
    videos = legacy.stored_videos(list(K.values()))
    assert list(videos) == [K[1]]
    (video,) = videos[K[1]]
    assert (video.prompt_set, video.path, video.sha256, video.size_bytes) == (
        "product_shots", f"data/outputs/product_shots/{K[1]}.mp4", "cd" * 32, 123456
    )
    assert legacy.progress("product_shots").collected == 1

    # Legacy purchases are never reused by an API: the emulator has bought nothing.
    assert ledger.known(list(K.values())) == {} and ledger.rows() == [] and ledger.attempts() == []
    assert ledger.scopes() == ["legacy"]


def test_opening_an_upgraded_ledger_again_changes_nothing(old_ledger: LedgerTarget) -> None:
    first = old_ledger.open().for_scope("legacy")
    before = (first.rows(), first.attempts(), first.stored_videos(list(K.values())))
    first.close()

    again = old_ledger.open().for_scope("legacy")
    assert (again.rows(), again.attempts(), again.stored_videos(list(K.values()))) == before
    engine = create_engine(old_ledger.url, old_ledger.schema)
    assert upgrade(engine, schema=old_ledger.schema) == (HEAD_REVISION, HEAD_REVISION)
    engine.dispose()
    # An upgraded legacy ledger still works for new purchases in a real scope.
    real = again.for_scope("https://api.aimlapi.com")
    real.plan("seaside", [planned(K[5])])
    assert claim(real, K[5]) == 1
    assert again.known([K[5]]) == {K[5]: KnownRequest(State.FAILED, 1)}


def test_a_row_the_old_code_left_claimed_is_in_doubt_after_the_upgrade(old_ledger: LedgerTarget) -> None:
    """aa9253d claimed a row before sending its create: a row it left in submitting may have been
    bought. The upgrade files its attempt as in doubt; the row must say so too, and recovery (which
    finds no tries recorded for it) must not send it back to planned as "never sent"."""
    engine = create_engine(old_ledger.url, old_ledger.schema)
    old = sa.Table("wan_generations", sa.MetaData(), autoload_with=engine, schema=old_ledger.schema)
    with engine.begin() as conn:
        conn.execute(
            old.update().where(old.c.request_key == K[6])
            .values(state="submitting", attempts=1, claim_owner="vm:6938:04d8283927bc",
                    claimed_at=datetime(2026, 11, 20, 9, 1, tzinfo=UTC))
        )  # fmt: skip
    engine.dispose()

    legacy = old_ledger.open(scope="legacy")
    (attempt,) = legacy.attempts(request_keys=[K[6]])
    assert attempt.outcome == "in_doubt"
    # Nothing recovers the legacy scope (a run recovers only the API in use): the upgrade itself must
    # say in doubt, or `status` shows it as "submitting" forever and never lists it for support.
    assert legacy.row(K[6]).state is State.IN_DOUBT, legacy.row(K[6])
    legacy.recover_abandoned()  # the claim is a year old
    row = legacy.row(K[6])
    assert row.state is State.IN_DOUBT, f"{row.state}: {row.error}"
    assert legacy.progress("seaside").in_doubt == [K[4], K[6]]


def _type(column_type: sa.types.TypeEngine, dialect: str) -> tuple[str, object, object]:
    """A column's type as both sides can say it: generic family, length, and (PostgreSQL) timezone."""
    if isinstance(column_type, sa.TypeDecorator):
        column_type = column_type.impl
    generic = column_type.as_generic()
    family = "Float" if isinstance(generic, sa.Float) else type(generic).__name__  # Double is a Float
    timezone = getattr(generic, "timezone", None) if dialect == "postgresql" else None  # SQLite has none
    return family, getattr(generic, "length", None), timezone


def _shape(inspector: sa.Inspector, schema: str | None) -> dict[str, object]:
    shape: dict[str, object] = {}
    for name in sorted(set(inspector.get_table_names(schema=schema)) - {VERSION_TABLE}):
        columns = inspector.get_columns(name, schema=schema)
        shape[name] = {
            "columns": [(c["name"], bool(c["nullable"]), _type(c["type"], inspector.dialect.name)) for c in columns],
            "primary_key": sorted(inspector.get_pk_constraint(name, schema=schema)["constrained_columns"]),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]))
                for i in inspector.get_indexes(name, schema=schema)
                if not i.get("duplicates_constraint")  # PostgreSQL's index behind a unique constraint
            ),
            "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(name, schema=schema)),
        }
    return shape


def _expected_shape(dialect: str) -> dict[str, object]:
    shape: dict[str, object] = {}
    for name, table in sorted(metadata.tables.items()):
        shape[name] = {
            "columns": [(c.name, bool(c.nullable), _type(c.type, dialect)) for c in table.columns],
            "primary_key": sorted(c.name for c in table.primary_key.columns),
            "indexes": sorted((i.name, tuple(c.name for c in i.columns)) for i in table.indexes),
            "unique": sorted(
                tuple(c.name for c in u.columns) for u in table.constraints if isinstance(u, sa.UniqueConstraint)
            ),
        }
    return shape


def _dialect(where: LedgerTarget) -> str:
    return normalized_url(where.url).get_backend_name()


def _reflected(where: LedgerTarget) -> dict[str, object]:
    engine = create_engine(where.url, where.schema)
    try:
        with engine.connect() as conn:
            return _shape(sa.inspect(conn), where.schema)
    finally:
        engine.dispose()


def test_a_fresh_ledgers_tables_are_what_the_schema_module_describes(target: LedgerTarget) -> None:
    target.open().close()
    assert _reflected(target) == _expected_shape(_dialect(target))


def test_an_upgraded_old_ledgers_tables_are_what_the_schema_module_describes(old_ledger: LedgerTarget) -> None:
    old_ledger.open().close()
    assert _reflected(old_ledger) == _expected_shape(_dialect(old_ledger))


def test_a_ledger_at_an_unknown_revision_is_refused_by_name(target: LedgerTarget) -> None:
    ledger = target.open()
    ledger.plan("s", [planned(K[1])])
    ledger.close()
    engine = create_engine(target.url, target.schema)
    version = sa.Table(VERSION_TABLE, sa.MetaData(), sa.Column("version_num", sa.String(32)), schema=target.schema)
    with engine.begin() as conn:
        conn.execute(version.update().values(version_num="0099_from_the_future"))
    engine.dispose()

    with pytest.raises(LedgerVersionError, match="'0099_from_the_future'") as refused:
        target.open()
    assert "newer" in str(refused.value) and HEAD_REVISION in str(refused.value)


def test_opening_a_sqlite_ledger_while_another_connection_holds_the_lock_waits(tmp_path: Path) -> None:
    """What two processes starting on a fresh SQLite ledger meet: one holds the file's lock (switching
    it to WAL, or migrating) while the other connects. The other must wait (busy timeout), not fail."""
    path = tmp_path / "ledger.sqlite"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE unrelated (a)")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        ledger = LedgerTarget(f"sqlite:///{path}").open()
        ledger.plan("s", [planned(K[1])])
    finally:
        release.join()
        holder.close()
    assert revision(LedgerTarget(f"sqlite:///{path}")) == HEAD_REVISION


def test_two_processes_opening_a_fresh_ledger_at_once_both_succeed(target: LedgerTarget, tmp_path: Path) -> None:
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{n}" for n in range(2)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "open", target.to_json(), str(flag), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for flag in ready
    ]
    try:
        wait_for(lambda: all(flag.exists() for flag in ready), "both workers to be ready")
        go.touch()
        outputs = [worker.communicate(timeout=60) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()

    assert [w.returncode for w in workers] == [0, 0], [err for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["opened", "opened"]
    ledger = target.open()
    assert len(ledger.prompt_sets()) == 2 and revision(target) == HEAD_REVISION
