"""Outlier detection with a trained Glow: per-image statistics, the training reference, the
scores (higher = more outlying), their metrics, and the reports and figures of a run.

Modules, each importing only those below it: ``scoring`` (``glowflow --score``: CSV, picture
sheet, summary) -> ``inputs`` (the image files, folders and .npz files it reads) and ``command``
(a benchmark run, ``glowflow --outlier_detection``, and the images a checkpoint's detector is
fitted on) -> ``cache`` (:func:`detector_for`: a checkpoint's detector, reused or fitted and
cached) -> ``detector`` (:class:`OutlierDetector`: fit, score, threshold, save/load, where a
checkpoint's detector is cached, ``from_pretrained``) and ``report`` -> ``detector_file`` (reading a
saved detector, checked)
-> ``scores`` -> ``reference`` -> ``orientation`` (the model's preference for an image's
orientation, and its combination with the density of states) -> ``checks`` (every entry of a
stored detector checked), ``statistics`` -> ``codecs`` and ``metrics``.
What each score means and where it comes from: docs/outlier_scores.md.
"""

from glowflow.ood.cache import detector_for
from glowflow.ood.codecs import CODECS, codec_bits_per_dim, codec_description
from glowflow.ood.command import OutlierDetectionSettings, run_outlier_detection, run_outlier_detection_command
from glowflow.ood.detector import (
    DETECTOR_FORMAT,
    FIT_IMAGES,
    OutlierDetector,
    detector_cache_path_for,
    threshold_at_tpr,
)
from glowflow.ood.metrics import fpr_at_tpr, outlier_metrics
from glowflow.ood.reference import (
    DOS_COMPONENTS,
    DOS_STATISTICS,
    REFERENCE_FORMAT,
    STATISTIC_GROUPS,
    Reference,
    dos_features,
    dos_log_density,
    fit_latent_gaussians,
    fit_reference,
    load_reference,
    model_fingerprint,
    reference_key,
    save_reference,
    top_gaussian_nll,
)
from glowflow.ood.report import format_summary, format_table, save_histograms, save_roc_curves
from glowflow.ood.scores import SCORE_DEFINITIONS, ScoredSet, outlier_scores, score_definition
from glowflow.ood.scoring import run_score, run_score_command
from glowflow.ood.statistics import ORIENTATION_TRANSFORMS, StatisticsSettings, compute_statistics, statistic_columns
from glowflow.pixels import perturb  # re-exported: glowflow.ood.perturb predates glowflow.pixels

__all__ = [
    "CODECS",
    "DETECTOR_FORMAT",
    "FIT_IMAGES",
    "OutlierDetector",
    "detector_cache_path_for",
    "detector_for",
    "run_score",
    "run_score_command",
    "threshold_at_tpr",
    "DOS_COMPONENTS",
    "DOS_STATISTICS",
    "REFERENCE_FORMAT",
    "SCORE_DEFINITIONS",
    "STATISTIC_GROUPS",
    "OutlierDetectionSettings",
    "Reference",
    "ScoredSet",
    "StatisticsSettings",
    "ORIENTATION_TRANSFORMS",
    "codec_bits_per_dim",
    "codec_description",
    "compute_statistics",
    "dos_features",
    "dos_log_density",
    "fit_latent_gaussians",
    "fit_reference",
    "format_summary",
    "format_table",
    "fpr_at_tpr",
    "load_reference",
    "model_fingerprint",
    "outlier_metrics",
    "outlier_scores",
    "perturb",
    "reference_key",
    "run_outlier_detection",
    "run_outlier_detection_command",
    "save_histograms",
    "save_reference",
    "save_roc_curves",
    "score_definition",
    "statistic_columns",
    "top_gaussian_nll",
]
