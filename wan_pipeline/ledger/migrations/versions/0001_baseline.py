"""The ledger as commit aa9253d made it with create_all: generations and set members.

A ledger made before migrations existed already has these tables and no version table: the tables
are then left as they are and only the revision is recorded.

Revision ID: 0001_baseline
"""

import sqlalchemy as sa
from alembic import op

from wan_pipeline.ledger.schema import UtcDateTime

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None

STATES = ("planned", "submitting", "submitted", "generating", "completed", "failed", "in_doubt", "rejected")


def upgrade() -> None:
    # The migration connection's search_path is the ledger's schema; inspection needs it by name.
    existing = set(sa.inspect(op.get_bind()).get_table_names(schema=op.get_context().version_table_schema))
    if "wan_generations" not in existing:
        op.create_table(
            "wan_generations",
            sa.Column("request_key", sa.String(64), primary_key=True),
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
            sa.Column("download_path", sa.Text),
            sa.Column("download_sha256", sa.String(64)),
            sa.Column("download_bytes", sa.BigInteger),
            sa.Column("updated_at", UtcDateTime(), nullable=False),
            sa.CheckConstraint(
                "state IN (" + ", ".join(f"'{s}'" for s in STATES) + ")", name="ck_wan_generations_state"
            ),
        )
        op.create_index("ix_wan_generations_state_next_poll", "wan_generations", ["state", "next_poll_at"])
    if "wan_prompt_set_members" not in existing:
        op.create_table(
            "wan_prompt_set_members",
            sa.Column("prompt_set", sa.String(128), primary_key=True),
            sa.Column(
                "request_key", sa.String(64), sa.ForeignKey("wan_generations.request_key"), primary_key=True
            ),
            sa.Column("added_at", UtcDateTime(), nullable=False),
            sa.Column("retired_at", UtcDateTime()),
        )
        op.create_index("ix_wan_prompt_set_members_request_key", "wan_prompt_set_members", ["request_key"])


def downgrade() -> None:
    op.drop_table("wan_prompt_set_members")
    op.drop_table("wan_generations")
