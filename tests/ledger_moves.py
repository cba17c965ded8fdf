"""Moving ledger rows the way a submission does, for tests that need a row in a given state."""

from __future__ import annotations

from datetime import UTC, datetime

from wan_pipeline.ledger import AttemptClaim, Ledger, State, TryAnswer

LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def submit_row(
    ledger: Ledger,
    request_key: str,
    generation_id: str,
    *,
    prompt_set: str = "s",
    next_poll_at: datetime = LONG_AGO,
    credits_used: float | None = None,
) -> None:
    """A planned row created at the provider as `generation_id` (one try, accepted)."""
    attempt = ledger.known([request_key])[request_key].attempts + 1
    ledger.try_sending(request_key, attempt, 1, f"wanp-{request_key}-{attempt}.1", AttemptClaim(prompt_set))
    answer = TryAnswer(True, 200, "accepted", generation_id, "queued", credits_used)
    assert ledger.try_answered(request_key, attempt, 1, answer, next_poll_at=next_poll_at) is State.SUBMITTED
