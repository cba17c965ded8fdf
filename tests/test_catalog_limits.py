"""Hostile catalogs (issue 9): every bound refuses at its limit + 1 and accepts at its limit, with a
located one-line problem and no traceback; whatever a report quotes is escaped and bounded."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from wan_pipeline.catalog import (
    MAX_ALIAS_NODES,
    MAX_FILE_BYTES,
    CatalogError,
    CatalogLimits,
    format_reports,
    load_prompt_set,
    validate_command,
    validate_paths,
)
from wan_pipeline.catalog.limits import QUOTE_LIMIT

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def project_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture
def folder(tmp_path) -> Path:
    Image.new("RGB", (400, 400), (40, 120, 200)).save(tmp_path / "img.png")
    return tmp_path


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, **kwargs):
    with pytest.raises(CatalogError) as caught:
        load_prompt_set(path, **kwargs)
    return caught.value.problems


def billion_laughs() -> str:
    lines = ["a: &a [x,x,x,x,x,x,x,x,x]"]
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join([f'*{previous}'] * 9)}]")
    return "\n".join([*lines, "description: *i"]) + "\n"


def aliases_text(alias_count: int) -> str:
    """An anchored list of 999 scalars (1,000 nodes with the list) and `alias_count` aliases of it."""
    return f"seeds: &s [{','.join(['1'] * 999)}]\nmore: [{', '.join(['*s'] * alias_count)}]\n"


def alias_problems(path: Path) -> list:
    return [p for p in problems_of(path) if p.field == "aliases"]


# --- YAML aliases ------------------------------------------------------------------------------------


def test_billion_laughs_is_refused_while_composing_with_little_memory(folder):
    path = write(folder, "bomb.yaml", billion_laughs())
    tracemalloc.start()
    try:
        [report] = validate_paths([path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    [problem] = report.problems
    assert problem.location == "line 6" and problem.field == "aliases"  # `f: &f [*e,...]` crosses the bound
    assert f"past {MAX_ALIAS_NODES} nodes" in problem.message
    assert peak < 20 * 1024 * 1024  # today: MemoryError after 2.3 GB


def test_alias_expansion_at_the_limit_passes_and_one_alias_more_is_refused(folder):
    per_alias = 1000  # the anchored list and its 999 entries
    at_limit = write(folder, "at.yaml", aliases_text(MAX_ALIAS_NODES // per_alias))
    past = write(folder, "past.yaml", aliases_text(MAX_ALIAS_NODES // per_alias + 1))

    assert alias_problems(at_limit) == []  # only the unknown top-level keys are reported
    [problem] = alias_problems(past)
    assert problem.location == "line 2" and "alias *s" in problem.message


def test_a_recursive_alias_is_a_located_problem(folder):
    [problem] = problems_of(write(folder, "loop.yaml", "items: &x [*x]\n"))
    assert (problem.location, problem.field) == ("line 1", "aliases") and "recursive" in problem.message


def test_items_aliasing_one_item_with_a_thousand_seeds_are_refused_early(folder):
    # The 84 KB file: MemoryError at 2.7 GB before.
    seeds = ", ".join(str(seed) for seed in range(1000))
    text = f"items:\n  - &one {{image: img.png, prompt: p, seeds: [{seeds}]}}\n" + "  - *one\n" * 12_000
    [problem] = problems_of(write(folder, "items.yaml", text))
    # The item weighs 1,007 nodes: the 100th alias (line 102) takes the aliases past 100,000.
    assert problem.field == "aliases" and problem.location == "line 102"


# --- one cap for every way of making generations -------------------------------------------------------

SMALL = CatalogLimits(max_generations=6)


def seeds_item(count: int) -> str:
    return f"items:\n  - {{image: img.png, prompt: p, seeds: [{', '.join(str(s) for s in range(count))}]}}\n"


@pytest.mark.parametrize(
    "name, at_limit, past_limit, location, message",
    [
        ("seeds.yaml", seeds_item(6), seeds_item(7), "line 1", "items: expands to 7 generations, allowed: at most 6"),
        ("grid.yaml", "grid: {images: [img.png], prompts: [a, b, c], seeds: [1, 2]}\n",
         "grid: {images: [img.png, img.png], prompts: [a, b, c], seeds: [1, 2]}\n", "line 1",
         "grid: expands to 12 generations, allowed: at most 6"),
        ("both.yaml", seeds_item(2) + "grid: {images: [img.png], prompts: [a, b], seeds: [1, 2]}\n",
         seeds_item(3) + "grid: {images: [img.png], prompts: [a, b], seeds: [1, 2]}\n", "line 1",
         "items: expands to 7 generations (3 from items, 4 from the grid), allowed: at most 6"),
        ("rows.csv", "image,prompt,seed\n" + "".join(f"img.png,p,{s}\n" for s in range(6)),
         "image,prompt,seed\n" + "".join(f"img.png,p,{s}\n" for s in range(7)), None,
         "rows: expands to 7 generations, allowed: at most 6"),
    ],
)
def test_generations_are_counted_against_one_cap_before_expanding(folder, name, at_limit, past_limit, location,
                                                                   message):
    assert len(load_prompt_set(write(folder, name, at_limit), limits=SMALL).requests) == 6
    [problem] = problems_of(write(folder, name, past_limit), limits=SMALL)
    assert (problem.location, problem.message) == (location, message)


# --- file size -----------------------------------------------------------------------------------------


def test_file_size_at_the_limit_is_read_and_one_byte_more_is_refused_unread(folder, monkeypatch):
    text = "image,prompt\nimg.png,p\n"
    at_limit = write(folder, "at.csv", text)
    assert load_prompt_set(at_limit, limits=CatalogLimits(max_file_bytes=len(text))).requests

    past = folder / "past.csv"
    with past.open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: the size is all that matters

    real_open = Path.open

    def refuse_past(self, *args, **kwargs):
        assert self != past, "an oversized file was opened"
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse_past)
    [problem] = problems_of(past)
    assert (problem.location, problem.field) == (None, "file size")
    assert problem.message == f"file size: {MAX_FILE_BYTES + 1} bytes, allowed: at most {MAX_FILE_BYTES} bytes"


# --- control characters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, location, field, shown",
    [
        ("nul.csv", "image,prompt\nimg.png,a\x00b\n", "row 2", "prompt", "\\x00"),
        ("raw_nul.yaml", "items:\n  - image: img.png\n    prompt: a\x00b\n", "line 3", "prompt", "\\x00"),
        ("escape.yaml", 'items:\n  - image: img.png\n    prompt: "red \\e[31m"\n', "line 3", "prompt", "\\x1b"),
        ("tab_path.yaml", 'items:\n  - image: "img\\t.png"\n    prompt: p\n', "line 2", "image", "\\t"),
        ("bidi.csv", "image,prompt\nimg.png,abc\u202edef\n", "row 2", "prompt", "\\u202e"),
        ("model.csv", "image,prompt,model\nimg.png,p,x\x1by\n", "row 2", "model", "\\x1b"),
        ("description.yaml", 'description: "a\\x07"\nitems:\n  - {image: img.png, prompt: p}\n', "line 1",
         "description", "\\x07"),
    ],
)
def test_control_characters_are_located_problems(folder, name, text, location, field, shown):
    problems = problems_of(write(folder, name, text))
    [problem] = [p for p in problems if p.field == field]
    assert problem.location == location
    assert f"{field}: control character {shown} at " in problem.message
    assert "\x00" not in str(problem) and "\x1b" not in str(problem)


def test_tabs_newlines_and_joiners_are_allowed_in_prompts(folder):
    text = 'items:\n  - image: img.png\n    prompt: "Two\\tcolumns\\nand a family \U0001F468\u200d\U0001F469"\n'
    [request] = load_prompt_set(write(folder, "multiline.yaml", text)).requests
    assert request.request.prompt == "Two\tcolumns\nand a family \U0001F468\u200d\U0001F469"


# --- what reports print --------------------------------------------------------------------------------


def test_reports_escape_file_names_and_values_and_keep_one_problem_per_line(folder):
    write(folder, "bad\nname\x1b[2J.yaml", 'items:\n  - {image: img.png, prompt: p, "\\e[31mcolour": red}\n')
    write(folder, "long.yaml", f"items:\n  - {{image: img.png, prompt: p, model: {'m' * 10_000}}}\n")

    reports = validate_paths([folder])
    output = format_reports(reports)

    assert "\x1b" not in output
    problems = [line for line in output.splitlines() if line.startswith("  ")]
    assert len(problems) == sum(len(report.problems) for report in reports)
    assert any("bad\\nname\\x1b[2J.yaml" in line and "\\x1b[31mcolour: unknown field" in line for line in problems)
    [long_value] = [line for line in problems if "model: got" in line]
    assert "more chars]" in long_value and len(long_value) < len(str(folder)) + 3 * QUOTE_LIMIT + 200


def test_an_unknown_field_gets_the_closest_allowed_name(folder):
    path = write(folder, "typo.yaml", "items:\n  - {image: img.png, promt: A slow pan}\n")
    messages = [p.message for p in problems_of(path)]
    assert any(m.startswith("promt: unknown field, did you mean 'prompt'? allowed: ") for m in messages)
    assert "prompt: missing, allowed: a non-empty string" in messages


def test_the_core_reads_no_environment(folder, monkeypatch, capsys):
    monkeypatch.setenv("WAN_PIPELINE_CATALOG_DIR", str(folder))
    monkeypatch.setenv("WAN_PIPELINE_ALLOWED_ROOTS", str(folder))
    assert validate_command([]) == 0  # the explicit default, configs/prompt_sets
    assert "configs/prompt_sets/spring_campaign.yaml" in capsys.readouterr().out
