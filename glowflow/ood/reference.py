"""The training-set reference of the scores: the typicality mean, the class-conditional Gaussians
of the top latent, the density-of-states mixture fitted on the training images' statistics, the
label classifier's class Gaussians (when the images have labels), its
plain-array .npz form (no pickle) and the cache key (the cache itself is the saved detector,
:mod:`glowflow.ood.detector`)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from glowflow.config import PRIOR_FIT_BEFORE_ITS_FIELD
from glowflow.data.npzfile import open_npz
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write
from glowflow.ood import checks
from glowflow.ood.class_gaussians import (  # noqa: F401  (re-exported: the reference's parts)
    CLASSIFIER_SHRINKAGE,
    LATENT_SHRINKAGE,
    MIN_CLASS_IMAGES,
    LatentGaussians,
    fit_latent_gaussians,
    latent_arrays,
    latent_from_arrays,
    top_gaussian_nll,
)
from glowflow.ood.classifier import Classifier, calibrated, classifier_arrays, classifier_from_arrays
from glowflow.ood.orientation import (
    Orientation,
    combined_score,
    fit_orientation,
    orientation_arrays,
    orientation_from_arrays,
    orientation_score,
)
from glowflow.ood.statistics import TRANSFORMS, statistic_columns

REFERENCE_FORMAT = "glowflow-ood-reference-v9"

DOS_STATISTICS = ("level_bpd", "codec_bpd", "top_gaussian")
"""The statistics the density of states uses by default (groups of :func:`statistic_columns`,
and ``top_gaussian``)."""
STATISTIC_GROUPS = ("level_bpd", "logdet", "latent_rms", "codec_bpd", "bpd", "top_gaussian")
"""Every group of :func:`statistic_columns` and ``top_gaussian`` (:func:`top_gaussian_nll`), in
the order :func:`dos_features` takes them."""
DOS_COMPONENTS = 4
"""Components of the density-of-states Gaussian mixture by default."""


def dos_features(
    stats: Mapping[str, np.ndarray],
    statistics: Sequence[str] = DOS_STATISTICS,
    latent: Optional[LatentGaussians] = None,
) -> Tuple[List[str], np.ndarray]:
    """The statistics the density of states is fitted on: names and an (N, d) matrix.

    ``stats``: :func:`compute_statistics` output for N images. ``statistics`` are groups of
    :func:`statistic_columns`, taken in this order: ``level_bpd`` (one column per level),
    ``logdet``, ``latent_rms`` (one per level), ``codec_bpd`` (taken only when ``stats`` has it),
    ``bpd``, ``top_gaussian`` (:func:`top_gaussian_nll` under ``latent``; taken only when
    ``latent`` is given and ``stats`` has ``top_latent``). The default is each level's bits/dim,
    the codec's bits/dim and the top latent's class-Gaussian NLL ("Choosing the statistics of
    `dos`" in docs/outlier_detection.md compares the choices).
    """
    unknown = [g for g in statistics if g not in STATISTIC_GROUPS]
    if unknown:
        raise GlowflowError(
            f"unknown density-of-states statistic {unknown[0]!r}; choose from {', '.join(STATISTIC_GROUPS)}"
        )
    columns = statistic_columns(stats)
    if "top_gaussian" in statistics and latent is not None and "top_latent" in stats:
        columns["top_gaussian"] = top_gaussian_nll(latent, stats["top_latent"])
    names = [
        name
        for group in STATISTIC_GROUPS
        if group in statistics
        for name in columns
        if re.sub(r"_\d+", "", name) == group
    ]  # level_2_bpd -> level_bpd
    if not names:
        raise GlowflowError(f"the statistics have none of {list(statistics)}")
    return names, np.column_stack([columns[n] for n in names])


@dataclass
class Reference:
    """What the scores need from the training set, fitted by :func:`fit_reference`.

    key: the cache key the training statistics were computed under ('' when not cached).
    num_levels, n_train: levels of the model; training images used.
    bpd_mean, bpd_std: mean and standard deviation of the training bits/dim (typicality).
    dos_features: names of the density-of-states statistics (see :func:`dos_features`).
    dos_mean, dos_std (d,): their training mean and standard deviation (standardisation).
    dos_log_weights (k,), dos_means (k, d), dos_precision_cholesky (k, d, d): the Gaussian
    mixture fitted on the standardised statistics (``precision = P P^T`` per component).
    latent: the class-conditional Gaussians of the top latent (:class:`LatentGaussians`), or
    None when the training statistics had no ``top_latent``.
    orientation: what the ``orientation`` and ``dos_orientation`` scores need
    (:class:`glowflow.ood.orientation.Orientation`), or None when the training statistics had no
    ``transform_bpd``.
    classifier, classifier_gaussians: the label classifier (:mod:`glowflow.ood.classifier`) and the
    class Gaussians of its features, fitted like ``latent``; None when the fit images had no labels.
    """

    key: str
    num_levels: int
    n_train: int
    bpd_mean: float
    bpd_std: float
    dos_features: Tuple[str, ...]
    dos_mean: np.ndarray
    dos_std: np.ndarray
    dos_log_weights: np.ndarray
    dos_means: np.ndarray
    dos_precision_cholesky: np.ndarray
    latent: Optional[LatentGaussians] = None
    orientation: Optional[Orientation] = None
    classifier: Optional[Classifier] = None
    classifier_gaussians: Optional[LatentGaussians] = None


def fit_reference(
    train_stats: Mapping[str, np.ndarray],
    key: str = "",
    max_dos_points: int = 60_000,
    seed: int = 0,
    components: int = DOS_COMPONENTS,
    statistics: Sequence[str] = DOS_STATISTICS,
    latent: Optional[LatentGaussians] = None,
    transforms: Sequence[str] = (),
    calibration_stats: Optional[Mapping[str, np.ndarray]] = None,
    classifier: Optional[Classifier] = None,
) -> Reference:
    """Fit the training-set reference from :func:`compute_statistics` of the training images.

    Typicality: the mean (and std) of the training bits/dim.

    Top latent: when the statistics have ``top_latent``, the class-conditional Gaussians of
    :func:`fit_latent_gaussians` (classes from ``labels``; one Gaussian without them), or
    ``latent`` when given (Gaussians already fitted on these same images: a benchmark comparing
    choices of statistics fits them once).

    Density of states: the ``statistics`` of :func:`dos_features` (by default each level's
    bits/dim, the codec's bits/dim when the statistics have it, and the top latent's class-Gaussian
    NLL when they have the top latent) are standardised with their training mean and std (a
    constant column keeps std 1), and a full-covariance Gaussian mixture of ``components``
    components (scikit-learn's ``GaussianMixture``, ``reg_covar=1e-6``, seeded with ``seed``) is
    fitted on up to ``max_dos_points`` training images (a seeded subset), with at most
    ``n // (2 d + 2)`` components for n images and d statistics. The class Gaussians and the
    mixture see the same images: the in-sample NLL is lower than a new inlier's, which weights
    the latent term more in the mixture (measured better on the development sets than fitting
    them on separate halves; docs/outlier_detection.md). Images with a non-finite statistic are
    left out (with a warning).

    Orientation: with ``transforms`` (the names the statistics' ``transform_bpd`` columns were
    computed with), :func:`glowflow.ood.orientation.fit_orientation` on the same images, its
    combination with the density of states standardised on ``calibration_stats`` (statistics of
    held-back inliers, such as the detector's threshold images; None: the training images).

    Classifier: with ``classifier`` (trained on these images' labels), the class Gaussians of the
    statistics' ``classifier_features`` (:func:`fit_latent_gaussians`), and the ``combined``
    score's standardisation on ``calibration_stats`` (:func:`glowflow.ood.classifier.calibrated`).
    """
    bpd = np.asarray(train_stats["bpd"], dtype=np.float64)
    if latent is None and "top_latent" in train_stats:
        top = np.asarray(train_stats["top_latent"])
        rows = np.isfinite(top).all(1) & np.isfinite(bpd)
        labels = train_stats.get("labels")
        latent = fit_latent_gaussians(top[rows], None if labels is None else np.asarray(labels)[rows])
    names, matrix = dos_features(train_stats, statistics, latent)
    finite = _finite_rows(matrix, bpd)
    matrix, bpd = matrix[finite], bpd[finite]
    mean = matrix.mean(0)
    std = matrix.std(0)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    mixture = _fit_mixture((matrix - mean) / std, components, max_dos_points, seed)
    reference = Reference(
        key=key,
        num_levels=int(np.asarray(train_stats["level_bpd"]).shape[1]),
        n_train=int(bpd.size),
        bpd_mean=float(bpd.mean()),
        bpd_std=float(bpd.std()),
        dos_features=tuple(names),
        dos_mean=mean,
        dos_std=std,
        dos_log_weights=np.log(mixture.weights_),
        dos_means=mixture.means_,
        dos_precision_cholesky=mixture.precisions_cholesky_,
        latent=latent,
    )
    calibration = train_stats if calibration_stats is None else calibration_stats
    calibration_dos = -dos_log_density(reference, calibration) if transforms or classifier is not None else None
    if transforms:
        reference.orientation = fit_orientation(train_stats, transforms, calibration, calibration_dos)
    if classifier is not None:
        _fit_classifier_part(reference, classifier, train_stats, calibration, calibration_dos)
    return reference


def _fit_classifier_part(
    reference: Reference,
    classifier: Classifier,
    train_stats: Mapping[str, np.ndarray],
    calibration: Mapping[str, np.ndarray],
    calibration_dos: np.ndarray,
) -> None:
    """The classifier's class Gaussians on ``train_stats`` and its standardisation against the score
    it is added to (``dos_orientation``, else ``dos``) on ``calibration`` (whose ``dos`` scores are
    ``calibration_dos``), set on ``reference``."""
    if "classifier_features" not in train_stats or "classifier_features" not in calibration:
        raise GlowflowError("fitting the classifier score needs the statistics' classifier_features")
    features = np.asarray(train_stats["classifier_features"])
    labels = np.asarray(train_stats["labels"])
    rows = np.isfinite(features).all(1)
    reference.classifier_gaussians = fit_latent_gaussians(features[rows], labels[rows], CLASSIFIER_SHRINKAGE, tied=True)
    base = calibration_dos
    if reference.orientation is not None:
        base = combined_score(reference.orientation, base, orientation_score(reference.orientation, calibration))
    score = top_gaussian_nll(reference.classifier_gaussians, calibration["classifier_features"])
    reference.classifier = calibrated(classifier, base, score)


def _finite_rows(matrix: np.ndarray, bpd: np.ndarray) -> np.ndarray:
    """(N,) mask of the training images whose statistics (rows of the (N, d) ``matrix``) and
    bits/dim (N,) are all finite; enough of them to fit, and a warning about the others."""
    finite = np.isfinite(matrix).all(1) & np.isfinite(bpd)
    if finite.sum() < 2 * matrix.shape[1] + 2:
        raise GlowflowError(
            "fitting the outlier reference needs more training images with finite statistics "
            f"(have {int(finite.sum())})"
        )
    if not finite.all():
        warnings.warn(
            f"{int((~finite).sum())} training image(s) with non-finite statistics left out of the outlier reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return finite


def _fit_mixture(points: np.ndarray, components: int, max_points: int, seed: int):
    """A fitted full-covariance ``GaussianMixture`` on the (n, d) standardised ``points`` (a
    seeded subset of ``max_points`` of them when there are more), with at most
    ``n // (2 d + 2)`` components."""
    from sklearn.mixture import GaussianMixture

    if points.shape[0] > max_points:
        keep = np.random.default_rng(seed).choice(points.shape[0], max_points, replace=False)
        points = points[np.sort(keep)]
    components = max(1, min(components, points.shape[0] // (2 * points.shape[1] + 2)))
    return GaussianMixture(components, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(points)


def dos_log_density(
    reference: Reference, stats: Mapping[str, np.ndarray], top_gaussian: Optional[np.ndarray] = None
) -> np.ndarray:
    """Log-density (N,) of each image's standardised statistics under the reference's mixture.
    ``top_gaussian``: the images' :func:`top_gaussian_nll` when already computed (else computed
    here, when the mixture uses it)."""
    from scipy.special import logsumexp

    columns = statistic_columns(stats)
    if "top_gaussian" in reference.dos_features and reference.latent is not None and "top_latent" in stats:
        if top_gaussian is None:
            top_gaussian = top_gaussian_nll(reference.latent, stats["top_latent"])
        columns["top_gaussian"] = np.asarray(top_gaussian, dtype=np.float64)
    missing = [n for n in reference.dos_features if n not in columns]
    if missing == ["top_gaussian"]:
        raise GlowflowError(
            "the outlier reference uses the top latent: compute the statistics with this version "
            "of glowflow (compute_statistics gives top_latent)"
        )
    if missing == ["codec_bpd"]:
        raise GlowflowError(
            "the outlier reference was fitted with the codec's bits/dim: compute the "
            "statistics with the same codec (compute_statistics(..., codec=...))"
        )
    if missing:
        raise GlowflowError(
            f"the statistics lack {missing} of the reference's {list(reference.dos_features)} "
            f"(a model with another number of levels?)"
        )
    matrix = np.column_stack([columns[n] for n in reference.dos_features])
    z = (matrix - reference.dos_mean) / reference.dos_std
    d = z.shape[1]
    per_component = []
    for log_w, mu, chol in zip(reference.dos_log_weights, reference.dos_means, reference.dos_precision_cholesky):
        y = (z - mu) @ chol
        log_det = np.log(np.diagonal(chol)).sum()
        per_component.append(log_w + log_det - 0.5 * (d * math.log(2 * math.pi) + (y * y).sum(1)))
    return logsumexp(np.stack(per_component), axis=0)


def reference_arrays(reference: Reference) -> Dict[str, np.ndarray]:
    """``reference`` as named plain arrays (strings, numbers, float arrays; no objects), the
    content of :func:`save_reference`'s file; :func:`reference_from_arrays` reads them back."""
    return dict(
        format=np.array(REFERENCE_FORMAT),
        key=np.array(reference.key),
        num_levels=np.array(reference.num_levels, dtype=np.int64),
        n_train=np.array(reference.n_train, dtype=np.int64),
        bpd_mean=np.array(reference.bpd_mean),
        bpd_std=np.array(reference.bpd_std),
        dos_features=np.array(list(reference.dos_features), dtype=str),
        dos_mean=reference.dos_mean,
        dos_std=reference.dos_std,
        dos_log_weights=reference.dos_log_weights,
        dos_means=reference.dos_means,
        dos_precision_cholesky=reference.dos_precision_cholesky,
        **latent_arrays(reference.latent),
        **({} if reference.orientation is None else orientation_arrays(reference.orientation)),
        **classifier_arrays(reference.classifier),
        **latent_arrays(reference.classifier_gaussians, "classifier_gaussian"),
    )


_STATISTIC_NAME = re.compile(r"(level_\d+_bpd|latent_rms_\d+|logdet|bpd|codec_bpd|top_gaussian)")


def reference_from_arrays(data: Mapping[str, np.ndarray], path: str) -> Reference:
    """The :class:`Reference` stored by :func:`reference_arrays` in ``data`` (an open .npz, read
    from ``path``); :class:`GlowflowError` if it is of another format or anything in it is unusable
    (:mod:`glowflow.ood.checks`: every array finite and of agreeing shapes, scales positive)."""
    if "format" not in data or str(data["format"]) != REFERENCE_FORMAT:
        raise GlowflowError(f"{path} is not a {REFERENCE_FORMAT} file")
    features = checks.names(data, "dos_features", path)
    unknown = [n for n in features if not _STATISTIC_NAME.fullmatch(n)]
    if unknown:
        raise checks.bad(path, f"dos_features names unknown statistics {unknown[:3]}")
    d = len(features)
    log_weights = checks.array(data, "dos_log_weights", path, (None,))
    k = log_weights.size
    dos_std = checks.array(data, "dos_std", path, (d,))
    checks.positive(dos_std, "dos_std", path)
    bpd_std = checks.number(data, "bpd_std", path)
    if bpd_std < 0:
        raise checks.bad(path, f"bpd_std is {bpd_std}, a negative standard deviation")
    counts = {key: checks.number(data, key, path, integer=True) for key in ("num_levels", "n_train")}
    for key, value in counts.items():
        if value < 1:
            raise checks.bad(path, f"{key} must be at least 1, got {value}")
    latent = latent_from_arrays(data, path)
    if "top_gaussian" in features and latent is None:
        raise checks.bad(path, "dos_features uses top_gaussian, but the file has no top-latent Gaussians")
    classifier = classifier_from_arrays(data, path)
    classifier_gaussians = latent_from_arrays(data, path, "classifier_gaussian")
    if (classifier is None) != (classifier_gaussians is None):
        raise checks.bad(path, "it holds a label classifier without its class Gaussians, or the other way round")
    if classifier is not None and classifier_gaussians.means.shape[1] != classifier.net.hidden.out_features:
        raise checks.bad(path, "the classifier's class Gaussians do not match its features")
    return Reference(
        key=checks.text(data, "key", path),
        num_levels=counts["num_levels"],
        n_train=counts["n_train"],
        bpd_mean=checks.number(data, "bpd_mean", path),
        bpd_std=bpd_std,
        dos_features=features,
        dos_mean=checks.array(data, "dos_mean", path, (d,)),
        dos_std=dos_std,
        dos_log_weights=log_weights,
        dos_means=checks.array(data, "dos_means", path, (k, d)),
        dos_precision_cholesky=checks.cholesky(data, "dos_precision_cholesky", path, (k, d, d)),
        latent=latent,
        orientation=orientation_from_arrays(data, path, tuple(TRANSFORMS)),
        classifier=classifier,
        classifier_gaussians=classifier_gaussians,
    )


def save_reference(path: str, reference: Reference) -> None:
    """Write ``reference`` to ``path`` as a .npz of plain arrays (no pickle), atomically."""
    arrays = reference_arrays(reference)
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_reference(path: str) -> Reference:
    """Read a reference written by :func:`save_reference` (:func:`glowflow.data.npzfile.open_npz`:
    a regular file, its declared sizes checked before reading, no pickle); a saved
    :class:`glowflow.ood.OutlierDetector` holds one too and reads as one.

    Raises :class:`GlowflowError` when the file is missing, unreadable, of another format or
    unusable (:func:`reference_from_arrays`).
    """
    with open_npz(path, "outlier reference", checks.DETECTOR_MAX_BYTES) as (data, _):
        return reference_from_arrays(data, path)


def model_fingerprint(model) -> str:
    """SHA-256 of the model's configuration and every tensor of its state dict (names, dtypes,
    shapes, bytes): changes whenever the checkpoint's weights or architecture do. A model without
    fitted priors hashes its configuration without ``prior_fit`` (as written before the field), so
    the detectors cached for such models, the shipped one's included, stay valid."""
    digest = hashlib.sha256()
    config = model.config.to_dict()
    if config.get("prior_fit") == PRIOR_FIT_BEFORE_ITS_FIELD:
        del config["prior_fit"]
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference_key(
    model,
    n_bits: int,
    dataset: str,
    seed: int = 0,
    max_images: Optional[int] = None,
    codec: Optional[str] = "png",
    threshold_fraction: float = 0.0,
    transforms: Sequence[str] = (),
) -> str:
    """The cache key of a training reference: JSON of the model fingerprint, n_bits, the training
    dataset's name, the noise seed, the image cap (the detector's fit images), the codec and the
    fraction of those images held back for the detector's threshold (or, for a checkpoint with a
    validation split, taken from it: a model folder exported from that checkpoint has no record
    of its validation split and must reuse the same detector, so that is not part of the key). A
    cached reference is reused only when its key is identical, so a changed checkpoint (weights
    or architecture), bit depth, dataset, seed, cap, codec or hold-back recomputes it. (Changed
    *contents* under the same dataset name are not detected.)"""
    return json.dumps(
        {
            "format": REFERENCE_FORMAT,
            "model_sha256": model_fingerprint(model),
            "n_bits": int(n_bits),
            "dataset": str(dataset),
            "seed": int(seed),
            "max_images": max_images,
            "codec": codec,
            "threshold_fraction": float(threshold_fraction),
            "transforms": list(transforms),
        },
        sort_keys=True,
    )
