"""``glowflow --score PATH``: every image of a folder or .npz scored by a checkpoint's outlier
detector, written as a CSV (one row per image), a picture sheet of the most and least outlying
images (PNG), and a printed summary of how many were flagged."""

from __future__ import annotations

import csv
import io
import os
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from glowflow import data
from glowflow.checkpoint import Checkpoint
from glowflow.config import OUTPUT_ROOT, RunConfig, dataset_slug
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write, atomic_write_text, check_writable_folder
from glowflow.ood.command import FitSets
from glowflow.ood.detector import OutlierDetector, detector_cache_path_for, detector_for
from glowflow.ood.statistics import StatisticsSettings
from glowflow.runtime import resolve_device

SHEET_IMAGES = 16
"""Images in each row of the picture sheet (most outlying, least outlying)."""


def image_names(dataset) -> List[str]:
    """One name per image of a dataset from :func:`glowflow.data.load_dataset`: the file path for
    an image folder, the index in the file otherwise."""
    base = getattr(dataset, "base", None)
    samples = getattr(base, "samples", None)
    if samples is not None and len(samples) == len(dataset):
        return [str(path) for path, _ in samples]
    return [str(i) for i in range(len(dataset))]


def write_scores_csv(
    path: str,
    names: Sequence[str],
    stats: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    detector_score: str,
    threshold: float,
) -> str:
    """One row per image: ``index``, ``image`` (path or index), ``bits_per_dim``, every score
    (higher = more outlying), ``outlier`` (1 when the ``detector_score`` is above ``threshold``
    or not a number, else 0) and ``decision`` (``threshold - score``: negative = outlier, as
    scikit-learn's ``decision_function``); written atomically."""
    columns = list(scores)
    chosen = np.asarray(scores[detector_score], dtype=np.float64)
    outlier = ~(chosen <= threshold)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "image", "bits_per_dim", *columns, "outlier", "decision"])
    for i, name in enumerate(names):
        writer.writerow(
            [i, name, _num(stats["bpd"][i])]
            + [_num(scores[k][i]) for k in columns]
            + [int(outlier[i]), _num(threshold - chosen[i])]
        )
    return atomic_write_text(path, buffer.getvalue())


def _num(v: float) -> str:
    return f"{float(v):.6g}"


def extremes(scores: np.ndarray, n: int = SHEET_IMAGES):
    """Indices of the ``n`` highest scores (NaN first, then descending) and the ``n`` lowest
    (ascending)."""
    order = np.argsort(-np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=np.inf), kind="stable")
    n = min(n, len(order))
    return order[:n], order[::-1][:n]


def save_sheet(path: str, rows: Sequence[tuple], title: str) -> str:
    """A PNG with one labelled row per ``(label, images (n, C, H, W) in [0, 1], captions,
    flagged)`` in ``rows`` (a flagged image's caption is red), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(len(images) for _, images, _, _ in rows)
    fig = Figure(figsize=(1.0 * cols + 1.2, 1.45 * len(rows) + 0.3), dpi=100)
    FigureCanvasAgg(fig)
    for r, (label, images, captions, flagged) in enumerate(rows):
        for c in range(len(images)):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            img = images[c].float().clamp(0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img[:3].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(captions[c], fontsize=7, color="red" if flagged[c] else "black")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return atomic_write(path, lambda handle: fig.savefig(handle, format="png"))


def run_score(detector: OutlierDetector, dataset, name: str, output_dir: str) -> Dict[str, object]:
    """Score every image of ``dataset`` (yielding ``(image, label)`` of the model's shape) with the
    fitted ``detector``; write ``<output_dir>/scores_<slug>.csv`` (:func:`write_scores_csv`) and
    ``scores_<slug>_sheet.png`` (the :data:`SHEET_IMAGES` most and least outlying images,
    :func:`save_sheet`), print a summary. Returns the file paths, the number of images and of
    outliers, the score and the threshold."""
    if len(dataset) == 0:
        raise GlowflowError(f"{name}: no images to score")
    stats = detector.statistics(dataset, "scoring")
    scores = detector.scores_from_statistics(stats)
    score, threshold = detector.score, detector.threshold_
    outlier = detector.decide(scores[score])
    slug = dataset_slug(name)
    csv_path = os.path.join(output_dir, f"scores_{slug}.csv")
    sheet_path = os.path.join(output_dir, f"scores_{slug}_sheet.png")
    names = image_names(dataset)
    write_scores_csv(csv_path, names, stats, scores, score, threshold)
    rows = []
    for label, picks in zip(("most outlying", "least outlying"), extremes(scores[score])):
        images = torch.stack([dataset[int(i)][0] for i in picks])
        captions = [f"#{i}\n{scores[score][i]:.3g}" for i in picks]
        rows.append((label, images, captions, outlier[picks]))
    base = os.path.basename(os.path.normpath(name))
    title = f"{base}: {score} (higher = more outlying; red = flagged at {threshold:.4g})"
    save_sheet(sheet_path, rows, title)
    flagged, total = int(outlier.sum()), int(outlier.size)
    print(
        f"scored {total} images of {name} with {score}: {flagged} flagged as outliers ({100 * flagged / total:.1f}%) "
        f"at threshold {threshold:.4g}, which keeps {100 * detector.tpr:g}% of {detector.n_threshold_} "
        f"held-back inlier images"
    )
    print(f"wrote {csv_path}")
    print(f"wrote {sheet_path}")
    return dict(csv=csv_path, sheet=sheet_path, n_images=total, n_outliers=flagged, score=score, threshold=threshold)


def load_images_to_score(path: str, run: RunConfig, image_shape: Sequence[int]):
    """The images of the folder or .npz at ``path`` as a dataset of the model's shape: its test
    split (a folder with train/ and test/ (or val/) sub-folders, or a .npz with ``test_images``),
    otherwise all of it. One-line :class:`GlowflowError` for a missing, empty or unreadable one."""
    if not (os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".npz"))):
        if not os.path.exists(path):
            raise GlowflowError(f"--score: {path} does not exist")
        raise GlowflowError(f"--score: {path} is neither a folder of images nor a .npz file")
    if not os.access(path, os.R_OK):
        raise GlowflowError(f"--score: cannot read {path} (permission denied)")
    if os.path.isdir(path) and not os.access(path, os.X_OK):
        raise GlowflowError(f"--score: cannot read {path} (permission denied)")
    dataset = data.load_scored_images(path, run.data_root, image_shape[1])
    if len(dataset) == 0:
        raise GlowflowError(f"--score: {path} holds no images")
    return dataset if tuple(dataset.info.image_shape) == tuple(image_shape) else data.match_shape(dataset, image_shape)


def run_score_command(run: RunConfig, dataset: Optional[str] = None) -> Dict[str, object]:
    """``glowflow --score PATH --checkpoint X``: the detector from ``run.detector`` (a saved
    :class:`OutlierDetector`) or fitted on the checkpoint's training data (``dataset``, default
    the checkpoint's; cached beside the checkpoint or inside a model folder,
    :func:`detector_cache_path_for`), then
    :func:`run_score` on the images at ``run.score_path``."""
    output_dir = run.output_dir or OUTPUT_ROOT
    check_writable_folder(output_dir)  # before any work; creates nothing
    device = resolve_device(run.device)
    checkpoint = Checkpoint.read(run.checkpoint)
    model = checkpoint.load_model(device)
    shape = tuple(model.config.image_shape)
    to_score = load_images_to_score(run.score_path, run, shape)
    if run.detector:
        detector = OutlierDetector.load(run.detector, model, device=device, progress=True)
        detector.set_tpr(run.tpr).set_score(run.detector_score)
    else:
        in_name, image_size = checkpoint.data_to_read(dataset, run.dataset)
        fit_sets = FitSets(checkpoint, in_name, run, image_size, 2**model.config.L)

        def training_images():  # read only when no cached detector can be used
            train_set = fit_sets.training()
            if tuple(train_set.info.image_shape) != shape:
                raise GlowflowError(
                    f"{in_name} images are {train_set.info.image_shape}, the checkpoint's model {shape}"
                )
            return train_set

        settings = StatisticsSettings(device=device, seed=run.eval_seed)
        detector = OutlierDetector(
            model,
            run.detector_score,
            tpr=run.tpr,
            fit_images=run.fit_images or None,
            batch_size=run.eval_batch_size,
            device=device,
            seed=settings.seed,
            progress=True,
        )
        cache = detector_cache_path_for(run.checkpoint, in_name, model.config.n_bits)
        validation = fit_sets.validation if fit_sets.has_validation else None
        detector, _ = detector_for(model, training_images, in_name, detector, cache, threshold_images=validation)
    return run_score(detector, to_score, run.score_path, output_dir)
