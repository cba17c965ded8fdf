"""Draw docs/comparison_sheet.png: a real comparison sheet of emulator videos (no account needed).

A throwaway project in a temporary folder buys a 3 prompts x 4 seeds grid over one sample image
from an embedded emulator (some generations fail on purpose: `error_rate`), collects the videos
(measuring their quality), builds the experiment table and draws the image's comparison sheet.

    python scripts/draw_comparison_sheet.py [OUTPUT_PNG]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = """\
description: Comparison sheet for the README
defaults: {resolution: 720p, duration: 5, generate_audio: true}
grid:
  images: [../../data/images/still_life.png]
  prompts:
    - Gentle push-in on the geometric still life
    - The camera orbits the table slowly
    - Morning light sweeps across the shapes
  seeds: [1, 2, 3, 4]
"""


def main(output: Path) -> None:
    sys.path.insert(0, str(REPO))
    from wan_pipeline.api import AsyncAimlApiClient, ClientConfig
    from wan_pipeline.catalog import load_prompt_set
    from wan_pipeline.collection import collect_videos
    from wan_pipeline.emulator import EmulatorConfig, FaultConfig, running_emulator
    from wan_pipeline.experiments import comparison_layout, experiment_table, render_comparison_page
    from wan_pipeline.ledger import Ledger
    from wan_pipeline.polling import wait_until_terminal
    from wan_pipeline.settings import Secret
    from wan_pipeline.storage import VideoStore
    from wan_pipeline.submission import submit_prompt_set

    with tempfile.TemporaryDirectory(prefix="wan-sheet-") as folder:
        root = Path(folder)
        (root / "configs" / "prompt_sets").mkdir(parents=True)
        shutil.copytree(REPO / "data" / "images", root / "data" / "images")
        set_file = root / "configs" / "prompt_sets" / "sheet.yaml"
        set_file.write_text(GRID)
        prompt_set = load_prompt_set(set_file)
        emulator_config = EmulatorConfig(latency_s=0.5, seed=7, faults=FaultConfig(error_rate=0.15))
        with running_emulator(emulator_config) as emulator:
            config = ClientConfig(base_url=emulator.base_url, api_key=Secret("local-emulator-key"),
                                  expected_seconds=0.5, poll_min_interval_s=0.05, poll_max_interval_s=0.5)
            ledger = Ledger(f"sqlite:///{root / 'ledger.sqlite'}", scope="emulator")
            store = VideoStore(str(root / "outputs"))
            submit_prompt_set(ledger, lambda: AsyncAimlApiClient(config), "sheet", prompt_set.requests)
            wait_until_terminal(ledger, config, [r.request_key for r in prompt_set.requests], deadline_s=120)
            collect_videos(ledger, lambda: AsyncAimlApiClient(config), store, prompt_set.requests)
            frame = experiment_table(ledger, store, prompt_set.requests)
            (page,) = comparison_layout(frame)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_bytes(render_comparison_page(page, store))
            ledger.close()
    failing = int((frame["state"] != "completed").sum() + (frame["quality_passed"] == False).sum())  # noqa: E712
    print(f"wrote {output} ({len(frame)} generations, {failing} marked failing)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "comparison_sheet.png")
