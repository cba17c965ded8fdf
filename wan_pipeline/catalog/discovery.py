"""Which files in a catalog folder are prompt sets, their names, and how paths are shown."""

from __future__ import annotations

import re
from pathlib import Path

SLUG = re.compile(r"[a-z0-9][a-z0-9_-]*")
SLUG_ALLOWED = "a slug [a-z0-9][a-z0-9_-]* (the file name without its extension)"
SET_SUFFIXES = (".yaml", ".yml", ".csv")


def is_valid_set_name(name: str) -> bool:
    return SLUG.fullmatch(name) is not None


def prompt_set_files(catalog_dir: Path) -> list[Path]:
    """Every candidate set file directly in `catalog_dir` (*.yaml, *.yml, *.csv), valid name or not."""
    return sorted(
        path for path in Path(catalog_dir).iterdir() if path.is_file() and path.suffix.lower() in SET_SUFFIXES
    )


def discover_prompt_sets(catalog_dir: Path) -> dict[str, Path]:
    """Slug -> file for the sets usable as partitions. A file whose stem is not a slug, or whose stem
    another file also claims (`x.yaml` and `x.csv`), is left out here and reported by `validate_paths`."""
    if not Path(catalog_dir).is_dir():
        return {}
    by_name: dict[str, list[Path]] = {}
    for path in prompt_set_files(catalog_dir):
        by_name.setdefault(path.stem, []).append(path)
    return {name: paths[0] for name, paths in by_name.items() if len(paths) == 1 and is_valid_set_name(name)}


def display_path(path: Path) -> str:
    """A path as messages show it: relative to the working directory when under it (stable reports).
    Raw: whatever prints it escapes it (`CatalogProblem.__str__`, `format_reports`)."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(resolved)
