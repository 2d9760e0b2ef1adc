"""The model's own view of orientation as an outlier signal, and its combination with the density
of states: the ``orientation`` and ``dos_orientation`` scores.

A model trained on upright garments gives an upright garment more likelihood than the same image
turned upside down or on its side; an image that is itself turned over (or of a kind the model
never saw upright) does not show that preference. For each image x and each transform t (by
default :data:`glowflow.ood.statistics.ORIENTATION_TRANSFORMS`: upside down and a quarter turn)
the *margin* ``bpd(x) - bpd(t(x))`` (bits/dim; negative when x is the likelier way up) is
standardised with its mean and standard deviation over the training images, and

    orientation(x) = log(1 + sum_t exp(z_t(x)))

a smooth maximum of the standardised margins (higher = some transform of x is likelier than x,
relative to training images). It compares an image with itself, so image complexity, which
dominates bits/dim, cancels. The idea is that of classifying transformations for outlier
detection (Golan & El-Yaniv, 2018; Hendrycks et al., 2019), with the flow's likelihood as the
classifier.

``dos_orientation`` (the detector's default score) adds the two scores after standardising each
with its mean and standard deviation on held-back inlier images (the detector's threshold
images; the training images themselves when there are none): ``(dos - m_dos) / s_dos +
(orientation - m_or) / s_or``. The density of states keeps far outliers (other datasets, noise)
where orientation is uninformative, and orientation adds the near ones (flipped and rotated
images, unseen classes) where the density is not. docs/outlier_detection.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from glowflow.errors import GlowflowError
from glowflow.ood import checks


@dataclass
class Orientation:
    """What the ``orientation`` and ``dos_orientation`` scores need, fitted on inlier images.

    transforms: the T transform names (columns of the statistics' ``transform_bpd``).
    margin_mean, margin_std (T,): mean and standard deviation of each margin
    ``bpd - transform_bpd[:, j]`` over the reference's training images.
    combined_mean, combined_std (2,): mean and standard deviation of (``dos``, ``orientation``)
    over the held-back inlier images given to :func:`fit_orientation` (or the training images).
    """

    transforms: Tuple[str, ...]
    margin_mean: np.ndarray
    margin_std: np.ndarray
    combined_mean: np.ndarray
    combined_std: np.ndarray


def orientation_margins(stats: Mapping[str, np.ndarray], transforms: Sequence[str]) -> np.ndarray:
    """(N, T) float64 ``bpd - transform_bpd``: how many bits/dim each image costs more than its
    transform (negative: the image as it is is the likelier)."""
    if "transform_bpd" not in stats:
        raise GlowflowError(
            "the outlier reference compares images with their transforms "
            f"({', '.join(transforms)}): compute the statistics with those transforms "
            "(compute_statistics(..., transforms=...))"
        )
    turned = np.asarray(stats["transform_bpd"], dtype=np.float64)
    if turned.ndim != 2 or turned.shape[1] != len(transforms):
        raise GlowflowError(
            f"the statistics hold the bits/dim of {turned.shape[1:]} transforms, the reference {len(transforms)}"
        )
    return np.asarray(stats["bpd"], dtype=np.float64)[:, None] - turned


def fit_orientation(
    train_stats: Mapping[str, np.ndarray],
    transforms: Sequence[str],
    calibration_stats: Mapping[str, np.ndarray],
    calibration_dos: np.ndarray,
) -> Orientation:
    """The margins' mean and std over ``train_stats`` (a constant margin keeps std 1), and the
    combination's standardisation (:func:`calibrated`) on the images of ``calibration_stats``, whose
    density-of-states scores are ``calibration_dos``: held-back inliers where there are some, else
    the training images themselves."""
    margins = orientation_margins(train_stats, transforms)
    finite = np.isfinite(margins).all(1)
    if finite.sum() < 2:
        raise GlowflowError("fitting the orientation score needs at least 2 training images with finite bits/dim")
    mean, std = margins[finite].mean(0), margins[finite].std(0)
    fitted = Orientation(
        transforms=tuple(transforms),
        margin_mean=mean,
        margin_std=np.where(std > 1e-12, std, 1.0),
        combined_mean=np.zeros(2),
        combined_std=np.ones(2),
    )
    return calibrated(fitted, calibration_dos, orientation_score(fitted, calibration_stats))


def orientation_score(orientation: Orientation, stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """(N,) ``log(1 + sum_t exp(z_t))`` of the standardised margins (higher = more outlying)."""
    z = (orientation_margins(stats, orientation.transforms) - orientation.margin_mean) / orientation.margin_std
    return np.logaddexp.reduce(np.concatenate([z, np.zeros((len(z), 1))], 1), axis=1)


def calibrated(orientation: Orientation, dos: np.ndarray, orient: np.ndarray) -> Orientation:
    """``orientation`` with the combination standardised on images whose ``dos`` and ``orient``
    scores are given (non-finite scores left out; a constant score keeps std 1)."""
    mean, std = pair_standardisation(dos, orient, "dos_orientation")
    return replace(orientation, combined_mean=mean, combined_std=std)


def pair_standardisation(first: np.ndarray, second: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (2,) of two scores over the same images (rows where either is
    not finite left out; a constant score keeps std 1), for a combination named ``what``."""
    pair = np.column_stack([np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)])
    pair = pair[np.isfinite(pair).all(1)]
    if len(pair) < 2:
        raise GlowflowError(f"standardising the {what} score needs at least 2 images with finite scores")
    std = pair.std(0)
    return pair.mean(0), np.where(std > 1e-12, std, 1.0)


def combined_score(orientation: Orientation, dos: np.ndarray, orient: np.ndarray) -> np.ndarray:
    """(N,) ``dos_orientation``: the sum of both scores, each standardised (see the module)."""
    mean, std = orientation.combined_mean, orientation.combined_std
    return (np.asarray(dos) - mean[0]) / std[0] + (np.asarray(orient) - mean[1]) / std[1]


def orientation_arrays(orientation: Orientation) -> Dict[str, np.ndarray]:
    """``orientation`` as plain arrays for a reference file (read back by :func:`orientation_from_arrays`)."""
    return dict(
        orientation_transforms=np.array(list(orientation.transforms), dtype=str),
        orientation_margin_mean=orientation.margin_mean,
        orientation_margin_std=orientation.margin_std,
        orientation_combined_mean=orientation.combined_mean,
        orientation_combined_std=orientation.combined_std,
    )


def orientation_from_arrays(data: Mapping[str, np.ndarray], path: str, known: Sequence[str]):
    """The :class:`Orientation` stored in ``data`` (None when the file has none), every array
    checked: transforms among ``known``, means finite, standard deviations positive."""
    if "orientation_transforms" not in data:
        return None
    transforms = checks.names(data, "orientation_transforms", path)
    unknown = [t for t in transforms if t not in known]
    if unknown or not transforms or len(set(transforms)) != len(transforms):
        raise checks.bad(
            path, f"orientation_transforms must be distinct names of {list(known)}, got {list(transforms)}"
        )
    t = len(transforms)
    margin_std = checks.array(data, "orientation_margin_std", path, (t,))
    combined_std = checks.array(data, "orientation_combined_std", path, (2,))
    checks.positive(margin_std, "orientation_margin_std", path)
    checks.positive(combined_std, "orientation_combined_std", path)
    return Orientation(
        transforms=transforms,
        margin_mean=checks.array(data, "orientation_margin_mean", path, (t,)),
        margin_std=margin_std,
        combined_mean=checks.array(data, "orientation_combined_mean", path, (2,)),
        combined_std=combined_std,
    )
