"""The cached detector of a checkpoint, as the commands use it: :func:`detector_for` reuses a
detector fitted before (saved beside the checkpoint, or inside its model folder: where
:func:`detector_cache_path_for` says, from :mod:`glowflow.ood.cache_path`) when its key matches,
and otherwise fits one and caches it."""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Tuple, Union

from glowflow.errors import GlowflowError
from glowflow.ood.cache_path import detector_cache_path_for
from glowflow.ood.detector import OutlierDetector
from glowflow.ood.detector_images import Images
from glowflow.ood.reference import reference_key
from glowflow.pretrained import is_shipped

__all__ = ["detector_cache_path_for", "detector_for"]


def detector_for(
    model,
    train_images: Union[None, Images, Callable[[], Images]],
    dataset: str,
    detector: OutlierDetector,
    cache_path: Optional[str] = None,
    threshold_images: Union[None, Images, Callable[[], Images]] = None,
) -> Tuple[OutlierDetector, bool]:
    """``detector`` fitted on ``dataset``'s training images (its internal hold-back sets the
    threshold), and whether it came from the cache.

    With ``cache_path``, a detector stored there under the same key (:func:`reference_key` of
    the model, dataset, seed, fit images, codec and hold-back) is reused, keeping ``detector``'s
    score and tpr; otherwise ``detector`` is fitted on ``train_images`` and, with
    ``cache_path``, saved there (:func:`_cache`: a one-line note instead when it cannot be
    written, or would replace a detector shipped with the package). ``train_images`` may be None
    when the cache is valid, or a function that returns them, called only when the detector has
    to be fitted (so that a valid cache spares reading the training set). ``threshold_images``
    (or a function returning them): inliers the model never trained on, e.g. the training run's
    validation split, to set the threshold on (:meth:`OutlierDetector.fit`); None: held back
    from the training images.
    """
    key = reference_key(
        model,
        model.config.n_bits,
        dataset,
        detector.seed,
        detector.fit_images,
        detector.codec,
        detector.threshold_fraction,
        detector.transforms,
    )
    cached = _cached_detector(cache_path, key, detector)
    if cached is not None:
        return cached, True
    if train_images is None:
        raise GlowflowError("outlier detection needs the training images (no valid cached detector)")
    threshold = threshold_images() if callable(threshold_images) else threshold_images
    detector._fit(train_images() if callable(train_images) else train_images, threshold_images=threshold, key=key)
    if cache_path is not None:
        _cache(detector, cache_path)
    return detector, False


def _cache(detector: OutlierDetector, path: str) -> None:
    """Save the fitted ``detector`` at ``path`` as the cache. Where that cannot be done (a folder
    that is not writable, e.g. an installed package's) or must not (it would replace the detector
    of a model folder shipped with glowflow, fitted with other settings), one line on stderr says
    that it was not cached; the fitted detector is used all the same."""
    if is_shipped(path) and os.path.exists(path):
        print(
            f"note: the outlier detector was not cached: {path} ships with glowflow and is kept "
            f"(it was fitted with other settings)",
            file=sys.stderr,
        )
        return
    try:
        detector.save(path)
    except GlowflowError as exc:
        print(f"note: the outlier detector was not cached ({exc})", file=sys.stderr)
        return
    print(f"wrote {path}")


def _cached_detector(path: Optional[str], key: str, detector: OutlierDetector) -> Optional[OutlierDetector]:
    """The detector cached at ``path`` if there is a readable one with ``key`` (given
    ``detector``'s score, tpr and reading settings), else None (saying why it is not used)."""
    if path is None or not os.path.exists(path):
        return None
    try:
        cached = OutlierDetector.load(path, detector.model, check_model=False)
    except GlowflowError as exc:
        print(f"note: ignoring the cached outlier detector and fitting it again: {exc}")
        return None
    if cached.reference_.key != key:
        print(f"the cached outlier detector in {path} is for another checkpoint or settings; recomputing")
        return None
    print(f"reusing the training statistics (the fitted outlier detector) cached in {path}")
    return detector._adopt(cached.reference_, cached.threshold_scores_)
