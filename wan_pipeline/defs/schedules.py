import os

import dagster as dg

from .jobs import submit_job
from .partitions import prompt_sets

DEFAULT_CRON = "0 6 * * *"


@dg.schedule(
    cron_schedule=os.environ.get("WAN_PIPELINE_SCHEDULE_CRON") or DEFAULT_CRON,
    target=submit_job,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Production runs: submit every prompt set. Unchanged sets cost nothing (request keys are reused).",
)
def production_schedule(context: dg.ScheduleEvaluationContext):
    # build_schedule_from_partitioned_job rejects dynamic partitions: one RunRequest per prompt set.
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    for prompt_set in context.instance.get_dynamic_partitions(prompt_sets.name):
        yield dg.RunRequest(partition_key=prompt_set, run_key=f"{prompt_set}-{tick}")
