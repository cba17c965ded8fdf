"""The one Definitions object that `workspace.yaml` loads."""

from __future__ import annotations

import dagster as dg

from wan_pipeline.defs.assets import (
    downloaded_videos,
    generation_requests,
    generation_results,
    prompt_set_file,
    submitted_generations,
)
from wan_pipeline.defs.checks import no_failed_generations, videos_match_requests
from wan_pipeline.defs.executors import job_executor
from wan_pipeline.defs.experiments import experiment_table
from wan_pipeline.defs.io import ParquetIOManager
from wan_pipeline.defs.jobs import collect_job, submit_job
from wan_pipeline.defs.quality_checks import videos_pass_quality_checks
from wan_pipeline.defs.resources import AimlApiResource, CatalogResource, LedgerResource, VideoStoreResource
from wan_pipeline.defs.schedules import production_schedule
from wan_pipeline.defs.sensors import (
    catalog_automation_sensor,
    generation_completion_sensor,
    prompt_set_sensor,
)
from wan_pipeline.settings import Settings, env_number, load_settings


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or load_settings()
    return dg.Definitions(
        assets=[
            prompt_set_file,
            generation_requests,
            submitted_generations,
            generation_results,
            downloaded_videos,
            experiment_table,
        ],
        asset_checks=[videos_match_requests, no_failed_generations, videos_pass_quality_checks],
        jobs=[submit_job, collect_job],
        sensors=[prompt_set_sensor, generation_completion_sensor, catalog_automation_sensor],
        schedules=[production_schedule],
        # Dagster's default, or dagster-celery workers with WAN_PIPELINE_EXECUTOR=celery (defs/executors.py).
        executor=job_executor(),
        resources={
            # The key is resolved from the environment at run time and never stored in config.
            "aimlapi": AimlApiResource(
                api_key=dg.EnvVar("AIMLAPI_API_KEY"),
                base_url=settings.base_url,
                max_concurrency=env_number("WAN_PIPELINE_API_CONCURRENCY", int, minimum=1, default=8),
                expected_seconds=env_number("WAN_PIPELINE_EXPECTED_SECONDS", float, minimum=0),
            ),
            "ledger": LedgerResource(url=settings.ledger_url),
            "video_store": VideoStoreResource(root=settings.output_root),
            "catalog": CatalogResource(
                catalog_dir=str(settings.catalog_dir), allowed_roots=[str(p) for p in settings.allowed_roots]
            ),
            "parquet_io_manager": ParquetIOManager(base_dir=f"{settings.output_root.rstrip('/')}/_assets"),
        },
    )


defs = build_definitions()
