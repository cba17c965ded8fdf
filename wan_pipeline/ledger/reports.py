"""What the ledger says about purchases and spend: `wan-pipeline status`, and the figures `run` prints.

Every figure comes from the attempts table, so each purchase is counted once, attributed to the
set whose submission bought it, and lifetime spend stays exact across retries and resubmits. A set
that repeats a request another set bought shows it as reused, at $0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from wan_pipeline.ledger.schema import AttemptOutcome, State
from wan_pipeline.ledger.store import AttemptRow, Ledger
from wan_pipeline.safe_text import printable

PROMPT_SHOWN = 60  # characters of a prompt quoted in a report line


@dataclass
class Spend:
    """Purchases and their cost, summed over attempts."""

    purchases: int = 0  # attempts the provider accepted
    credits_used: float = 0.0
    usd_spent: float = 0.0
    unreported: int = 0  # accepted attempts whose answer carried no cost
    unreported_estimate_usd: float = 0.0
    in_doubt: int = 0  # attempts sent whose outcome is unknown
    in_doubt_estimate_usd: float = 0.0  # what they cost if they were in fact created
    open: int = 0  # attempts not settled yet: a create in flight, or left by a process that died
    open_estimate_usd: float = 0.0
    keys: set[str] = field(default_factory=set)  # requests with at least one purchase

    def add(self, attempt: AttemptRow) -> None:
        if attempt.usd_spent is not None:
            self.usd_spent += attempt.usd_spent
        if attempt.credits_used is not None:
            self.credits_used += attempt.credits_used
        if attempt.outcome == AttemptOutcome.CREATED:
            self.purchases += 1
            self.keys.add(attempt.request_key)
            if attempt.usd_spent is None:
                self.unreported += 1
                self.unreported_estimate_usd += attempt.estimated_usd or 0.0
        elif attempt.outcome == AttemptOutcome.IN_DOUBT:
            self.in_doubt += 1
            self.in_doubt_estimate_usd += attempt.estimated_usd or 0.0
        elif attempt.outcome is None:
            self.open += 1
            self.open_estimate_usd += attempt.estimated_usd or 0.0

    def describe(self) -> str:
        text = f"${self.usd_spent:.4f} for {self.purchases} purchase(s) ({self.credits_used:,.0f} credits)"
        if self.unreported:
            text += f"; {self.unreported} with no cost reported (estimated ${self.unreported_estimate_usd:.4f})"
        if self.in_doubt:
            text += f"; {self.in_doubt} in doubt (up to ${self.in_doubt_estimate_usd:.4f} more if created)"
        if self.open:
            text += (
                f"; {self.open} not settled yet (being created, or left by a process that died; up to "
                f"${self.open_estimate_usd:.4f} more if created)"
            )
        return text


def spend(attempts: Iterable[AttemptRow]) -> Spend:
    total = Spend()
    for attempt in attempts:
        total.add(attempt)
    return total


def spend_by_set(attempts: Iterable[AttemptRow]) -> dict[str, Spend]:
    """Each attempt under the set whose submission made it."""
    by_set: dict[str, Spend] = {}
    for attempt in attempts:
        by_set.setdefault(attempt.prompt_set, Spend()).add(attempt)
    return by_set


def _prompt(request_json: dict) -> str:
    return printable(request_json.get("prompt", ""), PROMPT_SHOWN)


def _time(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def _set_block(ledger: Ledger, name: str, bought: dict[str, Spend]) -> list[str]:
    progress = ledger.progress(name)
    here = bought.get(name, Spend())
    members = ledger.set_members(name)
    states = ", ".join(f"{state.value} {count}" for state, count in progress.counts.items() if count)
    bought_elsewhere = {
        key for other, other_spend in bought.items() if other != name for key in other_spend.keys
    }
    reused = len((set(members) & bought_elsewhere) - here.keys)
    lines = [f"  {printable(name)}: {progress.total} request(s): {states or 'none'}"]
    lines.append(f"    bought here {here.describe()}; reused from other sets {reused} ($0)")
    if progress.counts[State.COMPLETED]:
        lines.append(f"    stored in the set's folder {progress.collected} of {progress.counts[State.COMPLETED]} completed")
    return lines


def _in_doubt_block(ledger: Ledger, sets: Sequence[str]) -> list[str]:
    in_set = [row for row in ledger.rows(states={State.IN_DOUBT, State.SUBMITTING}) if not sets or set(row.prompt_sets) & set(sets)]
    claimed = [row for row in in_set if row.state is State.SUBMITTING]
    rows = [row for row in in_set if row.state is State.IN_DOUBT]
    lines = [
        f"  being created ({len(claimed)}), or left mid-create by a process that died (the next run settles "
        "them by their recorded tries): " + ", ".join(row.request_key for row in claimed[:20])
    ] if claimed else []
    if not rows:
        return lines
    lines.append(
        f"  in doubt ({len(rows)}): may already be paid for; look them up with the provider's support by "
        "client request id, then resubmit with `run --resubmit-in-doubt KEY|SET|all` if they were not created:"
    )
    by_key = {}
    for attempt in ledger.attempts(request_keys=[r.request_key for r in rows]):
        by_key.setdefault(attempt.request_key, []).append(attempt)
    for row in rows:
        lines.append(f"    {row.request_key}  set {', '.join(row.prompt_sets) or '-'}  prompt '{_prompt(row.request_json)}'")
        tries = {t.attempt: t for t in ledger.try_rows(row.request_key)}
        for attempt in by_key.get(row.request_key, []):
            if attempt.outcome != AttemptOutcome.IN_DOUBT:
                continue
            last_try = tries.get(attempt.attempt)
            sent = _time(last_try.sent_at) if last_try else "-"
            lines.append(
                f"      attempt {attempt.attempt}: claimed {_time(attempt.claimed_at)}, last try sent {sent}, "
                f"client request id {attempt.client_request_id or '-'}: {printable(attempt.error or '')}"
            )
    return lines


def format_status(ledger: Ledger, sets: Sequence[str] | None = None) -> str:
    """Every API scope's purchases (the ledger's own scope, the API in use, first), per set, with each
    scope's totals, the in-doubt rows with what support needs, and a last line `total ...`."""
    scopes = ledger.scopes()
    if not scopes:
        return "The ledger records no purchases yet.\ntotal $0.0000 for 0 purchase(s) (0 credits)"
    ordered = [ledger.scope] + [s for s in scopes if s != ledger.scope]
    everything = Spend()
    blocks = []
    for scope in ordered:
        view = ledger.for_scope(scope)
        attempts = view.attempts()
        for attempt in attempts:
            everything.add(attempt)
        if scope not in scopes:
            blocks.append(f"== API {scope} (in use): nothing bought yet")
            continue
        in_use = " (in use)" if scope == ledger.scope else ""
        never_reused = "; never reused automatically" if scope == "legacy" else ""
        lines = [f"== API {scope}{in_use}{never_reused}"]
        bought = spend_by_set(attempts)
        names = list(sets) if sets else sorted({*view.prompt_sets()} & ({*bought} | set(_sets_with_rows(view))))
        for name in names:
            lines += _set_block(view, name, bought)
        lines += _in_doubt_block(view, names if sets else [])
        lines.append(f"  {scope} total {spend(attempts).describe()}")
        blocks.append("\n".join(lines))
    blocks.append(f"total {everything.describe()}")
    return "\n\n".join(blocks)


def _sets_with_rows(ledger: Ledger) -> list[str]:
    """Sets with at least one request planned in this scope."""
    names = set()
    for row in ledger.rows():
        names.update(row.prompt_sets)
    return sorted(names)
