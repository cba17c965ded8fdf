"""The generation ledger: the durable record of what was bought, from which API, and every attempt.

- `schema`: the tables and the states they hold;
- `database`: engines (SQLite by default, PostgreSQL through a URL) and Alembic migrations;
- `store`: the state machine, the one place a purchase's state changes (`Ledger`);
- `reports`: what `status`, `run` and `validate` print about purchases and spend.
"""

from wan_pipeline.ledger.database import LedgerVersionError, normalized_url, upgrade
from wan_pipeline.ledger.schema import (
    HEAD_REVISION,
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
from wan_pipeline.ledger.store import (
    ALLOWED_MOVES,
    COLLECT_EARLY_AFTER,
    DEFAULT_STALE_AFTER_S,
    PENDING,
    PENDING_REMOTE,
    TERMINAL,
    AttemptClaim,
    AttemptRow,
    ClaimLost,
    IllegalTransition,
    KnownRequest,
    Ledger,
    LedgerRow,
    PlannedRequest,
    PlanResult,
    SetProgress,
    StoredVideo,
    TryAnswer,
)

__all__ = [
    "ALLOWED_MOVES", "COLLECT_EARLY_AFTER", "DEFAULT_STALE_AFTER_S", "HEAD_REVISION", "PENDING",
    "PENDING_REMOTE", "TERMINAL", "AttemptClaim", "AttemptOutcome", "AttemptReason", "AttemptRow",
    "ClaimLost", "IllegalTransition", "KnownRequest", "Ledger", "LedgerRow", "LedgerVersionError",
    "PlanResult", "PlannedRequest", "SetProgress", "State", "StoredVideo", "TryAnswer", "VideoSource",
    "attempts", "create_tries", "generations", "normalized_url", "set_members", "set_videos", "upgrade",
    "utcnow",
]
