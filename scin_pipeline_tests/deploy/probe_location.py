"""A second, tiny code location served beside ``scin_pipeline`` in the deployment test.

The project's schedule (``weekly_full_pipeline``) ticks once a week, so no test can wait for it; this
location's every-minute schedule is what proves that the daemon evaluates schedule ticks against the
Postgres instance and launches their runs through the queue. Its job does no real work, so the tick's
run costs only the run worker's start-up.
"""

from __future__ import annotations

from dagster import Definitions, ScheduleDefinition, job, op

PROBE_LOCATION = "deploy_probe"
PROBE_SCHEDULE = "deploy_probe_every_minute"


@op
def probe_heartbeat(context) -> int:
    context.log.info("deploy probe: scheduled run executed")
    return 1


@job(description="Trivial job for the deployment test's every-minute schedule.")
def deploy_probe_job():
    probe_heartbeat()


deploy_probe_every_minute = ScheduleDefinition(
    name=PROBE_SCHEDULE, job=deploy_probe_job, cron_schedule="* * * * *", execution_timezone="UTC"
)

defs = Definitions(jobs=[deploy_probe_job], schedules=[deploy_probe_every_minute])
