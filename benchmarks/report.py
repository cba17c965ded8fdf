"""Markdown for the results, and the scaling verdicts of figure 6 (pure functions over the JSON)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# A step in marginal cost per generation beyond this factor is called a knee.
KNEE_FACTOR = 1.5


def cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def table_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met: bool | None) -> str:
    return {True: "MET", False: "MISSED", None: "not measured in this mode"}[met]


def figure_markdown(figure: dict[str, Any]) -> str:
    parts = [f"## Figure {figure['figure']}: {figure['title']}", ""]
    if figure["params"]:
        parts += ["Parameters: " + "; ".join(f"{k} = {cell(v)}" for k, v in figure["params"].items()), ""]
    for table in figure["tables"]:
        if table["title"]:
            parts += [f"**{table['title']}**", ""]
        parts += [table_markdown(table["columns"], table["rows"]), ""]
    if figure["targets"]:
        parts += ["Targets:", ""]
        for target in figure["targets"]:
            note = f" ({target['note']})" if target["note"] else ""
            parts.append(f"- {target['name']}: {cell(target['value'])}, target {target['goal']}: "
                         f"**{verdict(target['met'])}**{note}")
        parts.append("")
    for note in figure["notes"]:
        parts.append(f"- {note}")
    if figure["notes"]:
        parts.append("")
    return "\n".join(parts)


def growth(points: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """How a cost grows with N: marginal cost per unit between consecutive sizes, and the verdict.

    Linear means the marginal cost stays within KNEE_FACTOR of the previous step's; the knee is the
    first size after which it rises by more and stays up (superlinear); a falling marginal cost is
    sublinear (fixed costs still dominate at the small sizes). A single high step is noise, not a knee.
    """
    points = sorted(points)
    steps = [
        {"from": n0, "to": n1, "per_unit": (v1 - v0) / (n1 - n0)}
        for (n0, v0), (n1, v1) in zip(points, points[1:], strict=False)
    ]
    costs = [step["per_unit"] for step in steps]
    knee = next(
        (
            steps[i]["from"]
            for i in range(1, len(costs))
            if costs[i - 1] > 0 and all(later > KNEE_FACTOR * costs[i - 1] for later in costs[i:])
        ),
        None,
    )
    if len(steps) < 2:
        shape = "one step only"
    elif knee is not None:
        shape = f"superlinear past N = {knee:,.0f}"
    elif costs[-1] < costs[0] / KNEE_FACTOR:
        shape = "sublinear (fixed costs dominate the small sizes)"
    else:
        shape = "linear"
    return {"steps": steps, "knee": knee, "shape": shape}


def document(figures: Sequence[dict[str, Any]], machine: dict[str, Any], *, mode: str, elapsed_s: float,
             failures: Sequence[str]) -> str:
    header = [
        f"# wan-pipeline benchmarks ({mode})",
        "",
        f"Date: {machine['date']}. Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, "
        f"{machine['os']}, Python {machine['python']}; load average at start {machine['load_average_at_start']}. "
        + ", ".join(f"{k} {v}" for k, v in machine["packages"].items())
        + f". Whole run: {elapsed_s:.0f} s.",
        "",
        "All figures run against the local emulator in benchmark mode (`small_frames=True`: the requested "
        "frame size at 2 fps, so the two cores are not spent on H.264 encodes). Ratios compare "
        "measurements taken side by side in this run; absolute seconds on a shared 2-core machine are noisy. "
        "Regenerate with `make bench` (or `make bench-quick`). Method: benchmarks/README.md.",
        "",
    ]
    if mode == "quick":
        header += ["Quick mode runs small versions of each figure so the scripts never rot: fixed costs dominate "
                   "them and several targets are defined at sizes it does not reach. Its verdicts are indicative "
                   "only; `make bench` gives the figures.", ""]
    if failures:
        header += ["**Benchmarks that crashed:** " + "; ".join(failures), ""]
    summary = ["## Targets at a glance", "", table_markdown(
        ["figure", "target", "measured", "goal", "verdict"],
        [[f["figure"], t["name"], t["value"], t["goal"], verdict(t["met"])] for f in figures for t in f["targets"]],
    ), ""]
    return "\n".join(header + summary + [figure_markdown(f) for f in figures])


def _series(points: Sequence[tuple[float, float]], unit: str, scale: float) -> tuple[str, str]:
    """'N=10: 1.2; N=100: 3.4' and the marginal cost per generation of each step, in `unit`."""
    values = "; ".join(f"N={n:,.0f}: {cell(v)}" for n, v in sorted(points))
    steps = growth(points)["steps"]
    marginal = " -> ".join(f"{cell(step['per_unit'] * scale)}" for step in steps) + f" {unit}" if steps else "-"
    return values, marginal


def scaling_figure(figures: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Figure 6: how time and memory grow with N, from the measurements of figures 1, 3a, 3b and 5."""
    by_number = {f["figure"]: f["data"] for f in figures}
    series: list[tuple[str, list[tuple[float, float]], str, float]] = []
    if "1" in by_number:
        runs = by_number["1"]["runs"]
        series += [
            ("1: `wan-pipeline run` wall s", [(r["count"], r["wall_s"]) for r in runs], "ms / generation", 1000),
            ("1: `wan-pipeline run` peak RSS MB", [(r["count"], r["max_rss_mb"]) for r in runs], "MB / generation", 1),
            ("1: collect run s", [(r["count"], r["phases"].get("collect_run_s", 0.0)) for r in runs],
             "ms / generation", 1000),
        ]
    if "3a" in by_number:
        summary = by_number["3a"]["summary"]
        for variant in ("asset", "core", "bare"):
            series.append((f"3a: submit ({variant}) s", [(int(n), s[variant]["seconds"]) for n, s in summary.items()],
                           "ms / generation", 1000))
        series.append(("3a: submit (asset) peak RSS growth MB",
                       [(int(n), s["asset"]["memory_growth_mb"]) for n, s in summary.items()], "MB / generation", 1))
    if "3b" in by_number:
        for variant in ("sensor tick", "core poll_due"):
            results = [r for r in by_number["3b"]["results"] if r["variant"] == variant]
            series.append((f"3b: {variant} s", [(r["count"], r["seconds"]) for r in results], "ms / generation", 1000))
        series.append(("3b: sensor tick peak RSS growth MB",
                       [(r["count"], r["memory_growth_mb"]) for r in by_number["3b"]["results"]
                        if r["variant"] == "sensor tick"], "MB / generation", 1))
    if "5" in by_number:
        series.append(("5: load_prompt_set s", [(r["count"], r["load_s"]) for r in by_number["5"]["runs"]],
                       "ms / row", 1000))
    rows = []
    verdicts = {}
    for name, points, unit, scale in series:
        values, marginal = _series(points, unit, scale)
        shape = growth(points)
        verdicts[name] = shape
        rows.append([name, values, marginal, shape["shape"]])
    return {
        "figure": "6",
        "title": "Scaling: how time and memory grow with N",
        "params": {},
        "tables": [{"title": "", "columns": ["quantity", "measured", "marginal cost per step", "shape"],
                    "rows": rows}],
        "targets": [],
        "notes": [
            "Marginal cost = (value(N2) - value(N1)) / (N2 - N1) between consecutive sizes. Linear: it stays "
            f"within {KNEE_FACTOR:g}x from step to step; the knee is the first size after which it rises by more "
            "and stays up; "
            "sublinear: it falls (fixed costs such as imports and Dagster runs dominate the small sizes).",
            "Memory figures are peak resident set: of the whole `wan-pipeline run` process (figure 1) or the "
            "growth over the measured call in its worker (3a, 3b).",
        ],
        "data": verdicts,
    }
