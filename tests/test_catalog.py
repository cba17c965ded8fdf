"""The prompt-set catalog: loading, expansion, validation messages, identity of generations."""

from __future__ import annotations

import csv
import io
import shutil
import wave
from pathlib import Path

import fsspec
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from wan_pipeline import catalog, pricing, sources
from wan_pipeline.catalog import (
    CATALOG_FIELDS,
    GRID_KEYS,
    ITEM_KEYS,
    TOP_LEVEL_KEYS,
    CatalogError,
    PromptSet,
    discover_prompt_sets,
    format_reports,
    load_prompt_set,
    requests_from_dataframe,
    validate_command,
    validate_paths,
)
from wan_pipeline.pricing import PriceTable, PriceUnknown

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "catalogs"
GOLDEN = REPO / "tests" / "golden"


@pytest.fixture(autouse=True)
def project_cwd(monkeypatch):
    """Messages show paths relative to the working directory: run every test from the project root."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WAN_PIPELINE_ALLOWED_ROOTS", raising=False)


def write_image(path: Path, size=(400, 400), color=(40, 120, 200), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def write_wav(path: Path, seconds: float = 3.5, rate: int = 8000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))
    return path


def write_set(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, **kwargs) -> list[catalog.CatalogProblem]:
    with pytest.raises(CatalogError) as caught:
        load_prompt_set(path, **kwargs)
    assert str(caught.value) == "\n".join(str(p) for p in caught.value.problems)
    return caught.value.problems


# --- the sample catalog ------------------------------------------------------------------------------


def test_sample_catalog_is_valid_and_small():
    reports = validate_paths([REPO / "configs" / "prompt_sets"])

    assert [r.name for r in reports] == ["product_shots", "spring_campaign"]
    assert all(r.ok for r in reports), format_reports(reports)
    assert 5 <= sum(r.count for r in reports) <= 8
    assert sorted(discover_prompt_sets(REPO / "configs" / "prompt_sets")) == [
        "product_shots",
        "spring_campaign",
    ]
    for image in (REPO / "data" / "images").iterdir():
        with Image.open(image) as opened:
            assert all(360 <= side <= 2000 for side in opened.size)
        assert image.stat().st_size < 200_000


# --- golden reports --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "catalog_file, golden", [("broken.yaml", "broken_yaml.txt"), ("broken.csv", "broken_csv.txt")]
)
def test_broken_catalog_report_matches_golden(catalog_file, golden):
    report = format_reports(validate_paths([FIXTURES / catalog_file]))
    assert report == (GOLDEN / golden).read_text(encoding="utf-8").rstrip("\n")


def test_load_raises_every_problem_that_validate_reports():
    [report] = validate_paths([FIXTURES / "broken.yaml"])
    assert problems_of(FIXTURES / "broken.yaml") == report.problems


# --- structure errors are located, never tracebacks ------------------------------------------------


@pytest.mark.parametrize(
    "name, text, location, fragment",
    [
        ("list.yaml", "- just\n- a list\n", "line 1", "the catalog must be a mapping"),
        ("empty.yaml", "", None, "no generations"),
        ("no_items.yaml", "description: nothing\nitems: []\n", None, "no generations"),
        ("bad.yaml", "items:\n  - image: img.png\n    prompt: [unclosed\n", "line 4", "malformed YAML"),
        ("tabs.yaml", "items:\n\t- image: img.png\n", "line 2", "malformed YAML"),
        ("two_docs.yaml", "items: []\n---\nitems: []\n", "line 2", "malformed YAML"),
        ("grid_list.yaml", "grid: [img.png]\n", "line 1", "grid: got ['img.png'], allowed: a mapping"),
        ("grid_half.yaml", "grid:\n  images: [img.png]\n", "line 1", "grid: `prompts` is missing"),
        (
            "grid_axis.yaml",
            "grid:\n  images: img.png\n  prompts: [p]\n",
            "line 2",
            "images: got 'img.png', allowed: a non-empty list",
        ),
        (
            "grid_singular.yaml",
            "grid:\n  images: [img.png]\n  prompts: [p]\n  seed: [1]\n",
            "line 4",
            "write `seeds` as a list",
        ),
        (
            "both_seeds.yaml",
            "items:\n  - image: img.png\n    prompt: p\n    seed: 1\n    seeds: [2]\n",
            "line 5",
            "`seed` and `seeds` are both given",
        ),
        (
            "empty_seeds.yaml",
            "items:\n  - image: img.png\n    prompt: p\n    seeds: []\n",
            "line 4",
            "seeds: got [], allowed: a non-empty list",
        ),
        (
            "twice.yaml",
            "items:\n  - image: img.png\n    prompt: p\n    prompt: q\n",
            "line 4",
            "prompt: written twice",
        ),
        (
            "top.yaml",
            "colour: red\nitems:\n  - {image: img.png, prompt: p}\n",
            "line 1",
            "colour: unknown top-level key",
        ),
        (
            "items_map.yaml",
            "items: {image: img.png}\n",
            "line 1",
            "items: got {'image': 'img.png'}, allowed: a list",
        ),
        ("item_str.yaml", "items:\n  - img.png\n", "line 2", "items: got 'img.png', allowed: a mapping"),
        (
            "defaults.yaml",
            "defaults: 720p\nitems:\n  - {image: img.png, prompt: p}\n",
            "line 1",
            "defaults: got '720p'",
        ),
        (
            "model.yaml",
            "defaults:\n  model: [x]\nitems:\n  - {image: img.png, prompt: p}\n",
            "line 2",
            "model: got ['x']",
        ),
        (
            "long.yaml",
            f"items:\n  - image: img.png\n    prompt: {'x' * 1501}\n",
            "line 3",
            "prompt: got '<1501 characters>', allowed: at most 1500",
        ),
        (
            "quoted.yaml",
            "items:\n  - image: img.png\n    prompt: p\n    duration: '5'\n",
            "line 4",
            "duration: got '5'",
        ),
        ("no_image.yaml", "items:\n  - prompt: p\n", "line 2", "image: got None"),
        ("semicolon.csv", "image;prompt\nimg.png;p\n", "row 1", "image: required column is missing"),
        ("nameless.csv", "image,prompt,\nimg.png,p,x\n", "row 1", "column 3 has no name"),
        ("twice.csv", "image,prompt,seed,seed\nimg.png,p,1,2\n", "row 1", "seed: column given twice"),
        ("empty.csv", "", None, "empty CSV"),
        ("header_only.csv", "image,prompt\n\n", None, "no generations"),
        ("duration.csv", "image,prompt,duration\nimg.png,p,5s\n", "row 2", "duration: got '5s'"),
        ("notes.txt", "image,prompt\n", None, "file type: got '.txt'"),
    ],
)
def test_structure_problems_name_the_place(tmp_path, name, text, location, fragment):
    write_image(tmp_path / "img.png")
    path = write_set(tmp_path, name, text)

    problems = problems_of(path)

    assert any(p.location == location and fragment in p.message for p in problems), problems
    assert all(p.file == str(path) for p in problems)  # outside the working directory: absolute


def test_yaml_anchors_and_merge_keys_are_plain_yaml(tmp_path):
    write_image(tmp_path / "img.png")
    text = """defaults: &base
  resolution: 720p
  duration: 5
items:
  - <<: *base
    image: img.png
    prompt: &pan A slow pan
    resolution: 1080p
  - {image: img.png, prompt: *pan, seed: 4}
"""
    first, second = load_prompt_set(write_set(tmp_path, "anchors.yaml", text)).requests
    assert (first.request.resolution, first.request.duration, first.source_line) == ("1080p", 5, 5)
    assert (second.request.prompt, second.request.resolution, second.source_line) == ("A slow pan", "720p", 9)


def test_undecodable_file_is_a_problem(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("items:\n  - prompt: caf\xe9\n".encode("latin-1"))
    [problem] = problems_of(path)
    assert "not UTF-8" in problem.message


def test_grid_too_large_is_refused_before_expansion(tmp_path):
    text = yaml.safe_dump(
        {"grid": {"images": ["img.png"] * 100, "prompts": ["p"] * 100, "seeds": list(range(11))}}
    )
    problems = problems_of(write_set(tmp_path, "huge.yaml", text))
    assert [p.message for p in problems] == ["grid: expands to 110000 generations, allowed: at most 100000"]


# --- hypothesis: anything at all fails as CatalogError ----------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(
        [
            "img.png",
            "720p",
            "1080p",
            "480p",
            "single",
            "multi",
            "../../etc/passwd",
            "/etc/passwd",
            "https://example.com/a.png",
            "memory://missing.png",
            "local:///etc/passwd",
            "nope://x",
            "data:image/png;base64,xx",
            "a::b://c",
            "~nobody-here/x.png",
            "img\x00.png",
            "x" * 1600,
        ]
    ),
)
FIELD_NAMES = st.sampled_from([*ITEM_KEYS, *GRID_KEYS, "bogus"])
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FIELD_NAMES, inner, max_size=4),
    max_leaves=8,
)
ITEMS = st.lists(st.dictionaries(FIELD_NAMES, VALUES, max_size=6), max_size=3)
PROMPTS = st.text(min_size=1, max_size=30).filter(str.strip)
# Mostly valid items, so that loading succeeds often enough to be exercised too.
VALID_ITEMS = st.lists(
    st.fixed_dictionaries(
        {"image": st.just("img.png"), "prompt": PROMPTS},
        optional={
            "resolution": st.sampled_from(["720p", "1080p", "480p"]),
            "duration": st.sampled_from([5, 10, 7]),
            "seeds": st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=3, unique=True),
            "generate_audio": st.booleans(),
            "negative_prompt": SCALARS,
            "bogus": SCALARS,
        },
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda item: item["prompt"],
)
CATALOGS = st.one_of(
    VALUES,
    st.dictionaries(st.sampled_from([*TOP_LEVEL_KEYS, "bogus"]), VALUES | ITEMS, max_size=4),
    st.fixed_dictionaries({"items": ITEMS}),
    st.fixed_dictionaries({"grid": st.dictionaries(FIELD_NAMES, VALUES, max_size=5)}),
    st.fixed_dictionaries(
        {"items": VALID_ITEMS}, optional={"defaults": st.dictionaries(FIELD_NAMES, SCALARS, max_size=2)}
    ),
    st.fixed_dictionaries(
        {
            "grid": st.fixed_dictionaries(
                {
                    "images": st.just(["img.png"]),
                    "prompts": st.lists(PROMPTS, min_size=1, max_size=3, unique=True),
                },
                optional={"seeds": st.lists(SCALARS, min_size=1, max_size=3), "duration": VALUES},
            )
        }
    ),
)


@pytest.fixture(scope="module")
def playground(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("playground")
    write_image(folder / "img.png")
    return folder


def assert_loads_or_fails_cleanly(path: Path) -> None:
    try:
        prompt_set = load_prompt_set(path)
    except CatalogError as exc:
        assert exc.problems and all(p.file == str(path) and p.message for p in exc.problems)
    else:
        assert isinstance(prompt_set, PromptSet) and prompt_set.requests


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=CATALOGS)
def test_any_yaml_structure_fails_only_as_catalog_error(playground, data):
    path = playground / "random.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    assert_loads_or_fails_cleanly(path)


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(max_size=200)
    | st.sampled_from(
        [
            "a: &x [*x]\n",
            "? [a]\n: b\n",
            "a: !!python/object x\n",
            "&a [*a, *a]",
            "items:\n  - <<: {image: img.png}\n",
        ]
    )
)
def test_any_yaml_text_fails_only_as_catalog_error(playground, text):
    path = playground / "text.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert_loads_or_fails_cleanly(path)


CELLS = st.text(max_size=10) | st.sampled_from(
    ["img.png", "720p", "5", "10", "yes", "0", "-1", "", " 1080p "]
)


@settings(max_examples=150, deadline=None)
@given(
    header=st.lists(st.sampled_from([*CATALOG_FIELDS, "bogus", "", " image "]), max_size=7)
    | st.just(["image", "prompt", "generate_audio", "duration"]),
    rows=st.lists(st.lists(CELLS, max_size=8), max_size=5)
    | st.lists(
        st.tuples(st.just("img.png"), PROMPTS, CELLS, st.sampled_from(["5", "10", "", "7"])),
        min_size=1,
        max_size=4,
        unique_by=lambda row: row[1],
    ),
)
def test_any_csv_cells_fail_only_as_catalog_error(playground, header, rows):
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    path = playground / "random.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8", errors="surrogatepass")
    assert_loads_or_fails_cleanly(path)


# --- expansion, seeds, identity ----------------------------------------------------------------------


def test_grid_and_items_expand_to_the_cartesian_product(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name, color=(len(name), 10, 10) if name == "a.png" else (10, 200, 10))
    text = """
defaults: {duration: 5}
items:
  - image: a.png
    prompt: One item, three seeds
    seeds: [1, 2, 3]
grid:
  images: [a.png, b.png]
  prompts: [A slow pan, The camera orbits, A crash zoom]
  resolution: [720p, 1080p]
  seeds: [1, 2]
"""
    prompt_set = load_prompt_set(write_set(tmp_path, "grid.yaml", text))

    grid_rows = [r for r in prompt_set.requests if r.source_line == 7]
    assert len(prompt_set.requests) == 3 + 2 * 3 * 2 * 2
    assert (
        len({(r.image_ref, r.request.prompt, r.request.resolution, r.request.seed) for r in grid_rows}) == 24
    )
    assert [r.image_ref for r in grid_rows[:12]] == ["a.png"] * 12  # images outermost
    assert [r.request.seed for r in grid_rows[:2]] == [1, 2]  # seeds innermost
    assert not any(r.seed_derived for r in prompt_set.requests)
    assert prompt_set.estimated_usd == pytest.approx(
        12 * 5 * 0.105 + 15 * 5 * 0.1575
    )  # items default to 1080p


def test_missing_seeds_are_derived_deterministically_and_pinned(tmp_path):
    first = load_prompt_set(FIXTURES / "pinned.yaml")
    # Moving the catalog and its image elsewhere changes no identity: media are identified by content.
    shutil.copytree(FIXTURES / "media", tmp_path / "media")
    moved = load_prompt_set(shutil.copy(FIXTURES / "pinned.yaml", tmp_path / "pinned.yaml"))

    # These values are what was paid for: a change here would silently re-buy every video.
    expected = [
        ("adae8112d41f9d8b995fc37b82b44be0", 1226957075, True),
        ("4767cb811922be65ad9f854594afd340", 11, False),
    ]
    for prompt_set in (first, moved):
        assert [(r.request_key, r.request.seed, r.seed_derived) for r in prompt_set.requests] == expected
    assert first.requests[1].image_sha256 is None  # an http(s) image is identified by its URL
    assert first.requests[0].image_sha256 == sources.sha256_hex(
        (FIXTURES / "media" / "square.png").read_bytes()
    )


def test_derived_seed_follows_the_request(tmp_path):
    write_image(tmp_path / "img.png")
    text = "items:\n  - {image: img.png, prompt: A slow pan}\n  - {image: img.png, prompt: A fast pan}\n"
    seeds = [r.request.seed for r in load_prompt_set(write_set(tmp_path, "s.yaml", text)).requests]
    assert seeds[0] != seeds[1]


def test_duplicate_generations_are_reported(tmp_path):
    write_image(tmp_path / "img.png")
    shutil.copy(tmp_path / "img.png", tmp_path / "same_bytes.png")
    text = """items:
  - image: img.png
    prompt: p
    seeds: [1, 1]
  - image: same_bytes.png
    prompt: p
    seed: 1
"""
    problems = problems_of(write_set(tmp_path, "dups.yaml", text))

    assert [(p.location, p.field) for p in problems] == [("line 2", "request_key"), ("line 5", "request_key")]
    assert all(
        "duplicate generation" in p.message and "also produced by line 2" in p.message for p in problems
    )


# --- media: containment, caching ---------------------------------------------------------------------


@pytest.fixture
def outside_image(tmp_path) -> Path:
    return write_image(tmp_path / "outside" / "secret.png")


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("../outside/secret.png", "outside the allowed roots"),
        ("../../etc/passwd", "outside the allowed roots"),
        ("/etc/passwd", "outside the allowed roots"),
        ("{outside}", "outside the allowed roots"),
        ("file://{outside}", "outside the allowed roots"),
        ("local://{outside}", "reaches the local disk"),
        ("simplecache::file://{outside}", "chained fsspec URLs"),
        ("link.png", "outside the allowed roots"),
    ],
)
def test_paths_outside_the_allowed_roots_are_never_read(tmp_path, outside_image, monkeypatch, ref, fragment):
    catalog_dir = tmp_path / "catalog"
    catalog_dir.mkdir()
    (catalog_dir / "link.png").symlink_to(outside_image)
    path = write_set(
        catalog_dir, "escape.yaml", f"items:\n  - image: {ref.format(outside=outside_image)}\n    prompt: p\n"
    )

    def refuse(*args, **kwargs):
        raise AssertionError("a file outside the allowed roots was read")

    monkeypatch.setattr(sources, "read_bytes", refuse)
    [problem] = problems_of(path)
    assert (problem.location, problem.field) == ("line 2", "image") and fragment in problem.message


def test_allowed_roots_extend_where_images_may_live(tmp_path, outside_image, monkeypatch):
    path = write_set(tmp_path / "catalog", "s.yaml", f"items:\n  - image: {outside_image}\n    prompt: p\n")
    assert load_prompt_set(path, allowed_roots=[outside_image.parent]).requests[0].request.image_url == str(
        outside_image
    )
    monkeypatch.setenv("WAN_PIPELINE_ALLOWED_ROOTS", str(outside_image.parent))
    assert load_prompt_set(path).requests[0].image_sha256 == sources.sha256_hex(outside_image.read_bytes())


def test_ten_thousand_rows_inspect_each_image_once(tmp_path, monkeypatch):
    images = [write_image(tmp_path / f"img{i}.png", color=(i * 10, 50, 90)) for i in range(20)]
    lines = ["image,prompt,resolution,duration"] + [
        f"{images[i % 20].name},Prompt {i},720p,5" for i in range(10_000)
    ]
    path = write_set(tmp_path, "big.csv", "\n".join(lines) + "\n")
    inspected: list[int] = []
    real_inspect = sources.inspect_image

    def counting_inspect(data, spec):
        inspected.append(len(data))
        return real_inspect(data, spec)

    monkeypatch.setattr(sources, "inspect_image", counting_inspect)
    prompt_set = load_prompt_set(path)

    assert len(prompt_set.requests) == 10_000
    assert len(inspected) == 20
    assert prompt_set.requests[-1].source_line == 10_001  # header = row 1
    assert len({r.request_key for r in prompt_set.requests}) == 10_000


# --- CSV ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, expected",
    [
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("1", True),
        ("false", False),
        ("No", False),
        ("0", False),
        ("", True),
    ],  # empty: the model's default
)
def test_csv_booleans(tmp_path, cell, expected):
    write_image(tmp_path / "img.png")
    path = write_set(
        tmp_path, "b.csv", f"image,prompt,generate_audio,enhance_prompt\nimg.png,p,{cell},{cell}\n"
    )
    [request] = load_prompt_set(path).requests
    assert (request.request.generate_audio, request.request.enhance_prompt) == (expected, expected)


def test_csv_rows_number_as_a_spreadsheet_shows_them(tmp_path):
    write_image(tmp_path / "img.png")
    text = 'image,prompt,seed\n\nimg.png,"two\nlines",1\nimg.png,p,x\n'
    [problem] = problems_of(write_set(tmp_path, "rows.csv", text))
    assert str(problem) == f"{tmp_path / 'rows.csv'}:row 4: seed: got 'x', allowed: an integer 0..2147483647"


# --- DataFrame and provenance ------------------------------------------------------------------------


@pytest.fixture
def rich_set(tmp_path) -> PromptSet:
    write_image(tmp_path / "img.png")
    write_wav(tmp_path / "music.wav")
    memory = fsspec.filesystem("memory")
    memory.pipe("/catalog-test/remote.jpg", (tmp_path / "img.png").read_bytes())
    text = """
defaults: {negative_prompt: blurry, resolution: 720p, duration: 5}
items:
  - {image: img.png, prompt: With audio, audio: music.wav, seed: 3}
  - {image: "https://example.com/a.png", prompt: By URL, negative_prompt: null, shot_type: multi}
  - {image: "memory://catalog-test/remote.jpg", prompt: From fsspec, generate_audio: false, enhance_prompt: false}
"""
    yield load_prompt_set(write_set(tmp_path, "rich.yaml", text))
    memory.rm("/catalog-test", recursive=True)


def test_dataframe_round_trips_through_parquet(rich_set):
    frame = rich_set.to_dataframe()
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    restored = pd.read_parquet(io.BytesIO(buffer.getvalue()))

    assert requests_from_dataframe(restored) == rich_set.requests
    assert str(frame["seed"].dtype) == "int64" and str(frame["generate_audio"].dtype) == "bool"
    assert frame.loc[1, "negative_prompt"] is pd.NA or pd.isna(frame.loc[1, "negative_prompt"])  # null unsets
    assert list(frame["image_sha256"].isna()) == [False, True, False]
    assert frame.loc[0, "audio_sha256"] == rich_set.requests[0].audio_sha256


def test_provenance_names_media_by_source_and_content(rich_set, tmp_path):
    with_audio, by_url, _ = rich_set.requests
    record = with_audio.provenance_request()

    assert record["image_url"] == {"source": "img.png", "sha256": with_audio.image_sha256}
    assert record["audio_url"] == {"source": "music.wav", "sha256": with_audio.audio_sha256}
    assert with_audio.request.image_url == str(tmp_path / "img.png")  # the request carries the resolved path
    assert str(tmp_path) not in str(record)
    assert by_url.provenance_request()["image_url"] == {"source": "https://example.com/a.png", "sha256": None}
    assert "audio_url" not in by_url.provenance_request()


# --- discovery, names, CLI ---------------------------------------------------------------------------


def test_only_usable_names_are_discovered_and_the_rest_reported(tmp_path):
    write_image(tmp_path / "img.png")
    good = "items:\n  - {image: img.png, prompt: p}\n"
    for name in ("good.yaml", "Bad Name.yaml", "twin.yaml", "twin.csv", "readme.md"):
        write_set(tmp_path, name, good if name.endswith((".yaml", ".md")) else "image,prompt\nimg.png,q\n")

    assert discover_prompt_sets(tmp_path) == {"good": tmp_path / "good.yaml"}
    reports = {r.path.name: r for r in validate_paths([tmp_path])}
    assert sorted(reports) == ["Bad Name.yaml", "good.yaml", "twin.csv", "twin.yaml"]
    assert reports["good.yaml"].ok
    assert [p.field for p in reports["Bad Name.yaml"].problems] == ["name"]
    assert "defined by 2 files (twin.csv, twin.yaml)" in reports["twin.yaml"].problems[0].message


def test_validate_command_prints_counts_costs_and_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WAN_PIPELINE_CATALOG_DIR", raising=False)
    assert validate_command([]) == 0  # default: WAN_PIPELINE_CATALOG_DIR, else configs/prompt_sets
    out = capsys.readouterr().out
    assert "spring_campaign (configs/prompt_sets/spring_campaign.yaml): 5 generations, est. $2.625*" in out
    assert "total: 2 sets, 7 generations, est. $3.675*; all valid" in out

    assert validate_command([str(FIXTURES / "broken.csv"), str(REPO / "configs" / "prompt_sets")]) == 1
    out = capsys.readouterr().out
    assert "tests/fixtures/catalogs/broken.csv:row 2: generate_audio: got 'maybe'" in out

    monkeypatch.setenv("WAN_PIPELINE_CATALOG_DIR", str(tmp_path))
    assert validate_command([]) == 1
    assert "no prompt-set files" in capsys.readouterr().out
    assert validate_command(["no/such/set.yaml"]) == 1


# --- prices ------------------------------------------------------------------------------------------


def test_price_table_documented_and_estimated_rates():
    prices = PriceTable.load()
    model = "alibaba/wan-2-6-i2v"
    assert prices.estimate_usd(model, "1080p", 5) == pytest.approx(0.7875)
    assert not prices.is_estimate(model, "1080p")
    assert prices.estimate_usd(model, "720p", 10) == pytest.approx(1.05)
    assert prices.is_estimate(model, "720p")
    with pytest.raises(PriceUnknown):
        prices.estimate_usd(model, "480p", 5)


def test_embedded_prices_equal_the_file_and_stand_in_for_it(monkeypatch):
    assert yaml.safe_load(pricing.DEFAULT_PRICES_PATH.read_text()) == pricing.EMBEDDED_PRICES
    monkeypatch.setattr(pricing, "DEFAULT_PRICES_PATH", REPO / "no-such-prices.yaml")
    embedded = PriceTable.load()
    assert embedded.origin == "embedded"
    assert embedded.prices == PriceTable.load(REPO / "configs" / "prices.yaml").prices


def test_a_project_laid_out_like_this_one_reads_its_own_data_from_any_working_directory(
    tmp_path, monkeypatch
):
    project = tmp_path / "elsewhere"
    image = write_image(project / "data" / "images" / "a.png")
    path = write_set(
        project / "configs" / "prompt_sets",
        "s.yaml",
        "items:\n  - image: ../../data/images/a.png\n    prompt: p\n",
    )
    monkeypatch.chdir(tmp_path)  # not the project: its `data/` is found through the catalog's layout
    assert load_prompt_set(path).requests[0].image_sha256 == sources.sha256_hex(image.read_bytes())
    sibling = write_set(
        project / "configs" / "prompt_sets",
        "t.yaml",
        "items:\n  - image: ../../../secret.png\n    prompt: p\n",
    )
    write_image(tmp_path / "secret.png")
    [problem] = problems_of(sibling)
    assert "outside the allowed roots" in problem.message
