"""Every attempt is a row, and spend is counted once (issue 8, problem 4).

A request retried after failure and an in-doubt one resubmitted keep every attempt with its
generation id and cost; `reports.spend` sums the accepted attempts; `format_status` attributes each
purchase to the set that bought it, shows reuse at $0, lists the in-doubt rows with what the
provider's support needs, shows every scope (the ledger's own first) and ends with a `total` line.
"""

from __future__ import annotations

import re

import pytest
from ledger_worker import (
    USD,
    Clock,
    LedgerTarget,
    answer,
    generation_id,
    planned,
    send,
    submit,
)

from wan_pipeline.ledger import AttemptOutcome, AttemptReason, Ledger, State
from wan_pipeline.ledger.reports import format_status, spend, spend_by_set

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
REAL = "https://api.aimlapi.com"
K1, K2, K3, K4 = ("11" * 16, "22" * 16, "33" * 16, "44" * 16)


def fail(ledger: Ledger, key: str) -> None:
    ledger.record_poll(
        key, raw_status="error", status="failed", video_url=None, video_expires_at=None,
        error="upstream failed", credits_used=None, usd_spent=None, next_poll_at=None,
    )  # fmt: skip


def history(ledger: Ledger) -> Ledger:
    """alpha = {K1, K2}, beta = {K2, K3}. K1 failed and was retried; K2 was in doubt and resubmitted;
    beta reuses K2 and has K3 in doubt."""
    ledger.plan("alpha", [planned(K1), planned(K2, prompt="a cat on a harbour wall")])
    ledger.plan("beta", [planned(K2), planned(K3, prompt="a gull over the pier")])
    submit(ledger, K1, prompt_set="alpha")  # 1 575 000 credits: $0.7875
    fail(ledger, K1)
    assert ledger.requeue([K1], from_states={State.FAILED}) == [K1]
    submit(ledger, K1, prompt_set="alpha", reason=AttemptReason.RETRY_FAILED, credits_used=None, usd_spent=0.5)

    send(ledger, K2, prompt_set="alpha")
    answer(ledger, K2, None, status_code=504)
    assert ledger.requeue([K2], from_states={State.IN_DOUBT}) == [K2]
    submit(ledger, K2, prompt_set="alpha", reason=AttemptReason.RESUBMIT_IN_DOUBT)

    send(ledger, K3, prompt_set="beta")
    answer(ledger, K3, None, status_code=504)
    return ledger


def accepted_usd(ledger: Ledger) -> float:
    return sum(a.usd_spent for a in ledger.attempts(all_scopes=True) if a.outcome == AttemptOutcome.CREATED)


def usd(text: str) -> float:
    return float(re.search(r"\$([0-9]+\.[0-9]+)", text).group(1))


def test_retries_and_resubmits_keep_every_attempt_with_its_generation_and_cost(target: LedgerTarget) -> None:
    ledger = history(target.open(clock=Clock()))

    by_key = {k: [(a.attempt, a.reason, a.outcome, a.generation_id, a.usd_spent) for a in ledger.attempts(request_keys=[k])]
              for k in (K1, K2, K3)}  # fmt: skip
    assert by_key[K1] == [
        (1, "first", "created", generation_id(K1, 1), USD),
        (2, "retry_failed", "created", generation_id(K1, 2), 0.5),
    ]
    assert by_key[K2] == [
        (1, "first", "in_doubt", None, None),
        (2, "resubmit_in_doubt", "created", generation_id(K2, 2), USD),
    ]
    assert by_key[K3] == [(1, "first", "in_doubt", None, None)]
    assert ledger.row(K1).usd_spent == 0.5  # the row holds only its current attempt

    total = spend(ledger.attempts())
    assert total.usd_spent == pytest.approx(accepted_usd(ledger)) == pytest.approx(2 * USD + 0.5)
    assert (total.purchases, total.in_doubt, total.keys) == (3, 2, {K1, K2})
    assert total.in_doubt_estimate_usd == pytest.approx(1.0)
    per_set = spend_by_set(ledger.attempts())
    assert per_set["alpha"].usd_spent == pytest.approx(total.usd_spent)  # K2 counted once, for alpha
    assert per_set["beta"].usd_spent == 0 and per_set["beta"].purchases == 0


def test_lifetime_spend_stays_exact_after_requeue(target: LedgerTarget) -> None:
    ledger = target.open()
    ledger.plan("s", [planned(K1)])
    for n in range(3):
        submit(ledger, K1, prompt_set="s", reason=AttemptReason.RETRY_FAILED if n else AttemptReason.FIRST)
        fail(ledger, K1)
        ledger.requeue([K1], from_states={State.FAILED})
    assert spend(ledger.attempts()).usd_spent == pytest.approx(3 * USD)
    assert ledger.row(K1).usd_spent is None  # requeued: nothing current, the history is in attempts


def test_a_cost_reported_by_a_later_poll_is_the_current_attempts(target: LedgerTarget) -> None:
    ledger = target.open()
    ledger.plan("s", [planned(K1)])
    submit(ledger, K1, credits_used=None, usd_spent=None)
    assert spend(ledger.attempts()).unreported == 1
    ledger.record_poll(
        K1, raw_status="completed", status="completed", video_url="https://x/v.mp4", video_expires_at=None,
        error=None, credits_used=1_050_000, usd_spent=None, next_poll_at=None,
    )  # fmt: skip
    total = spend(ledger.attempts())
    assert (total.usd_spent, total.unreported) == (pytest.approx(0.525), 0)


def test_status_attributes_spend_to_the_buying_set_and_ends_with_the_total(target: LedgerTarget) -> None:
    ledger = history(target.open(clock=Clock()))
    text = format_status(ledger)
    lines = text.splitlines()

    assert lines[-1].startswith("total")
    assert usd(lines[-1]) == pytest.approx(accepted_usd(ledger))
    alpha = lines.index(next(line for line in lines if line.strip().startswith("alpha:")))
    beta = lines.index(next(line for line in lines if line.strip().startswith("beta:")))
    assert "bought here $2.0750 for 3 purchase(s)" in lines[alpha + 1]
    assert "bought here $0.0000 for 0 purchase(s)" in lines[beta + 1]
    assert "reused from other sets 1 ($0)" in lines[beta + 1]  # K2, bought by alpha
    bought_here = [usd(line.split("bought here", 1)[1]) for line in lines if "bought here" in line]
    assert sum(bought_here) == pytest.approx(usd(lines[-1]))  # the sets add up to the total

    (in_doubt,) = [line for line in lines if K3 in line]
    assert "set beta" in in_doubt and "a gull over the pier" in in_doubt
    detail = lines[lines.index(in_doubt) + 1]
    assert "claimed 2026-01-01 12:00:00 UTC" in detail and "last try sent 2026-01-01 12:00:00 UTC" in detail
    assert "crid-333333-a1-t1" in detail
    assert "--resubmit-in-doubt" in text
    assert not any(K2 in line and "set" in line for line in lines)  # resubmitted and bought: not in doubt


def test_status_shows_every_scope_with_its_totals_the_one_in_use_first(target: LedgerTarget) -> None:
    emulator = history(target.open(clock=Clock()))
    real = emulator.for_scope(REAL)
    real.plan("alpha", [planned(K1), planned(K4)])
    submit(real, K4, prompt_set="alpha", credits_used=None, usd_spent=1.25)
    legacy = emulator.for_scope("legacy")
    legacy.plan("alpha", [planned(K1)])
    submit(legacy, K1, prompt_set="alpha", credits_used=None, usd_spent=0.25)

    text = format_status(real)
    headers = [line for line in text.splitlines() if line.startswith("== API")]
    assert headers[0] == f"== API {REAL} (in use)"
    assert [h.split()[2].rstrip(";") for h in headers] == [REAL, "emulator", "legacy"]
    assert "never reused automatically" in headers[2]
    scope_totals = [usd(line.split("total", 1)[1]) for line in text.splitlines() if line.strip().split(" ")[1:2] == ["total"]]
    assert scope_totals == [pytest.approx(1.25), pytest.approx(2 * USD + 0.5), pytest.approx(0.25)]
    assert text.splitlines()[-1].startswith("total")
    assert usd(text.splitlines()[-1]) == pytest.approx(accepted_usd(emulator)) == pytest.approx(2 * USD + 2.0)

    fresh = emulator.for_scope("https://other.example")
    assert format_status(fresh).splitlines()[0] == "== API https://other.example (in use): nothing bought yet"


def test_status_of_an_empty_ledger_still_ends_with_a_total(target: LedgerTarget) -> None:
    text = format_status(target.open())
    assert text.splitlines()[-1].startswith("total") and usd(text.splitlines()[-1]) == 0


def test_a_create_not_settled_yet_is_shown_as_possible_spend(target: LedgerTarget) -> None:
    # A claimed create whose answer has not been recorded (in flight, or its process was killed) may
    # be paid for: until the next run settles it, `status` must say so and count it.
    ledger = target.open()
    ledger.plan("s", [planned(K1, usd=0.75)])
    send(ledger, K1)
    text = format_status(ledger)
    assert "being created (1), or left mid-create by a process that died" in text and K1 in text
    total = text.splitlines()[-1]
    assert total.startswith("total $0.0000") and "1 not settled yet" in total and "up to $0.7500 more" in total
