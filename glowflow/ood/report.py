"""What a run shows and writes: the printed tables, the histogram and ROC figures (PNG), and the
JSON reports (one per outlier set, and a summary), each written atomically, under file names that
are unique within a run (:func:`file_slugs`: two sets with one base name never share a file)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from glowflow.config import dataset_slug
from glowflow.files import atomic_write, atomic_write_text
from glowflow.ood.metrics import _clean_pair
from glowflow.ood.reference import Reference
from glowflow.ood.scores import ScoredSet, score_definition


def format_table(report: Mapping) -> str:
    """The printed table of one report: score | AUROC | AUPR-in | AUPR-out | FPR95."""
    bpd = report["bits_per_dim"]
    lines = [
        f"Outlier detection: {report['in_dataset']} (in, n={report['n_in']}, {bpd['in']:.4f} bits/dim) vs "
        f"{report['out_dataset']} (out, n={report['n_out']}, {bpd['out']:.4f} bits/dim)",
        f"{'score':<18} {'AUROC':>7} {'AUPR-in':>8} {'AUPR-out':>9} {'FPR95':>7}",
    ]
    for name, m in report["scores"].items():
        lines.append(f"{name:<18} {m['auroc']:>7.4f} {m['aupr_in']:>8.4f} {m['aupr_out']:>9.4f} {m['fpr95']:>7.4f}")
    return "\n".join(lines)


def format_summary(reports: Mapping[str, Mapping]) -> str:
    """AUROC of every score (rows) against every outlier set (columns), and each set's bits/dim;
    the best score of each column is marked with ``*``."""
    names = list(reports)
    scores = list(next(iter(reports.values()))["scores"])
    width = max(12, *(len(n) + 1 for n in names))
    in_name = next(iter(reports.values()))["in_dataset"]
    lines = [
        f"AUROC, {in_name} (in) against each outlier set",
        f"{'score':<18}" + "".join(f"{n:>{width}}" for n in names),
    ]
    best = {}
    for n in names:
        values = {k: reports[n]["scores"][k]["auroc"] for k in scores if reports[n]["scores"][k]["auroc"] is not None}
        best[n] = max(values, key=values.get) if values else None
    for k in scores:
        cells = []
        for n in names:
            v = reports[n]["scores"][k]["auroc"]
            cells.append(f"{'-' if v is None else f'{v:.4f}' + ('*' if best[n] == k else ' '):>{width}}")
        lines.append(f"{k:<18}" + "".join(cells))
    lines.append(
        f"{'bits/dim in/out':<18}"
        + "".join(
            f"{reports[n]['bits_per_dim']['in']:.2f}/{reports[n]['bits_per_dim']['out']:.2f} ".rjust(width)
            for n in names
        )
    )
    return "\n".join(lines)


def _figure(n_panels: int, cols: int = 4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(n_panels / cols))
    cols = min(cols, max(1, n_panels))
    fig = Figure(figsize=(3.6 * cols, 2.9 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _iqr(v: np.ndarray) -> float:
    q75, q25 = np.percentile(v, [75, 25])
    return float(q75 - q25)


def _histogram_bins(a: np.ndarray, b: np.ndarray) -> Tuple[float, float, np.ndarray, Optional[float]]:
    """``(lo, hi, bins, symlog)`` for histograms of the scores ``a`` and ``b`` (1-D): 40 bins over
    the 0.5-99.5 percentiles of both together, even on a symmetric-log axis with linear range
    ``symlog`` when the range exceeds 200 times the smaller interquartile range (else ``symlog``
    is None and the bins are even)."""
    lo, hi = np.percentile(np.concatenate([a, b]), [0.5, 99.5])
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    scale = min(_iqr(a), _iqr(b))
    if scale <= 0:
        scale = (hi - lo) / 1000.0
    if hi - lo > 200 * scale:
        # bins even in t(v) = sign(v) log1p(|v| / scale), close to matplotlib's symlog
        def t(v):
            return np.sign(v) * np.log1p(np.abs(v) / scale)

        u = np.linspace(t(lo), t(hi), 41)
        return lo, hi, np.sign(u) * np.expm1(np.abs(u)) * scale, scale
    return lo, hi, np.linspace(lo, hi, 41), None


def save_histograms(
    path: str,
    scores_in: Mapping[str, np.ndarray],
    scores_out: Mapping[str, np.ndarray],
    in_name: str,
    out_name: str,
    metrics: Optional[Mapping] = None,
) -> None:
    """One panel per score: histograms of the in-distribution and outlier scores (Agg, PNG).

    Bars are the fraction of each set per bin. The bins span the 0.5-99.5 percentiles of both
    sets together; values beyond are counted in the edge bins, so one far-off outlier cannot
    squash the rest. When the two sets live on very different scales (the range exceeds 200
    times the smaller interquartile range), the x axis is symmetric-log (linear within that
    interquartile range of zero) with bins evenly spaced on it."""
    names = list(scores_in)
    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        a, b = _clean_pair(scores_in[name], scores_out[name])
        lo, hi, bins, symlog = _histogram_bins(a, b)
        if symlog is not None:
            ax.set_xscale("symlog", linthresh=symlog)
        ax.hist(
            np.clip(a, lo, hi), bins=bins, weights=np.full(a.size, 1.0 / a.size), alpha=0.55, label=f"{in_name} (in)"
        )
        ax.hist(
            np.clip(b, lo, hi), bins=bins, weights=np.full(b.size, 1.0 / b.size), alpha=0.55, label=f"{out_name} (out)"
        )
        title = name if metrics is None else f"{name}  AUROC {metrics[name]['auroc']:.3f}"
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    if axes:
        axes[0].legend(fontsize=7)
        axes[0].set_ylabel("fraction of images", fontsize=8)
    fig.suptitle(f"Outlier scores (higher = more outlying): {in_name} vs {out_name}", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png"))


def save_roc_curves(
    path: str, scores_in: Mapping[str, np.ndarray], scores_out: Mapping[str, np.ndarray], in_name: str, out_name: str
) -> None:
    """The ROC curves of every score on one axis (outliers positive), AUROC in the legend (Agg, PNG)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, (ax,) = _figure(1, cols=1)
    fig.set_size_inches(6.5, 6.0)
    for name in scores_in:
        a, b = _clean_pair(scores_in[name], scores_out[name])
        y = np.concatenate([np.zeros(a.size), np.ones(b.size)])
        s = np.concatenate([a, b])
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(y, s):.3f})", linewidth=1.2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.6)
    ax.set_xlabel("false-positive rate (in-distribution flagged)")
    ax.set_ylabel("true-positive rate (outliers flagged)")
    ax.set_title(f"ROC: {in_name} (in) vs {out_name} (out)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png"))


def _json_float(v: float) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


def _mean(a: np.ndarray) -> Optional[float]:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return _json_float(a.mean()) if a.size else None


def _write_json(path: str, payload) -> None:
    """``payload`` as indented JSON at ``path``, written atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def file_slugs(in_name: str, out_names: Sequence[str]) -> Tuple[str, Dict[str, str]]:
    """``(in slug, {out name: out slug})``: the names a run's files use for its datasets, unique
    within the run. Each is the dataset's base name (:func:`glowflow.config.dataset_slug`:
    ``/data/d1/set.npz`` -> ``set``) unless two datasets share it; then each of those gets a
    suffix: its parent folder's name (``set_d1``, ``set_d2``), or where that collides too (or
    there is no folder), 8 hex digits of the name's SHA-1 (``set_3f2a9c01``). An outlier set
    named exactly as the in-distribution set shares its slug."""
    names = list(dict.fromkeys([in_name, *out_names]))
    base = {name: dataset_slug(name) for name in names}
    counts = Counter(base.values())
    slugs = {name: base[name] for name in names if counts[base[name]] == 1}
    used = set(slugs.values())
    for name in names:
        if name in slugs:
            continue
        candidates = []
        if os.sep in name or name.endswith(".npz"):
            parent = os.path.basename(os.path.dirname(os.path.abspath(name)))
            if parent:
                candidates.append(f"{base[name]}_{dataset_slug(parent)}")
        digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()
        candidates += [f"{base[name]}_{digest[:8]}", f"{base[name]}_{digest}"]
        candidates += [f"{base[name]}_{digest}_{k}" for k in range(2, len(names) + 2)]
        slugs[name] = next(c for c in candidates if c not in used)
        used.add(slugs[name])
    return slugs[in_name], {name: slugs[name] for name in out_names}


def report_files(output_dir: str, in_slug: str, out_slug: str) -> Dict[str, str]:
    """The files of one comparison, named from the datasets' slugs (:func:`file_slugs`):
    ``{"json", "histograms", "roc"}`` -> ``<output_dir>/ood_<in>_vs_<out>{.json, _histograms.png,
    _roc.png}``."""
    stem = f"ood_{in_slug}_vs_{out_slug}"
    return {
        "json": os.path.join(output_dir, f"{stem}.json"),
        "histograms": os.path.join(output_dir, f"{stem}_histograms.png"),
        "roc": os.path.join(output_dir, f"{stem}_roc.png"),
    }


def reference_summary(reference: Reference, cache_path: Optional[str], reused: bool) -> dict:
    """The ``"reference"`` entry of a report: training images used, their bits/dim mean and std,
    the cache file and whether it was reused."""
    return {
        "n_train": reference.n_train,
        "train_bits_per_dim_mean": reference.bpd_mean,
        "train_bits_per_dim_std": reference.bpd_std,
        "cache": cache_path,
        "reused_cache": reused,
    }


def build_report(
    in_set: ScoredSet,
    out_set: ScoredSet,
    metrics: Mapping[str, Mapping[str, float]],
    *,
    n_bits: int,
    codec: str,
    reference: dict,
    files: Mapping[str, str],
) -> dict:
    """The report of one comparison, as written to its JSON: ``in_dataset``, ``out_dataset``,
    ``n_in``, ``n_out``, ``n_bits``, ``codec`` (:func:`codec_description`), ``bits_per_dim``
    ``{"in", "out"}`` (means), ``scores`` ``{name: {"auroc", "aupr_in", "aupr_out", "fpr95"}}``
    (from ``metrics``), ``score_definitions``, ``reference`` (:func:`reference_summary`),
    ``files`` (:func:`report_files`) and, with a background model, ``background_bits_per_dim``
    ``{"in", "out"}``. Non-finite numbers become None."""
    report = {
        "in_dataset": in_set.name,
        "out_dataset": out_set.name,
        "n_in": int(in_set.stats["bpd"].size),
        "n_out": int(out_set.stats["bpd"].size),
        "n_bits": int(n_bits),
        "codec": codec,
        "bits_per_dim": {"in": _mean(in_set.stats["bpd"]), "out": _mean(out_set.stats["bpd"])},
        "scores": {name: {k: _json_float(v) for k, v in m.items()} for name, m in metrics.items()},
        "score_definitions": {name: score_definition(name) for name in metrics},
        "reference": reference,
        "files": dict(files),
    }
    if in_set.background_stats is not None:
        report["background_bits_per_dim"] = {
            "in": _mean(in_set.background_stats["bpd"]),
            "out": _mean(out_set.background_stats["bpd"]),
        }
    return report


def write_report(report: dict, in_set: ScoredSet, out_set: ScoredSet, metrics: Mapping[str, Mapping]) -> None:
    """Print the report's table, write its JSON and figures (``report["files"]``), and print
    the paths written."""
    files = report["files"]
    print(format_table(report))
    _write_json(files["json"], report)
    save_histograms(files["histograms"], in_set.scores, out_set.scores, in_set.name, out_set.name, metrics)
    save_roc_curves(files["roc"], in_set.scores, out_set.scores, in_set.name, out_set.name)
    for path in files.values():
        print(f"wrote {path}")


def write_summary(reports: Mapping[str, Mapping], output_dir: str, in_name: str, in_slug: Optional[str] = None) -> str:
    """Write ``<output_dir>/ood_<in slug>_summary.json`` (``{"in_dataset", "auroc": {out:
    {score: auroc}}, "reports": {out: json path}}``; the slug defaults to the base name),
    print :func:`format_summary`, return the path."""
    path = os.path.join(output_dir, f"ood_{in_slug or dataset_slug(in_name)}_summary.json")
    summary = {
        "in_dataset": in_name,
        "auroc": {out: {k: m["auroc"] for k, m in r["scores"].items()} for out, r in reports.items()},
        "reports": {out: r["files"]["json"] for out, r in reports.items()},
    }
    _write_json(path, summary)
    print()
    print(format_summary(reports))
    print(f"wrote {path}")
    return path
