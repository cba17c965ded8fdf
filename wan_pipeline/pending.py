"""What is still waiting in a prompt set, as the completion sensor shows it: counts by state, the oldest
pending age, and when the set should be done (from the learned processing time).

No Dagster here: the sensor turns a `PendingView` into an asset observation and one tick-log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from wan_pipeline.ledger import PENDING_REMOTE, Ledger, SetProgress, State


@dataclass(frozen=True)
class PendingView:
    prompt_set: str
    submitting: int
    queued: int  # accepted by the provider, not started (submitted)
    generating: int
    completed: int
    collected: int  # completed and stored in the set's folder
    failed: int  # failed or rejected
    in_doubt: int
    not_submitted: int  # planned: nothing bought for it in this API scope
    oldest_pending_age_s: float | None
    expected_finish: datetime | None  # when the last pending generation should be done
    fingerprint: str

    @property
    def pending(self) -> int:
        return self.submitting + self.queued + self.generating

    def metadata(self) -> dict[str, object]:
        """Plain values for an observation (the sensor wraps them)."""
        return {
            "pending": self.pending,
            "queued": self.queued,
            "generating": self.generating,
            "submitting": self.submitting,
            "completed": self.completed,
            "collected": self.collected,
            "failed": self.failed,
            "in_doubt": self.in_doubt,
            "not_submitted": self.not_submitted,
            "oldest_pending_age_s": round(self.oldest_pending_age_s, 1) if self.oldest_pending_age_s is not None else None,
            "expected_finish": self.expected_finish.isoformat(timespec="seconds") if self.expected_finish else None,
        }

    def line(self, now: datetime) -> str:
        """One tick-log line: `spring: 2 queued, 1 generating, 3 completed (3 stored), ...`."""
        text = (
            f"{self.prompt_set}: {self.queued} queued, {self.generating} generating, {self.completed} completed "
            f"({self.collected} stored), {self.failed} failed, {self.in_doubt} in doubt"
        )
        if self.submitting:
            text += f", {self.submitting} submitting"
        if self.oldest_pending_age_s is not None:
            text += f"; oldest pending {_duration(self.oldest_pending_age_s)}"
        if self.expected_finish is not None:
            left = (self.expected_finish - now).total_seconds()
            when = self.expected_finish.astimezone(UTC).strftime("%H:%M:%S UTC")
            text += f"; expected done by {when} " + (f"(in {_duration(left)})" if left >= 0 else f"(overdue by {_duration(-left)})")
        return text


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def pending_view(ledger: Ledger, progress: SetProgress, now: datetime | None = None) -> PendingView:
    """The set's pending work; the expected finish reads the rows only while something is pending."""
    now = now or datetime.now(UTC)
    counts = progress.counts
    expected_finish = None
    if progress.pending:
        learned: dict[tuple[str, str, int], float | None] = {}
        for row in ledger.rows(progress.prompt_set, states=PENDING_REMOTE):
            if row.submitted_at is None:
                continue
            shape = (row.model, str(row.request_json.get("resolution")), int(row.request_json.get("duration") or 5))
            if shape not in learned:
                learned[shape] = ledger.observed_processing_seconds(*shape)
            seconds = learned[shape] if learned[shape] is not None else row.expected_seconds
            if seconds is None:
                continue
            finish = row.submitted_at + timedelta(seconds=seconds)
            expected_finish = finish if expected_finish is None else max(expected_finish, finish)
    oldest = progress.oldest_pending_since
    return PendingView(
        prompt_set=progress.prompt_set,
        submitting=counts[State.SUBMITTING],
        queued=counts[State.SUBMITTED],
        generating=counts[State.GENERATING],
        completed=counts[State.COMPLETED],
        collected=progress.collected,
        failed=counts[State.FAILED] + counts[State.REJECTED],
        in_doubt=counts[State.IN_DOUBT],
        not_submitted=counts[State.PLANNED],
        oldest_pending_age_s=(now - oldest).total_seconds() if oldest else None,
        expected_finish=expected_finish,
        fingerprint=progress.fingerprint,
    )
