"""Experiments: the comparison layout, the experiment table, and reproductions (ledger and CLI)."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from pipeline_support import REPO
from test_cli import wan_pipeline, workdir  # noqa: F401  (a fixture)

from wan_pipeline.catalog import load_prompt_set
from wan_pipeline.experiments import (
    EXPERIMENT_COLUMNS,
    comparison_layout,
    experiment_frame,
    render_comparison_page,
    write_experiment_table,
)
from wan_pipeline.ledger import (
    AttemptClaim,
    AttemptOutcome,
    AttemptReason,
    ClaimLost,
    Ledger,
    PlannedRequest,
    State,
    TryAnswer,
)
from wan_pipeline.ledger.reports import spend
from wan_pipeline.storage import VideoStore

GRID = """\
defaults: {resolution: 720p, duration: 5}
grid:
  images: [../../data/images/mug.png, ../../data/images/still_life.png]
  prompts: [A slow pan across the scene, The camera orbits the subject, A gentle push-in]
  seeds: [1, 2, 3, 4]
"""


@pytest.fixture
def grid_set(tmp_path: Path):
    (tmp_path / "configs" / "prompt_sets").mkdir(parents=True)
    shutil.copytree(REPO / "data" / "images", tmp_path / "data" / "images")
    path = tmp_path / "configs" / "prompt_sets" / "grid.yaml"
    path.write_text(GRID)
    return load_prompt_set(path)


def test_a_2_x_3_x_4_grid_gives_one_sheet_per_image_prompts_by_seeds(grid_set, tmp_path: Path) -> None:
    frame = experiment_frame(grid_set.requests, [], [], {})
    pages = comparison_layout(frame)
    assert len(pages) == 2
    assert [p.image_ref for p in pages] == ["../../data/images/mug.png", "../../data/images/still_life.png"]
    for page in pages:
        assert (page.row_field, page.column_field) == ("prompt", "seed")
        assert len(page.row_values) == 3 and page.column_values == (1, 2, 3, 4)
        assert sorted((c.row, c.column) for c in page.cells) == [(r, c) for r in range(3) for c in range(4)]
        assert page.fixed == () and (page.number, page.of) == (1, 1)
        assert all(c.failing and c.video_path is None for c in page.cells)  # nothing bought yet
    by_key = {r.request_key: r for r in grid_set.requests}
    for cell in pages[0].cells:
        request = by_key[cell.request_key].request
        assert pages[0].row_values[cell.row] == request.prompt and pages[0].column_values[cell.column] == request.seed

    png = render_comparison_page(pages[0], VideoStore(str(tmp_path / "out")))
    with Image.open(io.BytesIO(png)) as sheet:
        assert sheet.size == (200 + 4 * 240, 36 + 3 * (4 + 130 + 18))


def test_large_grids_are_paged_and_further_varying_fields_make_more_pages(grid_set) -> None:
    frame = experiment_frame(grid_set.requests, [], [], {})
    pages = comparison_layout(frame, max_rows=2, max_columns=3)
    assert len(pages) == 2 * 2 * 2  # per image: prompts 2 + 1, seeds 3 + 1
    assert sum(len(p.cells) for p in pages) == 24
    assert {(p.number, p.of) for p in pages} == {(1, 4), (2, 4), (3, 4), (4, 4)}
    # A third varying field (resolution) becomes a page per value, named in the title.
    doubled = pd.concat([frame, frame.assign(resolution="1080p", request_key=frame["request_key"] + "x")])
    pages = comparison_layout(doubled)
    assert len(pages) == 4 and {p.fixed for p in pages} == {(("resolution", "720p"),), (("resolution", "1080p"),)}
    assert "resolution 1080p" in pages[1].title


def test_every_paged_cell_sits_under_its_own_row_and_column_values(grid_set) -> None:
    frame = experiment_frame(grid_set.requests, [], [], {})
    # One seed left unset (NaN in the table) and one prompt repeated with another image: still one
    # cell each, in the column of their own value.
    frame.loc[0, "seed"] = float("nan")
    by_key = {row.request_key: row for row in frame.itertuples()}
    for max_rows, max_columns in ((1, 1), (2, 3), (3, 2), (8, 8)):
        pages = comparison_layout(frame, max_rows=max_rows, max_columns=max_columns)
        placed = [(page, cell) for page in pages for cell in page.cells]
        assert sorted(cell.request_key for _, cell in placed) == sorted(frame["request_key"])
        for page, cell in placed:
            row = by_key[cell.request_key]
            assert page.image_ref == row.image_ref
            assert cell.row < max_rows and cell.column < max_columns
            assert page.row_values[cell.row] == row.prompt
            assert repr(page.column_values[cell.column]) == repr(row.seed)


def test_the_experiment_table_has_every_request_field_and_reads_back_in_one_line(grid_set, tmp_path: Path) -> None:
    frame = experiment_frame(grid_set.requests, [], [], {})
    assert tuple(frame.columns) == EXPERIMENT_COLUMNS
    for column in ("prompt", "negative_prompt", "seed", "image_ref", "image_sha256", "resolution", "duration",
                   "shot_type", "generate_audio", "enhance_prompt", "state", "usd_spent", "usd_all_attempts",
                   "submitted_at", "completed_at", "processing_s", "quality_passed", "first_frame_ssim", "motion",
                   "longest_frozen_s", "longest_blank_s", "audio_rms_dbfs"):
        assert column in frame.columns
    assert len(frame) == 24 and set(frame["state"]) == {"not_planned"}
    store = VideoStore(str(tmp_path / "out"))
    parquet, csv = write_experiment_table(store, "grid", frame)
    assert parquet.endswith("grid/experiment.parquet") and csv.endswith("grid/experiment.csv")
    back = pd.read_parquet(parquet)
    pd.testing.assert_frame_equal(back, frame)
    assert list(pd.read_csv(csv).columns) == list(EXPERIMENT_COLUMNS)


# ---------------------------------------------------------------------------------------------------
# The ledger: a reproduction is a new attempt of a completed key; the row stays completed.


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def completed_ledger(request: pytest.FixtureRequest, tmp_path: Path):
    """A ledger (SQLite, and PostgreSQL when WAN_PIPELINE_TEST_POSTGRES_URL is set) with one completed key."""
    from datetime import UTC, datetime

    from ledger_worker import ledger_target

    with ledger_target(request.param, tmp_path) as target:
        ledger = target.open()
        ledger.plan("s", [PlannedRequest("k" * 32, "alibaba/wan-2-6-i2v", {"prompt": "p"}, 0.5, None)])
        ledger.try_sending("k" * 32, 1, 1, "wanp-k-1.1", AttemptClaim("s"))
        ledger.try_answered("k" * 32, 1, 1, TryAnswer(True, 200, "accepted", "gen-1", "queued", 1e6, 0.5),
                            next_poll_at=datetime.now(UTC))
        _complete(ledger, "k" * 32)
        assert ledger.row("k" * 32).state is State.COMPLETED
        yield ledger
        ledger.close()


def _complete(ledger: Ledger, key: str) -> None:
    import sqlalchemy as sa

    from wan_pipeline.ledger import generations

    with ledger._writing() as conn:  # the poll path is tested elsewhere: jump to completed
        conn.execute(sa.update(generations).where(generations.c.request_key == key).values(
            state=State.COMPLETED.value, generation_id="gen-1", video_url="http://x/v.mp4"))


def test_a_reproduction_is_a_new_attempt_and_the_row_stays_completed(completed_ledger: Ledger) -> None:
    ledger, key = completed_ledger, "k" * 32
    claim = AttemptClaim("s", AttemptReason.REPRODUCTION, "run-r")
    with pytest.raises(ValueError, match="reason 'reproduction'"):
        ledger.reproduction_try_sending(key, 2, 1, "wanp-k-2.1", AttemptClaim("s"))
    with pytest.raises(ClaimLost):  # not at attempt 1 -> 2: a stale plan never sends
        ledger.reproduction_try_sending(key, 3, 1, "wanp-k-3.1", claim)
    ledger.reproduction_try_sending(key, 2, 1, "wanp-k-2.1", claim)
    with pytest.raises(ClaimLost):  # a second process planning the same reproduction loses
        ledger.for_scope("emulator").reproduction_try_sending(key, 2, 1, "wanp-k-2.1b", claim)
    ledger.reproduction_try_answered(key, 2, 1, TryAnswer(False, 503, "HTTP 503"))  # not created: retry
    ledger.reproduction_try_sending(key, 2, 2, "wanp-k-2.2", claim)
    ledger.reproduction_try_answered(key, 2, 2, TryAnswer(True, 200, "accepted", "gen-2", "queued", 1e6, 0.5))
    row = ledger.row(key)
    assert (row.state, row.generation_id, row.attempts) == (State.COMPLETED, "gen-1", 2)
    attempts = ledger.attempts(request_keys=[key])
    assert [(a.attempt, a.reason, a.outcome, a.generation_id) for a in attempts] == [
        (1, "first", "created", "gen-1"), (2, "reproduction", "created", "gen-2"),
    ]
    total = spend(attempts)
    assert total.purchases == 2 and total.usd_spent == pytest.approx(1.0)


def test_a_reproduction_whose_answer_is_lost_is_in_doubt_on_its_attempt_only(completed_ledger: Ledger) -> None:
    ledger, key = completed_ledger, "k" * 32
    ledger.reproduction_try_sending(key, 2, 1, "wanp-k-2.1", AttemptClaim("s", AttemptReason.REPRODUCTION))
    ledger.settle_abandoned_attempt(key, 2, "ReadTimeout")
    assert ledger.row(key).state is State.COMPLETED
    assert ledger.attempts(request_keys=[key])[-1].outcome == AttemptOutcome.IN_DOUBT


# ---------------------------------------------------------------------------------------------------
# The CLI against the emulator


def test_reproduce_refuses_without_yes_then_buys_once_and_compares(workdir, emulator) -> None:  # noqa: F811
    cwd, env = workdir
    assert wan_pipeline(cwd, env, "run", "--deadline", "120").returncode == 0
    key = json.loads(next((cwd / "data/outputs/launch").glob("*.json")).read_text())["request_key"]
    bought = emulator.stats()["accepted_creates"]

    preview = wan_pipeline(cwd, env, "reproduce", key)
    assert preview.returncode == 1, preview.stdout + preview.stderr
    assert f"reproduce launch/{key}: seed" in preview.stdout and "est. $0.5250" in preview.stdout
    assert "Nothing was bought: add --yes" in preview.stdout
    assert emulator.stats()["accepted_creates"] == bought

    original = (cwd / f"data/outputs/launch/{key}.mp4").read_bytes()
    result = wan_pipeline(cwd, env, "reproduce", key, "--yes", "--deadline", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert emulator.stats()["accepted_creates"] == bought + 1
    assert f"reproduced launch/{key} (attempt 2" in result.stdout
    assert "closeness to the original: identical" in result.stdout  # the emulator is deterministic per seed
    assert (cwd / f"data/outputs/launch/{key}.mp4").read_bytes() == original  # never replaced
    copy = cwd / f"data/outputs/launch/reproductions/{key}.attempt2.mp4"
    sidecar = json.loads(copy.with_suffix(".json").read_text())
    assert sidecar["reproduction_of"]["request_key"] == key and sidecar["closeness"]["identical_bytes"]

    with sqlite3.connect(cwd / "data" / "ledger.sqlite") as db:
        attempts = db.execute(
            "SELECT attempt, reason, outcome, usd_spent FROM wan_attempts WHERE request_key = ? ORDER BY attempt", (key,)
        ).fetchall()
        state = db.execute("SELECT state, attempts FROM wan_generations WHERE request_key = ?", (key,)).fetchone()
    assert [(a, r, o) for a, r, o, _ in attempts] == [(1, "first", "created"), (2, "reproduction", "created")]
    assert state == ("completed", 2)
    status = wan_pipeline(cwd, env, "status")
    total = sum(usd for *_, usd in attempts) + 0.525  # the other seed of the set
    assert f"total ${total:.4f} for 3 purchase(s)" in status.stdout, status.stdout


def test_reproduce_refuses_a_changed_image_naming_the_file(workdir, emulator) -> None:  # noqa: F811
    cwd, env = workdir
    assert wan_pipeline(cwd, env, "run", "--deadline", "120").returncode == 0
    image = cwd / "data" / "images" / "mug.png"
    with Image.open(image) as picture:
        picture.rotate(90, expand=True).save(image)
    bought = emulator.stats()["accepted_creates"]
    result = wan_pipeline(cwd, env, "reproduce", "launch", "--yes")
    assert result.returncode == 2
    assert f"{image.resolve()}: the source image changed since" in result.stderr
    assert "nothing was bought" in result.stderr
    assert emulator.stats()["accepted_creates"] == bought


# ---------------------------------------------------------------------------------------------------
# Dagster: the collect run measures quality, checks it (warning only) and writes the table and sheets


def test_the_collect_run_records_quality_and_writes_the_table_and_a_comparison_sheet(
    tmp_path, emulator, monkeypatch
) -> None:
    import dagster as dg
    from pipeline_support import TWO_SEEDS, make_project
    from test_pipeline import materialization, run_sensor_path

    with dg.instance_for_test() as instance:
        project = make_project(tmp_path, emulator, monkeypatch, instance)
        project.write_set("launch.yaml", TWO_SEEDS)
        collected = run_sensor_path(project)
        assert collected.success
        out = project.root / "outputs" / "launch"
        for sidecar in out.glob("*.json"):
            quality = json.loads(sidecar.read_text())["quality"]
            assert quality["passed"] is True, quality  # the emulator pans across the image, with a tone
            assert quality["first_frame_ssim"] > 0.45 and quality["motion"] > 0.5
            assert quality["thresholds"]["min_motion"] == 0.5
        videos = materialization(collected, "downloaded_videos")
        assert videos["quality_failing"] == 0 and "quality_summary" in videos
        table = materialization(collected, "experiment_table")
        assert table["dagster/row_count"] == 2 and table["comparison_sheets"] == 1
        assert "comparison_sheet" in table and "seed" in table["best_seed_per_prompt"]
        frame = pd.read_parquet(out / "experiment.parquet")
        assert set(frame["seed"]) == {1, 2} and frame["quality_passed"].all() and (frame["usd_spent"] > 0).all()
        assert next(out.glob("comparison_*_p1.png")).read_bytes().startswith(b"\x89PNG")
        # The README's one-liner: the best seed per prompt.
        df = frame
        best = df[df.quality_passed.fillna(False)].sort_values("first_frame_ssim").groupby(["image_ref", "prompt"]).tail(1)[["prompt", "seed", "first_frame_ssim", "motion"]]  # noqa: E501
        assert len(best) == 1 and best["seed"].iloc[0] in {1, 2}
        (check,) = [e for e in collected.get_asset_check_evaluations() if e.check_name == "videos_pass_quality_checks"]
        assert check.passed and check.metadata["videos_measured"].value == 2


def test_a_reproduction_bought_but_not_stored_is_resumed_not_bought_again(workdir, emulator) -> None:  # noqa: F811
    cwd, env = workdir
    assert wan_pipeline(cwd, env, "run", "--deadline", "120").returncode == 0
    key = json.loads(next((cwd / "data/outputs/launch").glob("*.json")).read_text())["request_key"]
    bought = emulator.stats()["accepted_creates"]
    cut_short = wan_pipeline(cwd, env, "reproduce", key, "--yes", "--deadline", "0.01")
    assert cut_short.returncode == 1 and "bought, not stored yet (rerun to resume)" in cut_short.stdout
    assert emulator.stats()["accepted_creates"] == bought + 1

    preview = wan_pipeline(cwd, env, "reproduce", key)
    assert "attempt 2 already bought" in preview.stdout and "est. $0.0000" in preview.stdout
    resumed = wan_pipeline(cwd, env, "reproduce", key, "--yes", "--deadline", "60")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert emulator.stats()["accepted_creates"] == bought + 1  # re-attached by its generation id
    assert (cwd / f"data/outputs/launch/reproductions/{key}.attempt2.mp4").exists()
    assert "identical" in resumed.stdout
