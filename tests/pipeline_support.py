"""A throwaway project (catalog, output, ledger, Dagster instance) wired to a running emulator."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from conftest import EMULATOR_API_KEY

from wan_pipeline.definitions import build_definitions
from wan_pipeline.ledger import Ledger
from wan_pipeline.scopes import scope_in_use
from wan_pipeline.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO / "data" / "images"
# A prompt set of two generations (one image, one prompt, two seeds), for a `configs/prompt_sets/` dir
# two levels below a folder that holds a copy of data/images.
TWO_SEEDS = """\
defaults: {resolution: 720p, duration: 5}
items:
  - image: ../../data/images/mug.png
    prompt: Slow dolly-in on a steaming mug
    seeds: [1, 2]
"""


@dataclass
class Project:
    root: Path
    settings: Settings
    defs: dg.Definitions
    instance: dg.DagsterInstance
    emulator: object

    @property
    def catalog_dir(self) -> Path:
        return self.settings.catalog_dir

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.settings.ledger_url, scope=scope_in_use(self.settings))

    def write_set(self, name: str, text: str) -> Path:
        path = self.catalog_dir / name
        path.write_text(text)
        stem = path.stem
        if not self.instance.has_dynamic_partition("prompt_sets", stem):
            self.instance.add_dynamic_partitions("prompt_sets", [stem])
        return path

    def accepted_creates(self) -> int:
        return self.emulator.stats()["accepted_creates"]

    def submit(self, prompt_set: str, **config) -> dg.ExecuteInProcessResult:
        return self.defs.resolve_job_def("submit_prompt_set").execute_in_process(
            instance=self.instance,
            partition_key=prompt_set,
            run_config={"ops": {"submitted_generations": {"config": config}}} if config else None,
            raise_on_error=False,
        )

    def collect(self, prompt_set: str, **tags) -> dg.ExecuteInProcessResult:
        return self.defs.resolve_job_def("collect_prompt_set").execute_in_process(
            instance=self.instance, partition_key=prompt_set, tags=tags or None, raise_on_error=False
        )

    def tick(self, sensor_name: str, cursor: str | None = None) -> dg.SensorResult:
        sensor = self.defs.resolve_sensor_def(sensor_name)
        # A `with`: the resources' setup/teardown (the API resource owns its clients) run around the tick.
        with dg.build_sensor_context(
            instance=self.instance,
            cursor=cursor,
            definitions=self.defs,
            sensor_name=sensor_name,
            resources=self.defs.resources,
        ) as context:
            return sensor(context)


def make_project(
    tmp_path: Path, emulator, monkeypatch, instance: dg.DagsterInstance, *, output: str | None = None
) -> Project:
    """The project in `tmp_path`; its videos and tables go to `output` (a path or URL) if given."""
    catalog_dir = tmp_path / "configs" / "prompt_sets"
    catalog_dir.mkdir(parents=True)
    images = tmp_path / "data" / "images"
    shutil.copytree(SAMPLE_IMAGES, images)
    env = {
        "AIMLAPI_API_KEY": EMULATOR_API_KEY,
        "AIMLAPI_BASE_URL": emulator.base_url,
        "WAN_PIPELINE_CATALOG_DIR": str(catalog_dir),
        "WAN_PIPELINE_OUTPUT": output or str(tmp_path / "outputs"),
        "WAN_PIPELINE_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
        "WAN_PIPELINE_ALLOWED_ROOTS": str(tmp_path),
        "WAN_PIPELINE_EXPECTED_SECONDS": "0.5",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    return Project(tmp_path, settings, build_definitions(settings), instance, emulator)
