"""Write-ahead submission of a prompt set: every request bought at most once, whatever happens.

Against the emulator over loopback HTTP (its counters say what was created), on SQLite and on
PostgreSQL. Answers the emulator cannot give (400, 403, a bug in the client) come from a scripted
stand-in for the client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from ledger_worker import LedgerTarget, wait_for
from PIL import Image

from wan_pipeline.api import (
    ApiError,
    AsyncAimlApiClient,
    ClientConfig,
    CreateTry,
    Generation,
    OutOfCredits,
    RequestRejected,
    ServerError,
)
from wan_pipeline.catalog import CatalogRequest, load_prompt_set
from wan_pipeline.emulator import EmulatorConfig, running_emulator
from wan_pipeline.ledger import Ledger, State
from wan_pipeline.scopes import api_origin, api_scope
from wan_pipeline.settings import Secret
from wan_pipeline.submission import (
    BudgetExceeded,
    plan_submission,
    submit_planned,
    submit_prompt_set,
)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
WORKER = Path(__file__).with_name("ledger_worker.py")
REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-submission-8d1e5b"
CREATE_ROUTE = "POST /v2/video/generations"
USD_PER_REQUEST = 0.525  # 5 s at 720p


@pytest.fixture(scope="module")
def emulator_server() -> Iterator[Any]:
    # Tiny frames: every accepted create starts an encode, which must not load the 2 cores.
    config = EmulatorConfig(latency_s=30.0, small_frames=True, api_key=API_KEY, seed=7)
    with running_emulator(config) as emu:
        yield emu


@pytest.fixture
def client_config(emulator: Any) -> ClientConfig:
    return ClientConfig(
        base_url=emulator.base_url,
        api_key=Secret(API_KEY),
        read_timeout=5.0,
        max_attempts=2,
        max_retry_seconds=2.0,
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        expected_seconds=20.0,
    )


@pytest.fixture
def ledger(target: LedgerTarget) -> Iterator[Ledger]:
    opened = target.open()
    yield opened
    opened.close()


def write_prompt_set(folder: Path, name: str, seeds: list[int]) -> Path:
    """A YAML prompt set: one image, one prompt, one generation per seed (5 s at 720p)."""
    image = folder / "media" / "frame.png"
    if not image.exists():
        image.parent.mkdir(parents=True)
        Image.new("RGB", (480, 360), (40, 90, 160)).save(image)
    path = folder / f"{name}.yaml"
    item = {"image": "media/frame.png", "prompt": "A slow pan across the harbour", "seeds": seeds}
    path.write_text(yaml.safe_dump({"defaults": {"resolution": "720p", "duration": 5}, "items": [item]}))
    return path


def catalog(folder: Path, name: str, seeds: list[int]) -> list[CatalogRequest]:
    return load_prompt_set(write_prompt_set(folder, name, seeds)).requests


def creates(emulator: Any) -> dict[str, int]:
    """How many times the emulator accepted each distinct create body."""
    return emulator.stats()["creates_by_body_hash"]


def create_calls(emulator: Any) -> int:
    return sum(emulator.stats()["requests"].get(CREATE_ROUTE, {}).values())


def states(ledger: Ledger, requests: list[CatalogRequest]) -> list[State]:
    return [row.state for row in ledger.rows_for_keys(r.request_key for r in requests)]


def test_a_set_is_bought_once_and_reused_on_rerun(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1, 2, 3, 4])
    before = datetime.now(UTC)
    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests)

    assert (report.new, report.reused, report.in_doubt, report.failed_to_submit) == (4, 0, [], [])
    assert report.usd_spent == pytest.approx(4 * USD_PER_REQUEST)
    assert sorted(creates(emulator).values()) == [1, 1, 1, 1]
    rows = ledger.rows("harbour")
    assert {r.state for r in rows} == {State.SUBMITTED}
    assert set(emulator.stats()["generations"]) == {r.generation_id for r in rows}
    for row in rows:
        # First poll just before the expected processing time (0.9 x 20 s), not right away.
        assert before + timedelta(seconds=17) < row.next_poll_at < datetime.now(UTC) + timedelta(seconds=19)
        assert row.expected_seconds == 20.0

    again = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests)
    assert (again.new, again.reused, again.usd_spent) == (0, 4, 0.0)
    assert create_calls(emulator) == 4


def test_a_request_shared_by_two_sets_is_bought_once(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    first = catalog(tmp_path, "first", [1, 2])
    second = catalog(tmp_path, "second", [2, 3])
    submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "first", first)
    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "second", second)

    assert (report.new, report.reused) == (1, 1)
    assert sorted(creates(emulator).values()) == [1, 1, 1]
    shared = ledger.row(second[0].request_key)
    assert shared.prompt_sets == ("first", "second")


def test_dry_run_and_budget_guard_create_and_write_nothing(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1, 2, 3])
    factory = lambda: AsyncAimlApiClient(client_config)  # noqa: E731

    dry = submit_prompt_set(ledger, factory, "harbour", requests, dry_run=True)
    assert [item.request.request_key for item in dry.plan.to_submit] == [r.request_key for r in requests]
    assert dry.plan.estimated_usd == pytest.approx(3 * USD_PER_REQUEST)
    with pytest.raises(BudgetExceeded, match="3 generation"):
        submit_prompt_set(ledger, factory, "harbour", requests, max_usd=1.0)

    assert create_calls(emulator) == 0
    assert ledger.rows() == [] and ledger.prompt_sets() == []  # neither wrote a row or a membership
    report = submit_prompt_set(ledger, factory, "harbour", requests, max_usd=1.6)
    assert report.new == 3


def test_the_budget_counts_only_what_would_be_newly_bought(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    factory = lambda: AsyncAimlApiClient(client_config)  # noqa: E731
    submit_prompt_set(ledger, factory, "pilot", catalog(tmp_path, "pilot", [1, 2]))
    full = catalog(tmp_path, "full", [1, 2, 3, 4])

    with pytest.raises(BudgetExceeded):
        submit_prompt_set(ledger, factory, "full", full, max_usd=2 * USD_PER_REQUEST - 0.01)
    report = submit_prompt_set(ledger, factory, "full", full, max_usd=2 * USD_PER_REQUEST + 0.01)
    assert (report.new, report.reused) == (2, 2)
    assert sorted(creates(emulator).values()) == [1, 1, 1, 1]


def test_a_lost_create_answer_is_in_doubt_and_resubmitted_only_when_asked(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1, 2])
    factory = lambda: AsyncAimlApiClient(client_config)  # noqa: E731
    emulator.update_faults(create_504_rate=1.0)  # the provider answers 504: it may have created it
    report = submit_prompt_set(ledger, factory, "harbour", requests)
    assert report.new == 0 and sorted(report.in_doubt) == sorted(r.request_key for r in requests)
    assert create_calls(emulator) == 2  # one try each: an ambiguous create is never retried blindly

    emulator.update_faults(create_504_rate=0.0)
    rerun = submit_prompt_set(ledger, factory, "harbour", requests)
    dry = submit_prompt_set(ledger, factory, "harbour", requests, dry_run=True, resubmit_in_doubt="all")
    assert (rerun.new, sorted(rerun.in_doubt), create_calls(emulator)) == (0, sorted(report.in_doubt), 2)
    assert len(dry.plan.to_submit) == 2 and states(ledger, requests) == [State.IN_DOUBT] * 2

    # Only what is named is bought again: one key, then the set.
    first, second = (r.request_key for r in requests)
    one = submit_prompt_set(ledger, factory, "harbour", requests, resubmit_in_doubt=[first])
    assert one.new == 1 and states(ledger, requests) == [State.SUBMITTED, State.IN_DOUBT]
    by_set = submit_prompt_set(ledger, factory, "harbour", requests, resubmit_in_doubt="harbour")
    assert (by_set.new, by_set.in_doubt) == (1, [])
    assert [row.attempts for row in ledger.rows("harbour")] == [2, 2]
    reasons = [(a.attempt, a.outcome, a.reason) for a in ledger.attempts(request_keys=[first])]
    assert reasons == [(1, "in_doubt", "first"), (2, "created", "resubmit_in_doubt")]


def test_a_create_surely_not_accepted_goes_back_to_planned(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1, 2])
    factory = lambda: AsyncAimlApiClient(client_config)  # noqa: E731
    emulator.update_faults(create_503_rate=1.0)
    report = submit_prompt_set(ledger, factory, "harbour", requests)

    assert report.new == 0 and report.in_doubt == []
    assert sorted(key for key, _ in report.failed_to_submit) == sorted(r.request_key for r in requests)
    assert all("CreateNotAccepted" in message for _, message in report.failed_to_submit)
    assert states(ledger, requests) == [State.PLANNED] * 2
    assert emulator.stats()["accepted_creates"] == 0

    emulator.update_faults(create_503_rate=0.0)
    assert submit_prompt_set(ledger, factory, "harbour", requests).new == 2  # no flag needed


def test_media_that_became_unreadable_is_not_sent_and_stays_planned(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1])
    (tmp_path / "media" / "frame.png").write_bytes(b"not an image any more")
    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests)

    assert report.new == 0 and "MediaError" in report.failed_to_submit[0][1]
    assert create_calls(emulator) == 0
    assert states(ledger, requests) == [State.PLANNED]
    assert ledger.attempts() == []  # nothing was sent, so no attempt was made


def test_an_image_edited_after_validation_is_not_sent_under_the_old_key(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1])
    Image.new("RGB", (480, 360), (200, 30, 30)).save(tmp_path / "media" / "frame.png")  # still a valid image
    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests)

    (key, message), = report.failed_to_submit
    assert "image changed since it was validated" in message and "frame.png" in message
    assert (report.new, report.in_doubt, create_calls(emulator)) == (0, [], 0)
    (row,) = ledger.rows("harbour")
    assert row.state is State.PLANNED and "image changed since it was validated" in row.error


def test_a_bad_api_key_stops_creating(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1, 2, 3])
    wrong_key = dataclasses.replace(client_config, api_key=Secret("sk-wrong"))
    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(wrong_key), "harbour", requests, max_concurrency=1)

    assert report.auth_failed and "AuthenticationError" in report.stopped_by and report.new == 0
    assert create_calls(emulator) == 1  # the first 401 stopped the rest
    assert states(ledger, requests) == [State.PLANNED] * 3


def test_a_401_after_one_create_keeps_what_was_bought_and_says_so(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1, 2, 3])
    emulator.update_faults(auth_fail_after_creates=1)
    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests, max_concurrency=1)

    assert report.auth_failed and (report.new, report.usd_spent) == (1, pytest.approx(USD_PER_REQUEST))
    assert [key for key, _ in report.failed_to_submit] == [r.request_key for r in requests[1:]]
    assert states(ledger, requests) == [State.SUBMITTED, State.PLANNED, State.PLANNED]
    assert emulator.stats()["accepted_creates"] == 1


def test_what_one_api_bought_is_bought_again_on_another(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1, 2])
    submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests)
    with running_emulator(EmulatorConfig(latency_s=30.0, small_frames=True, identify=False)) as other:
        other_config = dataclasses.replace(client_config, base_url=other.base_url)
        elsewhere = ledger.for_scope(api_scope(other.base_url))
        report = submit_prompt_set(elsewhere, lambda: AsyncAimlApiClient(other_config), "harbour", requests)
        assert (report.new, report.reused) == (2, 0)
        assert other.stats()["accepted_creates"] == 2
    assert elsewhere.scope == api_origin(other.base_url) != ledger.scope == "emulator"
    assert {r.generation_id for r in ledger.rows()}.isdisjoint(r.generation_id for r in elsewhere.rows())


def test_retries_before_any_answer_that_could_mean_created_leave_nothing_in_doubt(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", [1])
    emulator.update_faults(create_429_rate=0.6, create_503_rate=0.3)
    retrying = dataclasses.replace(client_config, max_attempts=20, max_retry_seconds=30.0)
    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(retrying), "harbour", requests)

    assert report.new == 1
    (key,) = [r.request_key for r in requests]
    tries = ledger.try_rows(key)
    assert len(tries) == create_calls(emulator) >= 2  # every HTTP try recorded
    assert [t.created for t in tries] == [False] * (len(tries) - 1) + [True]
    assert all(t.answered_at is not None and t.sent_at <= t.answered_at for t in tries)
    assert tries[-1].client_request_id.endswith(f"-1.{len(tries)}")


@dataclass
class ScriptedClient:
    """Stands in for `AsyncAimlApiClient` for answers the emulator cannot give. Like the real client it
    reports each try before sending it and once its answer is judged."""

    failures: dict[str, BaseException]  # request_key -> what its create raises; the others succeed
    config: ClientConfig = field(default_factory=lambda: ClientConfig(expected_seconds=10.0))
    calls: list[str] = field(default_factory=list)

    async def submit(self, request: Any, *, request_key: str, attempt: int = 1, on_try: Any, **_: Any) -> Generation:
        self.calls.append(request_key)
        request_id = f"wanp-{request_key}-{attempt}.1"
        await asyncio.to_thread(on_try, CreateTry(1, request_id, "sending"))
        failure = self.failures.get(request_key)
        if failure is None:
            await asyncio.to_thread(
                on_try, CreateTry(1, request_id, "answered", created=True, generation_id=f"gen-{request_key[:8]}")
            )
            return Generation(
                f"gen-{request_key[:8]}", "queued", "pending", credits_used=1_050_000, usd_spent=0.525
            )
        if isinstance(failure, ApiError):  # an answer the client judged; a bug in the client has none
            answered = CreateTry(1, request_id, "answered", created=failure.created, status_code=failure.status_code)
            await asyncio.to_thread(on_try, answered)
        raise failure


def run_scripted(ledger: Ledger, requests: list[CatalogRequest], client: ScriptedClient) -> Any:
    plan = plan_submission(ledger, "harbour", requests)
    return asyncio.run(submit_planned(ledger, client, plan, max_concurrency=1))


def test_a_rejected_request_is_recorded_and_the_others_go_on(ledger: Ledger, tmp_path: Path) -> None:
    requests = catalog(tmp_path, "harbour", [1, 2, 3])
    bad = requests[1].request_key
    client = ScriptedClient({bad: RequestRejected("Body validation error!", status_code=400, created=False)})
    report = run_scripted(ledger, requests, client)

    assert report.new == 2
    assert report.rejected == [(bad, "RequestRejected: Body validation error! [HTTP 400]")]
    assert states(ledger, requests) == [State.SUBMITTED, State.REJECTED, State.SUBMITTED]
    assert plan_submission(ledger, "harbour", requests).rejected == [bad]  # never sent again as is


def test_out_of_credits_stops_creating_and_nothing_unsent_is_lost(ledger: Ledger, tmp_path: Path) -> None:
    requests = catalog(tmp_path, "harbour", [1, 2, 3, 4])
    client = ScriptedClient({requests[1].request_key: OutOfCredits("out of credits", status_code=403, created=False)})
    report = run_scripted(ledger, requests, client)

    assert report.out_of_credits and report.new == 1
    assert client.calls == [requests[0].request_key, requests[1].request_key]
    assert [key for key, _ in report.failed_to_submit] == [r.request_key for r in requests[1:]]
    assert states(ledger, requests) == [State.SUBMITTED] + [State.PLANNED] * 3


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (ServerError("HTTP 507", status_code=507, created=None), State.IN_DOUBT),  # may exist
        (ServerError("bad gateway", status_code=502, created=False), State.PLANNED),
        (KeyError("a bug in the client"), State.IN_DOUBT),
    ],
)
def test_what_a_failed_create_means_for_the_money(
    ledger: Ledger, tmp_path: Path, failure: BaseException, expected: State
) -> None:
    requests = catalog(tmp_path, "harbour", [1])
    client = ScriptedClient({requests[0].request_key: failure})
    if isinstance(failure, KeyError):  # unexpected: recorded, then raised
        with pytest.raises(KeyError):
            run_scripted(ledger, requests, client)
    else:
        run_scripted(ledger, requests, client)
    assert states(ledger, requests) == [expected]


def test_two_submitters_on_one_set_never_create_twice(
    target: LedgerTarget, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", list(range(1, 9)))
    reports: list[Any] = []

    def submitter() -> None:
        ledger = target.open()  # its own engine and claim owner, as another process would have
        reports.append(
            submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests)
        )

    threads = [threading.Thread(target=submitter) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sum(r.new for r in reports) == 8
    assert sorted(creates(emulator).values()) == [1] * 8


def test_a_killed_submitter_leaves_a_ledger_the_rerun_completes_without_duplicates(
    target: LedgerTarget, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    set_file = write_prompt_set(tmp_path, "harbour", [1, 2, 3, 4])
    requests = load_prompt_set(set_file).requests
    flag = tmp_path / "hanging"
    environment = {**os.environ, "AIMLAPI_BASE_URL": emulator.base_url, "AIMLAPI_API_KEY": API_KEY}
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), "submit", target.to_json(), str(set_file), "2", str(flag)],
        env=environment,
        cwd=REPO,
    )
    try:
        # The second create was accepted (and charged) by the provider; its answer is not recorded yet.
        wait_for(lambda: flag.exists() or worker.poll() is not None, "the worker to hang mid-create")
        assert worker.poll() is None, "the worker ended before its second create"
        ledger = target.open()
        assert states(ledger, requests) == [State.SUBMITTED, State.SUBMITTING, State.PLANNED, State.PLANNED]
    finally:
        worker.kill()  # SIGKILL
        worker.wait()

    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests)

    assert (report.new, report.reused, report.in_doubt) == (2, 1, [requests[1].request_key])
    assert sorted(creates(emulator).values()) == [1, 1, 1, 1]  # no request was created twice
    mid_call = ledger.row(requests[1].request_key)
    assert mid_call.state is State.IN_DOUBT and "died" in mid_call.error
    assert states(ledger, requests) == [State.SUBMITTED, State.IN_DOUBT, State.SUBMITTED, State.SUBMITTED]


def test_a_create_the_ledger_fails_to_record_keeps_its_generation_id(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path, monkeypatch
) -> None:
    requests = catalog(tmp_path, "harbour", [1])

    def database_gone(*args: Any, **kwargs: Any) -> None:
        raise OSError("database unreachable")

    answered = ledger.try_answered

    def accepted_answer_not_recorded(*args: Any, **kwargs: Any) -> Any:
        if args[3].created is True:
            raise OSError("database unreachable")
        return answered(*args, **kwargs)

    batched = ledger.record_tries

    def accepted_answers_not_batched(accepted: Any = (), sending: Any = ()) -> Any:
        if accepted:  # the group commit fails; it then records each answer with try_answered, which fails too
            raise OSError("database unreachable")
        return batched(accepted, sending)

    monkeypatch.setattr(ledger, "try_answered", accepted_answer_not_recorded)
    monkeypatch.setattr(ledger, "record_tries", accepted_answers_not_batched)
    with pytest.raises(OSError):
        submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests)

    (generation_id,) = emulator.stats()["generations"]  # it was created, and so paid for
    (row,) = ledger.rows("harbour")
    assert row.state is State.SUBMITTED and row.generation_id == generation_id  # kept, not lost
    again = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(client_config), "harbour", requests)
    assert again.new == 0 and create_calls(emulator) == 1


# -- the provider's rate limit and quota ----------------------------------------------------------------


def test_a_run_rides_the_rate_limit_and_buys_everything_once(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", list(range(1, 25)))
    # One token, a new one every 250 ms: the first creates, sent together, cannot all be let through
    # however slowly a loaded machine sends them.
    emulator.update_faults(create_rate_limit_per_s=4.0, create_burst=1)
    patient = dataclasses.replace(client_config, max_attempts=10, max_retry_seconds=30.0)
    report = submit_prompt_set(ledger, lambda: AsyncAimlApiClient(patient), "harbour", requests)

    stats = emulator.stats()
    assert (report.new, report.in_doubt, report.failed_to_submit, report.stopped_by) == (24, [], [], None)
    assert sorted(creates(emulator).values()) == [1] * 24
    # 8 at once against 1 token: 429s were served, every one seen by the run's pacer, none fatal.
    assert stats["create_429s"]["rate_limit"] == report.rate_limited_429s > 0
    assert stats["requests"][CREATE_ROUTE]["429"] == report.rate_limited_429s
    assert report.rate_limited_until is None
    assert {row.state for row in ledger.rows("harbour")} == {State.SUBMITTED}


def test_an_exhausted_quota_stops_the_run_leaves_the_rest_planned_and_the_next_run_buys_it(
    ledger: Ledger, emulator: Any, client_config: ClientConfig, tmp_path: Path
) -> None:
    requests = catalog(tmp_path, "harbour", list(range(1, 6)))  # N = 5
    quota = 3  # K, and the next window's quota covers the N - K left
    emulator.update_faults(create_quota=quota, create_quota_window_s=5.0)
    # The quota's Retry-After (up to 5 s here, an hour upstream) is past what the client waits.
    waits_little = dataclasses.replace(client_config, rate_limit_max_wait_s=0.5)
    factory = lambda: AsyncAimlApiClient(waits_little)  # noqa: E731
    before = datetime.now(UTC)
    report = submit_prompt_set(ledger, factory, "harbour", requests, max_concurrency=2)

    assert report.new == quota and report.in_doubt == []
    assert report.rate_limited_until is not None and "creating resumes after" in report.stopped_by
    window_ends = datetime.fromtimestamp(emulator.stats()["limits"]["quota_window_ends_at"], UTC)
    assert before < report.rate_limited_until and abs((report.rate_limited_until - window_ends).total_seconds()) <= 1.5
    assert len(report.failed_to_submit) == len(requests) - quota
    counted = [row.state for row in ledger.rows("harbour")]
    assert counted.count(State.SUBMITTED) == quota and counted.count(State.PLANNED) == len(requests) - quota
    assert State.IN_DOUBT not in counted and State.SUBMITTING not in counted
    calls = emulator.stats()["requests"][CREATE_ROUTE]
    # It stopped at once: the 429s are the creates already in flight when the quota ran out, no more.
    assert calls["200"] == quota and 1 <= calls["429"] <= 2
    assert all(t.created is not None for key in (r.request_key for r in requests) for t in ledger.try_rows(key))

    # A run before the quota comes back buys nothing and doubts nothing: one more refused try.
    early = submit_prompt_set(ledger, factory, "harbour", requests, max_concurrency=2)
    assert early.new == 0 and early.rate_limited_until is not None and early.in_doubt == []

    time.sleep(max(0.0, emulator.stats()["limits"]["quota_window_ends_at"] - time.time()) + 0.05)
    resumed = submit_prompt_set(ledger, factory, "harbour", requests, max_concurrency=2)
    assert (resumed.new, resumed.reused, resumed.in_doubt, resumed.stopped_by) == (len(requests) - quota, quota, [], None)
    stats = emulator.stats()
    assert stats["accepted_creates"] == len(requests)
    assert sorted(creates(emulator).values()) == [1] * len(requests)  # no duplicates
    assert {row.state for row in ledger.rows("harbour")} == {State.SUBMITTED}
