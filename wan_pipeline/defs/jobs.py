import dagster as dg

from .assets import downloaded_videos, generation_requests, generation_results, submitted_generations

# What spends money (the schedule and opt-in auto-submit target this) ...
submit_job = dg.define_asset_job(
    "submit_prompt_set",
    selection=dg.AssetSelection.assets(generation_requests, submitted_generations),
    description="Validate a prompt set and create the generations the ledger has not bought yet.",
)
# ... and what only collects what was bought (the completion sensor targets this).
collect_job = dg.define_asset_job(
    "collect_prompt_set",
    # The experiment table reads only the ledger and the sidecars: no API call, so it rides along.
    selection=dg.AssetSelection.assets(generation_results, downloaded_videos, "experiment_table"),
    description="Record final results and download finished videos (runs the asset checks).",
)
