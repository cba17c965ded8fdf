"""Validate deploy/helm/values.yaml against the Dagster chart's values.schema.json.

The chart is on no registry this project installs from (PyPI, npm, Debian), so this is not part of
the test suite: run it where the chart can be pulled (see deploy/README.md):

    helm pull dagster/dagster --version 1.13.27 --untar -d /tmp/chart
    .venv/bin/python scripts/check_helm_values.py /tmp/chart/dagster/values.schema.json

The values file is an override: the chart's defaults supply the keys it leaves out, so `required` is
not checked, and the schema's references to kubernetesjsonschema.dev are taken as any object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

VALUES = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "values.yaml"


def loosen(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: loosen(v) for k, v in node.items() if k != "required"}
        if str(node.get("$ref", "")).startswith("http"):
            node.pop("$ref")
        return node
    return [loosen(v) for v in node] if isinstance(node, list) else node


def problems(schema: dict[str, Any], values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(loosen(schema))
    return [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(values)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("schema", type=Path, help="the chart's values.schema.json")
    parser.add_argument("--values", type=Path, default=VALUES)
    args = parser.parse_args()
    found = problems(json.loads(args.schema.read_text()), yaml.safe_load(args.values.read_text()))
    for line in found:
        print(line)
    print(f"{args.values}: {'valid' if not found else f'{len(found)} problem(s)'} against {args.schema}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
