"""The deployable outlier detector: :class:`OutlierDetector` (fit once on inlier images, then
score, decide and save), the threshold at a chosen true-positive rate, its .npz file (no pickle),
and where the detector of a checkpoint's training data is cached (beside a checkpoint file, inside
a model folder: :func:`detector_cache_path_for`; :mod:`glowflow.ood.cache` reuses or fits it for
``glowflow --outlier_detection`` and ``glowflow --score``).

Conventions, as in scikit-learn's ``IsolationForest`` / ``LocalOutlierFactor``:

* ``outlier_scores(X)`` (glowflow's convention): the chosen score, **higher = more outlying**.
* ``score_samples(X)`` = ``-outlier_scores(X)``: **higher = more normal** (scikit-learn's).
* ``decision_function(X)`` = ``score_samples(X) - offset_`` = ``threshold_ - outlier_scores(X)``:
  **negative = outlier**.
* ``predict(X)``: **+1 inlier, -1 outlier**; ``is_outlier(X)``: the same as a bool array.

An image whose score is not finite (NaN) is an outlier.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import replace
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from glowflow.config import DetectorConfig, dataset_slug
from glowflow.data import make_loader
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write
from glowflow.model import Glow
from glowflow.ood.detector_file import DETECTOR_FORMAT, read_detector_file
from glowflow.ood.orientation import calibrated
from glowflow.ood.reference import Reference, fit_reference, model_fingerprint, reference_arrays
from glowflow.ood.scores import outlier_scores
from glowflow.ood.statistics import ORIENTATION_TRANSFORMS, StatisticsSettings, check_transforms
from glowflow.pretrained import PretrainedFolder, find_folder, is_model_folder, resolve

FIT_IMAGES = DetectorConfig.fit_images
"""Inlier images a detector fits on by default (a seeded random subset when there are more): 8000
for the reference, 2000 held back for the threshold. On Fashion-MNIST the density of states from
8000 training images is within sampling noise of the one from all 60000
(docs/outlier_detection.md), and 10000 images take seconds instead of minutes."""
THRESHOLD_FRACTION = 0.2
"""Share of the fit images held back (a seeded random subset) to set the threshold on, when
``fit`` is given no ``threshold_images``."""
DEFAULT_TPR = DetectorConfig.tpr
"""Share of held-back inlier images the threshold keeps (classifies as inliers)."""
DEFAULT_SCORE = DetectorConfig.detector_score
"""The score a detector decides with by default (glowflow.ood.orientation; docs/outlier_detection.md)."""

Images = Union[torch.Tensor, np.ndarray, Dataset, DataLoader, Iterable]


def threshold_at_tpr(scores: np.ndarray, tpr: float) -> float:
    """The threshold ``t`` that keeps (``score <= t``) the ``ceil(tpr * n)`` lowest of ``n``
    inlier ``scores`` (higher = more outlying): ``t`` is the ``ceil(tpr * n)``-th smallest, so at
    least ``tpr`` of these images are kept (more only where scores tie at ``t``). A NaN score
    counts as the most outlying."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise GlowflowError("setting a threshold needs at least one held-back inlier image")
    _check_tpr(tpr)
    s = np.sort(np.where(np.isnan(s), np.inf, s))
    k = min(s.size, max(1, math.ceil(round(tpr * s.size, 9))))
    return float(s[k - 1])


def _check_tpr(tpr: float) -> None:
    if not (isinstance(tpr, (int, float)) and not isinstance(tpr, bool) and 0.0 < tpr <= 1.0):
        raise GlowflowError(f"the true-positive rate must be in (0, 1], got {tpr!r}")


class OutlierDetector:
    """Fit-once, score-many outlier detection with a trained Glow (see the module docstring for
    the sign conventions).

    ``model``: a trained :class:`glowflow.Glow`. ``score``: the decision score, any name of
    :func:`glowflow.ood.outlier_scores` but ``likelihood_ratio`` (default ``"dos_orientation"``,
    the density of states plus the model's preference for the image's orientation; ``"dos"``
    without it). ``tpr``: the share of held-back inliers the threshold keeps. ``fit_images``: at
    most this many fit images are used (a random subset, seeded with ``seed``; None: all).
    ``threshold_fraction``: the share of them held back for the threshold when ``fit`` has no
    ``threshold_images``. ``batch_size``, ``device`` (default: the model's), ``seed`` (the
    dequantisation noise and the subsets), ``codec`` (for ``complexity`` and ``dos``; None: no
    codec) and ``progress`` (a progress bar) set how images are read. ``transforms``: the image
    transforms the ``orientation`` score compares every image with (one more pass of the model
    each; empty: no ``orientation`` or ``dos_orientation`` score, and ``dos`` is the default).

    Images (``X``) are a tensor or array (N, C, H, W) in [0, 1] on the 8-bit grid, a Dataset
    yielding ``(image, label)`` (labels are ignored), or a DataLoader (or any iterable) of such
    batches. After :meth:`fit`: ``reference_`` (:class:`Reference`), ``thresholds_`` (every
    score's threshold at ``tpr``), ``threshold_`` and ``offset_`` (``-threshold_``) of ``score``,
    ``n_threshold_`` (held-back images).
    """

    def __init__(
        self,
        model,
        score: Optional[str] = None,
        *,
        tpr: float = DEFAULT_TPR,
        fit_images: Optional[int] = FIT_IMAGES,
        threshold_fraction: float = THRESHOLD_FRACTION,
        batch_size: int = 256,
        device=None,
        seed: int = 0,
        codec: Optional[str] = "png",
        progress: bool = False,
        transforms: Sequence[str] = ORIENTATION_TRANSFORMS,
    ):
        _check_tpr(tpr)
        if fit_images is not None and (isinstance(fit_images, bool) or int(fit_images) < 1):
            raise GlowflowError(f"fit_images must be at least 1 (or None: all), got {fit_images!r}")
        if not 0.0 < threshold_fraction < 1.0:
            raise GlowflowError(f"threshold_fraction must be in (0, 1), got {threshold_fraction!r}")
        if int(batch_size) < 1:
            raise GlowflowError(f"batch_size must be at least 1, got {batch_size!r}")
        self.model = model
        self.tpr = float(tpr)
        self.fit_images = None if fit_images is None else int(fit_images)
        self.threshold_fraction = float(threshold_fraction)
        self.batch_size = int(batch_size)
        self.settings = StatisticsSettings(
            device=device,
            seed=int(seed),
            codec=codec,
            progress=progress,
            transforms=check_transforms(transforms, model.config.image_shape),
        )
        self.score = str(score) if score is not None else (DEFAULT_SCORE if self.settings.transforms else "dos")
        self._check_score_name(self.score)
        self.reference_: Optional[Reference] = None
        self.threshold_scores_: Dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ names and state

    def score_names(self) -> Tuple[str, ...]:
        """Every score the detector computes (the columns of :meth:`all_scores`), in order."""
        names = ["nll"] + (["complexity"] if self.settings.codec is not None else []) + ["typicality"]
        levels = int(self.model.config.L)
        names += [f"level_{i + 1}_bpd" for i in range(levels)]
        names += ["hierarchy_ratio"] if levels >= 2 else []
        names += ["top_gaussian", "dos"]
        return tuple(names + (["orientation", "dos_orientation"] if self.settings.transforms else []))

    def _check_score_name(self, name: str) -> None:
        if name not in self.score_names():
            raise GlowflowError(f"unknown detector score {name!r}; choose from {', '.join(self.score_names())}")

    def _check_fitted(self) -> None:
        if self.reference_ is None:
            raise GlowflowError("the outlier detector is not fitted yet: call fit(images) or OutlierDetector.load")

    @property
    def thresholds_(self) -> Dict[str, float]:
        """Every score's threshold at ``tpr`` on the held-back inlier images."""
        self._check_fitted()
        return {name: threshold_at_tpr(s, self.tpr) for name, s in self.threshold_scores_.items()}

    @property
    def threshold_(self) -> float:
        """The threshold of ``score``: an image is an outlier when its score is above it."""
        return self.thresholds_[self.score]

    @property
    def offset_(self) -> float:
        """scikit-learn's ``offset_``: ``decision_function = score_samples - offset_``."""
        return -self.threshold_

    @property
    def n_threshold_(self) -> int:
        """Held-back inlier images the thresholds were set on."""
        self._check_fitted()
        return int(next(iter(self.threshold_scores_.values())).size)

    def set_score(self, score: str) -> OutlierDetector:
        """Decide with another score (every score's threshold is kept: no refit)."""
        self._check_score_name(score)
        self.score = score
        return self

    def set_tpr(self, tpr: float) -> OutlierDetector:
        """Move every threshold to another true-positive rate (the held-back scores are kept: no refit)."""
        _check_tpr(tpr)
        self.tpr = float(tpr)
        return self

    # ------------------------------------------------------------------ reading images

    def _loader(self, images: Images) -> Iterable:
        """A loader over ``images`` (see the class docstring), in their order."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if torch.is_tensor(images):
            if images.dim() != 4:
                raise GlowflowError(f"images must be a (N, C, H, W) tensor in [0, 1], got shape {tuple(images.shape)}")
            images = TensorDataset(images)
        if isinstance(images, Dataset) and hasattr(images, "__len__"):
            return make_loader(images, batch_size=self.batch_size, shuffle=False)
        if isinstance(images, Iterable):
            return images
        raise GlowflowError(f"images must be a tensor, a Dataset or a DataLoader, got {type(images).__name__}")

    def _indexable(self, images: Images) -> Optional[Dataset]:
        """``images`` as a map-style Dataset when they are one (a DataLoader's own dataset), else None."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if torch.is_tensor(images):
            return TensorDataset(images) if images.dim() == 4 else None
        if isinstance(images, DataLoader):
            images = images.dataset
        if isinstance(images, Dataset) and hasattr(images, "__len__"):
            return images
        return None

    def statistics(self, images: Images, desc: str = "images", max_images: Optional[int] = None):
        """:func:`glowflow.ood.compute_statistics` of ``images`` with the detector's settings."""
        settings = self.settings if max_images is None else replace(self.settings, max_images=max_images)
        return settings.compute(self.model, self._loader(images), desc)

    # ------------------------------------------------------------------ fitting

    def fit(self, images: Images, threshold_images: Optional[Images] = None, key: str = "") -> OutlierDetector:
        """Fit the reference on inlier ``images`` and set the threshold on held-back inliers.

        Without ``threshold_images``: at most ``fit_images`` of ``images`` are used (a random
        subset seeded with ``seed`` when they are a tensor, a Dataset or a DataLoader over a
        map-style dataset; the first ones otherwise), and a seeded random ``threshold_fraction``
        of them is held back: the reference is fitted on the rest and the threshold set on them.
        With ``threshold_images`` (inlier images the model was not trained on and not among
        ``images``, e.g. the training run's validation split): the same split of the budget, the
        reference on at most ``(1 - threshold_fraction) * fit_images`` of ``images`` and the
        threshold on at most ``threshold_fraction * fit_images`` of ``threshold_images`` (seeded
        subsets; all of them when ``fit_images`` is None). ``key`` is stored as the reference's
        key (the cache key; '' when not cached).
        """
        if threshold_images is not None:
            stats = self._fit_statistics(images, self._share(1.0 - self.threshold_fraction), "fit images")
            limit = self._share(self.threshold_fraction)
            threshold_stats = self._fit_statistics(threshold_images, limit, "threshold images")
            return self.fit_statistics(stats, threshold_stats, key=key)
        stats = self._fit_statistics(images, self.fit_images, "fit images")
        n = stats["bpd"].size
        held = int(round(self.threshold_fraction * n))
        if held < 1 or n - held < 1:
            raise GlowflowError(f"fitting a detector on {n} image(s) leaves none to hold back for the threshold")
        order = np.random.default_rng(self.settings.seed).permutation(n)
        threshold_stats = _rows(stats, np.sort(order[:held]))
        return self.fit_statistics(_rows(stats, np.sort(order[held:])), threshold_stats, key=key)

    def _share(self, fraction: float) -> Optional[int]:
        """``fraction`` of ``fit_images`` (at least 1), or None when ``fit_images`` is None (all)."""
        return None if self.fit_images is None else max(1, int(round(fraction * self.fit_images)))

    def _fit_statistics(self, images: Images, limit: Optional[int], desc: str):
        """Statistics of at most ``limit`` of ``images`` (None: all): a seeded random subset when
        they are indexable, the first ones otherwise (see :meth:`fit`)."""
        dataset = self._indexable(images)
        if dataset is not None and limit is not None and len(dataset) > limit:
            keep = np.random.default_rng(self.settings.seed).choice(len(dataset), limit, replace=False)
            batch = images.batch_size if isinstance(images, DataLoader) and images.batch_size else self.batch_size
            subset = Subset(dataset, np.sort(keep).tolist())
            return self.settings.compute(self.model, make_loader(subset, batch, shuffle=False), desc)
        return self.statistics(images, desc, max_images=limit)

    def fit_statistics(
        self, train_stats: Mapping[str, np.ndarray], threshold_stats: Mapping[str, np.ndarray], key: str = ""
    ) -> OutlierDetector:
        """Fit from already computed statistics (:func:`glowflow.ood.compute_statistics` with the
        detector's codec): the reference (:func:`fit_reference`, seeded with ``seed``) on
        ``train_stats``, then every score of ``threshold_stats`` kept for the thresholds."""
        self.reference_ = fit_reference(
            train_stats, key=key, seed=self.settings.seed, transforms=self.settings.transforms
        )
        if self.reference_.orientation is not None:  # dos_orientation standardised on the held-back images
            held = self.scores_from_statistics(threshold_stats)
            orientation = calibrated(self.reference_.orientation, held["dos"], held["orientation"])
            self.reference_ = replace(self.reference_, orientation=orientation)
        self.threshold_scores_ = self.scores_from_statistics(threshold_stats)
        return self

    # ------------------------------------------------------------------ scoring

    def scores_from_statistics(
        self, stats: Mapping[str, np.ndarray], background_stats: Optional[Mapping[str, np.ndarray]] = None
    ) -> Dict[str, np.ndarray]:
        """Every score (:func:`glowflow.ood.outlier_scores`, higher = more outlying) of the
        images whose statistics are ``stats``."""
        self._check_fitted()
        return outlier_scores(stats, self.reference_, background_stats)

    def all_scores(self, images: Images) -> Dict[str, np.ndarray]:
        """Every score (N,) of ``images``, higher = more outlying (glowflow's convention)."""
        return self.scores_from_statistics(self.statistics(images))

    def outlier_scores(self, images: Images) -> np.ndarray:
        """The detector's ``score`` (N,): higher = more outlying."""
        self._check_fitted()
        return self.all_scores(images)[self.score]

    def score_samples(self, images: Images) -> np.ndarray:
        """scikit-learn's convention: ``-outlier_scores``, higher = more normal."""
        return -self.outlier_scores(images)

    def decision_function(self, images: Images) -> np.ndarray:
        """``threshold_ - outlier_scores``: negative = outlier, positive = inlier (scikit-learn's)."""
        return self.score_samples(images) - self.offset_

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Bool (N,) from scores of ``score`` (higher = more outlying): above the threshold, or NaN."""
        return ~(np.asarray(scores, dtype=np.float64) <= self.threshold_)

    def is_outlier(self, images: Images) -> np.ndarray:
        """Bool (N,): True for an outlier (score above the threshold, or not a number)."""
        return self.decide(self.outlier_scores(images))

    def predict(self, images: Images) -> np.ndarray:
        """int (N,): +1 inlier, -1 outlier (scikit-learn's convention)."""
        return np.where(self.is_outlier(images), -1, 1)

    # ------------------------------------------------------------------ file

    def save(self, path: str) -> str:
        """Write the fitted detector (reference, held-back scores, settings, the model's
        fingerprint) to ``path`` as a .npz of plain arrays (no pickle), atomically."""
        self._check_fitted()
        names = list(self.threshold_scores_)
        arrays = reference_arrays(self.reference_)
        arrays.update(
            detector_format=np.array(DETECTOR_FORMAT),
            detector_settings=np.array(json.dumps(self._settings_dict(), sort_keys=True)),
            model_sha256=np.array(model_fingerprint(self.model)),
            threshold_score_names=np.array(names, dtype=str),
            threshold_scores=np.stack([self.threshold_scores_[n] for n in names], 1),
        )
        return atomic_write(path, lambda handle: np.savez(handle, **arrays))

    def _settings_dict(self) -> dict:
        return dict(
            score=self.score,
            tpr=self.tpr,
            fit_images=self.fit_images,
            threshold_fraction=self.threshold_fraction,
            batch_size=self.batch_size,
            seed=self.settings.seed,
            codec=self.settings.codec,
        )

    @classmethod
    def load(cls, path: str, model, device=None, progress: bool = False, check_model: bool = True) -> OutlierDetector:
        """The detector :meth:`save` wrote to ``path``, for ``model`` (read without pickle, every
        array checked first: :func:`read_detector_file`). Refused with a one-line
        :class:`GlowflowError` saying what is wrong when the file is missing or not a regular file,
        damaged, of another format, holds an entry that is not finite, of the wrong shape or type
        (a zero scale, a non-finite threshold), or (``check_model``) was fitted for another model
        (weights or architecture)."""
        stored = read_detector_file(path)
        if check_model and stored.model_sha256 != model_fingerprint(model):
            raise GlowflowError(f"the outlier detector {path} was fitted for another model (weights or architecture)")
        orientation = stored.reference.orientation
        transforms = () if orientation is None else orientation.transforms
        detector = cls(model, device=device, progress=progress, transforms=transforms, **stored.settings)
        detector.reference_ = stored.reference
        detector.threshold_scores_ = {n: stored.held[:, i] for i, n in enumerate(stored.names)}
        if set(stored.names) != set(detector.score_names()):
            raise GlowflowError(
                f"the outlier detector {path} has scores {list(stored.names)}, the model gives {detector.score_names()}"
            )
        broken = {n: t for n, t in detector.thresholds_.items() if not math.isfinite(t)}
        if broken:
            name, value = next(iter(broken.items()))
            raise GlowflowError(
                f"unusable outlier detector file {path}: the {name} threshold at tpr {detector.tpr:g} is {value} "
                f"(its held-back scores are not finite numbers)"
            )
        return detector

    @classmethod
    def from_pretrained(
        cls, name: str = "fashionmnist", device="cpu", score: Optional[str] = None, tpr: Optional[float] = None
    ) -> OutlierDetector:
        """The fitted detector of a model folder, with its model (``detector.model``), in one call:
        ``OutlierDetector.from_pretrained("fashionmnist")`` for the model shipped with glowflow
        (also ``"pretrained:NAME"``, or the path of a folder written by ``glowflow --export`` in
        which ``glowflow --score`` has cached a detector). ``score`` and ``tpr`` change the stored
        ones (no refit). GlowflowError when the folder holds no fitted detector."""
        folder = find_folder(name)
        model = Glow.from_pretrained(folder, device)
        dataset = PretrainedFolder.open(folder).dataset
        n_bits = int(model.config.n_bits)
        path = detector_cache_path_for(folder, dataset, n_bits) if dataset else None
        if path is None or not os.path.isfile(path):
            found = sorted(glob.glob(os.path.join(glob.escape(resolve(folder)), f"ood_detector_*_{n_bits}bit.npz")))
            if len(found) != 1:
                raise GlowflowError(
                    f"{name} holds {'no' if not found else 'more than one'} fitted outlier detector "
                    f"(ood_detector_<dataset>_{n_bits}bit.npz): run glowflow --score IMAGES --checkpoint {name} "
                    f"once to fit and cache it there, or fit one with OutlierDetector(model).fit(images)"
                )
            path = found[0]
        detector = cls.load(path, model, device=device)
        if score is not None:
            detector.set_score(score)
        return detector if tpr is None else detector.set_tpr(tpr)


def _rows(stats: Mapping[str, np.ndarray], index: np.ndarray) -> Dict[str, np.ndarray]:
    return {k: np.asarray(v)[index] for k, v in stats.items()}


def detector_cache_path_for(checkpoint_path: str, dataset: str, n_bits: int) -> str:
    """Where the command line caches a checkpoint's detector (fitted on ``dataset`` at ``n_bits``):
    inside a model folder (and ``pretrained:NAME``), ``<folder>/ood_detector_<dataset>_<n_bits>bit.npz``,
    so that it travels with the folder; beside a checkpoint file,
    ``<checkpoint stem>.ood_detector_<dataset>_<n_bits>bit.npz``."""
    name = f"ood_detector_{dataset_slug(dataset)}_{int(n_bits)}bit.npz"
    if is_model_folder(checkpoint_path):
        return os.path.join(os.path.abspath(resolve(checkpoint_path)), name)
    stem = os.path.splitext(os.path.abspath(checkpoint_path))[0]
    return f"{stem}.{name}"
