"""Where the ledger lives: engines for SQLite (WAL) and PostgreSQL, and its schema's version.

The schema is changed only by the Alembic migrations beside this module. `upgrade` applies the
missing ones (at start, or by `wan-pipeline ledger upgrade`), serialised between processes that
start at the same time; a ledger written by newer code than this is refused with a clear error
rather than read wrongly.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url

from wan_pipeline.ledger.schema import HEAD_REVISION

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Not Alembic's default `alembic_version`: the ledger may share a database with the Dagster
# instance, which keeps its own revisions there.
VERSION_TABLE = "wan_ledger_version"
MIGRATIONS = Path(__file__).with_name("migrations")
WRITE_OPTION = "wan_ledger_write"
# pg_advisory_xact_lock key serialising migrations by processes that start at the same time.
_DDL_LOCK_KEY = 0x57414E4C  # "WANL"


class LedgerVersionError(RuntimeError):
    """The database's ledger schema is not one this code can use (newer, or unknown)."""


def normalized_url(url: str) -> sa.URL:
    """The SQLAlchemy URL with the driver this project ships for a bare postgresql:// URL."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the project ships psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed


def shown_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _sqlite_begin), so the sqlite3 module must not.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # Switching a file to WAL takes its lock without waiting for busy_timeout: retry while another
    # connection (a process opening the same fresh ledger) holds it.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # answers the mode now in force
            break  # WAL, or a database that has no WAL (in memory)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the write lock at BEGIN, so a read-then-write transaction waits for other
    # writers (busy_timeout) instead of failing on a stale snapshot.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")


def create_engine(url: str, schema: str | None) -> Engine:
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


def _known_revisions() -> set[str]:
    return {path.stem for path in (MIGRATIONS / "versions").glob("[0-9]*.py")}


def current_revision(conn: Connection, schema: str | None) -> str | None:
    """The revision recorded in the database; None for an empty database or a pre-migration ledger."""
    inspector = sa.inspect(conn)
    if not inspector.has_table(VERSION_TABLE, schema=schema):
        return None
    table = sa.Table(VERSION_TABLE, sa.MetaData(), sa.Column("version_num", sa.String(32)), schema=schema)
    return conn.execute(sa.select(table.c.version_num)).scalar_one_or_none()


def _check_known(revision: str | None, shown: str) -> None:
    if revision is not None and revision not in _known_revisions():
        raise LedgerVersionError(
            f"the ledger at {shown} is at schema revision {revision!r}, which this version of wan-pipeline "
            f"does not know (newest known: {HEAD_REVISION!r}): it was written by newer code. Upgrade "
            "wan-pipeline; do not point older code at it."
        )


def _alembic_config(conn: Connection, schema: str | None) -> Any:
    from alembic.config import Config  # imported only when a migration actually runs

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    config.attributes["schema"] = schema
    return config


@contextmanager
def _migration_lock(engine: Engine, schema: str | None) -> Iterator[Connection]:
    """One connection in one transaction, holding the database-wide migration lock."""
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_DDL_LOCK_KEY)))
            if schema:
                conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
                # Migrations use plain table names (and raw SQL): resolve them in the ledger's schema.
                conn.exec_driver_sql(f'SET LOCAL search_path TO "{schema}"')
        yield conn


def upgrade(engine: Engine, *, schema: str | None = None, shown: str = "") -> tuple[str | None, str]:
    """Apply the migrations the database lacks. Returns (revision before, revision after)."""
    with engine.connect() as probe:
        before = current_revision(probe, schema)
        probe.rollback()
    _check_known(before, shown)
    if before == HEAD_REVISION:
        return before, before
    from alembic import command

    with _migration_lock(engine, schema) as conn:
        before = current_revision(conn, schema)  # another process may have upgraded meanwhile
        _check_known(before, shown)
        if before != HEAD_REVISION:
            command.upgrade(_alembic_config(conn, schema), "head")
    return before, HEAD_REVISION
