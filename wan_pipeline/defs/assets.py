"""The assets of a prompt set: its file (a source) -> catalog -> submissions -> results -> videos."""


import base64
import hashlib
from collections.abc import Iterator

import dagster as dg
import pandas as pd

from wan_pipeline.catalog import CatalogError, requests_from_dataframe
from wan_pipeline.collection import collect_videos
from wan_pipeline.ledger import PENDING, Ledger, LedgerRow, State
from wan_pipeline.ledger.reports import spend
from wan_pipeline.media import contact_sheet
from wan_pipeline.polling import wait_until_terminal
from wan_pipeline.previews import preview_images
from wan_pipeline.safe_text import printable
from wan_pipeline.settings import SettingsError, env_number
from wan_pipeline.storage import file_sha256, write_atomically
from wan_pipeline.submission import BudgetExceeded, SubmissionPlan, plan_submission, submit_prompt_set

from .partitions import prompt_sets
from .resources import AimlApiResource, CatalogResource, LedgerResource, VideoStoreResource

# What every asset of a prompt set shares: its partitioning, owner, storage and code version.
PROMPT_SET_ASSET = {
    "partitions_def": prompt_sets,
    "owners": ["team:video-platform"],
    "io_manager_key": "parquet_io_manager",
    "code_version": "1",
}
PREVIEW_ROWS = 20
PROMPT_SHOWN = 60  # characters of a prompt in tables and contact-sheet labels
# The per-run budget of a submission launched from the UI or the schedule, unless its run config
# raises it (`max_usd`): what a run would newly buy is refused above it, before any create.
DEFAULT_MAX_USD = 20.0
MAX_USD_ENV = "WAN_PIPELINE_MAX_USD"
# Run tags: what a submission run bought and what a collection run collected (the runs list shows them).
TAG_PREFIX = "wan_pipeline/"
# The contact sheet travels in the event log as a picture: it shows the first videos of a large set.
CONTACT_SHEET_VIDEOS = 100


def request_keys_version(keys: pd.Series) -> str:
    """Data version of a catalog: the hash of its sorted request keys (prompt edits change it)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def short_prompt(prompt: object, limit: int = PROMPT_SHOWN) -> str:
    """A prompt as tables and labels show it: one escaped line, shortened with an ellipsis."""
    return printable(prompt if isinstance(prompt, str) else "", limit)


def file_data_version(path) -> str:
    """Data version of a prompt-set file: its content hash (an edit marks everything downstream stale)."""
    return file_sha256(path)[1][:16]


def default_max_usd() -> float:
    try:
        return float(env_number(MAX_USD_ENV, float, minimum=0, default=DEFAULT_MAX_USD))
    except SettingsError as exc:
        raise dg.Failure(description=f"{exc}; nothing was submitted") from None


def tag_run(context: dg.AssetExecutionContext, tags: dict[str, object]) -> None:
    """Add `wan_pipeline/*` tags to this run (tags are set at launch; what a run bought is known later)."""
    context.instance.add_run_tags(context.run.run_id, {f"{TAG_PREFIX}{k}": str(v) for k, v in tags.items()})


def set_spend_metadata(store: Ledger, prompt_set: str, keys: list[str]) -> dict:
    """Spend to date of a set, from the attempts table: bought by this set, in this API scope."""
    bought = spend(a for a in store.attempts(request_keys=keys) if a.prompt_set == prompt_set)
    return {
        "set_usd_to_date": round(bought.usd_spent, 4),
        "set_purchases_to_date": bought.purchases,
        "set_in_doubt_usd_estimate": round(bought.in_doubt_estimate_usd, 4),
    }


@dg.observable_source_asset(
    partitions_def=prompt_sets,
    group_name="catalog",
    tags={"dagster/kind/yaml": "", "dagster/kind/csv": ""},
    description="A prompt-set file in the catalog folder. Its data version is the file's hash: "
    "`prompt_set_sensor` observes it on every change (with the file's problems, if any), so an edit "
    "marks `generation_requests` and everything downstream Unsynced by itself.",
)
def prompt_set_file(context, catalog: CatalogResource) -> dg.DataVersionsByPartition:
    files = catalog.files()
    known = context.instance.get_dynamic_partitions(prompt_sets.name)
    return dg.DataVersionsByPartition({name: file_data_version(files[name]) for name in known if name in files})


def _markdown_table(df: pd.DataFrame) -> dg.MetadataValue:
    return dg.MetadataValue.md(df.head(PREVIEW_ROWS).to_markdown(index=False) if len(df) else "_(empty)_")


def _table_schema(df: pd.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=str(c), type=str(t)) for c, t in df.dtypes.items()])


def pending_in(results: pd.DataFrame) -> int:
    """Generations of a results frame still being submitted or running: non-zero for an increment
    (a collection while others still run), zero for the final collection."""
    return int(results["state"].isin([str(s) for s in PENDING]).sum())


def _rows_frame(rows: list[LedgerRow]) -> pd.DataFrame:
    def processing_s(row: LedgerRow) -> float | None:
        if row.completed_at and row.submitted_at:
            return (row.completed_at - row.submitted_at).total_seconds()
        return None

    return pd.DataFrame(
        {
            "request_key": [r.request_key for r in rows],
            "prompt": [str((r.request_json or {}).get("prompt") or "") for r in rows],
            "state": [str(r.state) for r in rows],
            "generation_id": [r.generation_id for r in rows],
            "raw_status": [r.raw_status for r in rows],
            "attempts": [r.attempts for r in rows],
            "submitted_at": pd.to_datetime([r.submitted_at for r in rows], utc=True),
            "completed_at": pd.to_datetime([r.completed_at for r in rows], utc=True),
            "processing_s": pd.array([processing_s(r) for r in rows], dtype="Float64"),
            "video_url": [r.video_url for r in rows],
            "error": [r.error for r in rows],
            "credits_used": pd.array([r.credits_used for r in rows], dtype="Float64"),
            "usd_spent": pd.array([r.usd_spent for r in rows], dtype="Float64"),
        }
    )


@dg.asset(
    **PROMPT_SET_ASSET,
    group_name="catalog",
    kinds={"yaml", "pandas"},
    deps=[prompt_set_file],
    # Refreshing the catalog costs nothing, so it follows its file by itself; nothing that spends does.
    automation_condition=dg.AutomationCondition.eager(),
)
def generation_requests(context: dg.AssetExecutionContext, catalog: CatalogResource) -> dg.Output[pd.DataFrame]:
    """The validated, expanded catalog of one prompt set: one row per generation, keyed by request_key.

    Nothing downstream runs when the catalog is invalid: every problem is listed in the failure.
    """
    try:
        prompt_set = catalog.load(context.partition_key)
    except CatalogError as exc:
        raise dg.Failure(
            description=f"Prompt set {context.partition_key!r} is invalid ({len(exc.problems)} problem(s)); nothing "
            f"was submitted: fix its file (`wan-pipeline validate` lists the problems) and run it again.\n{exc}",
            metadata={"problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in exc.problems))},
        ) from None
    frame = prompt_set.to_dataframe()
    return dg.Output(
        frame,
        data_version=dg.DataVersion(request_keys_version(frame["request_key"])),
        metadata={
            "catalog_file": dg.MetadataValue.path(str(prompt_set.path)),
            "catalog_sha256": prompt_set.file_sha256,
            "dagster/row_count": len(frame),
            "estimated_usd": round(prompt_set.estimated_usd, 4),
            "preview": _markdown_table(frame.drop(columns=["image_url", "audio_url"], errors="ignore")),
            "dagster/column_schema": _table_schema(frame),
        },
    )


class SubmissionConfig(dg.Config):
    dry_run: bool = False
    """Show what would be bought, reused and left alone, and its cost; write nothing, buy nothing."""
    max_usd: float | None = None
    """Refuse to start when the estimate of what this run would newly buy exceeds it. Unset: the per-run
    budget WAN_PIPELINE_MAX_USD (default $20); set it here to raise (or lower) that budget for this run."""
    resubmit_in_doubt: list[str] = []
    """Buy again in-doubt generations (they may already be paid for): "all", this set's name, or request keys."""
    retry_failed: bool = False
    """Resubmit generations the provider reported as failed."""


def _plan_metadata(plan: SubmissionPlan) -> dict:
    return {
        "would_buy": len(plan.to_submit),
        "would_spend_usd": round(plan.estimated_usd, 4),
        "would_reuse": len(plan.reused),
        "in_doubt_left_alone": len(plan.in_doubt),
        "plan": _markdown_table(
            pd.DataFrame(
                {
                    "request_key": [item.request.request_key for item in plan.to_submit],
                    "why": [str(item.reason) for item in plan.to_submit],
                    "estimated_usd": [item.request.estimated_usd for item in plan.to_submit],
                }
            )
        ),
    }


@dg.asset(**PROMPT_SET_ASSET, group_name="generation", kinds={"api"}, pool="aimlapi", output_required=False)
def submitted_generations(
    context: dg.AssetExecutionContext,
    config: SubmissionConfig,
    generation_requests: pd.DataFrame,
    aimlapi: AimlApiResource,
    ledger: LedgerResource,
    catalog: CatalogResource,
) -> Iterator[dg.Output[pd.DataFrame]]:
    """Creates the generations this API has not bought yet (write-ahead, every try recorded), and
    reuses the rest.

    A dry run writes nothing and materializes nothing: the plan is logged and recorded as an
    observation. When the API answers 401 or 403 midway, what was bought before is stored (so it is
    collected) and then the step fails, saying how many were bought and what stopped it.
    """
    requests = requests_from_dataframe(generation_requests)
    store = ledger.get(aimlapi)
    if config.dry_run:
        plan = plan_submission(
            store, context.partition_key, requests, resubmit_in_doubt=config.resubmit_in_doubt,
            retry_failed=config.retry_failed, dry_run=True,
        )
        context.log.info(f"dry run, nothing bought: {plan.describe()}")
        tag_run(context, {"dry_run": "true", "would_buy": len(plan.to_submit), "would_spend_usd": f"{plan.estimated_usd:.4f}"})
        context.log_event(
            dg.AssetObservation(
                asset_key=context.asset_key, partition=context.partition_key,
                metadata={"dry_run": True, **_plan_metadata(plan)},
            )
        )
        return
    max_usd = config.max_usd if config.max_usd is not None else default_max_usd()
    budget_source = "run config max_usd" if config.max_usd is not None else f"{MAX_USD_ENV} per-run budget"
    try:
        report = submit_prompt_set(
            store,
            aimlapi.async_client,
            context.partition_key,
            requests,
            max_concurrency=aimlapi.max_concurrency,
            max_usd=max_usd,
            resubmit_in_doubt=config.resubmit_in_doubt,
            retry_failed=config.retry_failed,
            run_id=context.run.run_id,
            allowed_roots=catalog.roots(),
        )
    except BudgetExceeded as exc:
        tag_run(context, {"bought": 0, "usd": "0.0000", "refused": "over budget"})
        raise dg.Failure(
            description=f"Refused by the {budget_source} (${max_usd:.2f}): {exc}. To buy it, launch again with "
            f"run config ops.submitted_generations.config.max_usd set to at least the estimate.",
            allow_retries=False,
        ) from None
    finally:
        # What this run bought, from the attempts table: exact even when the step failed midway.
        bought = spend(store.attempts(run_id=context.run.run_id))
        tag_run(context, {"bought": bought.purchases, "usd": f"{bought.usd_spent:.4f}", "in_doubt": bought.in_doubt})
    keys = [r.request_key for r in requests]
    rows = store.rows_for_keys(keys)
    frame = _rows_frame(rows)
    metadata = {
        "budget_usd": round(max_usd, 4),
        **set_spend_metadata(store, context.partition_key, keys),
        "api_scope": store.scope,
        "new": report.new,
        "reused": report.reused,
        "in_doubt": len(report.in_doubt),
        "rejected": len(report.rejected),
        "not_submitted": len(report.failed_to_submit),
        "credits_used": float(report.credits_used or 0),
        "usd_spent": round(float(report.usd_spent or 0), 4),
        "dagster/row_count": len(frame),
    }
    if report.rejected:
        metadata["rejections"] = dg.MetadataValue.md("\n".join(f"- `{k}`: {m}" for k, m in report.rejected))
    if report.failed_to_submit:
        metadata["not_submitted_why"] = dg.MetadataValue.md(
            "\n".join(f"- `{k}`: {m}" for k, m in report.failed_to_submit[:PREVIEW_ROWS])
        )
    if report.rate_limited_429s:
        metadata["rate_limited_429s"] = report.rate_limited_429s
    # The provider's quota stopped creating: when it accepts creates again (UTC), for the UI and the runner.
    until = report.rate_limited_until.strftime("%Y-%m-%d %H:%M:%S UTC") if report.rate_limited_until else (
        "an unknown time (the provider sent no Retry-After)" if report.rate_limited else None)
    if until:
        metadata["rate_limited_until"] = until
    context.log.info(
        f"{context.partition_key} on {store.scope}: {report.new} new, {report.reused} reused, "
        f"{len(report.in_doubt)} in doubt, {len(report.rejected)} rejected, ${float(report.usd_spent or 0):.4f} spent"
        + (f"; creating stopped by the provider's rate limit until {until}, "
           f"{len(report.failed_to_submit)} left planned" if until else "")
    )
    yield dg.Output(frame, metadata=metadata)
    if report.stopped_by:
        what = "the API rejected the key (401): check AIMLAPI_API_KEY" if report.auth_failed else (
            "the API is out of credits (403)" if report.out_of_credits else report.stopped_by)
        left = f"{len(report.failed_to_submit)} not sent and not charged."
        if until:
            what = f"the provider's rate limit (429) refuses creates until {until}"
            left = (f"{len(report.failed_to_submit)} left planned (a 429 creates nothing: not charged, not in doubt): the next "
                    "run or schedule tick after that time continues with them.")
        raise dg.Failure(
            description=f"Submission stopped: {what}. Bought {report.new} generation(s) for "
            f"${report.usd_spent:.4f} before it (stored, and collected like any other); {left}",
            metadata={"stops_submission": True, "new": report.new, "usd_spent": round(report.usd_spent, 4),
                      **({"rate_limited_until": until} if until else {})},
            allow_retries=False if until else None,
        )


class ResultsConfig(dg.Config):
    wait_deadline_s: float = 1800.0
    """How long an ad-hoc run waits for generations still pending at the provider."""
    fail_on_pending: bool = True
    """Fail when generations are still pending after the wait. The completion sensor turns this off
    (and the wait) to collect a set's finished videos while a straggler is still running."""


@dg.asset(**PROMPT_SET_ASSET, group_name="generation", kinds={"api"})
def generation_results(
    context: dg.AssetExecutionContext,
    config: ResultsConfig,
    submitted_generations: pd.DataFrame,
    aimlapi: AimlApiResource,
    ledger: LedgerResource,
) -> dg.Output[pd.DataFrame]:
    """The final state of every generation of the set. Waits (adaptive polling) for pending ones.

    Failed generations do not fail the asset: they are counted and listed.
    """
    store = ledger.get(aimlapi)
    keys = list(submitted_generations["request_key"])
    still_pending = wait_until_terminal(
        store,
        aimlapi.async_client,
        keys,
        deadline_s=config.wait_deadline_s,
        on_progress=lambda report, pending: context.log.info(
            f"polled {report.polled}: {report.completed} completed, {report.failed} failed, {pending} pending"
        ),
    )
    listing = ", ".join(f"{r.request_key} ({r.generation_id}, {r.raw_status})" for r in still_pending[:20])
    if still_pending and config.fail_on_pending:
        raise dg.Failure(
            description=f"{len(still_pending)} generation(s) still pending after {config.wait_deadline_s:.0f} s: {listing}",
            metadata={"pending": len(still_pending)},
        )
    rows = store.rows_for_keys(keys)
    frame = _rows_frame(rows)
    failed = frame[frame["state"].isin([str(State.FAILED), str(State.REJECTED)])]
    counts = frame["state"].value_counts().to_dict()
    metadata = {
        "completed": int(counts.get(str(State.COMPLETED), 0)),
        "failed": len(failed),
        "in_doubt": int(counts.get(str(State.IN_DOUBT), 0)),
        "not_submitted": int(counts.get(str(State.PLANNED), 0)),
        "still_pending": len(still_pending),
        # An increment reports what is finished so far; the final collection judges everything.
        "collection": "partial" if pending_in(frame) else "final",
        "usd_spent": round(float(frame["usd_spent"].fillna(0).sum()), 4),
        "median_processing_s": float(frame["processing_s"].median()) if frame["processing_s"].notna().any() else 0.0,
        "dagster/row_count": len(frame),
        "results": _markdown_table(
            frame.assign(prompt=frame["prompt"].map(short_prompt))[
                ["request_key", "prompt", "state", "raw_status", "processing_s", "usd_spent", "error"]
            ]
        ),
        **set_spend_metadata(store, context.partition_key, keys),
    }
    tag_run(context, {"completed": metadata["completed"], "failed": len(failed), "still_pending": len(still_pending)})
    if len(failed):
        metadata["failures"] = dg.MetadataValue.md(
            "\n".join(f"- `{r.request_key}`: {printable(r.error)}" for r in failed.itertuples())
        )
    return dg.Output(frame, metadata=metadata)


@dg.asset(**PROMPT_SET_ASSET, group_name="generation", kinds={"video"})
def downloaded_videos(
    context: dg.AssetExecutionContext,
    generation_requests: pd.DataFrame,
    generation_results: pd.DataFrame,
    aimlapi: AimlApiResource,
    ledger: LedgerResource,
    video_store: VideoStoreResource,
) -> dg.Output[pd.DataFrame]:
    """Every completed video at `<output>/<set>/<request_key>.mp4` with a `.json` provenance sidecar.

    While some generations still run (an increment), it stores what is finished so far and says how
    many are pending (and goes on with those that complete meanwhile, until a pass finds none). A file
    already stored and unchanged since it was hashed (its stamp) is not read again."""
    requests = requests_from_dataframe(generation_requests)
    store = video_store.get()
    pending = pending_in(generation_results)
    report = collect_videos(ledger.get(aimlapi), aimlapi.async_client, store, requests, follow=pending > 0)
    by_key = {r.request_key: r for r in requests}
    frame = pd.DataFrame(
        {
            "request_key": [v.request_key for v in report.videos],
            "path": [v.path for v in report.videos],
            "sha256": [v.sha256 for v in report.videos],
            "bytes": [v.size_bytes for v in report.videos],
            "width": [v.probe.get("width") for v in report.videos],
            "height": [v.probe.get("height") for v in report.videos],
            "duration_s": [v.probe.get("duration_s") for v in report.videos],
            "has_audio": [v.probe.get("has_audio") for v in report.videos],
            "stored_how": [v.how for v in report.videos],
            # Measured once per stored video (wan_pipeline.quality), as its sidecar records them.
            "quality_passed": [(v.quality or {}).get("passed") for v in report.videos],
            "first_frame_ssim": [(v.quality or {}).get("first_frame_ssim") for v in report.videos],
            "motion": [(v.quality or {}).get("motion") for v in report.videos],
        }
    )
    metadata: dict = {
        "videos": len(report.videos),
        "collection": "partial" if pending else "final",
        "still_pending": pending,
        "downloaded": report.count("downloaded"),
        "copied_from_other_sets": report.count("copied"),
        "already_verified": report.count("kept"),
        "temporaries_swept": len(report.swept),
        "bytes_downloaded": report.bytes_downloaded,
        "refreshed_urls": report.refreshed_urls,
        "seconds_of_video": float(frame["duration_s"].sum()) if len(frame) else 0.0,
        "output_folder": dg.MetadataValue.path(str(store.set_dir(context.partition_key))),
        "dagster/row_count": len(frame),
        "quality_failing": sum((v.quality or {}).get("passed") is False for v in report.videos),
    }
    if report.videos:
        metadata["quality_summary"] = dg.MetadataValue.md(
            frame[["request_key", "quality_passed", "first_frame_ssim", "motion"]].head(PREVIEW_ROWS).to_markdown(index=False)
        )
    if report.videos and pending:
        # An increment stores files as fast as it can; the sheet (seconds of decoding and PNG
        # encoding per run) is drawn by the final collection.
        metadata["contact_sheet"] = dg.MetadataValue.md("drawn by the final collection")
    elif report.videos:
        shown = report.videos[:CONTACT_SHEET_VIDEOS]
        labels = [
            f"{v.request_key[:8]} seed {by_key[v.request_key].request.seed} "
            f"{by_key[v.request_key].request.resolution} {by_key[v.request_key].request.duration}s "
            f"{short_prompt(by_key[v.request_key].request.prompt, 40)}"
            for v in shown
        ]
        frames = preview_images(store, [(v.sha256, v.path) for v in shown])
        sheet = contact_sheet(list(zip(frames, labels, strict=True)), tile_width=240)
        sheet_path = write_atomically(store.set_dir(context.partition_key) / "contact_sheet.png", sheet)
        caption = "" if len(shown) == len(report.videos) else f"\n\nFirst {len(shown)} of {len(report.videos)} videos."
        metadata["contact_sheet"] = dg.MetadataValue.md(
            f"![contact sheet](data:image/png;base64,{base64.b64encode(sheet).decode()}){caption}"
        )
        metadata["contact_sheet_path"] = dg.MetadataValue.path(str(sheet_path))
    tag_run(context, {"collected": len(report.videos), "downloaded": report.count("downloaded")})
    if report.failures:
        listing = "\n".join(f"- `{k}`: {m}" for k, m in report.failures)
        raise dg.Failure(
            description=f"{len(report.failures)} download(s) failed; verified videos are kept:\n{listing}",
            metadata=metadata,
        )
    return dg.Output(frame, metadata=metadata)

