"""Outlier detection with a trained Glow: per-image statistics, the training reference, the
scores (higher = more outlying), their metrics, and the reports and figures of a run.

Modules, each importing only those below it: ``score_command`` (``glowflow --score``: CSV,
picture sheet, summary) -> ``inputs`` (the image files, folders and .npz files it reads) and
``command`` (a benchmark run, ``glowflow --outlier_detection``, the settings both commands build
their detector with, and the images a checkpoint's detector is fitted on) -> ``cache``
(:func:`detector_for`: a checkpoint's detector, reused or fitted and cached) -> ``detector``
(:class:`OutlierDetector`: fit, score, threshold, get/set_params, save/load, ``from_pretrained``)
and ``report`` -> ``cache_path`` (where a checkpoint's detector is cached), ``detector_images``
(the images a detector accepts) and ``detector_file`` (reading a saved detector, checked)
-> ``scores`` (each score's definition) -> ``reference`` -> ``orientation`` (the model's
preference for an image's orientation, and its combination with the density of states) ->
``checks`` (every entry of a stored detector checked), ``statistics`` -> ``codecs`` and ``metrics``.
What each score means and where it comes from: docs/outlier_scores.md.

This package exports the handful of names a user starts from; everything else is imported from
its module (``from glowflow.ood.reference import load_reference``).
"""

from glowflow.ood.command import OutlierDetectionSettings, run_outlier_detection
from glowflow.ood.detector import OutlierDetector
from glowflow.ood.metrics import outlier_metrics
from glowflow.ood.reference import fit_reference
from glowflow.ood.scores import outlier_scores
from glowflow.ood.statistics import compute_statistics
from glowflow.pixels import perturb  # re-exported: glowflow.ood.perturb predates glowflow.pixels

__all__ = [
    "OutlierDetectionSettings",
    "OutlierDetector",
    "compute_statistics",
    "fit_reference",
    "outlier_metrics",
    "outlier_scores",
    "perturb",
    "run_outlier_detection",
]
