"""Where a test ledger lives (SQLite file or a throwaway PostgreSQL schema), and a worker process.

The ledger and submission tests import `LedgerTarget` / `ledger_target`. Run as a script, this file
works on a ledger from another process, so tests can race two processes or SIGKILL one:

    claim TARGET KEYS_FILE SEED READY_FILE GO_FILE
                                                 once GO_FILE exists, try to claim every key of
                                                 KEYS_FILE (JSON list) in an order shuffled by SEED;
                                                 print the JSON list of keys it won
    hold TARGET KEY                              claim KEY, print "claimed", block until killed
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
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from wan_pipeline.ledger import Ledger, normalized_url

POSTGRES_URL_ENV = "WAN_PIPELINE_TEST_POSTGRES_URL"
WAIT_LIMIT_S = 30.0


@dataclass(frozen=True)
class LedgerTarget:
    url: str
    schema: str | None = None

    def open(self, **options: Any) -> Ledger:
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


def _claim(target: LedgerTarget, keys_file: str, seed: str, ready_file: str, go_file: str) -> None:
    ledger = target.open()
    keys = json.loads(Path(keys_file).read_text())
    # Different orders make the two workers meet on keys all along the run, not only one trailing the other.
    random.Random(int(seed)).shuffle(keys)
    Path(ready_file).touch()
    wait_for(Path(go_file).exists, "the go signal", interval_s=0.0005)
    won = [key for key in keys if ledger.claim(key) is not None]
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


def _hold(target: LedgerTarget, key: str) -> None:
    ledger = target.open()
    if ledger.claim(key) is None:
        raise SystemExit(f"could not claim {key}")
    print("claimed", flush=True)
    sys.stdin.read()  # until killed (the test keeps stdin open)


if __name__ == "__main__":
    command, target_json, *arguments = sys.argv[1:]
    commands = {"claim": _claim, "hold": _hold, "submit": _submit}
    commands[command](LedgerTarget.from_json(target_json), *arguments)
