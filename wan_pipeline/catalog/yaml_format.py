"""YAML prompt sets: parsing with bounded aliases, line numbers, and expansion into drafts.

A YAML set is a mapping with optional `description`, `defaults` (any catalog field), `items` (each a
mapping with `image`, `prompt`, request fields, and `seed` or a `seeds` list) and `grid` (lists
`images`, `prompts`, optional `seeds`, and any other field as a list or a single value: the
cartesian product). A field set to null is unset (the model's default applies). Anchors, aliases
and merge keys are plain YAML, within `MAX_ALIAS_NODES`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.reader import ReaderError

from wan_pipeline.catalog.drafts import CATALOG_FIELDS, Draft, Fields
from wan_pipeline.catalog.limits import CHARACTERS_ALLOWED, CatalogLimits, character_problem
from wan_pipeline.catalog.problems import ProblemLog, shown
from wan_pipeline.safe_text import printable

TOP_LEVEL_KEYS = ("description", "defaults", "items", "grid")
ITEM_KEYS = (*CATALOG_FIELDS, "seeds")
# Grid axes: the three plural lists, then any other field, as a list or a single value.
GRID_LISTS = {"images": "image", "prompts": "prompt", "seeds": "seed"}
GRID_KEYS = (*GRID_LISTS, *(name for name in CATALOG_FIELDS if name not in GRID_LISTS.values()))
# The key a line starts with (`  - prompt: ...`), to name the field of a character the reader refuses.
_LINE_KEY = re.compile(r"[ \t]*(?:-[ \t]+)?([A-Za-z_]+)[ \t]*:")


class AliasLimitError(ComposerError):
    """A document whose aliases would expand beyond the limit, or into themselves."""


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer weighs every alias by the size of the node it names (aliases in
    that node included) and stops at `max_alias_nodes`: the expansion is counted, never built."""

    def __init__(self, text: str, max_alias_nodes: int):
        super().__init__(text)
        self.max_alias_nodes = max_alias_nodes
        self.alias_nodes = 0
        self._sizes: dict[int, int] = {}  # id(node) -> its size with aliases written out

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            anchored = self.anchors.get(event.anchor)
            if anchored is not None:  # an undefined alias is reported by the composer itself
                self._count_alias(event, anchored)
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = []
        self._sizes[id(node)] = 1 + sum(self._sizes[id(child)] for child in children)
        return node

    def _count_alias(self, event: yaml.AliasEvent, anchored: yaml.Node) -> None:
        size = self._sizes.get(id(anchored))
        if size is None:  # its node is still being composed: the alias is inside what it names
            raise AliasLimitError(None, None, f"alias *{event.anchor} is inside the node it names (a recursive "
                                  "structure), allowed: aliases of finished nodes", event.start_mark)
        self.alias_nodes += size
        if self.alias_nodes > self.max_alias_nodes:
            raise AliasLimitError(None, None, f"alias *{event.anchor} takes the aliases' expansion past "
                                  f"{self.max_alias_nodes} nodes, allowed: at most {self.max_alias_nodes} "
                                  "(write fewer or smaller aliases)", event.start_mark)


@dataclass
class YamlDocument:
    data: Any
    lines: dict[tuple[Any, ...], int]  # path of keys / indexes -> 1-based line

    def line(self, *path: Any) -> int:
        while path not in self.lines:  # an aliased node's children are recorded under its first path
            path = path[:-1]
        return self.lines[path]

    def at(self, *path: Any) -> str:
        return f"line {self.line(*path)}"


def parse_yaml(text: str, log: ProblemLog, limits: CatalogLimits) -> YamlDocument | None:
    try:
        loader = _BoundedLoader(text, limits.max_alias_nodes)  # the reader checks the characters here
    except ReaderError as exc:
        _report_refused_character(text, exc, log)
        return None
    try:
        node = loader.get_single_node()
        if node is None:
            return YamlDocument(None, {(): 1})
        data = loader.construct_document(node)
        return YamlDocument(data, _node_lines(node, loader, log))
    except AliasLimitError as exc:
        log.add(f"line {exc.problem_mark.line + 1}", f"aliases: {exc.problem}", field="aliases",
                allowed=f"at most {limits.max_alias_nodes} nodes from aliases")
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = ", ".join(part for part in (exc.context, exc.problem) if part) or str(exc)
        log.add(f"line {mark.line + 1}" if mark else None, f"malformed YAML: {detail}")
    except yaml.YAMLError as exc:  # its message spans lines: one line per problem
        log.add(None, f"malformed YAML: {' '.join(str(exc).split())}")
    except RecursionError:
        log.add(None, "malformed YAML: nested too deeply")
    finally:
        loader.dispose()
    return None


def _report_refused_character(text: str, exc: ReaderError, log: ProblemLog) -> None:
    """A character YAML does not allow in a file (NUL, ESC...), located by line, column and field."""
    line_start = text.rfind("\n", 0, exc.position) + 1
    key = _LINE_KEY.match(text, line_start)
    field = key.group(1) if key else None
    line = text.count("\n", 0, exc.position) + 1
    log.add(f"line {line}",
            f"{field or 'text'}: control character {printable(chr(exc.character))} at column "
            f"{exc.position - line_start + 1}, allowed: {CHARACTERS_ALLOWED}",
            field=field, allowed=CHARACTERS_ALLOWED)


def _node_lines(root: yaml.Node, loader: yaml.SafeLoader, log: ProblemLog) -> dict[tuple[Any, ...], int]:
    """Line of every mapping key and sequence entry, by path; reports keys written twice in a mapping."""
    lines: dict[tuple[Any, ...], int] = {(): root.start_mark.line + 1}
    visited: set[int] = set()  # each node once: aliases may share a node
    stack: list[tuple[tuple[Any, ...], yaml.Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys_seen = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # a complex key already failed construction
                key = loader.construct_object(key_node)
                line = key_node.start_mark.line + 1
                # A key merged in with `<<: *anchor` lives elsewhere; overriding it is not a repeat.
                written_here = node.start_mark.index <= key_node.start_mark.index <= node.end_mark.index
                if key in keys_seen and written_here:
                    log.add(f"line {line}", f"{printable(key)}: written twice in one mapping (the last one "
                            "would win)", field=str(key))
                if written_here:
                    keys_seen.add(key)
                lines[path + (key,)] = line
                stack.append((path + (key,), value_node))
        elif isinstance(node, yaml.SequenceNode):
            for index, child in enumerate(node.value):
                lines[path + (index,)] = child.start_mark.line + 1
                stack.append((path + (index,), child))
    return lines


def yaml_drafts(doc: YamlDocument, log: ProblemLog, limits: CatalogLimits) -> tuple[str | None, list[Draft]]:
    """The description and the generations of a parsed YAML set (none when they are too many)."""
    data = doc.data
    if data is None:
        return None, []  # an empty file: reported as having no generations
    if not isinstance(data, dict):
        log.add(doc.at(), f"the catalog must be a mapping with keys {', '.join(TOP_LEVEL_KEYS)}; "
                f"got {shown(data)}", value=data, allowed=f"a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
        return None, []
    for key, value in data.items():
        if key not in TOP_LEVEL_KEYS:
            log.unknown_key(doc.at(key), key, value, TOP_LEVEL_KEYS, "top-level key")

    description = _description(doc, data.get("description"), log)
    defaults = Fields()
    if data.get("defaults") is not None:
        if isinstance(data["defaults"], dict):
            defaults = _yaml_fields(doc, ("defaults",), data["defaults"], CATALOG_FIELDS, log)
        else:
            log.bad_value(doc.at("defaults"), "defaults", data["defaults"], "a mapping of request fields")

    items = data.get("items")
    if items is not None and not isinstance(items, list):
        log.bad_value(doc.at("items"), "items", items, "a list of generations (mappings)")
        items = None
    axes = _grid_axes(doc, data["grid"], log) if data.get("grid") is not None else []
    # Counted before anything is expanded: an item's seeds and the grid multiply.
    item_count = sum(len(item["seeds"]) if isinstance(item, dict) and isinstance(item.get("seeds"), list)
                     and item["seeds"] else 1 for item in items or [])
    grid_count = math.prod(len(entries) for _, entries in axes) if axes else 0
    if item_count + grid_count > limits.max_generations:
        if not item_count:
            log.too_many(doc.at("grid"), "grid", grid_count, limits.max_generations)
        else:
            detail = f" ({item_count} from items, {grid_count} from the grid)" if grid_count else ""
            log.too_many(doc.at("items"), "items", item_count + grid_count, limits.max_generations, detail)
        return description, []

    drafts = [draft for index, item in enumerate(items or []) for draft in _item_drafts(doc, index, item, defaults, log)]
    if axes:
        location, line = doc.at("grid"), doc.line("grid")
        for combination in itertools.product(*(entries for _, entries in axes)):
            fields = defaults.copy()
            for (name, _), (value, where) in zip(axes, combination, strict=True):
                fields.set(name, value, where)
            drafts.append(Draft(location, line, fields))
    return description, drafts


def _description(doc: YamlDocument, description: Any, log: ProblemLog) -> str | None:
    if description is None:
        return None
    if not isinstance(description, str):
        log.bad_value(doc.at("description"), "description", description, "a string")
        return None
    problem = character_problem("description", description)
    if problem:
        log.add(doc.at("description"), problem, field="description", value=description, allowed=CHARACTERS_ALLOWED)
        return None
    return description


def _yaml_fields(
    doc: YamlDocument, path: tuple[Any, ...], mapping: dict[Any, Any], allowed: Sequence[str], log: ProblemLog
) -> Fields:
    """The catalog fields of a mapping; unknown keys are reported; `seeds` is left to the caller."""
    fields = Fields()
    for key, value in mapping.items():
        if key not in allowed:
            log.unknown_key(doc.at(*path, key), key, value, allowed, "field")
        elif key != "seeds":
            fields.set(key, value, doc.at(*path, key))
    return fields


def _item_drafts(doc: YamlDocument, index: int, item: Any, defaults: Fields, log: ProblemLog) -> list[Draft]:
    path = ("items", index)
    if not isinstance(item, dict):
        log.bad_value(doc.at(*path), "items", item, "a mapping with image, prompt and request fields")
        return []
    fields = defaults.overlaid(_yaml_fields(doc, path, item, ITEM_KEYS, log))
    location, line = doc.at(*path), doc.line(*path)
    if "seeds" not in item:
        return [Draft(location, line, fields)]
    if "seed" in item:  # reported; the seeds are still expanded so their other problems show too
        log.add(doc.at(*path, "seeds"), "seeds: `seed` and `seeds` are both given, allowed: one of them",
                field="seeds", value=item["seeds"], allowed="one of seed | seeds")
    drafts = []
    for seed, where in _yaml_list(doc, path + ("seeds",), "seeds", item["seeds"], log):
        seeded = fields.copy()
        seeded.set("seed", seed, where)
        drafts.append(Draft(location, line, seeded))
    return drafts


def _yaml_list(
    doc: YamlDocument, path: tuple[Any, ...], name: str, value: Any, log: ProblemLog
) -> list[tuple[Any, str]]:
    """A non-empty list's entries with their locations; [] (and a problem) for anything else."""
    if isinstance(value, list) and value:
        return [(entry, doc.at(*path, index)) for index, entry in enumerate(value)]
    log.bad_value(doc.at(*path), name, value, "a non-empty list")
    return []


def _grid_axes(doc: YamlDocument, grid: Any, log: ProblemLog) -> list[tuple[str, list[tuple[Any, str]]]]:
    """The grid's axes in expansion order (images outermost, seeds innermost); [] when it is invalid."""
    if not isinstance(grid, dict):
        log.bad_value(doc.at("grid"), "grid", grid, "a mapping of images, prompts, seeds and request fields")
        return []
    problems_before = log.reported
    for name in ("images", "prompts"):
        if name not in grid:
            log.add(doc.at("grid"), f"grid: `{name}` is missing, allowed: a grid needs both images and prompts",
                    field=name, allowed="a grid with images and prompts")
    axes: list[tuple[str, list[tuple[Any, str]]]] = []
    for key, value in grid.items():
        if key not in GRID_KEYS:
            log.unknown_key(doc.at("grid", key), key, value, GRID_KEYS, "grid field")  # `seed`: did you mean 'seeds'?
        elif key in GRID_LISTS or isinstance(value, list):
            axes.append((GRID_LISTS.get(key, key), _yaml_list(doc, ("grid", key), key, value, log)))
        else:
            axes.append((key, [(value, doc.at("grid", key))]))
    if log.reported > problems_before:
        return []
    # Images outermost and seeds innermost, so the rows of one image and prompt stay together.
    rank = {"image": 0, "prompt": 1, "seed": 3}
    return sorted(axes, key=lambda axis: rank.get(axis[0], 2))
