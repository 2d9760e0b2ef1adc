"""``glowflow --score PATH [PATH ...]``: every image of image files, folders and .npz files
(:mod:`glowflow.ood.inputs`) scored by a checkpoint's outlier detector, written together or not at
all as a CSV (one row per image, unreadable files marked) and a picture sheet of the most and least
outlying images (PNG), and a printed summary of how many were flagged (:func:`write_image_scores`;
the command itself: :func:`run_score_command`). The scores themselves: :mod:`glowflow.ood.scores`."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from glowflow.checkpoint import Checkpoint
from glowflow.config import OUTPUT_ROOT, RunConfig, dataset_slug
from glowflow.errors import GlowflowError
from glowflow.files import atomic_output, atomic_write, atomic_write_text, check_writable_folder, describe_os_error
from glowflow.ood.cache import detector_for
from glowflow.ood.command import FitSets, command_settings
from glowflow.ood.detector import OutlierDetector
from glowflow.ood.inputs import check_some_readable, load_images_to_score, unreadable_note
from glowflow.ood.scores import outlier_scores
from glowflow.runtime import resolve_device

SHEET_IMAGES = 16
"""Images in each row of the picture sheet (most outlying, least outlying)."""
CAPTION_CHARACTERS = 14
"""Longest file name a sheet caption shows (longer ones keep their start and end)."""


def image_names(dataset) -> List[str]:
    """One name per image of a dataset: its ``names`` when it has them (:class:`ScoredImages`),
    the file path for an image folder from :func:`glowflow.data.load_dataset`, the index otherwise."""
    names = getattr(dataset, "names", None)
    if names is not None and len(names) == len(dataset):
        return [str(n) for n in names]
    base = getattr(dataset, "base", None)
    samples = getattr(base, "samples", None)
    if samples is not None and len(samples) == len(dataset):
        return [str(path) for path, _ in samples]
    return [str(i) for i in range(len(dataset))]


def scores_csv_text(
    names: Sequence[str],
    stats: Mapping[str, np.ndarray],
    scores: Mapping[str, np.ndarray],
    decision: np.ndarray,
    outlier: np.ndarray,
    unreadable: Optional[Mapping[int, str]] = None,
) -> str:
    """The score CSV: one row per image (``names``, in order): ``index``, ``image`` (path or
    index), ``bits_per_dim``, every score (higher = more outlying), ``outlier`` (1 where
    ``outlier`` is True, else 0), ``decision`` (the detector's ``decision_function``,
    ``threshold - score``: negative = outlier) and ``unreadable`` (empty; for an image file that
    could not be read, why, with every number of its row empty). ``stats``, ``scores``,
    ``decision`` and ``outlier`` hold the readable images only, in order."""
    unreadable = unreadable or {}
    columns = list(scores)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "image", "bits_per_dim", *columns, "outlier", "decision", "unreadable"])
    j = 0
    for i, name in enumerate(names):
        if i in unreadable:
            writer.writerow([i, name, *[""] * (len(columns) + 3), unreadable[i]])
            continue
        writer.writerow(
            [i, name, _num(stats["bpd"][j])]
            + [_num(scores[k][j]) for k in columns]
            + [int(outlier[j]), _num(decision[j]), ""]
        )
        j += 1
    return buffer.getvalue()


def write_scores_csv(path: str, names: Sequence[str], stats, scores, detector: OutlierDetector) -> str:
    """:func:`scores_csv_text` written atomically at ``path``, with the fitted ``detector``'s
    decision (its ``decision_function`` and ``is_outlier`` of the images whose ``scores`` these are)."""
    decision, outlier = detector._decide(scores[detector.score])
    return atomic_write_text(path, scores_csv_text(names, stats, scores, decision, outlier))


def _num(v: float) -> str:
    return f"{float(v):.6g}"


def extremes(scores: np.ndarray, n: int = SHEET_IMAGES):
    """Indices of the ``n`` highest scores (NaN first, then descending) and the ``n`` lowest
    (ascending). With fewer than ``2 n`` images no image is in both: the more outlying half
    (the odd one included) is the first, the rest the second (possibly empty)."""
    order = np.argsort(-np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=np.inf), kind="stable")
    n = min(n, (len(order) + 1) // 2)
    return order[:n], order[n:][::-1][:n]


def caption(name: str, limit: int = CAPTION_CHARACTERS) -> str:
    """A picture's caption for the image ``name``: its file name (without folders), shortened
    to ``limit`` characters in the middle; ``#<index>`` for an image of a .npz."""
    base = os.path.basename(str(name)) or str(name)
    if base.isdigit():
        return f"#{base}"
    return base if len(base) <= limit else base[: limit // 2 - 1] + "..." + base[-(limit - limit // 2 - 2) :]


def render_sheet(rows: Sequence[tuple], title: str) -> bytes:
    """A PNG (bytes) with one labelled row per ``(label, images (n, C, H, W) in [0, 1], captions,
    flagged)`` in ``rows`` (a flagged image's caption is red; rows without images are left out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [row for row in rows if len(row[1])]
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_sheet(path: str, rows: Sequence[tuple], title: str) -> str:
    """:func:`render_sheet` written atomically at ``path``."""
    content = render_sheet(rows, title)
    return atomic_write(path, lambda handle: handle.write(content))


def write_all_or_nothing(files: Sequence[Tuple[str, bytes]]) -> None:
    """Write every ``(path, content)`` or none: each is written to a temporary file and synced
    before any is renamed into place, so a full disk leaves every old file as it was. One
    GlowflowError line says what was and was not written in the unlikely case of a failure
    between the renames."""
    before = {path: _inode(path) for path, _ in files}
    try:
        with contextlib.ExitStack() as stack:
            for path, content in files:
                handle = stack.enter_context(atomic_output(path))
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
    except GlowflowError as err:
        written = [path for path, _ in files if _inode(path) != before[path]]
        missing = [path for path, _ in files if path not in written]
        if not written:
            raise GlowflowError(f"--score wrote nothing: {err}") from None
        raise GlowflowError(f"--score wrote only {', '.join(written)}, not {', '.join(missing)}: {err}") from None
    except OSError as err:
        raise GlowflowError(f"--score wrote nothing: cannot write {files[0][0]}: {describe_os_error(err)}") from None


def _inode(path: str) -> Optional[Tuple[int, int]]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def write_image_scores(detector: OutlierDetector, dataset, name: str, output_dir: str) -> Dict[str, object]:
    """Score every image of ``dataset`` (yielding ``(image, label)`` of the model's shape; a
    :class:`ScoredImages` names its images and the files it could not read) with the fitted
    ``detector``; write ``<output_dir>/scores_<slug>.csv`` (:func:`scores_csv_text`) and
    ``scores_<slug>_sheet.png`` (the :data:`SHEET_IMAGES` most and least outlying images,
    :func:`render_sheet`) together or not at all (:func:`write_all_or_nothing`), print a summary.
    Returns the file paths, the number of images scored, of outliers and of unreadable files, the
    score and the threshold."""
    if len(dataset) == 0:
        raise GlowflowError(f"{name}: no images to score")
    score, threshold = detector.score, detector.threshold_
    if not math.isfinite(threshold):
        raise GlowflowError(
            f"the outlier detector's {score} threshold at tpr {detector.tpr:g} is {threshold}: "
            f"its held-back scores are not finite numbers; refit it"
        )
    stats = detector.statistics(dataset, "scoring")
    unreadable = dict(getattr(dataset, "unreadable", None) or {})
    if unreadable:
        check_some_readable(dataset)
        kept = np.array([i not in unreadable for i in range(len(dataset))])
        stats = {k: np.asarray(v)[kept] for k, v in stats.items()}
    readable = [i for i in range(len(dataset)) if i not in unreadable]
    scores = outlier_scores(stats, detector.reference_)
    decision, outlier = detector._decide(scores[score])  # as decision_function and is_outlier, from these scores
    slug = getattr(dataset, "slug", None) or dataset_slug(name)
    csv_path = os.path.join(output_dir, f"scores_{slug}.csv")
    sheet_path = os.path.join(output_dir, f"scores_{slug}_sheet.png")
    names = image_names(dataset)
    rows = []
    for label, picks in zip(("most outlying", "least outlying"), extremes(scores[score])):
        images = torch.stack([dataset[readable[int(i)]][0] for i in picks]) if len(picks) else torch.empty(0)
        captions = [f"{caption(names[readable[int(i)]])}\n{scores[score][i]:.3g}" for i in picks]
        rows.append((label, images, captions, outlier[picks]))
    base = os.path.basename(os.path.normpath(name))
    title = f"{base}: {score} (higher = more outlying; red = flagged at {threshold:.4g})"
    text = scores_csv_text(names, stats, scores, decision, outlier, unreadable)
    write_all_or_nothing([(csv_path, text.encode("utf-8")), (sheet_path, render_sheet(rows, title))])
    note = unreadable_note(dataset) if unreadable else None
    if note:
        print(note, file=sys.stderr)
    flagged, total = int(outlier.sum()), int(outlier.size)
    print(
        f"scored {total} images of {name} with {score}: {flagged} flagged as outliers ({100 * flagged / total:.1f}%) "
        f"at threshold {threshold:.4g}, which keeps {100 * detector.tpr:g}% of {detector.n_threshold_} "
        f"held-back inlier images" + (f"; {len(unreadable)} unreadable file(s) skipped" if unreadable else "")
    )
    print(f"wrote {csv_path}")
    print(f"wrote {sheet_path}")
    return dict(
        csv=csv_path,
        sheet=sheet_path,
        n_images=total,
        n_outliers=flagged,
        n_unreadable=len(unreadable),
        score=score,
        threshold=threshold,
    )


def run_score_command(
    run: RunConfig, dataset: Optional[str] = None, paths: Optional[Sequence[str]] = None
) -> Dict[str, object]:
    """``glowflow --score PATH [PATH ...] --checkpoint X``: the images at ``paths`` (default
    ``run.score_path`` alone; :func:`load_images_to_score`), scored by the detector from
    ``run.detector`` (a saved :class:`OutlierDetector`, refused in one line when anything in it is
    wrong) or fitted on the checkpoint's training data (``dataset``, default the checkpoint's;
    cached beside the checkpoint or inside a model folder, :func:`detector_cache_path_for`, and
    refitted with a note when the cache is unusable; built as ``--outlier_detection`` builds it,
    :func:`command_settings`), with :func:`write_image_scores`."""
    output_dir = run.output_dir or OUTPUT_ROOT
    check_writable_folder(output_dir)  # before any work; creates nothing
    device = resolve_device(run.device)
    checkpoint = Checkpoint.read(run.checkpoint)
    model = checkpoint.load_model(device)
    shape = tuple(model.config.image_shape)
    to_score = load_images_to_score(list(paths) if paths else [run.score_path], shape)
    if run.detector:
        detector = OutlierDetector.load(run.detector, model, device=device, progress=True)
        detector.set_params(tpr=run.tpr, score=run.detector_score)
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

        settings = command_settings(run, in_name, model.config.n_bits, device, output_dir)
        detector = settings.detector(model)
        validation = fit_sets.validation if fit_sets.has_validation else None
        detector, _ = detector_for(
            model, training_images, in_name, detector, settings.reference_cache_path, threshold_images=validation
        )
    return write_image_scores(detector, to_score, to_score.name, output_dir)
