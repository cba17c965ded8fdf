"""Validation reports, as `wan-pipeline validate` prints them: one per set file, every problem,
counts and estimated cost. Everything a report quotes (names, paths, values, messages) is escaped
by `safe_text.printable`, one problem per line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from wan_pipeline.catalog.discovery import SET_SUFFIXES, display_path, prompt_set_files
from wan_pipeline.catalog.limits import DEFAULT_LIMITS, PATH_LIMIT, CatalogLimits
from wan_pipeline.catalog.loader import load_with_problems
from wan_pipeline.catalog.model import CatalogProblem, SetReport
from wan_pipeline.pricing import PriceTable
from wan_pipeline.safe_text import printable
from wan_pipeline.settings import DEFAULT_CATALOG_DIR


def validate_paths(
    paths: Sequence[Path],
    *,
    allowed_roots: Sequence[Path] = (),
    prices: PriceTable | None = None,
    limits: CatalogLimits = DEFAULT_LIMITS,
) -> list[SetReport]:
    """One report per set file; a folder stands for every set file directly in it."""
    prices = prices or PriceTable.load()
    reports: list[SetReport] = []
    for given in paths:
        given = Path(given)
        if given.is_dir():
            reports.extend(_validate_folder(given, allowed_roots, prices, limits))
        elif given.exists():
            reports.append(_validate_file(given, allowed_roots, prices, limits))
        else:
            problem = CatalogProblem(display_path(given), None, None, None, None, "no such file or folder")
            reports.append(SetReport(given.stem, given, 0, 0.0, [problem]))
    return reports


def _validate_folder(
    folder: Path, allowed_roots: Sequence[Path], prices: PriceTable, limits: CatalogLimits
) -> list[SetReport]:
    files = prompt_set_files(folder)
    if not files:
        problem = CatalogProblem(display_path(folder), None, None, None, None,
                                 f"no prompt-set files ({', '.join('*' + s for s in SET_SUFFIXES)}) in this folder")
        return [SetReport(folder.name, folder, 0, 0.0, [problem])]
    reports = [_validate_file(path, allowed_roots, prices, limits) for path in files]
    claimed: dict[str, list[SetReport]] = {}
    for report in reports:
        claimed.setdefault(report.name, []).append(report)
    for name, claimants in claimed.items():
        if len(claimants) > 1:
            names = ", ".join(report.path.name for report in claimants)
            for report in claimants:
                report.problems.insert(0, CatalogProblem(
                    display_path(report.path), None, "name", name, "one file per prompt-set name",
                    f"name: prompt set {name!r} is defined by {len(claimants)} files ({names}), allowed: one",
                ))
    return reports


def _validate_file(path: Path, allowed_roots: Sequence[Path], prices: PriceTable, limits: CatalogLimits) -> SetReport:
    prompt_set, problems = load_with_problems(path, allowed_roots, prices, limits)
    return SetReport(
        name=prompt_set.name,
        path=path,
        count=len(prompt_set.requests),
        estimated_usd=prompt_set.estimated_usd,
        problems=problems,
        price_is_estimate=any(
            prices.is_estimate(r.request.model, r.request.resolution) for r in prompt_set.requests
        ),
        prompt_set=prompt_set,
    )


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _usd(amount: float) -> str:
    """Dollars to the hundredth, or the ten-thousandth where it matters ($0.7875 is one 1080p 5 s video)."""
    text = f"{amount:.4f}"
    return "$" + (text[:-2] + text[-2:].rstrip("0"))


def format_reports(reports: Iterable[SetReport]) -> str:
    """Per set: name, file, generations, estimated USD, then every problem; then a total."""
    reports = list(reports)
    lines = []
    for report in reports:
        mark = "*" if report.price_is_estimate else ""
        status = "ok" if report.ok else f"INVALID, {_counted(len(report.problems), 'problem')}"
        lines.append(
            f"{printable(report.name, PATH_LIMIT)} ({printable(display_path(report.path), PATH_LIMIT)}): "
            f"{_counted(report.count, 'generation')}, est. {_usd(report.estimated_usd)}{mark} -- {status}"
        )
        lines.extend(f"  {problem}" for problem in report.problems)
    invalid = sum(not report.ok for report in reports)
    any_estimate = any(report.price_is_estimate for report in reports)
    lines.append(
        f"total: {_counted(len(reports), 'set')}, {_counted(sum(r.count for r in reports), 'generation')}, "
        f"est. {_usd(sum(r.estimated_usd for r in reports))}{'*' if any_estimate else ''}; "
        + (f"{invalid} invalid" if invalid else "all valid")
    )
    if any_estimate:
        lines.append("* includes prices marked as estimates in the price table (not documented by the provider)")
    return "\n".join(lines)


def validate_command(
    paths: Sequence[str],
    *,
    catalog_dir: Path = Path(DEFAULT_CATALOG_DIR),
    allowed_roots: Sequence[Path] = (),
    prices: PriceTable | None = None,
    limits: CatalogLimits = DEFAULT_LIMITS,
) -> int:
    """`wan-pipeline validate [PATH...]`: print the reports; 0 only when every set is valid.

    Without paths, `catalog_dir` is validated. Nothing here reads the environment: the CLI passes
    `settings.catalog_dir` and `settings.allowed_roots`."""
    targets = [Path(p) for p in paths] or [Path(catalog_dir)]
    reports = validate_paths(targets, allowed_roots=allowed_roots, prices=prices, limits=limits)
    print(format_reports(reports))
    return 0 if reports and all(report.ok for report in reports) else 1
