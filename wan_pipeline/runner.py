"""`wan-pipeline run`: the same Definitions, executed on a real Dagster instance from a terminal.

It does what a deployment does with a daemon, in one process: register the partitions, materialize the
submission assets, evaluate the completion sensor on its own clock and execute the runs it requests,
until every selected set is collected or the deadline passes. Runs, materializations, check results
and sensor cursors land in the instance, so `dagster dev` shows the same history afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import dagster as dg

from wan_pipeline.catalog import (
    PromptSet,
    discover_prompt_sets,
    format_reports,
    load_prompt_set,
    validate_paths,
)
from wan_pipeline.defs.sensors import STATES_TAG, collection_run_request
from wan_pipeline.ledger import COLLECT_EARLY_AFTER, Ledger, State
from wan_pipeline.ledger.reports import spend, spend_by_set
from wan_pipeline.safe_text import printable
from wan_pipeline.scopes import scope_in_use
from wan_pipeline.settings import Settings
from wan_pipeline.submission import (
    BudgetExceeded,
    InDoubtSelection,
    SubmissionPlan,
    check_budget,
    plan_submission,
)

# `run`'s exit status when the provider's quota stopped creating and nothing else went wrong: what
# is left is planned, and a run after the time the summary gives continues (EX_TEMPFAIL, "try again").
EXIT_RATE_LIMITED = 75
# The waiting loop stops this long before the deadline (at most a quarter of it), so the videos that
# are finished can still be collected before the hard wall.
COLLECT_RESERVE_S = 60.0
# Step failures are summarized from the ledger and the failure's description; Dagster's own console
# lines (with stack traces) stay in the instance's event log, where `dagster dev` shows them.
QUIET_LOGGING = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
# No pool limit here: a run killed mid-step would hold its `aimlapi` slot forever, and nothing in a
# local instance frees it (deploy/dagster.yaml sets the limit, with the daemon's run monitoring).
# The client bounds in-flight API calls itself.
INSTANCE_YAML = """\
# Project-local Dagster instance for `wan-pipeline run` and `wan-pipeline dev`.
telemetry:
  enabled: false
"""


class DeadlineReached(KeyboardInterrupt):
    """`run --deadline` passed: raised into whatever the run was doing, like Ctrl-C.

    A KeyboardInterrupt, so that Dagster and asyncio unwind the way they do for an interrupt: a
    create that was sent and not answered is settled by its recorded tries (in doubt), a download's
    temporary file is swept by the next collection of its set.
    """


@dataclass
class Wall:
    seconds: float
    hit: bool = False


@contextlib.contextmanager
def hard_deadline(seconds: float) -> Iterator[Wall]:
    """Interrupt the main thread after `seconds`, whatever call it is in (no-op off the main thread)."""
    wall = Wall(seconds)
    if threading.current_thread() is not threading.main_thread():
        yield wall
        return

    def on_alarm(signum: int, frame: object) -> None:
        wall.hit = True
        raise DeadlineReached(f"the deadline of {seconds:.0f} s was reached")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield wall
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def ensure_dagster_home(project_dir: Path) -> Path:
    """Use $DAGSTER_HOME, or a project-local `.dagster_home` with telemetry off."""
    home = Path(os.environ.get("DAGSTER_HOME") or project_dir / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(INSTANCE_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


@dataclass
class RunOptions:
    prompt_sets: Sequence[str] = ()
    deadline_s: float = 3600.0
    retry_failed: bool = False
    resubmit_in_doubt: InDoubtSelection = field(default_factory=InDoubtSelection)
    max_usd: float | None = None
    dry_run: bool = False
    tick_interval_s: float = 10.0


@dataclass
class SetOutcome:
    name: str
    run_id: str | None = None  # the submission run: its attempts are what this run bought
    collected_fingerprint: str | None = None  # the set's states when a collection run last ran
    errors: list[str] = field(default_factory=list)
    submission_recorded: bool = True  # False: the submission stored nothing, so nothing to collect
    rate_limited_until: str | None = None  # the provider's quota stopped creating until then (UTC)
    collection_runs: int = 0  # increments and the final collection, run by this `run`
    ok: bool = False  # set by the summary: everything asked for is stored, nothing failed or in doubt


def _failure(result: dg.ExecuteInProcessResult) -> tuple[str, dict]:
    """The first failed step's message and metadata: a `dg.Failure`'s description, else the first
    line of the innermost error (the user's exception, not Dagster's wrapper around it)."""
    for event in result.all_events:
        if event.is_step_failure:
            failure = event.step_failure_data
            if failure.user_failure_data and failure.user_failure_data.description:
                metadata = {k: v.value for k, v in failure.user_failure_data.metadata.items()}
                return failure.user_failure_data.description, metadata
            error = failure.error
            while error is not None and error.cause is not None:
                error = error.cause
            if error is not None:
                return (error.message or "").strip().splitlines()[0], {}
    return "run failed", {}


class SensorThread:
    """Ticks the completion sensor (`tick(cursor) -> cursor`) in a daemon thread until stopped,
    sleeping until the next poll is due in between (`seconds_until_due(max_wait_s)`). An error in a
    tick stops the thread and is raised in the main thread by `check`."""

    def __init__(
        self,
        tick: Callable[[str | None], str | None],
        seconds_until_due: Callable[[float], float],
        max_wait_s: float,
    ):
        self._tick, self._seconds_until_due, self._max_wait_s = tick, seconds_until_due, max_wait_s
        self._ticked, self._stop, self._wake = threading.Event(), threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="completion-sensor", daemon=True)

    def __enter__(self) -> SensorThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._wake.set()
        # A tick is bounded by its time budget; a run stopped by its deadline does not wait for it.
        self._thread.join(timeout=None if exc_info[0] is None else 1.0)

    def _loop(self) -> None:
        cursor: str | None = None
        try:
            while not self._stop.is_set():
                cursor = self._tick(cursor)
                self._ticked.set()
                self._wake.wait(self._seconds_until_due(self._max_wait_s))
                self._wake.clear()
        except BaseException as exc:  # handed to the main thread, which decides
            self._error = exc
            self._ticked.set()

    def wake(self) -> None:
        """Tick now rather than when the last tick thought the next poll was due (new generations
        were just submitted: their poll times were not in the ledger then)."""
        self._wake.set()

    def check(self) -> None:
        """Raise the error that stopped the thread, if one did."""
        if self._error is not None:
            raise self._error

    def wait_for_tick(self, timeout_s: float) -> None:
        if self._ticked.wait(timeout_s):
            self._ticked.clear()


class PipelineRunner:
    def __init__(
        self,
        defs: dg.Definitions,
        instance: dg.DagsterInstance | None,  # None: a dry run, which touches no instance
        settings: Settings,
        *,
        out: TextIO = sys.stdout,
    ):
        self.defs = defs
        self.instance = instance
        self.settings = settings
        self.out = out
        self.ledger = Ledger(settings.ledger_url, scope=scope_in_use(settings))
        self.submit_job = defs.resolve_job_def("submit_prompt_set")
        self.collect_job = defs.resolve_job_def("collect_prompt_set")
        self.completion_sensor = defs.resolve_sensor_def("generation_completion_sensor")
        self.planned_usd: dict[str, float] = {}

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def select_sets(self, names: Sequence[str]) -> dict[str, Path] | None:
        """The named sets' files (all sets when none is named), or None after saying what is unknown."""
        available = discover_prompt_sets(self.settings.catalog_dir)
        unknown = [n for n in names if n not in available]
        if unknown:
            self.say(
                f"Unknown prompt set(s): {', '.join(unknown)}. Available in {self.settings.catalog_dir}: "
                f"{', '.join(sorted(available)) or '(none)'}"
            )
            return None
        return {name: available[name] for name in names or sorted(available)}

    def run(self, options: RunOptions) -> int:
        """Validate, plan, submit, wait and collect, all inside `--deadline` (a hard wall)."""
        started = time.monotonic()
        outcomes: dict[str, SetOutcome] = {}
        code: int | None = None
        with hard_deadline(options.deadline_s) as wall:
            try:
                code = self._run(options, outcomes, wall, started)
            except BaseException:
                # Dagster re-raises an interrupt as its own error type: the alarm says whether it was ours.
                if not wall.hit:
                    raise
        if wall.hit and not outcomes:
            self.say(f"Stopped at the hard deadline of {options.deadline_s:.0f} s while validating and planning: "
                     "nothing was submitted.")
            return 1
        if wall.hit:
            for outcome in outcomes.values():
                outcome.errors.append(f"stopped at the hard deadline of {options.deadline_s:.0f} s, mid-call")
        elif code is not None:
            return code
        self.summarize(outcomes)
        if all(o.ok for o in outcomes.values()):
            return 0
        # Stopped by the provider's quota with nothing else wrong: "try again later", not a failure.
        return EXIT_RATE_LIMITED if self._only_rate_limited(outcomes) else 1

    def _only_rate_limited(self, outcomes: dict[str, SetOutcome]) -> bool:
        if not any(o.rate_limited_until for o in outcomes.values()):
            return False
        for outcome in outcomes.values():
            counts = self.ledger.progress(outcome.name).counts
            if counts[State.FAILED] or counts[State.REJECTED] or counts[State.IN_DOUBT]:
                return False
            others = [e for e in outcome.errors if not e.startswith(("submission failed: Submission stopped: the "
                                                                    "provider's rate limit", "not submitted: "))]
            if others:
                return False
        return True

    def _run(self, options: RunOptions, outcomes: dict[str, SetOutcome], wall: Wall, started: float) -> int | None:
        """An exit code when the run ends before submitting (bad input, dry run, budget); None once
        `outcomes` is filled in and the summary is due."""
        files = self.select_sets(options.prompt_sets)
        if files is None:
            return 2
        if not files:
            self.say(f"No prompt sets in {self.settings.catalog_dir}.")
            return 2
        # With no set named, the folder itself is validated: a file whose name is not a slug, or two
        # files claiming one name, stop the run instead of being skipped in silence.
        targets = [self.settings.catalog_dir] if not options.prompt_sets else list(files.values())
        reports = validate_paths(targets, allowed_roots=self.settings.allowed_roots)
        if not all(report.ok for report in reports):
            self.say(format_reports(reports))
            self.say("Nothing was submitted: fix the catalog errors above first.")
            return 1
        names = list(files)
        loaded = {report.name: report.prompt_set for report in reports if report.prompt_set is not None}
        plans = self.plans(files, options, loaded)
        self.planned_usd = {plan.prompt_set: plan.estimated_usd for plan in plans}
        if options.dry_run:
            self.say_plans(plans)
            return 0
        try:
            check_budget(plans, options.max_usd)
        except BudgetExceeded as exc:
            self.say(f"Refused by --max-usd: {exc}.")
            return 1
        missing = [n for n in names if not self.instance.has_dynamic_partition("prompt_sets", n)]
        if missing:
            self.instance.add_dynamic_partitions("prompt_sets", missing)

        outcomes.update({name: SetOutcome(name) for name in names})
        stop_reason = None
        # The completion sensor ticks in a thread of its own from the first create on, as the daemon
        # ticks it beside running runs: what finishes while a set is submitted or collected is polled
        # then, not after, so the next increment can start as soon as this one ends.
        with SensorThread(self.tick, self._seconds_until_due, options.tick_interval_s) as sensor:
            for name in names:
                if stop_reason or wall.hit:
                    outcomes[name].errors.append(f"not submitted: {stop_reason or 'the deadline passed'}")
                    outcomes[name].submission_recorded = False
                    continue
                stop_reason = self.submit(name, options, outcomes[name])
                sensor.wake()
            if not wall.hit:
                self.wait_and_collect(outcomes, options, started, sensor)
        return None

    def plans(
        self, files: dict[str, Path], options: RunOptions, loaded: dict[str, PromptSet]
    ) -> list[SubmissionPlan]:
        """What each set would buy from the API in use, read from the ledger without writing to it."""
        return [
            plan_submission(
                self.ledger,
                name,
                (loaded.get(name) or load_prompt_set(path, allowed_roots=self.settings.allowed_roots)).requests,
                resubmit_in_doubt=options.resubmit_in_doubt,
                retry_failed=options.retry_failed,
                dry_run=True,
            )
            for name, path in files.items()
        ]

    def say_plans(self, plans: Sequence[SubmissionPlan]) -> None:
        self.say(f"Dry run against {self.ledger.scope}: nothing is written, bought or collected.")
        for plan in plans:
            self.say(plan.describe())
        count = sum(len(plan.to_submit) for plan in plans)
        self.say(f"total would newly buy {count} generation(s), estimated ${sum(p.estimated_usd for p in plans):.4f}")

    def submit(self, name: str, options: RunOptions, outcome: SetOutcome) -> str | None:
        """Materialize the set's submission assets; returns why no further set may be submitted, if so."""
        config = {
            "retry_failed": options.retry_failed,
            "resubmit_in_doubt": sorted(options.resubmit_in_doubt.names),
            # `run` has already checked its whole selection against --max-usd (or was given none): it
            # raises the asset's default per-run budget (WAN_PIPELINE_MAX_USD) explicitly to what it planned.
            "max_usd": options.max_usd if options.max_usd is not None else self.planned_usd.get(name, 0.0) + 0.01,
        }
        result = self.submit_job.execute_in_process(
            instance=self.instance,
            partition_key=name,
            run_config={"ops": {"submitted_generations": {"config": config}}, **QUIET_LOGGING},
            raise_on_error=False,
        )
        outcome.run_id = result.run_id
        stop_reason = None
        if not result.success:
            message, failure_metadata = _failure(result)
            outcome.errors.append(f"submission failed: {message}")
            if failure_metadata.get("stops_submission"):
                stop_reason = message
            outcome.rate_limited_until = failure_metadata.get("rate_limited_until")
        # What this run bought, from the ledger: present even when the step failed after buying some
        # (a 401 or 403 midway), so it is reported and collected.
        bought = spend(self.ledger.attempts(run_id=result.run_id))
        progress = self.ledger.progress(name)
        outcome.submission_recorded = progress.total > 0 and (result.success or bought.purchases > 0)
        if outcome.submission_recorded:
            self.say(
                f"{name}: {progress.total} generations, {bought.purchases} newly submitted (${bought.usd_spent:.4f}), "
                f"{max(progress.bought - bought.purchases, 0)} reused from the ledger"
            )
        return stop_reason

    def tick(self, cursor: str | None) -> str | None:
        """One tick of the completion sensor (its polls, its observations); returns its cursor. Its run
        requests are not used: `run` decides each collection itself by the same rule (`collection_due`)
        when the last one has ended, so requests piled up during a long run are never replayed."""
        # The sensor's own INFO lines are for the Dagster UI; here the progress line says it all.
        logging.disable(logging.INFO)
        try:
            with dg.build_sensor_context(
                instance=self.instance,
                cursor=cursor,
                definitions=self.defs,
                sensor_name=self.completion_sensor.name,
                resources=self.defs.resources,
            ) as context:
                result = self.completion_sensor(context)
        finally:
            logging.disable(logging.NOTSET)
        return result.cursor

    def wait_and_collect(
        self, outcomes: dict[str, SetOutcome], options: RunOptions, started: float, sensor: SensorThread
    ) -> None:
        give_up_at = started + options.deadline_s - min(COLLECT_RESERVE_S, options.deadline_s / 4)
        # Even a set whose submission stopped partway (out of credits, say) is waited for: what was
        # bought before the stop is collected now, not left for a rerun to find.
        active = {name for name, outcome in outcomes.items() if outcome.submission_recorded}
        last_line = ""
        while active:
            sensor.check()
            now = datetime.now(UTC)
            for name in list(active):
                progress = self.ledger.progress(name)
                # The same decision as the sensor's (`collection_due`): increments while generations
                # still run, the final collection once all are terminal. The sensor skips states an
                # earlier run already collected (so the daemon does not repeat what `run` did); `run`
                # collects them anyway: it is cheap (verified files are skipped) and it restores a
                # deleted video. Runs here are sequential: two never overlap.
                if progress.collection_due(now) and outcomes[name].collected_fingerprint != progress.fingerprint:
                    self.collect(collection_run_request(name, progress), outcomes[name])
                done = progress.ready_to_collect and outcomes[name].collected_fingerprint == progress.fingerprint
                if progress.total == 0 or done:
                    active.discard(name)
            if not active:
                break
            line = self._progress_line(active)
            if line != last_line:  # printed when the counts change, not on every tick
                self.say(f"[{time.monotonic() - started:6.1f}s] {line}")
                last_line = line
            if time.monotonic() >= give_up_at:
                for name in active:
                    progress = self.ledger.progress(name)
                    if progress.uncollected:  # what is finished is collected now, not left to a rerun
                        self.collect(collection_run_request(name, progress), outcomes[name])
                    outcomes[name].errors.append(
                        f"deadline of {options.deadline_s:.0f} s passed with {progress.pending} generation(s) pending"
                    )
                break
            # Until the sensor's next tick has polled something (or the soonest increment is due).
            sensor.wait_for_tick(max(0.05, min(COLLECT_EARLY_AFTER.total_seconds(), give_up_at - time.monotonic())))

    def _seconds_until_due(self, max_wait_s: float) -> float:
        """How long until the ledger's next poll is due, at most `max_wait_s` (and at least 50 ms)."""
        next_poll = self.ledger.next_poll_time()
        wait = max_wait_s
        if next_poll is not None:
            wait = min(wait, max(0.0, (next_poll - datetime.now(UTC)).total_seconds()))
        return max(0.05, wait)

    def _progress_line(self, active: set[str]) -> str:
        parts = []
        for name in sorted(active):
            progress = self.ledger.progress(name)
            done = progress.counts[State.COMPLETED] + progress.counts[State.FAILED]
            parts.append(f"{name} {done} done ({progress.collected} stored) / {progress.pending} pending")
        return "waiting: " + "; ".join(parts)

    def collect(self, request: dg.RunRequest, outcome: SetOutcome) -> None:
        result = self.collect_job.execute_in_process(
            instance=self.instance,
            partition_key=request.partition_key,
            asset_selection=request.asset_selection,  # an increment: results and videos only
            tags={**request.tags, "dagster/run_key": request.run_key},
            run_config={**(request.run_config or {}), **QUIET_LOGGING},
            raise_on_error=False,
        )
        outcome.collected_fingerprint = request.tags[STATES_TAG]
        outcome.collection_runs += 1
        if not result.success:
            outcome.errors.append(f"collection failed: {_failure(result)[0]}")
        for check in result.get_asset_check_evaluations():
            if not check.passed and check.severity == dg.AssetCheckSeverity.ERROR:
                outcome.errors.append(f"check {check.check_name} failed: {check.metadata.get('details').value}")

    def summarize(self, outcomes: dict[str, SetOutcome]) -> None:
        """Per set, from the ledger: what this run bought (and its cost), what was reused ($0), where
        each set stands; then every failure, in-doubt and unsent row; then the total this run spent."""
        header = (
            f"{'prompt set':<24} {'requested':>9} {'new':>5} {'reused':>6} {'completed':>9} {'stored':>6} "
            f"{'failed':>6} {'in doubt':>8} {'USD new':>9} {'USD set':>9}  output"
        )
        self.say("")
        self.say(f"API {self.ledger.scope}")
        self.say(header)
        self.say("-" * len(header))
        run_attempts = [a for o in outcomes.values() if o.run_id for a in self.ledger.attempts(run_id=o.run_id)]
        this_run = spend(run_attempts)
        by_set = spend_by_set(self.ledger.attempts())
        notes: list[str] = []
        for name, outcome in outcomes.items():
            progress = self.ledger.progress(name)
            counts = progress.counts
            new = spend(a for a in run_attempts if a.prompt_set == name)
            bought_before = progress.bought - new.purchases
            failed = counts[State.FAILED] + counts[State.REJECTED]
            output = f"{self.settings.output_root.rstrip('/')}/{name}/"
            self.say(
                f"{name:<24} {progress.total:>9} {new.purchases:>5} {max(bought_before, 0):>6} "
                f"{counts[State.COMPLETED]:>9} {progress.collected:>6} {failed:>6} {counts[State.IN_DOUBT]:>8} "
                f"{new.usd_spent:>9.4f} {by_set.get(name, spend(())).usd_spent:>9.4f}  {output}"
            )
            for row in self.ledger.rows(name, states={State.FAILED, State.REJECTED, State.IN_DOUBT, State.PLANNED}):
                why = printable(row.error or row.raw_status or "", 300)
                if row.state in (State.FAILED, State.REJECTED):
                    notes.append(f"FAILED {name}/{row.request_key}: {why}")
                elif row.state == State.IN_DOUBT:
                    notes.append(
                        f"IN DOUBT {name}/{row.request_key}: {why} (may be paid; `wan-pipeline status` lists the "
                        f"client request ids; rerun with --resubmit-in-doubt {row.request_key} to buy it again)"
                    )
                else:
                    notes.append(f"NOT SUBMITTED {name}/{row.request_key}: {why or 'not accepted'}")
            notes += [f"ERROR {name}: {error}" for error in outcome.errors]
            if outcome.rate_limited_until:
                notes.append(
                    f"RATE LIMITED {name}: the provider refuses creates until {outcome.rate_limited_until}; "
                    f"{counts[State.PLANNED]} left planned (a 429 creates nothing: not charged, not in doubt): run again after "
                    "that time, or let the schedule continue"
                )
            outcome.ok = (
                outcome.collected_fingerprint is not None
                and progress.collected == counts[State.COMPLETED]
                and not (failed or counts[State.IN_DOUBT] or counts[State.PLANNED] or outcome.errors)
            )
        for line in notes:
            self.say(line)
        if not run_attempts and all(o.submission_recorded for o in outcomes.values()) and not any(
            "NOT SUBMITTED" in n for n in notes
        ):
            self.say("Nothing new was submitted: every generation was already in the ledger ($0 spent).")
        self.say(f"total {this_run.describe()} bought by this run")
