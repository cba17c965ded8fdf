"""Purchases belong to an API; every attempt and every HTTP try of a create is kept; videos per set.

- `wan_generations` is keyed by (api_scope, request_key). Rows from before scopes existed move to
  the scope `legacy`, which is never reused automatically: nothing says which API bought them.
- `wan_attempts` (one row per paid attempt) and `wan_create_tries` (one per HTTP try) are new.
  Each legacy row with an attempt gets one attempt row carrying the cost the row recorded.
- The download columns move to `wan_set_videos`, filed under the set whose folder holds the file.
- `wan_prompt_set_members` loses its foreign key: a set's keys exist independently of any API.

Tables are rebuilt (create, copy, drop, rename) rather than altered, so the same steps run on
SQLite and PostgreSQL.

Revision ID: 0002_scopes_attempts
Revises: 0001_baseline
"""

from datetime import UTC, datetime
from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

from wan_pipeline.ledger.schema import UtcDateTime

revision = "0002_scopes_attempts"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None

LEGACY_SCOPE = "legacy"
STATES = ("planned", "submitting", "submitted", "generating", "completed", "failed", "in_doubt", "rejected")
OUTCOMES = ("created", "rejected", "not_accepted", "in_doubt")
# What the state of a legacy row says about how its latest attempt ended.
OUTCOME_OF_STATE = {
    "submitting": "in_doubt",  # a claim nobody recovered: it may have been sent
    "submitted": "created",
    "generating": "created",
    "completed": "created",
    "failed": "created",
    "in_doubt": "in_doubt",
    "rejected": "rejected",
    "planned": "not_accepted",
}
CHUNK = 500


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def _generations_columns() -> list[sa.schema.SchemaItem]:
    return [
        sa.Column("api_scope", sa.String(255), nullable=False),
        sa.Column("request_key", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("request_json", sa.JSON, nullable=False),
        sa.Column("estimated_usd", sa.Float),
        sa.Column("expected_seconds", sa.Float),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("claim_owner", sa.String(255)),
        sa.Column("claimed_at", UtcDateTime()),
        sa.Column("generation_id", sa.Text),
        sa.Column("raw_status", sa.Text),
        sa.Column("planned_at", UtcDateTime(), nullable=False),
        sa.Column("submitted_at", UtcDateTime()),
        sa.Column("generating_at", UtcDateTime()),
        sa.Column("completed_at", UtcDateTime()),
        sa.Column("next_poll_at", UtcDateTime()),
        sa.Column("poll_count", sa.Integer, nullable=False),
        sa.Column("video_url", sa.Text),
        sa.Column("video_expires_at", UtcDateTime()),
        sa.Column("error", sa.Text),
        sa.Column("credits_used", sa.Float),
        sa.Column("usd_spent", sa.Float),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("api_scope", "request_key", name="pk_wan_generations"),
        sa.CheckConstraint(_in("state", STATES), name="ck_wan_generations_state"),
    ]


GENERATION_COLUMNS = (
    "request_key, state, model, request_json, estimated_usd, expected_seconds, attempts, claim_owner, "
    "claimed_at, generation_id, raw_status, planned_at, submitted_at, generating_at, completed_at, "
    "next_poll_at, poll_count, video_url, video_expires_at, error, credits_used, usd_spent, updated_at"
)


def _utc(value: datetime | None) -> datetime | None:
    """Reflected SQLite timestamps come back naive; the ledger stores UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def upgrade() -> None:
    bind = op.get_bind()
    schema = op.get_context().version_table_schema
    old_generations = sa.Table("wan_generations", sa.MetaData(), autoload_with=bind, schema=schema)
    old_members = sa.Table("wan_prompt_set_members", sa.MetaData(), autoload_with=bind, schema=schema)

    op.create_table("wan_generations_v2", *_generations_columns())
    op.execute(
        f"INSERT INTO wan_generations_v2 (api_scope, {GENERATION_COLUMNS}) "
        f"SELECT '{LEGACY_SCOPE}', {GENERATION_COLUMNS} FROM wan_generations"
    )
    # aa9253d claimed before sending: a row it left claimed may have been bought (see OUTCOME_OF_STATE).
    op.execute(
        "UPDATE wan_generations_v2 SET state = 'in_doubt', claim_owner = NULL, "
        "error = 'claimed before this version recorded tries, never settled: the create may have been sent' "
        "WHERE state = 'submitting'"
    )
    op.create_table(
        "wan_prompt_set_members_v2",
        sa.Column("prompt_set", sa.String(128), nullable=False),
        sa.Column("request_key", sa.String(64), nullable=False),
        sa.Column("added_at", UtcDateTime(), nullable=False),
        sa.Column("retired_at", UtcDateTime()),
        sa.PrimaryKeyConstraint("prompt_set", "request_key", name="pk_wan_prompt_set_members"),
    )
    op.execute(
        "INSERT INTO wan_prompt_set_members_v2 (prompt_set, request_key, added_at, retired_at) "
        "SELECT prompt_set, request_key, added_at, retired_at FROM wan_prompt_set_members"
    )
    attempts = op.create_table(
        "wan_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("api_scope", sa.String(255), nullable=False),
        sa.Column("request_key", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("prompt_set", sa.String(128), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("run_id", sa.String(64)),
        sa.Column("claim_owner", sa.String(255), nullable=False),
        sa.Column("claimed_at", UtcDateTime(), nullable=False),
        sa.Column("outcome", sa.String(16)),
        sa.Column("finished_at", UtcDateTime()),
        sa.Column("generation_id", sa.Text),
        sa.Column("client_request_id", sa.String(128)),
        sa.Column("credits_used", sa.Float),
        sa.Column("usd_spent", sa.Float),
        sa.Column("estimated_usd", sa.Float),
        sa.Column("error", sa.Text),
        sa.UniqueConstraint("api_scope", "request_key", "attempt", name="uq_wan_attempts_attempt"),
        sa.CheckConstraint(_in("outcome", OUTCOMES), name="ck_wan_attempts_outcome"),
    )
    op.create_table(
        "wan_create_tries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("api_scope", sa.String(255), nullable=False),
        sa.Column("request_key", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("try_number", sa.Integer, nullable=False),
        sa.Column("client_request_id", sa.String(128), nullable=False),
        sa.Column("sent_at", UtcDateTime(), nullable=False),
        sa.Column("answered_at", UtcDateTime()),
        sa.Column("created", sa.Boolean),
        sa.Column("status_code", sa.Integer),
        sa.Column("generation_id", sa.Text),
        sa.Column("credits_used", sa.Float),
        sa.Column("usd_spent", sa.Float),
        sa.Column("detail", sa.Text),
        sa.UniqueConstraint(
            "api_scope", "request_key", "attempt", "try_number", name="uq_wan_create_tries_try"
        ),
    )
    videos = op.create_table(
        "wan_set_videos",
        sa.Column("api_scope", sa.String(255), nullable=False),
        sa.Column("prompt_set", sa.String(128), nullable=False),
        sa.Column("request_key", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("copied_from_set", sa.String(128)),
        sa.Column("recorded_at", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("api_scope", "prompt_set", "request_key", name="pk_wan_set_videos"),
    )

    sets_of: dict[str, list[str]] = {}
    for key, prompt_set in bind.execute(
        sa.select(old_members.c.request_key, old_members.c.prompt_set).order_by(old_members.c.prompt_set)
    ):
        sets_of.setdefault(key, []).append(prompt_set)
    attempt_rows, video_rows = [], []
    for row in bind.execute(sa.select(old_generations)).mappings():
        key = row["request_key"]
        member_of = sets_of.get(key, [])
        first_set = member_of[0] if member_of else "(unknown)"
        if row["attempts"] > 0:
            attempt_rows.append(
                {
                    "api_scope": LEGACY_SCOPE,
                    "request_key": key,
                    "attempt": row["attempts"],
                    "prompt_set": first_set,
                    "reason": "first",
                    "claim_owner": row["claim_owner"] or "(unknown)",
                    "claimed_at": _utc(row["claimed_at"] or row["planned_at"]),
                    "outcome": OUTCOME_OF_STATE[row["state"]],
                    "finished_at": _utc(row["submitted_at"] or row["updated_at"]),
                    "generation_id": row["generation_id"],
                    "credits_used": row["credits_used"],
                    "usd_spent": row["usd_spent"],
                    "estimated_usd": row["estimated_usd"],
                    "error": "recorded before attempts were kept: earlier attempts and their cost are unknown"
                    if row["attempts"] > 1
                    else row["error"],
                }
            )
        if row["download_sha256"] and row["download_path"]:
            folder = PurePosixPath(str(row["download_path"]).replace("\\", "/")).parent.name
            video_rows.append(
                {
                    "api_scope": LEGACY_SCOPE,
                    "prompt_set": folder if folder in member_of else first_set,
                    "request_key": key,
                    "path": row["download_path"],
                    "sha256": row["download_sha256"],
                    "size_bytes": row["download_bytes"] or 0,
                    "source": "download",
                    "recorded_at": _utc(row["updated_at"]),
                }
            )
    for start in range(0, len(attempt_rows), CHUNK):
        op.bulk_insert(attempts, attempt_rows[start : start + CHUNK])
    for start in range(0, len(video_rows), CHUNK):
        op.bulk_insert(videos, video_rows[start : start + CHUNK])

    op.drop_table("wan_prompt_set_members")
    op.drop_table("wan_generations")
    op.rename_table("wan_generations_v2", "wan_generations")
    op.rename_table("wan_prompt_set_members_v2", "wan_prompt_set_members")
    op.create_index("ix_wan_generations_poll", "wan_generations", ["api_scope", "state", "next_poll_at"])
    op.create_index("ix_wan_prompt_set_members_request_key", "wan_prompt_set_members", ["request_key"])
    op.create_index("ix_wan_attempts_run", "wan_attempts", ["run_id"])
    op.create_index("ix_wan_attempts_set", "wan_attempts", ["api_scope", "prompt_set"])
    op.create_index("ix_wan_set_videos_key", "wan_set_videos", ["api_scope", "request_key"])


def downgrade() -> None:
    raise NotImplementedError("the ledger is not downgraded: restore the backup taken before the upgrade")
