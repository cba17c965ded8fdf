"""The ledger's tables as the code expects them at the newest migration, and the states they hold.

The tables are created and changed only by the Alembic migrations in `migrations/versions/`; this
module describes the result for the queries. A test checks that the two agree.

A purchase belongs to an API: every row carries its `api_scope` (the API base URL's origin, or
`emulator` for any instance of the local emulator, or `legacy` for rows from before scopes
existed), so results bought from one API are never counted as bought on another.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

import sqlalchemy as sa

# The newest migration; `Ledger` compares the database's revision with it at start.
HEAD_REVISION = "0002_scopes_attempts"


class State(StrEnum):
    PLANNED = "planned"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    GENERATING = "generating"
    COMPLETED = "completed"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"  # a create was sent and never answered (or answered 500/504): it may be paid for
    REJECTED = "rejected"  # 400: the request itself is bad


class AttemptOutcome(StrEnum):
    """How one paid attempt ended. An open attempt (a create in flight) has no outcome yet."""

    CREATED = "created"  # the provider accepted it: a generation exists and was charged
    REJECTED = "rejected"  # 400/422: the request is bad, nothing charged
    NOT_ACCEPTED = "not_accepted"  # surely not created (429/502/503/401/403, not sent, image changed)
    IN_DOUBT = "in_doubt"  # sent, answer lost: it may exist and be charged


class AttemptReason(StrEnum):
    """Why an attempt was made: what the user asked for."""

    FIRST = "first"
    RETRY_FAILED = "retry_failed"
    RESUBMIT_IN_DOUBT = "resubmit_in_doubt"
    REPRODUCTION = "reproduction"


class VideoSource(StrEnum):
    DOWNLOAD = "download"  # streamed from the provider's signed URL
    COPY = "copy"  # copied inside the store from another set's verified file


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


def _state_check(name: str, column: str, values: type[StrEnum]) -> sa.CheckConstraint:
    return sa.CheckConstraint(f"{column} IN (" + ", ".join(f"'{v.value}'" for v in values) + ")", name=name)


metadata = sa.MetaData()

# The current state of one request as bought from one API.
generations = sa.Table(
    "wan_generations",
    metadata,
    sa.Column("api_scope", sa.String(255), primary_key=True),
    sa.Column("request_key", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("request_json", sa.JSON, nullable=False),
    sa.Column("estimated_usd", sa.Float),
    sa.Column("expected_seconds", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False),  # the number of the latest attempt
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
    sa.Column("credits_used", sa.Float),  # of the current attempt; spend figures come from attempts
    sa.Column("usd_spent", sa.Float),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
    _state_check("ck_wan_generations_state", "state", State),
    sa.Index("ix_wan_generations_poll", "api_scope", "state", "next_poll_at"),
)

# Which requests a prompt set's catalog asks for (independent of the API they are bought from).
set_members = sa.Table(
    "wan_prompt_set_members",
    metadata,
    sa.Column("prompt_set", sa.String(128), primary_key=True),
    sa.Column("request_key", sa.String(64), primary_key=True),
    sa.Column("added_at", UtcDateTime(), nullable=False),
    # Set when the set's catalog no longer asks for the key: the row and its history stay, but the
    # set's summaries, sensors and collection see only what the current catalog asks for.
    sa.Column("retired_at", UtcDateTime()),
    sa.Index("ix_wan_prompt_set_members_request_key", "request_key"),
)

# Append-only: one row per paid attempt of a request (its outcome is filled in once, when known).
# Every spend figure is a sum over this table, so retries and resubmits never hide earlier spend.
attempts = sa.Table(
    "wan_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("api_scope", sa.String(255), nullable=False),
    sa.Column("request_key", sa.String(64), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("prompt_set", sa.String(128), nullable=False),  # the set whose submission bought it
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("run_id", sa.String(64)),  # the Dagster run (or other caller) that made it
    sa.Column("claim_owner", sa.String(255), nullable=False),
    sa.Column("claimed_at", UtcDateTime(), nullable=False),
    sa.Column("outcome", sa.String(16)),
    sa.Column("finished_at", UtcDateTime()),
    sa.Column("generation_id", sa.Text),
    sa.Column("client_request_id", sa.String(128)),  # of the last try sent
    sa.Column("credits_used", sa.Float),
    sa.Column("usd_spent", sa.Float),
    sa.Column("estimated_usd", sa.Float),
    sa.Column("error", sa.Text),
    sa.UniqueConstraint("api_scope", "request_key", "attempt", name="uq_wan_attempts_attempt"),
    _state_check("ck_wan_attempts_outcome", "outcome", AttemptOutcome),
    sa.Index("ix_wan_attempts_run", "run_id"),
    sa.Index("ix_wan_attempts_set", "api_scope", "prompt_set"),
)

# Append-only: every HTTP try of a create, written before it is sent and updated when answered.
# A try sent and never answered (or answered 500/504) is what "in doubt" means, and nothing else.
create_tries = sa.Table(
    "wan_create_tries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("api_scope", sa.String(255), nullable=False),
    sa.Column("request_key", sa.String(64), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("try_number", sa.Integer, nullable=False),
    sa.Column("client_request_id", sa.String(128), nullable=False),
    sa.Column("sent_at", UtcDateTime(), nullable=False),
    sa.Column("answered_at", UtcDateTime()),
    sa.Column("created", sa.Boolean),  # answered: True accepted, False surely not, NULL may have been
    sa.Column("status_code", sa.Integer),
    sa.Column("generation_id", sa.Text),
    sa.Column("credits_used", sa.Float),
    sa.Column("usd_spent", sa.Float),
    sa.Column("detail", sa.Text),
    sa.UniqueConstraint("api_scope", "request_key", "attempt", "try_number", name="uq_wan_create_tries_try"),
)

# The verified video of a request in one set's folder of the store (downloaded or copied there).
set_videos = sa.Table(
    "wan_set_videos",
    metadata,
    sa.Column("api_scope", sa.String(255), primary_key=True),
    sa.Column("prompt_set", sa.String(128), primary_key=True),
    sa.Column("request_key", sa.String(64), primary_key=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    sa.Column("copied_from_set", sa.String(128)),
    sa.Column("recorded_at", UtcDateTime(), nullable=False),
    sa.Index("ix_wan_set_videos_key", "api_scope", "request_key"),
)
