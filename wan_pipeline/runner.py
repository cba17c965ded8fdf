"""`wan-pipeline run`: the same Definitions, executed on a real Dagster instance from a terminal.

It does what a deployment does with a daemon, in one process: register the partitions, materialize the
submission assets, evaluate the completion sensor on its own clock and execute the runs it requests,
until every selected set is collected or the deadline passes. Runs, materializations, check results
and sensor cursors land in the instance, so `dagster dev` shows the same history afterwards.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import dagster as dg

from wan_pipeline.catalog import discover_prompt_sets, format_reports, load_prompt_set, validate_paths
from wan_pipeline.collection import set_progress
from wan_pipeline.defs.sensors import STATES_TAG, collection_run_request
from wan_pipeline.ledger import Ledger, State
from wan_pipeline.settings import Settings
from wan_pipeline.submission import estimate_new_spend

QUIET_LOGGING = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# No pool limit here: a run killed mid-step would hold its `aimlapi` slot forever, and nothing in a
# local instance frees it (deploy/dagster.yaml sets the limit, with the daemon's run monitoring).
# The client bounds in-flight API calls itself.
INSTANCE_YAML = """\
# Project-local Dagster instance for `wan-pipeline run` and `wan-pipeline dev`.
telemetry:
  enabled: false
"""


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
    resubmit_in_doubt: bool = False
    max_usd: float | None = None
    tick_interval_s: float = 10.0


@dataclass
class SetOutcome:
    name: str
    requested: int = 0
    new: int = 0
    reused: int = 0
    completed: int = 0
    failed: int = 0
    in_doubt: int = 0
    not_submitted: int = 0
    usd_new: float = 0.0
    usd_total: float = 0.0
    collected_fingerprint: str | None = None  # the set's states when a collection run last ran
    failures: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    submission_recorded: bool = True  # False: the submission stored nothing, so nothing to collect

    @property
    def ok(self) -> bool:
        collected = self.collected_fingerprint is not None
        return collected and not (self.failed or self.in_doubt or self.not_submitted or self.errors)


def _materialization_metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        if materialization.asset_key.to_user_string() == asset:
            return {k: v.value for k, v in materialization.metadata.items()}
    return {}


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


class PipelineRunner:
    def __init__(
        self,
        defs: dg.Definitions,
        instance: dg.DagsterInstance,
        settings: Settings,
        *,
        out: TextIO = sys.stdout,
    ):
        self.defs = defs
        self.instance = instance
        self.settings = settings
        self.out = out
        self.ledger = Ledger(settings.ledger_url)
        self.submit_job = defs.resolve_job_def("submit_prompt_set")
        self.collect_job = defs.resolve_job_def("collect_prompt_set")
        self.completion_sensor = defs.resolve_sensor_def("generation_completion_sensor")

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
        if options.max_usd is not None and not self.within_budget(files, options):
            return 1
        missing = [n for n in names if not self.instance.has_dynamic_partition("prompt_sets", n)]
        if missing:
            self.instance.add_dynamic_partitions("prompt_sets", missing)

        outcomes = {name: SetOutcome(name) for name in names}
        stop_reason = None
        for name in names:
            if stop_reason:
                outcomes[name].errors.append(f"not submitted: {stop_reason}")
                outcomes[name].submission_recorded = False
                continue
            stop_reason = self.submit(name, options, outcomes[name])
        self.wait_and_collect(outcomes, options)
        self.summarize(outcomes)
        return 0 if all(o.ok for o in outcomes.values()) else 1

    def within_budget(self, files: dict[str, Path], options: RunOptions) -> bool:
        """`--max-usd` bounds the whole run: refuse before any create when all sets together exceed it."""
        estimate = sum(
            estimate_new_spend(
                self.ledger,
                load_prompt_set(path, allowed_roots=self.settings.allowed_roots).requests,
                resubmit_in_doubt=options.resubmit_in_doubt,
                retry_failed=options.retry_failed,
            )
            for path in files.values()
        )
        if estimate > options.max_usd:
            self.say(
                f"Refused: this run would newly buy an estimated ${estimate:.4f}, above --max-usd "
                f"${options.max_usd:.4f}. Nothing was submitted."
            )
            return False
        return True

    def submit(self, name: str, options: RunOptions, outcome: SetOutcome) -> str | None:
        """Materialize the set's submission assets; returns why no further set may be submitted, if so."""
        config = {
            "retry_failed": options.retry_failed,
            "resubmit_in_doubt": options.resubmit_in_doubt,
            "max_usd": options.max_usd,
        }
        result = self.submit_job.execute_in_process(
            instance=self.instance,
            partition_key=name,
            run_config={"ops": {"submitted_generations": {"config": config}}, **QUIET_LOGGING},
            raise_on_error=False,
        )
        stop_reason = None
        if not result.success:
            message, failure_metadata = _failure(result)
            outcome.errors.append(f"submission failed: {message}")
            if failure_metadata.get("stops_submission"):
                stop_reason = message
        # Present even when the run failed after recording what it bought (out of credits midway).
        metadata = _materialization_metadata(result, "submitted_generations")
        if not metadata:
            outcome.submission_recorded = False
            return stop_reason
        outcome.new = int(metadata.get("new", 0))
        outcome.reused = int(metadata.get("reused", 0))
        outcome.requested = int(metadata.get("dagster/row_count", 0))
        outcome.usd_new = float(metadata.get("usd_spent", 0.0))
        self.say(
            f"{name}: {outcome.requested} generations, {outcome.new} newly submitted (${outcome.usd_new:.4f}), "
            f"{outcome.reused} reused from the ledger"
        )
        return stop_reason

    def tick(self, cursor: str | None) -> tuple[str | None, list[dg.RunRequest]]:
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=cursor,
            definitions=self.defs,
            sensor_name=self.completion_sensor.name,
            resources=self.defs.resources,
        )
        # The sensor's own INFO lines are for the Dagster UI; here the progress line says it all.
        logging.disable(logging.INFO)
        try:
            result = self.completion_sensor(context)
        finally:
            logging.disable(logging.NOTSET)
        return result.cursor, list(result.run_requests or [])

    def wait_and_collect(self, outcomes: dict[str, SetOutcome], options: RunOptions) -> None:
        started = time.monotonic()
        give_up_at = started + options.deadline_s
        # Even a set whose submission stopped partway (out of credits, say) is waited for: what was
        # bought before the stop is collected now, not left for a rerun to find.
        active = {name for name, outcome in outcomes.items() if outcome.submission_recorded}
        cursor: str | None = None
        last_line = ""
        while active:
            cursor, requests = self.tick(cursor)
            # Unlike the daemon, run executes a requested collection even when an earlier run had the
            # same key: it is cheap (verified files are skipped) and it restores a deleted video.
            for request in requests:
                if request.partition_key in active:
                    self.collect(request, outcomes[request.partition_key])
            for name in list(active):
                progress = set_progress(self.ledger, name)
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
                    progress = set_progress(self.ledger, name)
                    if progress.uncollected:  # what is finished is collected now, not left to a rerun
                        self.collect(collection_run_request(name, progress), outcomes[name])
                    outcomes[name].errors.append(
                        f"deadline of {options.deadline_s:.0f} s passed with {progress.pending} generation(s) pending"
                    )
                break
            self._sleep_until_due(give_up_at, options.tick_interval_s)

    def _sleep_until_due(self, give_up_at: float, max_wait_s: float) -> None:
        next_poll = self.ledger.next_poll_time()
        wait = max_wait_s
        if next_poll is not None:
            wait = min(wait, max(0.0, (next_poll - datetime.now(UTC)).total_seconds()))
        time.sleep(max(0.05, min(wait, give_up_at - time.monotonic())))

    def _progress_line(self, active: set[str]) -> str:
        parts = []
        for name in sorted(active):
            counts = self.ledger.summary(name).counts
            done = counts.get(State.COMPLETED, 0) + counts.get(State.FAILED, 0)
            pending = sum(counts.get(s, 0) for s in (State.SUBMITTING, State.SUBMITTED, State.GENERATING))
            parts.append(f"{name} {done} done / {pending} pending")
        return "waiting: " + "; ".join(parts)

    def collect(self, request: dg.RunRequest, outcome: SetOutcome) -> None:
        result = self.collect_job.execute_in_process(
            instance=self.instance,
            partition_key=request.partition_key,
            tags={**request.tags, "dagster/run_key": request.run_key},
            run_config={**(request.run_config or {}), **QUIET_LOGGING},
            raise_on_error=False,
        )
        outcome.collected_fingerprint = request.tags[STATES_TAG]
        if not result.success:
            outcome.errors.append(f"collection failed: {_failure(result)[0]}")
        for check in result.get_asset_check_evaluations():
            if not check.passed and check.severity == dg.AssetCheckSeverity.ERROR:
                outcome.errors.append(f"check {check.check_name} failed: {check.metadata.get('details').value}")

    def summarize(self, outcomes: dict[str, SetOutcome]) -> None:
        header = f"{'prompt set':<24} {'requested':>9} {'new':>5} {'reused':>6} {'completed':>9} {'failed':>6} {'in doubt':>8} {'USD new':>9} {'USD total':>9}  output"
        self.say("")
        self.say(header)
        self.say("-" * len(header))
        total_new = 0
        rows_by_set = {name: self.ledger.rows(name) for name in outcomes}
        for name, outcome in outcomes.items():
            rows = rows_by_set[name]
            counts = {state: sum(r.state == state for r in rows) for state in State}
            outcome.completed = counts[State.COMPLETED]
            outcome.failed = counts[State.FAILED] + counts[State.REJECTED]
            outcome.in_doubt = counts[State.IN_DOUBT]
            outcome.not_submitted = counts[State.PLANNED]
            outcome.usd_total = sum(r.usd_spent or 0 for r in rows)
            outcome.failures = [(r.request_key, r.error or r.raw_status or "") for r in rows if r.state in (State.FAILED, State.REJECTED)]
            total_new += outcome.new
            output = f"{self.settings.output_root.rstrip('/')}/{name}/"
            self.say(
                f"{name:<24} {len(rows):>9} {outcome.new:>5} {outcome.reused:>6} {outcome.completed:>9} "
                f"{outcome.failed:>6} {outcome.in_doubt:>8} {outcome.usd_new:>9.4f} {outcome.usd_total:>9.4f}  {output}"
            )
        for outcome in outcomes.values():
            for key, message in outcome.failures:
                self.say(f"FAILED {outcome.name}/{key}: {message}")
            for row in rows_by_set[outcome.name]:
                if row.state == State.IN_DOUBT:
                    self.say(f"IN DOUBT {outcome.name}/{row.request_key}: {row.error} "
                             "(may be paid; rerun with --resubmit-in-doubt to buy it again)")
                elif row.state == State.PLANNED:
                    self.say(f"NOT SUBMITTED {outcome.name}/{row.request_key}: {row.error or 'not accepted'}")
            for error in outcome.errors:
                self.say(f"ERROR {outcome.name}: {error}")
        if total_new == 0 and all(o.submission_recorded and not o.not_submitted for o in outcomes.values()):
            self.say("Nothing new was submitted: every generation was already in the ledger ($0 spent).")
