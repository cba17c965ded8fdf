"""`wan-pipeline`: validate, status, run, reproduce, demo, dev and the local emulator.

Imports are local to each command so that `validate` and `status` start fast and never load Dagster.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from wan_pipeline.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from wan_pipeline.ledger import Ledger

PROJECT_DIR = Path.cwd()
# The emulator accepts any Bearer key; this one says what it is if it ever shows up somewhere.
EMULATOR_KEY = "local-emulator-key"
DEMO_LATENCY_S = 3.0
DEMO_DIR = Path("data/demo")


def open_ledger(settings: Settings) -> Ledger:
    """The ledger as seen from the API these settings buy from."""
    from wan_pipeline.ledger import Ledger
    from wan_pipeline.scopes import scope_in_use

    return Ledger(settings.ledger_url, scope=scope_in_use(settings))


def cmd_validate(args: argparse.Namespace) -> int:
    from wan_pipeline.catalog import format_reports, validate_paths
    from wan_pipeline.submission import plan_submission

    settings = load_settings()
    targets = [Path(p) for p in args.paths] or [settings.catalog_dir]
    reports = validate_paths(targets, allowed_roots=settings.allowed_roots)
    print(format_reports(reports))
    valid = [report for report in reports if report.ok]
    if valid:
        # What running them now would newly buy, against what the ledger already holds (read only).
        ledger = open_ledger(settings)
        print(f"against the ledger ({ledger.scope}):")
        for report in valid:
            plan = plan_submission(ledger, report.name, report.prompt_set.requests, dry_run=True)
            print(
                f"  {report.name}: would newly buy {len(plan.to_submit)} of {report.count} "
                f"(est. ${plan.estimated_usd:.4f} of ${report.estimated_usd:.4f}); {len(plan.reused)} already bought"
            )
    return 0 if reports and all(report.ok for report in reports) else 1


def cmd_status(args: argparse.Namespace) -> int:
    from wan_pipeline.ledger.reports import format_status

    print(format_status(open_ledger(load_settings()), args.prompt_sets or None))
    return 0


def cmd_ledger_upgrade(args: argparse.Namespace) -> int:
    from wan_pipeline.ledger import HEAD_REVISION, upgrade
    from wan_pipeline.ledger.database import create_engine, shown_url

    settings = load_settings()
    engine = create_engine(settings.ledger_url, None)
    before, after = upgrade(engine, shown=shown_url(settings.ledger_url))
    engine.dispose()
    if before == after:
        print(f"The ledger at {shown_url(settings.ledger_url)} is at the newest schema ({HEAD_REVISION}).")
    else:
        print(f"Upgraded the ledger at {shown_url(settings.ledger_url)} from {before or 'no revision'} to {after}.")
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from wan_pipeline.emulator import config_from_args, serve

    serve(config_from_args(args), args.host, args.port)
    return 0


@contextlib.contextmanager
def api_environment(
    *, latency_s: float | None = None, force_emulator: bool = False, steps_elsewhere: bool = False
) -> Iterator[str]:
    """Point the pipeline at the real API when a key is set, else at an embedded emulator.

    Yields a one-line description of the API in use (never the key). `steps_elsewhere`: steps run in
    processes that see only their own environment (celery workers), so neither the embedded emulator
    (on this process's loopback, for its lifetime) nor the variables set here would reach them.
    """
    settings = load_settings()
    if steps_elsewhere and (settings.api_key is None or not settings.base_url_explicit):
        raise SettingsError(
            "WAN_PIPELINE_EXECUTOR=celery runs steps on workers that see only their own environment: set "
            "AIMLAPI_BASE_URL and AIMLAPI_API_KEY here and on every worker (for a shared emulator, "
            "`wan-pipeline emulator`); an embedded emulator would exist only in this process"
        )
    if not force_emulator and (settings.api_key is not None or settings.base_url_explicit):
        if settings.api_key is None:
            os.environ["AIMLAPI_API_KEY"] = EMULATOR_KEY
        yield f"API: {settings.base_url}"
        return
    from wan_pipeline.emulator import EmulatorConfig, running_emulator

    latency = DEMO_LATENCY_S if latency_s is None else latency_s
    with running_emulator(EmulatorConfig(latency_s=latency)) as emulator:
        saved = {k: os.environ.get(k) for k in ("AIMLAPI_BASE_URL", "AIMLAPI_API_KEY", "WAN_PIPELINE_EXPECTED_SECONDS")}
        os.environ.update(
            AIMLAPI_BASE_URL=emulator.base_url,
            AIMLAPI_API_KEY=EMULATOR_KEY,
            WAN_PIPELINE_EXPECTED_SECONDS=str(latency),
        )
        try:
            yield f"API: embedded emulator at {emulator.base_url} (latency {latency:g} s; no AIMLAPI_API_KEY set)"
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_pipeline(args: argparse.Namespace) -> int:
    import dagster as dg

    from wan_pipeline.definitions import build_definitions
    from wan_pipeline.defs.executors import uses_celery
    from wan_pipeline.runner import PipelineRunner, RunOptions, ensure_dagster_home
    from wan_pipeline.submission import InDoubtSelection

    options = RunOptions(
        prompt_sets=args.prompt_sets,
        deadline_s=args.deadline,
        retry_failed=args.retry_failed,
        resubmit_in_doubt=InDoubtSelection.of(args.resubmit_in_doubt),
        max_usd=args.max_usd,
        dry_run=args.dry_run,
    )
    settings = load_settings()
    if uses_celery():
        print("note: `run` executes every step in this process; WAN_PIPELINE_EXECUTOR=celery applies to runs "
              "that the daemon or the UI launch", flush=True)
    if options.dry_run:  # no Dagster instance is opened or created: a dry run leaves nothing behind
        return PipelineRunner(build_definitions(settings), None, settings).run(options)
    ensure_dagster_home(PROJECT_DIR)
    with dg.DagsterInstance.get() as instance:
        return PipelineRunner(build_definitions(settings), instance, settings).run(options)


def cmd_run(args: argparse.Namespace) -> int:
    with api_environment(latency_s=args.emulator_latency) as description:
        print(description, flush=True)
        return run_pipeline(args)


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo keeps its own ledger, outputs and Dagster home: what it "buys" from the emulator is
    # never mistaken for a purchase when the same project later runs against a real API.
    demo_dir = PROJECT_DIR / DEMO_DIR
    os.environ.update(
        WAN_PIPELINE_LEDGER_URL=f"sqlite:///{demo_dir / 'ledger.sqlite'}",
        WAN_PIPELINE_OUTPUT=str(demo_dir / "outputs"),
        DAGSTER_HOME=str(demo_dir / "dagster_home"),
    )
    with api_environment(latency_s=args.latency, force_emulator=True) as description:
        print(description, flush=True)
        code = run_pipeline(args)
    print(f"Videos and their provenance sidecars are under {DEMO_DIR}/outputs/<prompt set>/ "
          f"(the demo's own ledger and Dagster home are in {DEMO_DIR}/; `make clean` removes them)")
    return code


def cmd_dev(args: argparse.Namespace) -> int:
    from wan_pipeline.defs.executors import describe, uses_celery
    from wan_pipeline.runner import ensure_dagster_home

    ensure_dagster_home(PROJECT_DIR)
    with api_environment(latency_s=args.latency, steps_elsewhere=uses_celery()) as description:
        print(description, flush=True)
        print(describe(), flush=True)
        command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", args.host, "-p", str(args.port)]
        env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"}
        try:
            return subprocess.call(command, env=env)
        except KeyboardInterrupt:
            return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Rebuild a stored generation's exact request, show its cost, and buy it again only with --yes."""
    import uuid

    from wan_pipeline.experiments import ReproductionRefused, plan_reproductions, reproduce
    from wan_pipeline.storage import VideoStore

    with api_environment(latency_s=args.emulator_latency) as description:
        settings = load_settings()
        ledger, store = open_ledger(settings), VideoStore(settings.output_root)
        print(description, flush=True)
        try:
            plans = plan_reproductions(ledger, store, args.target, allowed_roots=settings.allowed_roots)
        except ReproductionRefused as exc:
            print(f"wan-pipeline: {exc}", file=sys.stderr)
            return 2
        estimate = sum(plan.estimated_usd for plan in plans)
        for plan in plans:
            print(f"reproduce {plan.describe()}")
        print(f"total: {len(plans)} reproduction(s), est. ${estimate:.4f} (each a new purchase of the same request)")
        if not args.yes:
            print("Nothing was bought: add --yes to buy these reproductions.")
            return 1
        from wan_pipeline.api import AimlApiClient, ClientConfig
        from wan_pipeline.settings import env_number

        run_id = f"reproduce-{uuid.uuid4().hex[:12]}"
        failures = 0
        expected = env_number("WAN_PIPELINE_EXPECTED_SECONDS", float, minimum=0)
        overrides = {} if expected is None else {"expected_seconds": expected}
        with AimlApiClient(ClientConfig.from_settings(settings, **overrides)) as client:
            for plan in plans:
                try:
                    result = reproduce(ledger, client, store, plan, deadline_s=args.deadline, run_id=run_id)
                except ReproductionRefused as exc:
                    print(f"wan-pipeline: {exc}", file=sys.stderr)
                    failures += 1
                    continue
                key = plan.request.request_key
                if result.error:
                    failures += 1
                    print(f"FAILED {plan.prompt_set}/{key} (attempt {plan.attempt}): {result.error}")
                    continue
                cost = f"${result.usd_spent:.4f}" if result.usd_spent is not None else "cost not reported"
                passed = "passes" if (result.quality or {}).get("passed") else "fails"
                print(f"reproduced {plan.prompt_set}/{key} (attempt {plan.attempt}, generation {result.generation_id}, "
                      f"{cost}) -> {result.path}; quality {passed}")
                if result.closeness is not None:
                    print(f"  closeness to the original: {result.closeness.describe()}")
        print(f"Ledger run id {run_id}; `wan-pipeline status` counts each reproduction once, as its own purchase.")
        return 1 if failures else 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt_sets", nargs="*", metavar="SET", help="prompt sets to run (default: all)")
    parser.add_argument("--deadline", type=float, default=3600.0, metavar="S", help="give up waiting after S seconds")
    parser.add_argument("--retry-failed", action="store_true", help="resubmit generations the provider failed")
    parser.add_argument(
        "--resubmit-in-doubt", nargs="?", const="all", default=None, metavar="KEYS|SETS|all",
        help="buy again in-doubt creates whose answer was lost (they may already be paid for): comma-separated "
        "request keys or set names, or all (the default when no value is given)",
    )
    parser.add_argument("--max-usd", type=float, default=None, help="refuse to submit more than this estimate")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="show what would be bought, reused and left alone, and its cost; write, buy and collect nothing",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="validate prompt-set files; exit 0 only when all are valid")
    validate.add_argument("paths", nargs="*", metavar="PATH", help="set files or folders (default: the catalog dir)")
    validate.set_defaults(func=cmd_validate)

    status = commands.add_parser("status", help="ledger summary per prompt set: states, USD, in-doubt rows")
    status.add_argument("prompt_sets", nargs="*", metavar="SET")
    status.set_defaults(func=cmd_status)

    run = commands.add_parser("run", help="submit, wait and collect prompt sets on a Dagster instance")
    add_run_arguments(run)
    run.add_argument(
        "--emulator-latency", type=float, default=None, metavar="S",
        help="latency of the embedded emulator used when no AIMLAPI_API_KEY / AIMLAPI_BASE_URL is set",
    )
    run.set_defaults(func=cmd_run)

    demo = commands.add_parser("demo", help="run every sample set against an embedded emulator")
    add_run_arguments(demo)
    demo.add_argument("--latency", type=float, default=DEMO_LATENCY_S, metavar="S", help="emulator latency")
    demo.set_defaults(func=cmd_demo)

    dev = commands.add_parser("dev", help="emulator (unless AIMLAPI_API_KEY is set) + `dagster dev` UI")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    dev.add_argument("--latency", type=float, default=20.0, metavar="S", help="emulator latency")
    dev.set_defaults(func=cmd_dev)

    reproduce = commands.add_parser(
        "reproduce", help="buy a stored generation (or every one of a set) again and compare it with the original"
    )
    reproduce.add_argument("target", metavar="REQUEST_KEY|SET", help="a request key, or a prompt set's name")
    reproduce.add_argument("--yes", action="store_true", help="really buy (without it: show what and what it costs)")
    reproduce.add_argument("--deadline", type=float, default=1800.0, metavar="S", help="wait at most S s per video")
    reproduce.add_argument(
        "--emulator-latency", type=float, default=None, metavar="S",
        help="latency of the embedded emulator used when no AIMLAPI_API_KEY / AIMLAPI_BASE_URL is set",
    )
    reproduce.set_defaults(func=cmd_reproduce)

    ledger = commands.add_parser("ledger", help="the ledger's schema")
    ledger_commands = ledger.add_subparsers(dest="ledger_command", required=True)
    upgrade = ledger_commands.add_parser("upgrade", help="apply the ledger's schema migrations (also done at start)")
    upgrade.set_defaults(func=cmd_ledger_upgrade)

    emulator = commands.add_parser("emulator", help="serve the local AI/ML API emulator")
    from wan_pipeline.emulator import add_cli_arguments

    add_cli_arguments(emulator)
    emulator.set_defaults(func=cmd_emulator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A shell that starts us in the background (`cmd &`) hands down SIGINT as ignored; Dagster turns
    # SIGTERM into SIGINT, so without this a plain `kill` would not stop a run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from wan_pipeline.ledger.database import LedgerVersionError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SettingsError as exc:
        print(f"wan-pipeline: {exc}", file=sys.stderr)
        return 2
    except LedgerVersionError as exc:
        print(f"wan-pipeline: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
