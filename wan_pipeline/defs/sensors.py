"""Sensors: keep partitions in step with the catalog folder, and notice finished generations.

Sensors only poll and request runs; the assets do the work (a runless materialization reported from
a sensor could not be rematerialized from the UI).
"""


import json
import os
from datetime import UTC, datetime

import dagster as dg

from wan_pipeline.ledger import SetProgress
from wan_pipeline.polling import poll_due
from wan_pipeline.safe_text import printable
from wan_pipeline.storage import SLUG, file_sha256

from .jobs import collect_job, submit_job
from .partitions import prompt_sets
from .resources import AimlApiResource, CatalogResource, LedgerResource

# A tick must end well inside Dagster's 60 s sensor limit, whatever the backlog: what is left is
# still due at the next tick.
TICK_POLL_LIMIT = 5000
TICK_TIME_BUDGET_S = 30.0
# On a collection run: the fingerprint of the set's generation states it was requested for.
STATES_TAG = "wan_pipeline/states"


def auto_submit_enabled() -> bool:
    """Submitting on catalog change spends money, so it is opt-in (WAN_PIPELINE_AUTO_SUBMIT=1)."""
    return os.environ.get("WAN_PIPELINE_AUTO_SUBMIT", "").lower() in {"1", "true", "yes"}


@dg.sensor(
    target=submit_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition for each new prompt-set file; reports files that disappeared (their "
    "history is kept). With WAN_PIPELINE_AUTO_SUBMIT=1 it also submits sets whose file changed.",
)
def prompt_set_sensor(context: dg.SensorEvaluationContext, catalog: CatalogResource) -> dg.SensorResult:
    files = {name: path for name, path in catalog.files().items() if SLUG.fullmatch(name)}
    hashes = {name: file_sha256(path)[1] for name, path in files.items()}
    previous: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    known = set(context.instance.get_dynamic_partitions(prompt_sets.name))

    added = sorted(set(files) - known)
    for name in sorted(known - set(files)):
        context.log.warning(f"prompt set {name!r} has no file in {catalog.catalog_dir} any more; its history is kept")
    run_requests = []
    if auto_submit_enabled():
        run_requests = [
            dg.RunRequest(partition_key=name, run_key=f"auto-submit-{name}-{digest[:16]}")
            for name, digest in sorted(hashes.items())
            if previous.get(name) != digest
        ]
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[prompt_sets.build_add_request(added)] if added else [],
        cursor=json.dumps(hashes, sort_keys=True),
    )


def collection_run_request(prompt_set: str, progress: SetProgress) -> dg.RunRequest:
    """A collection run; while stragglers still run it collects what is finished without waiting."""
    partial = {"ops": {"generation_results": {"config": {"wait_deadline_s": 0, "fail_on_pending": False}}}}
    return dg.RunRequest(
        partition_key=prompt_set,
        run_key=f"collect-{prompt_set}-{progress.fingerprint}",
        run_config=None if progress.ready_to_collect else partial,
        tags={STATES_TAG: progress.fingerprint},
    )


@dg.sensor(
    target=collect_job,
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls the generations that are due (adaptive, per generation), writes their states to the "
    "ledger, and requests a collection run for each prompt set with finished videos not yet stored, once "
    "its generations are all terminal (or its finished ones have waited 10 min for stragglers).",
)
def generation_completion_sensor(
    context: dg.SensorEvaluationContext, aimlapi: AimlApiResource, ledger: LedgerResource
) -> dg.SensorResult:
    store = ledger.get(aimlapi)
    report = poll_due(store, aimlapi.client_config(), limit=TICK_POLL_LIMIT, time_budget_s=TICK_TIME_BUDGET_S)
    if report.polled or report.errors:
        context.log.info(
            f"polled {report.polled} in {report.elapsed_s:.1f} s: {report.completed} completed, "
            f"{report.failed} failed, {report.still_pending} pending, {report.unfinished} left for next tick"
        )
    for error in report.errors[:10]:
        context.log.warning(printable(error, 500))

    requested: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    run_requests = []
    now = datetime.now(UTC)
    for prompt_set in context.instance.get_dynamic_partitions(prompt_sets.name):
        progress = store.progress(prompt_set)
        if not progress.should_collect(now) or requested.get(prompt_set) == progress.fingerprint:
            continue
        requested[prompt_set] = progress.fingerprint
        run_requests.append(collection_run_request(prompt_set, progress))
    return dg.SensorResult(run_requests=run_requests, cursor=json.dumps(requested, sort_keys=True))
