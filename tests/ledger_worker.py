"""Where a test ledger lives (SQLite file or a throwaway PostgreSQL schema), small helpers that drive
the ledger's write-ahead create protocol, and a worker process.

The ledger and submission tests import `LedgerTarget` / `ledger_target` / `wait_for` and the helpers
(`send`, `answer`, `claim`, `submit`). Run as a script, this file works on a ledger from another
process, so tests can race two processes or SIGKILL one:

    claim TARGET KEYS_FILE SEED READY_FILE GO_FILE
                                                 once GO_FILE exists, try to claim (send try 1 of the
                                                 next attempt of) every key of KEYS_FILE (JSON list) in
                                                 an order shuffled by SEED; print the JSON list of keys
                                                 it won
    hold TARGET KEY [TRIES]                      send tries 1..TRIES of KEY's next attempt, every try but
                                                 the last answered "not created" (503); print "sent N"
                                                 and block until killed: the last try is never answered
    wait TARGET KEY                              send try 1, record its "not created" (429) answer (the
                                                 claim is released), print "waiting" and block until
                                                 killed, as a client sleeping before its retry
    claim-unsent TARGET KEY                      claim KEY and open its attempt without recording any
                                                 try (a claimant that never got to send), print
                                                 "claimed" and block until killed
    accepted TARGET KEY                          send try 1 and record its accepted answer on the try's row
                                                 only (`record_accepted_try`), print "recorded" and block
                                                 until killed: the row was never moved to submitted
    open TARGET READY_FILE GO_FILE               once GO_FILE exists, open the ledger (which applies the
                                                 migrations), plan one key, print "opened"
    submit TARGET SET_FILE HANG_ON FLAG_FILE     submit the prompt set SET_FILE, one create at a time,
                                                 to the API named by AIMLAPI_BASE_URL/AIMLAPI_API_KEY;
                                                 when the answer to create number HANG_ON arrives,
                                                 touch FLAG_FILE and hang before recording it

TARGET is the JSON of a `LedgerTarget`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from wan_pipeline.ledger import (
    AttemptClaim,
    AttemptReason,
    ClaimLost,
    Ledger,
    PlannedRequest,
    State,
    TryAnswer,
    attempts,
    generations,
    normalized_url,
)

POSTGRES_URL_ENV = "WAN_PIPELINE_TEST_POSTGRES_URL"
WAIT_LIMIT_S = 30.0
DEFAULT_SCOPE = "emulator"
CREDITS = 1_575_000  # the documented price of 5 s at 1080p: $0.7875
USD = 0.7875
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class LedgerTarget:
    url: str
    schema: str | None = None

    def open(self, **options: Any) -> Ledger:
        """A ledger on this location, in scope `emulator` unless `scope=` says otherwise."""
        options.setdefault("scope", DEFAULT_SCOPE)
        return Ledger(self.url, schema=self.schema, **options)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LedgerTarget:
        return cls(**json.loads(text))


@contextmanager
def ledger_target(backend: str, tmp_path: Path) -> Iterator[LedgerTarget]:
    """A fresh, isolated ledger location: a file under tmp_path, or a PostgreSQL schema dropped after."""
    if backend == "sqlite":
        yield LedgerTarget(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
        return
    import pytest

    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"{POSTGRES_URL_ENV} not set")
    schema = f"test_ledger_{uuid.uuid4().hex[:12]}"
    try:
        yield LedgerTarget(url, schema)
    finally:
        engine = sa.create_engine(normalized_url(url))
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def wait_for(condition: Any, what: str, limit_s: float = WAIT_LIMIT_S, interval_s: float = 0.01) -> Any:
    """Poll `condition()` until it returns something truthy; fail after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {limit_s:g} s")
        time.sleep(interval_s)
    return result


class Clock:
    """A ledger clock the test moves by hand."""

    def __init__(self, start: datetime = T0):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# -- driving the write-ahead create protocol, as `wan_pipeline.submission` does ----------------------


def planned(request_key: str, usd: float = 0.5, prompt: str | None = None) -> PlannedRequest:
    return PlannedRequest(
        request_key, "alibaba/wan-2-6-i2v", {"prompt": prompt or f"prompt {request_key}"}, usd, 100.0
    )


def client_request_id(request_key: str, attempt: int, try_number: int) -> str:
    return f"crid-{request_key[-6:]}-a{attempt}-t{try_number}"


def generation_id(request_key: str, attempt: int) -> str:
    return f"gen-{request_key[-6:]}-a{attempt}"


def last_try(ledger: Ledger, request_key: str, attempt: int | None = None) -> tuple[int, int]:
    """(attempt, try number) of the latest try recorded for the key (of `attempt`, if given)."""
    tries = [t for t in ledger.try_rows(request_key) if attempt is None or t.attempt == attempt]
    if not tries:
        return (attempt or 0, 0)
    return tries[-1].attempt, tries[-1].try_number


def send(
    ledger: Ledger,
    request_key: str,
    *,
    prompt_set: str = "s",
    reason: AttemptReason = AttemptReason.FIRST,
    run_id: str | None = None,
    attempt: int | None = None,
    try_number: int | None = None,
) -> tuple[int, int]:
    """Record the next try before it is sent: try 1 of the next attempt for a fresh claim, or the next
    try of this ledger's own released attempt. Returns (attempt, try number); raises `ClaimLost`."""
    row = ledger.row(request_key)
    if try_number is None:
        mine = row is not None and row.state is State.PLANNED and row.claim_owner == ledger.owner
        open_attempt = mine and any(
            a.outcome is None and a.attempt == row.attempts for a in ledger.attempts(request_keys=[request_key])
        )
        if open_attempt:
            attempt, try_number = row.attempts, last_try(ledger, request_key, row.attempts)[1] + 1
        else:
            attempt, try_number = (row.attempts if row else 0) + 1, 1
    elif attempt is None:
        attempt = (row.attempts if row else 0) + (1 if try_number == 1 else 0)
    ledger.try_sending(
        request_key,
        attempt,
        try_number,
        client_request_id(request_key, attempt, try_number),
        AttemptClaim(prompt_set, reason, run_id),
    )
    return attempt, try_number


def claim(ledger: Ledger, request_key: str, **options: Any) -> int | None:
    """Claim the key for a new attempt (its try 1 recorded as sent). The attempt number, or None if lost."""
    try:
        return send(ledger, request_key, **options)[0]
    except ClaimLost:
        return None


def answer(
    ledger: Ledger,
    request_key: str,
    created: bool | None,
    *,
    status_code: int | None = None,
    credits_used: float | None = CREDITS,
    usd_spent: float | None = None,
    next_poll_at: datetime = T0,
    attempt: int | None = None,
    try_number: int | None = None,
    detail: str | None = None,
) -> State:
    """Record the answer of the latest try (or of the given one): accepted (`True`, with a generation
    id and the cost), surely not created (`False`), or unknown (`None`)."""
    if attempt is None or try_number is None:
        attempt, try_number = last_try(ledger, request_key, attempt)
    if created is True:
        reply = TryAnswer(
            True,
            status_code or 200,
            detail or "accepted",
            generation_id=generation_id(request_key, attempt),
            raw_status="queued",
            credits_used=credits_used,
            usd_spent=usd_spent,
        )
        return ledger.try_answered(request_key, attempt, try_number, reply, next_poll_at=next_poll_at)
    code = status_code or (503 if created is False else 504)
    return ledger.try_answered(request_key, attempt, try_number, TryAnswer(created, code, detail or f"HTTP {code}"))


def submit(ledger: Ledger, request_key: str, **options: Any) -> int:
    """Claim, send and have the create accepted. Returns the attempt number."""
    send_options = {k: options.pop(k) for k in ("prompt_set", "reason", "run_id") if k in options}
    attempt, _ = send(ledger, request_key, **send_options)
    assert answer(ledger, request_key, True, **options) is State.SUBMITTED
    return attempt


# -- the worker process ------------------------------------------------------------------------------


def _claim(target: LedgerTarget, keys_file: str, seed: str, ready_file: str, go_file: str) -> None:
    ledger = target.open()
    keys = json.loads(Path(keys_file).read_text())
    # Different orders make the two workers meet on keys all along the run, not only one trailing the other.
    random.Random(int(seed)).shuffle(keys)
    Path(ready_file).touch()
    wait_for(Path(go_file).exists, "the go signal", interval_s=0.0005)
    won = []
    for key in keys:  # try 1 of attempt 1, straight to the ledger: the race is what is measured
        try:
            ledger.try_sending(key, 1, 1, client_request_id(key, 1, 1), AttemptClaim("race"))
        except ClaimLost:
            continue
        won.append(key)
    print(json.dumps(won), flush=True)


def _submit(target: LedgerTarget, set_file: str, hang_on: str, flag_file: str) -> None:
    # Imported here: the claim and hold workers start faster without the catalog (pandas) and client.
    import httpx

    from wan_pipeline.api import AsyncAimlApiClient, ClientConfig
    from wan_pipeline.catalog import load_prompt_set
    from wan_pipeline.settings import load_settings
    from wan_pipeline.submission import submit_prompt_set

    prompt_set = load_prompt_set(Path(set_file))
    creates_answered = 0

    async def hang_after_answer(response: httpx.Response) -> None:
        nonlocal creates_answered
        if response.request.method != "POST":
            return
        creates_answered += 1
        if creates_answered == int(hang_on):
            # The provider has accepted (and charged) this create; its answer is never recorded.
            Path(flag_file).touch()
            await asyncio.Event().wait()

    config = ClientConfig.from_settings(load_settings())
    http = httpx.AsyncClient(timeout=config.timeout, event_hooks={"response": [hang_after_answer]})
    submit_prompt_set(
        target.open(),
        lambda: AsyncAimlApiClient(config, http_client=http),
        prompt_set.name,
        prompt_set.requests,
        max_concurrency=1,
    )
    raise SystemExit("the submission finished: the test expected it to hang")


def _block() -> None:
    sys.stdin.read()  # until killed (the test keeps stdin open)


def _hold(target: LedgerTarget, key: str, tries: str = "1") -> None:
    ledger = target.open()
    for try_number in range(1, int(tries) + 1):
        try:
            send(ledger, key)
        except ClaimLost as exc:
            raise SystemExit(f"could not claim {key}: {exc}") from exc
        if try_number < int(tries):
            answer(ledger, key, False, status_code=503)
    print(f"sent {tries}", flush=True)
    _block()


def _wait(target: LedgerTarget, key: str) -> None:
    ledger = target.open()
    send(ledger, key)
    answer(ledger, key, False, status_code=429)
    print("waiting", flush=True)
    _block()


def _claim_unsent(target: LedgerTarget, key: str) -> None:
    """The claim half of `try_sending` alone: the row is claimed and its attempt opened, and the
    process dies before a try is recorded (what a claim made before the tries table existed, or by a
    client that claims before it records its first try, leaves behind)."""
    ledger = target.open()
    now = datetime.now(UTC)
    with ledger._writing() as conn:
        row = conn.execute(
            sa.select(generations).where(generations.c.api_scope == ledger.scope, generations.c.request_key == key)
        ).one()
        conn.execute(
            generations.update()
            .where(generations.c.api_scope == ledger.scope, generations.c.request_key == key)
            .values(state=State.SUBMITTING.value, claim_owner=ledger.owner, claimed_at=now,
                    attempts=row.attempts + 1, updated_at=now)
        )  # fmt: skip
        conn.execute(
            attempts.insert().values(
                api_scope=ledger.scope, request_key=key, attempt=row.attempts + 1, prompt_set="s",
                reason=AttemptReason.FIRST.value, claim_owner=ledger.owner, claimed_at=now,
            )
        )  # fmt: skip
    print("claimed", flush=True)
    _block()


def _accepted(target: LedgerTarget, key: str) -> None:
    ledger = target.open()
    attempt, try_number = send(ledger, key)
    reply = TryAnswer(True, 200, "accepted", generation_id=generation_id(key, attempt), credits_used=CREDITS)
    ledger.record_accepted_try(key, attempt, try_number, reply)
    print("recorded", flush=True)
    _block()


def _open(target: LedgerTarget, ready_file: str, go_file: str) -> None:
    Path(ready_file).touch()
    wait_for(Path(go_file).exists, "the go signal", interval_s=0.0005)
    ledger = target.open()
    ledger.plan(f"opened-{os.getpid()}", [planned(f"{os.getpid():032x}")])
    print("opened", flush=True)


if __name__ == "__main__":
    command, target_json, *arguments = sys.argv[1:]
    commands = {
        "claim": _claim,
        "hold": _hold,
        "wait": _wait,
        "claim-unsent": _claim_unsent,
        "accepted": _accepted,
        "open": _open,
        "submit": _submit,
    }
    commands[command](LedgerTarget.from_json(target_json), *arguments)
