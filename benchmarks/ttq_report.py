"""What benchmarks/time_to_quality.py prints and draws from its rows: the time each recipe first
reached a bits/dim (:func:`time_to_reach`), markdown tables, and the plot of test bits/dim
against training minutes."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

THRESHOLDS = (4.5, 4.0, 3.7)


def time_to_reach(points: Sequence[Tuple[float, float]], threshold: float) -> Tuple[Optional[float], str]:
    """When a curve of (minutes, bits/dim) evaluations first reached ``threshold`` (bits/dim at or
    below it): (minutes, "interpolated") linearly between the last evaluation above it and the
    first at or below it; (minutes of the first evaluation, "by") when the first evaluation is
    already there (it was reached at some time up to then); (None, "not reached") otherwise.
    Non-finite bits/dim count as above every threshold."""
    previous: Optional[Tuple[float, float]] = None
    for minutes, bpd in sorted(points):
        if math.isfinite(bpd) and bpd <= threshold:
            if previous is None:
                return minutes, "by"
            t0, b0 = previous
            if not math.isfinite(b0):
                return minutes, "by"
            return t0 + (b0 - threshold) / (b0 - bpd) * (minutes - t0), "interpolated"
        previous = (minutes, bpd)
    return None, "not reached"


def format_reach(minutes: Optional[float], kind: str) -> str:
    if minutes is None:
        return "not reached"
    return f"<= {minutes:.1f}" if kind == "by" else f"{minutes:.1f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table; numbers right-aligned (``|---:|``), the rest left."""
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def curves(rows: Sequence[Dict]) -> Dict[str, List[Tuple[float, float]]]:
    """{recipe: [(minutes, test bits/dim), ...]} in the order the recipes first appear."""
    out: Dict[str, List[Tuple[float, float]]] = {}
    for row in rows:
        out.setdefault(row["recipe"], []).append((row["minutes"], row["test_bpd"]))
    return out


def reach_rows(rows: Sequence[Dict], thresholds: Sequence[float] = THRESHOLDS) -> List[Dict]:
    """One dict per recipe: {recipe, threshold: {"minutes", "kind"}} for each threshold."""
    out = []
    for recipe, points in curves(rows).items():
        entry = {"recipe": recipe}
        for threshold in thresholds:
            minutes, kind = time_to_reach(points, threshold)
            entry[str(threshold)] = {"minutes": minutes, "kind": kind}
        out.append(entry)
    return out


def reach_table(reach: Sequence[Dict], thresholds: Sequence[float] = THRESHOLDS) -> str:
    headers = ["recipe"] + [f"minutes to {t:g} bits/dim" for t in thresholds]
    body = [
        [entry["recipe"]] + [format_reach(entry[str(t)]["minutes"], entry[str(t)]["kind"]) for t in thresholds]
        for entry in reach
    ]
    return markdown_table(headers, body)


def plot(rows: Sequence[Dict], path: str, title: str, thresholds: Sequence[float] = THRESHOLDS) -> None:
    """Test bits/dim against training minutes, one line per recipe, the thresholds dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for recipe, points in curves(rows).items():
        finite = [(m, b) for m, b in points if math.isfinite(b)]
        if finite:
            axes.plot(*zip(*finite), marker="o", label=recipe)
    for threshold in thresholds:
        axes.axhline(threshold, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("training wall-clock minutes (evaluation excluded)")
    axes.set_ylabel("test bits/dim")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
