"""Sensors: keep partitions in step with the catalog folder, and notice finished generations.

Sensors only poll, observe and request runs; the assets do the work (a runless materialization
reported from a sensor could not be rematerialized from the UI). Runless *observations* are fine:
the catalog sensor observes each prompt-set file (its data version is the file's hash) and the
completion sensor observes each set's pending work, at a bounded rate.
"""


import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from wan_pipeline.catalog import prompt_set_files, validate_paths
from wan_pipeline.ledger import SetProgress
from wan_pipeline.pending import PendingView, pending_view
from wan_pipeline.polling import poll_due
from wan_pipeline.safe_text import printable

from .assets import (
    downloaded_videos,
    file_data_version,
    generation_requests,
    generation_results,
    prompt_set_file,
)
from .jobs import collect_job, submit_job
from .partitions import prompt_sets
from .resources import AimlApiResource, CatalogResource, LedgerResource

# A tick must end well inside Dagster's 60 s sensor limit, whatever the backlog: what is left is
# still due at the next tick.
TICK_POLL_LIMIT = 5000
TICK_TIME_BUDGET_S = 30.0
# On a collection run: the fingerprint of the set's generation states it was requested for.
STATES_TAG = "wan_pipeline/states"
# On a collection run: "partial" (an increment while generations still run) or "final".
COLLECTION_TAG = "wan_pipeline/collection"
# What an increment materializes (with their checks).
PARTIAL_COLLECTION = (generation_results.key, downloaded_videos.key)
# Pending work is observed when a set's states change, and otherwise at most this often while it waits
# (so its age and expected finish stay current without an observation per tick).
OBSERVE_EVERY_S = 60.0
# Tick-log lines about sets and files, at most (the rest is summarised in one line).
MAX_LOG_LINES = 50
PROBLEMS_SHOWN = 5


def auto_submit_enabled() -> bool:
    """Submitting on catalog change spends money, so it is opt-in (WAN_PIPELINE_AUTO_SUBMIT=1)."""
    return os.environ.get("WAN_PIPELINE_AUTO_SUBMIT", "").lower() in {"1", "true", "yes"}


def _file_entries(cursor: str | None) -> dict[str, dict]:
    """The catalog cursor: file name -> {name, sha, problems}. An older cursor (set -> sha) still reads."""
    raw = json.loads(cursor) if cursor else {}
    if "files" in raw and isinstance(raw["files"], dict):
        return raw["files"]
    return {f"{name}": {"name": name, "sha": sha, "problems": None, "legacy": True} for name, sha in raw.items()}


def _previous_sha(entries: dict[str, dict], name: str) -> str | None:
    """The set's file hash at the previous tick, as a data version (an older cursor held the full sha256:
    its first 16 characters are the same, so an upgrade does not look like an edit)."""
    for entry in entries.values():
        if entry.get("name") == name and entry.get("sha"):
            return entry["sha"][:16]
    return None


@dg.sensor(
    target=submit_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition for each new valid prompt-set file and names every file it cannot use, "
    "with the reason; observes each file (data version = its hash) so edits show as Unsynced; reports "
    "files that disappeared (their history is kept). With WAN_PIPELINE_AUTO_SUBMIT=1 it also submits "
    "sets whose file changed.",
)
def prompt_set_sensor(context: dg.SensorEvaluationContext, catalog: CatalogResource) -> dg.SensorResult:
    previous = _file_entries(context.cursor)
    known = set(context.instance.get_dynamic_partitions(prompt_sets.name))
    candidates = prompt_set_files(Path(catalog.catalog_dir)) if Path(catalog.catalog_dir).is_dir() else []
    usable = catalog.files()  # slug names claimed by exactly one file

    entries: dict[str, dict] = {}
    observations: list[dg.AssetObservation] = []
    for path in candidates:
        sha = file_data_version(path)
        old = previous.get(path.name)
        if old and old.get("sha") == sha and old.get("problems") is not None and not old.get("legacy"):
            entry = old  # unchanged since it was validated: no need to read its media again
        else:
            (report,) = validate_paths([path], allowed_roots=catalog.roots())
            entry = {
                "name": path.stem,
                "sha": sha,
                "problems": [str(p) for p in report.problems],
                "generations": report.count,
                "estimated_usd": round(report.estimated_usd, 4),
            }
        if path.stem in usable and usable[path.stem] != path:
            entry = {**entry, "problems": [f"{path.name}: another file also defines prompt set {path.stem!r}"]}
        elif path.stem not in usable and not entry["problems"]:
            entry = {**entry, "problems": [f"{path.name}: prompt set {path.stem!r} is defined by more than one file"]}
        entries[path.name] = entry
        changed = old is None or old.get("sha") != sha or old.get("legacy")
        if changed and path.stem in usable and usable[path.stem] == path and (path.stem in known or not entry["problems"]):
            observations.append(_file_observation(path, entry))

    skipped = [(name, entry) for name, entry in sorted(entries.items()) if entry["problems"]]
    for file_name, entry in skipped[:MAX_LOG_LINES]:
        problems = entry["problems"]
        shown = " | ".join(problems[:PROBLEMS_SHOWN]) + (f" | ... {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else "")
        what = "kept as a partition but invalid" if entry["name"] in known else "skipped"
        context.log.warning(printable(f"{what}: {file_name}: {len(problems)} problem(s): {shown}", 2000))
    if len(skipped) > MAX_LOG_LINES:
        context.log.warning(f"... and {len(skipped) - MAX_LOG_LINES} more unusable file(s)")

    valid = {e["name"]: e for e in entries.values() if not e["problems"] and e["name"] in usable}
    added = sorted(set(valid) - known)
    present = {e["name"] for e in entries.values()}
    for name in sorted(known - present):
        context.log.warning(f"prompt set {name!r} has no file in {catalog.catalog_dir} any more; its history is kept")
    if added:
        context.log.info(f"new prompt set(s): {', '.join(added)}")
    run_requests = []
    if auto_submit_enabled():
        run_requests = [
            dg.RunRequest(partition_key=name, run_key=f"auto-submit-{name}-{entry['sha'][:16]}")
            for name, entry in sorted(valid.items())
            if _previous_sha(previous, name) != entry["sha"]
        ]
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[prompt_sets.build_add_request(added)] if added else [],
        asset_events=observations,
        cursor=json.dumps({"files": entries}, sort_keys=True),
    )


def _file_observation(path: Path, entry: dict) -> dg.AssetObservation:
    problems = entry["problems"]
    return dg.AssetObservation(
        asset_key=prompt_set_file.key,
        partition=entry["name"],
        tags={"dagster/data_version": entry["sha"]},
        metadata={
            "catalog_file": dg.MetadataValue.path(str(path)),
            "valid": not problems,
            "generations": int(entry.get("generations") or 0),
            "estimated_usd": float(entry.get("estimated_usd") or 0.0),
            "problems": dg.MetadataValue.md(
                "\n".join(f"- {printable(p, 500)}" for p in problems) if problems else "none"
            ),
        },
    )


def collection_run_request(prompt_set: str, progress: SetProgress) -> dg.RunRequest:
    """A collection run for the set's current states.

    Once every generation is terminal: the final collection (the whole job, the checks judge
    everything), run key `collect-<set>-<fingerprint>`. While some still run: an increment that
    stores what is finished without waiting (generation_results and downloaded_videos only; the
    experiment table is built by the final run), run key `collect-<set>-<finished>of<total>-<fingerprint>`.
    The fingerprint changes with every state change, so the same states never make two runs.
    """
    tags = {STATES_TAG: progress.fingerprint}
    if progress.ready_to_collect:
        return dg.RunRequest(
            partition_key=prompt_set,
            run_key=f"collect-{prompt_set}-{progress.fingerprint}",
            tags={**tags, COLLECTION_TAG: "final"},
        )
    finished = progress.total - progress.pending
    return dg.RunRequest(
        partition_key=prompt_set,
        run_key=f"collect-{prompt_set}-{finished}of{progress.total}-{progress.fingerprint}",
        run_config={"ops": {"generation_results": {"config": {"wait_deadline_s": 0, "fail_on_pending": False}}}},
        tags={**tags, COLLECTION_TAG: "partial"},
        asset_selection=list(PARTIAL_COLLECTION),
    )


def collection_in_flight(instance: dg.DagsterInstance, prompt_set: str) -> bool:
    """A collection run of the set is queued or running: the next one waits for it (two would
    download the same videos; the deployment's dagster/partition limit also queues them)."""
    runs = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=collect_job.name,
            tags={"dagster/partition": prompt_set},
            statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING,
                      dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.CANCELING],
        ),
        limit=1,
    )
    return bool(runs)


def already_collected(instance: dg.DagsterInstance, prompt_set: str, fingerprint: str) -> bool:
    """A collection run for these exact states exists (from this sensor, `wan-pipeline run` or a
    previous daemon): a fresh cursor must not launch it again."""
    runs = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=collect_job.name,
            tags={STATES_TAG: fingerprint, "dagster/partition": prompt_set},
            statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED,
                      dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED],
        ),
        limit=1,
    )
    return bool(runs)


def _pending_cursor(raw: dict) -> tuple[dict[str, str], dict[str, list]]:
    """(requested: set -> fingerprint, observed: set -> [fingerprint, unix time]); an older cursor
    (set -> fingerprint) still reads."""
    if "requested" in raw or "observed" in raw:
        return dict(raw.get("requested") or {}), dict(raw.get("observed") or {})
    return dict(raw), {}


def _pending_observation(view: PendingView) -> dg.AssetObservation:
    metadata = {k: v for k, v in view.metadata().items() if v is not None}
    if view.expected_finish is not None:
        metadata["expected_finish"] = dg.MetadataValue.timestamp(view.expected_finish)
    return dg.AssetObservation(asset_key=generation_results.key, partition=view.prompt_set, metadata=metadata)


@dg.sensor(
    target=collect_job,
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Polls the generations that are due (adaptive, per generation), writes their states to the "
    "ledger, logs and observes each set's pending work (queued, generating, completed, failed, in doubt, "
    "oldest pending age, expected finish) on generation_results, and requests collection runs for each "
    "prompt set as its generations finish: an increment (run key collect-<set>-<finished>of<total>-<states>) "
    "once finished videos wait uncollected (a batch of 25, or one for 2 s) while others still run, at "
    "most one collection run of a set at a time, and the final collection (collect-<set>-<states>) once "
    "all are terminal.",
)
def generation_completion_sensor(
    context: dg.SensorEvaluationContext, aimlapi: AimlApiResource, ledger: LedgerResource
) -> dg.SensorResult:
    store = ledger.get(aimlapi)
    report = poll_due(store, aimlapi.async_client, limit=TICK_POLL_LIMIT, time_budget_s=TICK_TIME_BUDGET_S)
    if report.polled or report.errors:
        context.log.info(
            f"polled {report.polled} in {report.elapsed_s:.1f} s: {report.completed} completed, "
            f"{report.failed} failed, {report.still_pending} pending, {report.unfinished} left for next tick"
        )
    for error in report.errors[:10]:
        context.log.warning(printable(error, 500))

    requested, observed = _pending_cursor(json.loads(context.cursor) if context.cursor else {})
    run_requests, observations, lines = [], [], 0
    now = datetime.now(UTC)
    for prompt_set in context.instance.get_dynamic_partitions(prompt_sets.name):
        progress = store.progress(prompt_set)
        if progress.total and (progress.pending or progress.uncollected):
            view = pending_view(store, progress, now)
            if lines < MAX_LOG_LINES:
                context.log.info(printable(view.line(now), 500))
            lines += 1
            last_fingerprint, last_time = (observed.get(prompt_set) or [None, 0.0])[:2]
            if last_fingerprint != progress.fingerprint or time.time() - float(last_time) >= OBSERVE_EVERY_S:
                observations.append(_pending_observation(view))
                observed[prompt_set] = [progress.fingerprint, time.time()]
        elif prompt_set in observed and observed[prompt_set][0] != progress.fingerprint and progress.total:
            # The last word on a set that has stopped waiting: nothing pending any more.
            observations.append(_pending_observation(pending_view(store, progress, now)))
            observed[prompt_set] = [progress.fingerprint, time.time()]
        if requested.get(prompt_set) == progress.fingerprint or progress.collection_due(now) is None:
            continue
        if collection_in_flight(context.instance, prompt_set):
            continue  # asked again at the next tick, with the states as they are then
        requested[prompt_set] = progress.fingerprint
        if already_collected(context.instance, prompt_set, progress.fingerprint):
            continue
        run_requests.append(collection_run_request(prompt_set, progress))
    if lines > MAX_LOG_LINES:
        context.log.info(f"... and {lines - MAX_LOG_LINES} more set(s) with pending work")
    return dg.SensorResult(
        run_requests=run_requests,
        asset_events=observations,
        cursor=json.dumps({"requested": requested, "observed": observed}, sort_keys=True),
    )


# Only the free refresh of the catalog runs by itself (its automation condition: eager on a file
# edit or a new set); nothing that spends is in its target, so it can never buy anything.
catalog_automation_sensor = dg.AutomationConditionSensorDefinition(
    "catalog_automation_sensor",
    target=dg.AssetSelection.assets(generation_requests),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Refreshes generation_requests (validation only, costs nothing) when its prompt-set file "
    "changes or a new set appears. Submitting stays manual (or the schedule / opt-in auto-submit).",
)


def evaluate_sensor(
    defs: dg.Definitions, instance: dg.DagsterInstance, name: str, cursor: str | None
) -> dg.SensorResult:
    """One tick of sensor `name` on `instance`, its partition requests and asset events applied as the
    daemon applies them (run requests are left to the caller). For scripts and tests without a daemon."""
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, sensor_name=name, resources=defs.resources
    ) as context:
        result = defs.resolve_sensor_def(name)(context)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events or []:
        instance.report_runless_asset_event(event)
    return result
