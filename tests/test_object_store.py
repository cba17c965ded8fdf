"""The output root on an object store (`WAN_PIPELINE_OUTPUT=s3://bucket/prefix`), against a real
S3-compatible server on loopback (moto's), reached through the usual AWS variables only.

What is checked at the level of S3 requests: a file reaches its key in one upload of the complete
bytes, after it was checked on local disk; a failed or killed upload leaves no object under the
key and no temporary object anywhere; a reused video is copied by the server, then read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) runs the S3 server these tests use")

from pipeline_support import REPO, TWO_SEEDS, make_project  # noqa: E402
from s3_server import (  # noqa: E402
    PARTS_STORED,
    SECRET_ACCESS_KEY,
    fresh_filesystem,
    new_bucket,
    on_s3_call,
    running_s3_server,
    small_parts,
)
from test_cli import wan_pipeline, workdir  # noqa: E402, F401 (workdir is a fixture: pytest passes it by name)
from upath import UPath  # noqa: E402

from wan_pipeline.storage import HOST_TAG, VideoStore, atomic_writer, write_atomically  # noqa: E402

KEY = "0123456789abcdef" * 2
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8
DIGEST = hashlib.sha256(VIDEO).hexdigest()
LARGE_VIDEO = VIDEO * 6000  # 12.4 MB: three parts of a multipart upload, with `small_parts`
# The S3 requests that change what a bucket holds.
WRITES = {
    "put_object", "copy_object", "create_multipart_upload", "upload_part", "complete_multipart_upload",
    "delete_object", "delete_objects",
}
SET = "launch"


@pytest.fixture(scope="session")
def s3_server():
    with running_s3_server() as server, pytest.MonkeyPatch.context() as environment:
        for name, value in server.environment.items():
            environment.setenv(name, value)
        yield server


@pytest.fixture
def s3_root(s3_server) -> str:
    """A new bucket's prefix, as a user writes it in WAN_PIPELINE_OUTPUT."""
    return f"s3://{new_bucket()}/prefix"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The S3 requests made from now on, by name."""
    made: list[str] = []
    on_s3_call(monkeypatch, lambda method, arguments: made.append(method))
    return made


def writes(calls: list[str]) -> list[str]:
    return [method for method in calls if method in WRITES]


def unfinished_uploads(root: str) -> list[dict[str, Any]]:
    """The multipart uploads begun and neither completed nor aborted in `root`'s bucket."""
    return fresh_filesystem().list_multipart_uploads(root.removeprefix("s3://").split("/")[0])


def objects(root: str) -> list[str]:
    """Every object under `root`, relative to it, as the server lists them now."""
    base = root.removeprefix("s3://")
    return sorted(name.removeprefix(f"{base}/") for name in fresh_filesystem().find(base))


def test_a_video_is_checked_on_local_disk_then_reaches_its_key_in_one_put(s3_root: str, calls: list[str]) -> None:
    store = VideoStore(s3_root)
    with store.staged_video("demo", KEY) as staged:
        assert staged.path.protocol == "" and Path(staged.path).is_relative_to(tempfile.gettempdir())
        staged.path.write_bytes(VIDEO)
        assert objects(s3_root) == []  # nothing in the store while it is probed and measured
        final = staged.publish()
    assert str(final) == f"{s3_root}/demo/{KEY}.mp4"
    assert writes(calls) == ["put_object"]
    assert UPath(str(final)).read_bytes() == VIDEO
    assert objects(s3_root) == [f"demo/{KEY}.mp4"]
    assert not Path(staged.path).exists()


def test_small_files_are_one_put_and_a_failed_write_sends_nothing(s3_root: str, calls: list[str]) -> None:
    store = VideoStore(s3_root)
    store.write_sidecar("demo", KEY, {"seed": 1})
    with pytest.raises(ConnectionError), atomic_writer(store.sidecar_path("demo", KEY)) as handle:
        handle.write(b'{"seed": 2, "vid')
        raise ConnectionError("connection reset")
    assert writes(calls) == ["put_object"]  # the sidecar's; the failed rewrite sent no byte
    assert store.read_sidecar("demo", KEY) == {"seed": 1}
    assert objects(s3_root) == [f"demo/{KEY}.json"]


def test_an_upload_failing_midway_leaves_no_object_and_no_open_upload(
    s3_root: str, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    small_parts(monkeypatch)

    def fail_second_part(method: str, arguments: dict[str, Any]) -> None:
        if method == "upload_part" and arguments["PartNumber"] == 2:
            raise ConnectionError("connection reset during part 2")

    on_s3_call(monkeypatch, fail_second_part)
    store = VideoStore(s3_root)
    with pytest.raises(ConnectionError), store.staged_video("demo", KEY) as staged:
        staged.path.write_bytes(LARGE_VIDEO)
        staged.publish()
    assert "create_multipart_upload" in calls and "complete_multipart_upload" not in calls
    assert objects(s3_root) == []
    assert unfinished_uploads(s3_root) == []


def test_a_writer_killed_before_its_upload_completes_leaves_no_object(s3_root: str, s3_server, tmp_path: Path) -> None:
    video = tmp_path / "video.mp4"
    video.write_bytes(LARGE_VIDEO)
    final = f"{s3_root}/demo/{KEY}.mp4"
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("s3_server.py")), str(video), final],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **s3_server.environment, "PYTHONPATH": str(REPO)},
    )
    try:
        said = child.stdout.readline().strip()
    finally:
        child.kill()
        _, errors = child.communicate()
    assert said == PARTS_STORED, errors
    # Every byte is on the server, and still no object: an unfinished multipart upload is invisible
    # (a lifecycle rule on the bucket removes it; see the README).
    assert objects(s3_root) == []
    (unfinished,) = unfinished_uploads(s3_root)
    assert unfinished["Key"] == f"prefix/demo/{KEY}.mp4"


def test_a_reused_video_is_copied_by_the_server_then_read_back(s3_root: str, calls: list[str]) -> None:
    store = VideoStore(s3_root)
    source = str(write_atomically(store.video_path("first", KEY), VIDEO))
    calls.clear()

    copied = store.copy_verified(source, "second", KEY, DIGEST)
    assert copied == store.video_path("second", KEY)
    assert writes(calls) == ["copy_object"]  # no byte of it went up from this process
    assert "get_object" in calls  # the copy itself was read back and hashed

    assert store.copy_verified(source, "third", KEY, "0" * 64) is None  # the source is not what was recorded
    assert store.copy_verified(f"{s3_root}/gone/{KEY}.mp4", "third", KEY, DIGEST) is None
    assert objects(s3_root) == [f"first/{KEY}.mp4", f"second/{KEY}.mp4"]


def test_sweeping_an_object_store_neither_lists_nor_deletes(s3_root: str, calls: list[str]) -> None:
    store = VideoStore(s3_root)
    final = store.video_path("demo", KEY)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # Named as the temporary of a writer that is gone: on a local disk it would be swept.
    stray = write_atomically(final.with_name(f".{final.name}.{HOST_TAG}-{dead.pid}-0123abcd.part"), b"old")
    calls.clear()
    assert store.sweep("demo") == []
    assert calls == []
    assert objects(s3_root) == [f"demo/{stray.name}"]


def materialization(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    (found,) = (
        event.step_materialization_data.materialization
        for event in result.get_asset_materialization_events()
        if event.step_materialization_data.materialization.asset_key.to_user_string() == asset
    )
    return {name: value.value for name, value in found.metadata.items()}


def test_a_set_runs_end_to_end_on_s3_and_a_second_set_reuses_its_videos_inside_the_bucket(
    tmp_path: Path, emulator, monkeypatch: pytest.MonkeyPatch, s3_root: str, caplog: pytest.LogCaptureFixture
) -> None:
    with dg.instance_for_test() as instance:
        project = make_project(tmp_path, emulator, monkeypatch, instance, output=s3_root)
        project.write_set(f"{SET}.yaml", TWO_SEEDS)
        runs = [project.submit(SET), project.collect(SET)]
        assert all(run.success for run in runs)
        collected = runs[-1]
        keys = sorted(project.ledger.set_members(SET))
        assert len(keys) == 2
        stored = objects(s3_root)
        sheets = [name for name in stored if name.startswith(f"{SET}/comparison_")]
        shas = {video.sha256 for found in project.ledger.stored_videos(keys).values() for video in found}
        assert sheets and stored == sorted(
            [f"_assets/{asset}/{SET}.parquet" for asset in (
                "generation_requests", "submitted_generations", "generation_results", "downloaded_videos",
                "experiment_table",
            )]
            + [f"{SET}/{key}{suffix}" for key in keys for suffix in (".mp4", ".json")]
            + [f"{SET}/contact_sheet.png", f"{SET}/experiment.csv", f"{SET}/experiment.parquet", *sheets]
            + [f".previews/{sha}.jpg" for sha in shas]  # drawn by the sheets (remade when missing)
        )
        assert not (tmp_path / "outputs").exists()
        # The collection run's inputs were materialized by the submission run: read back from the bucket.
        loaded = {event.event_specific_data.input_name for event in collected.all_events if event.is_loaded_input}
        assert {"generation_requests", "submitted_generations"} <= loaded
        checks = {check.check_name: check.passed for check in collected.get_asset_check_evaluations()}
        assert checks == {"videos_match_requests": True, "no_failed_generations": True, "videos_pass_quality_checks": True}

        videos = materialization(collected, "downloaded_videos")
        assert videos["output_folder"] == f"{s3_root}/{SET}"
        assert videos["contact_sheet_path"] == f"{s3_root}/{SET}/contact_sheet.png"
        table = materialization(collected, "experiment_table")
        assert table["parquet"] == f"{s3_root}/{SET}/experiment.parquet"
        frame = pd.read_parquet(table["parquet"])
        assert sorted(frame["video_path"]) == [f"{s3_root}/{SET}/{key}.mp4" for key in keys]
        ledger_paths = {video.path for found in project.ledger.stored_videos(keys).values() for video in found}
        assert ledger_paths == {f"{s3_root}/{SET}/{key}.mp4" for key in keys}

        # Same requests in another set: nothing bought, each video copied inside the bucket by its URL.
        project.write_set("encore.yaml", TWO_SEEDS)
        runs += [project.submit("encore"), project.collect("encore")]
        assert all(run.success for run in runs)
        assert project.accepted_creates() == 2
        assert materialization(runs[-1], "downloaded_videos")["copied_from_other_sets"] == 2
        for key in keys:
            sidecar = json.loads(UPath(f"{s3_root}/encore/{key}.json").read_text())
            assert sidecar["reused_from"] == {"prompt_set": SET, "path": f"{s3_root}/{SET}/{key}.mp4"}

        # The secret key is in the environment only: not in any object, event or log line.
        base = s3_root.removeprefix("s3://")
        for name in objects(s3_root):
            assert SECRET_ACCESS_KEY.encode() not in fresh_filesystem().cat_file(f"{base}/{name}"), name
        events = "".join(repr(record) for run in runs for record in instance.all_logs(run.run_id))
        assert f"{s3_root}/{SET}" in events and SECRET_ACCESS_KEY not in events
        assert SECRET_ACCESS_KEY not in caplog.text


def test_a_second_collection_on_s3_reads_no_stored_video_again(
    tmp_path: Path, emulator, monkeypatch: pytest.MonkeyPatch, s3_root: str
) -> None:
    with dg.instance_for_test() as instance:
        project = make_project(tmp_path, emulator, monkeypatch, instance, output=s3_root)
        project.write_set(f"{SET}.yaml", TWO_SEEDS)
        assert project.submit(SET).success and project.collect(SET).success
        reads: list[str] = []
        on_s3_call(monkeypatch, lambda method, arguments: method == "get_object" and reads.append(arguments["Key"]))
        again = project.collect(SET)
        assert again.success and materialization(again, "downloaded_videos")["already_verified"] == 2
        # Each object still has the ETag its sidecar recorded when it was hashed: no video is read.
        assert not [key for key in reads if key.endswith(".mp4")]
        (check,) = [c for c in again.get_asset_check_evaluations() if c.check_name == "videos_match_requests"]
        assert check.passed and check.metadata["videos_hashed_again"].value == 0


def test_wan_pipeline_run_then_reproduce_on_a_bucket(workdir, s3_server, s3_root: str) -> None:  # noqa: F811
    cwd, env = workdir
    env = {**env, **s3_server.environment, "WAN_PIPELINE_OUTPUT": s3_root}
    run = wan_pipeline(cwd, env, "run", "--deadline", "120")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{s3_root}/{SET}/" in run.stdout
    sidecars = [name for name in objects(s3_root) if name.startswith(f"{SET}/") and name.endswith(".json")]
    assert len(sidecars) == 2
    key = Path(sidecars[0]).stem

    # The reproduction reads the sidecar and the original video from the bucket, and stores its own there.
    again = wan_pipeline(cwd, env, "reproduce", key, "--yes", "--deadline", "60")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"-> {s3_root}/{SET}/reproductions/{key}.attempt2.mp4" in again.stdout
    assert "closeness to the original: identical" in again.stdout
    assert {f"{SET}/reproductions/{key}.attempt2{suffix}" for suffix in (".mp4", ".json")} <= set(objects(s3_root))
    assert not (cwd / "data" / "outputs").exists()
    assert SECRET_ACCESS_KEY not in run.stdout + run.stderr + again.stdout + again.stderr


def test_a_video_bought_from_another_api_is_moved_aside_inside_the_bucket(s3_root: str) -> None:
    store = VideoStore(s3_root)
    write_atomically(store.video_path("demo", KEY), VIDEO)
    store.write_sidecar("demo", KEY, {"api": {"scope": "https-api.example"}})
    moved = store.move_aside("demo", KEY, "https://api.example")
    assert str(moved) == f"{s3_root}/demo/by-api/https-api.example/{KEY}.mp4"
    assert objects(s3_root) == [f"demo/by-api/https-api.example/{KEY}.json", f"demo/by-api/https-api.example/{KEY}.mp4"]
    assert UPath(str(moved)).read_bytes() == VIDEO
