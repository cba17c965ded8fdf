"""`wan-pipeline`: validate, status, run, demo, dev and the local emulator.

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

from wan_pipeline.settings import SettingsError, load_settings

PROJECT_DIR = Path.cwd()
# The emulator accepts any Bearer key; this one says what it is if it ever shows up somewhere.
EMULATOR_KEY = "local-emulator-key"
DEMO_LATENCY_S = 3.0


def cmd_validate(args: argparse.Namespace) -> int:
    from wan_pipeline.catalog import validate_command

    paths = args.paths or [str(load_settings().catalog_dir)]
    return validate_command(paths)


def cmd_status(args: argparse.Namespace) -> int:
    from wan_pipeline.ledger import Ledger, format_status

    ledger = Ledger(load_settings().ledger_url)
    print(format_status(ledger, args.prompt_sets or None))
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from wan_pipeline.emulator import config_from_args, serve

    serve(config_from_args(args), args.host, args.port)
    return 0


@contextlib.contextmanager
def api_environment(*, latency_s: float | None = None, force_emulator: bool = False) -> Iterator[str]:
    """Point the pipeline at the real API when a key is set, else at an embedded emulator.

    Yields a one-line description of the API in use (never the key).
    """
    settings = load_settings()
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
    from wan_pipeline.runner import PipelineRunner, RunOptions, ensure_dagster_home

    ensure_dagster_home(PROJECT_DIR)
    settings = load_settings()
    with dg.DagsterInstance.get() as instance:
        runner = PipelineRunner(build_definitions(settings), instance, settings)
        return runner.run(
            RunOptions(
                prompt_sets=args.prompt_sets,
                deadline_s=args.deadline,
                retry_failed=args.retry_failed,
                resubmit_in_doubt=args.resubmit_in_doubt,
                max_usd=args.max_usd,
            )
        )


def cmd_run(args: argparse.Namespace) -> int:
    with api_environment(latency_s=args.emulator_latency) as description:
        print(description, flush=True)
        return run_pipeline(args)


def cmd_demo(args: argparse.Namespace) -> int:
    with api_environment(latency_s=args.latency, force_emulator=True) as description:
        print(description, flush=True)
        code = run_pipeline(args)
    settings = load_settings()
    print(f"Videos and their provenance sidecars are under {settings.output_root}/<prompt set>/")
    return code


def cmd_dev(args: argparse.Namespace) -> int:
    from wan_pipeline.runner import ensure_dagster_home

    ensure_dagster_home(PROJECT_DIR)
    with api_environment(latency_s=args.latency) as description:
        print(description, flush=True)
        command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", args.host, "-p", str(args.port)]
        env = {**os.environ, "DAGSTER_DISABLE_TELEMETRY": "1"}
        try:
            return subprocess.call(command, env=env)
        except KeyboardInterrupt:
            return 0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt_sets", nargs="*", metavar="SET", help="prompt sets to run (default: all)")
    parser.add_argument("--deadline", type=float, default=3600.0, metavar="S", help="give up waiting after S seconds")
    parser.add_argument("--retry-failed", action="store_true", help="resubmit generations the provider failed")
    parser.add_argument(
        "--resubmit-in-doubt", action="store_true", help="resubmit creates whose answer was lost (may pay twice)"
    )
    parser.add_argument("--max-usd", type=float, default=None, help="refuse to submit more than this estimate")


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

    emulator = commands.add_parser("emulator", help="serve the local AI/ML API emulator")
    from wan_pipeline.emulator import add_cli_arguments

    add_cli_arguments(emulator)
    emulator.set_defaults(func=cmd_emulator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A shell that starts us in the background (`cmd &`) hands down SIGINT as ignored; Dagster turns
    # SIGTERM into SIGINT, so without this a plain `kill` would not stop a run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SettingsError as exc:
        print(f"wan-pipeline: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
