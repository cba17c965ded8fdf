"""`python -m wan_pipeline.emulator [--port 8000] [--latency 3] [--create-429-rate 0.1] ...`"""

from __future__ import annotations

import argparse

from wan_pipeline.emulator import add_cli_arguments, config_from_args, serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m wan_pipeline.emulator",
        description="Serve a local emulator of the AI/ML API video endpoints (alibaba/wan-2-6-i2v).",
    )
    args = add_cli_arguments(parser).parse_args(argv)
    serve(config_from_args(args), args.host, args.port)


if __name__ == "__main__":
    main()
