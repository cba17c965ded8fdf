"""Which executor runs the jobs' steps: Dagster's default, or Celery workers (opt-in).

`WAN_PIPELINE_EXECUTOR=celery` sends every step of every job (submit_prompt_set, collect_prompt_set
and the asset jobs) to dagster-celery workers. Launcher and workers read the same variables:

    WAN_PIPELINE_CELERY_BROKER   the broker URL (required), e.g. amqp://user:password@rabbitmq:5672//
    WAN_PIPELINE_CELERY_BACKEND  the result backend (default rpc://), e.g. redis://redis:6379/0
    WAN_PIPELINE_CELERY_QUEUE    the queue the steps go to and the workers consume (default "dagster")

A worker is `celery -A wan_pipeline.defs.executors worker -Q "$WAN_PIPELINE_CELERY_QUEUE"`: the `app`
attribute below is built from those variables (the broker's password never lands in a file or in
run config: the executor resolves it from the environment, and every message here masks it).
A step on a worker sees only the worker's environment, so the worker refuses to start without a
shared ledger, an explicit output root and the API key (`check_worker_environment`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import dagster as dg

from wan_pipeline.settings import SettingsError

EXECUTOR_ENV = "WAN_PIPELINE_EXECUTOR"
BROKER_ENV = "WAN_PIPELINE_CELERY_BROKER"
BACKEND_ENV = "WAN_PIPELINE_CELERY_BACKEND"
QUEUE_ENV = "WAN_PIPELINE_CELERY_QUEUE"
DEFAULT_QUEUE = "dagster"  # dagster-celery's own default
DEFAULT_BACKEND = "rpc://"
DEFAULT_EXECUTORS = {"", "default", "multiprocess"}
# What a step reads from the environment of the process that runs it (see `build_definitions`).
WORKER_REQUIRED_ENV = ("AIMLAPI_API_KEY", "WAN_PIPELINE_LEDGER_URL", "WAN_PIPELINE_OUTPUT", "WAN_PIPELINE_CATALOG_DIR")


def mask_url(url: str) -> str:
    """The URL with its password replaced by `**` (kombu's own sanitizer, as Celery's banner does)."""
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url, mask="**")


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def executor_kind(environ: Mapping[str, str] | None = None) -> str:
    kind = (_env(environ).get(EXECUTOR_ENV) or "").strip().lower()
    if kind in DEFAULT_EXECUTORS:
        return "default"
    if kind != "celery":
        raise SettingsError(f"{EXECUTOR_ENV}={kind!r}: expected celery, or unset for Dagster's default executor")
    return kind


def uses_celery(environ: Mapping[str, str] | None = None) -> bool:
    return executor_kind(environ) == "celery"


def celery_queue(environ: Mapping[str, str] | None = None) -> str:
    return (_env(environ).get(QUEUE_ENV) or "").strip() or DEFAULT_QUEUE


def celery_executor_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The executor's config: the URLs as environment references (resolved when a run starts, so
    they are never stored in a job snapshot or run config), the queue as a value."""
    env = _env(environ)
    if not env.get(BROKER_ENV):
        raise SettingsError(f"{EXECUTOR_ENV}=celery needs {BROKER_ENV} (e.g. amqp://guest:guest@127.0.0.1:5672//)")
    return {
        "broker": {"env": BROKER_ENV},
        "backend": {"env": BACKEND_ENV} if env.get(BACKEND_ENV) else DEFAULT_BACKEND,
        "config_source": {"task_default_queue": celery_queue(env)},
    }


def describe(environ: Mapping[str, str] | None = None) -> str:
    """One line for logs: where steps run (passwords masked)."""
    env = _env(environ)
    if not uses_celery(env):
        return "steps run on Dagster's default executor (in the run's process or its subprocesses)"
    return (
        f"steps run on celery workers: broker {mask_url(env.get(BROKER_ENV, ''))}, "
        f"results {mask_url(env.get(BACKEND_ENV) or DEFAULT_BACKEND)}, queue {celery_queue(env)}"
    )


def _require_shared_instance(instance: dg.DagsterInstance) -> None:
    """A worker writes its step's events into the instance it is handed: a SQLite instance lives in
    the launcher's DAGSTER_HOME, which no worker on another machine can reach."""
    storage = type(instance.run_storage).__name__
    if "Sqlite" in storage or instance.is_ephemeral:
        raise dg.DagsterInvariantViolationError(
            f"The celery executor needs a shared Dagster instance (PostgreSQL: deploy/dagster.yaml); this run's "
            f"instance keeps its runs in {storage} under {instance.root_directory}, out of the workers' reach."
        )


def _celery_executor() -> dg.ExecutorDefinition:
    from dagster_celery import celery_executor

    @dg.executor(
        name="celery",
        config_schema=celery_executor.config_schema,
        requirements=dg.multiple_process_executor_requirements(),
    )
    def wan_celery_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
        """dagster-celery's executor, refusing an instance its workers cannot share."""
        _require_shared_instance(init_context.instance)
        return celery_executor.executor_creation_fn(init_context)

    return wan_celery_executor


def job_executor(environ: Mapping[str, str] | None = None) -> dg.ExecutorDefinition | None:
    """The executor for every job of the Definitions; None keeps Dagster's default."""
    env = _env(environ)
    if not uses_celery(env):
        return None
    return _celery_executor().configured(celery_executor_config(env), name="celery")


def check_worker_environment(environ: Mapping[str, str] | None = None) -> None:
    """What a celery worker must have of its own: steps never see the launcher's environment.

    The ledger must be shared (a SQLite file per machine would let two workers buy the same request),
    the output root and the catalog absolute (a relative path would follow each worker's working
    directory; the catalog's images are read again by the submission step, wherever it runs).
    """
    env = _env(environ)
    missing = [name for name in WORKER_REQUIRED_ENV if not env.get(name)]
    if missing:
        raise SettingsError(f"a celery worker needs {', '.join(missing)} in its own environment")
    ledger_url = env["WAN_PIPELINE_LEDGER_URL"]
    if ledger_url.startswith("sqlite"):
        raise SettingsError("a celery worker needs a shared ledger (WAN_PIPELINE_LEDGER_URL=postgresql://...), not SQLite")
    for name in ("WAN_PIPELINE_OUTPUT", "WAN_PIPELINE_CATALOG_DIR"):
        value = env[name]
        if "://" not in value and not PurePosixPath(value).is_absolute():
            raise SettingsError(f"a celery worker needs an absolute {name} (or a URL), not {value!r}")


def build_worker_app(environ: Mapping[str, str] | None = None) -> Any:
    """The Celery app a worker runs: dagster-celery's step task, on the broker and queue of the env."""
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    env = _env(environ)
    check_worker_environment(env)
    if not env.get(BROKER_ENV):
        raise SettingsError(f"a celery worker needs {BROKER_ENV}")
    executor = CeleryExecutor.for_cli(
        broker=env[BROKER_ENV],
        backend=env.get(BACKEND_ENV) or DEFAULT_BACKEND,
        # Loaded before the pool forks: a broken setting stops the worker at start, not at its first step.
        include=["wan_pipeline.definitions"],
        config_source={"task_default_queue": celery_queue(env)},
    )
    app = make_app(executor.app_args())
    create_task(app)
    return app


_worker_app: Any = None


def __getattr__(name: str) -> Any:
    # `celery -A wan_pipeline.defs.executors` reads `app`: built on first access, so importing this
    # module (as definitions.py does) neither needs the worker's variables nor creates a Celery app.
    global _worker_app
    if name == "app":
        if _worker_app is None:
            _worker_app = build_worker_app()
        return _worker_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
