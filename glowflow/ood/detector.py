"""The deployable outlier detector: :class:`OutlierDetector`, an estimator in the manner of
scikit-learn's ``IsolationForest`` and PyOD's ``BaseDetector`` (``fit`` once on inlier images,
then score, decide and save; ``get_params`` / ``set_params``), the threshold at a chosen
true-positive rate, and its .npz file (no pickle). Where the commands cache a checkpoint's
detector: :mod:`glowflow.ood.cache_path`; how they reuse or fit it: :mod:`glowflow.ood.cache`.

Conventions (scikit-learn's for the methods, PyOD's for the fitted attributes):

* ``outlier_scores(X)`` (glowflow's convention, PyOD's ``decision_function``): the chosen score,
  **higher = more outlying**.
* ``score_samples(X)`` = ``-outlier_scores(X)``: **higher = more normal** (scikit-learn's).
* ``decision_function(X)`` = ``score_samples(X) - offset_`` = ``threshold_ - outlier_scores(X)``:
  **negative = outlier** (scikit-learn's sign, not PyOD's).
* ``predict(X)`` and ``fit_predict(X)``: **+1 inlier, -1 outlier** (scikit-learn's);
  ``is_outlier(X)``: the same as a bool array.
* After ``fit``: ``threshold_``, ``decision_scores_`` (the held-back inlier images' scores,
  higher = more outlying) and ``labels_`` (0 inlier, 1 outlier for those images), as PyOD names them.

An image whose score is not finite (NaN) is an outlier.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from functools import partial
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import DataLoader, Subset

from glowflow.config import DetectorConfig
from glowflow.data import make_loader
from glowflow.errors import GlowflowError
from glowflow.files import atomic_write
from glowflow.model import Glow
from glowflow.ood.cache_path import pretrained_detector_path
from glowflow.ood.classifier import classifier_features, classifier_for
from glowflow.ood.detector_file import DETECTOR_FORMAT, read_detector_file
from glowflow.ood.detector_images import Images, as_indexable, as_loader, with_labels
from glowflow.ood.metrics import check_tpr, threshold_at_tpr
from glowflow.ood.reference import Reference, fit_reference, model_fingerprint, reference_arrays
from glowflow.ood.scores import outlier_scores
from glowflow.ood.statistics import ORIENTATION_TRANSFORMS, StatisticsSettings, check_transforms
from glowflow.pretrained import find_folder
from glowflow.runtime import resolve_precision

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
PARAMETERS = ("model", "score", "tpr", "fit_images", "threshold_fraction", "batch_size", "device", "seed", "codec")
PARAMETERS += ("progress", "transforms", "precision")
"""The constructor's parameters (:meth:`OutlierDetector.get_params`)."""
REFIT_PARAMETERS = frozenset({"model", "fit_images", "threshold_fraction", "seed", "codec", "transforms"})
"""Parameters whose change makes a fitted detector unfitted (:meth:`OutlierDetector.set_params`)."""


class NotFittedError(GlowflowError, AttributeError):
    """A fitted attribute or method of an :class:`OutlierDetector` that is not fitted (yet, or
    any more after :meth:`OutlierDetector.set_params` changed how it fits): a one-line
    GlowflowError, and an AttributeError as scikit-learn's ``NotFittedError`` is."""


FITTED = ("reference_", "threshold_scores_", "thresholds_", "threshold_", "offset_")
FITTED += ("decision_scores_", "labels_", "n_threshold_")
"""The attributes :meth:`OutlierDetector.fit` sets (names ending in ``_``, as scikit-learn's)."""


class OutlierDetector:
    """Fit-once, score-many outlier detection with a trained Glow (see the module docstring for
    the sign conventions).

    Parameters (:meth:`get_params`, :meth:`set_params`): ``model``: a trained
    :class:`glowflow.Glow`. ``score``: the decision score, any name of
    :func:`glowflow.ood.outlier_scores` but ``likelihood_ratio`` (default ``"combined"``: the
    density of states plus the model's preference for the image's orientation, plus, when the
    fit images have class labels, the label classifier's score, :mod:`glowflow.ood.classifier`).
    ``tpr``: the share of held-back inliers the threshold keeps. ``fit_images``: at most this many
    fit images are used (a random subset, seeded with ``seed``; None: all).
    ``threshold_fraction``: the share of them held back for the threshold when ``fit`` has no
    ``threshold_images``. ``batch_size``, ``device`` (default: the model's), ``seed`` (the
    dequantisation noise and the subsets), ``codec`` (for ``complexity`` and ``dos``; None: no
    codec) and ``progress`` (a progress bar) set how images are read. ``transforms``: the image
    transforms the ``orientation`` score compares every image with (one more pass of the model
    each; empty: no ``orientation`` or ``dos_orientation`` score, and ``dos`` is the default).
    ``precision``: the model passes' (:data:`glowflow.config.OOD_PRECISIONS`; "auto": bf16 autocast
    where the device computes bf16 natively, else float32; no refit when it changes).
    Every parameter is checked here, again by :meth:`set_params` and again by :meth:`fit`.

    Images (``X``) are a tensor or array (N, C, H, W) in [0, 1] on the 8-bit grid, a Dataset
    yielding ``(image, label)``, or a DataLoader (or any iterable) of such batches.

    After :meth:`fit` (or :meth:`load`): ``reference_`` (:class:`Reference`),
    ``threshold_scores_`` (every score (n,) of the n held-back inlier images), ``thresholds_``
    (every score's threshold at ``tpr``), and for ``score``: ``threshold_`` (an image is an
    outlier when its score is above it), ``offset_`` (``-threshold_``, scikit-learn's),
    ``decision_scores_`` (n,) (the held-back images' scores, higher = more outlying: the
    outlier scores of the fit data, as PyOD's ``decision_scores_``), ``labels_`` (n,) int (1
    where one of them is above the threshold, else 0: PyOD's) and ``n_threshold_`` (n). They are
    computed once, when the detector is fitted or loaded, and again when :meth:`set_params`
    changes ``score`` or ``tpr``.
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
        precision: str = DetectorConfig.ood_precision,
    ):
        self.model = model
        self.score = score
        self.tpr = tpr
        self.fit_images = fit_images
        self.threshold_fraction = threshold_fraction
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.codec = codec
        self.progress = progress
        self.transforms = transforms
        self.precision = precision
        self._check_params()

    # ------------------------------------------------------------------ parameters

    def _check_params(self) -> None:
        """Check every parameter, in one line each, and store it in its plain form (``score``
        None: the default score given the transforms)."""
        check_tpr(self.tpr)
        fit_images = self.fit_images
        if fit_images is not None and (isinstance(fit_images, bool) or int(fit_images) < 1):
            raise GlowflowError(f"fit_images must be at least 1 (or None: all), got {fit_images!r}")
        if not 0.0 < self.threshold_fraction < 1.0:
            raise GlowflowError(f"threshold_fraction must be in (0, 1), got {self.threshold_fraction!r}")
        if int(self.batch_size) < 1:
            raise GlowflowError(f"batch_size must be at least 1, got {self.batch_size!r}")
        self.tpr = float(self.tpr)
        self.fit_images = None if fit_images is None else int(fit_images)
        self.threshold_fraction = float(self.threshold_fraction)
        self.batch_size = int(self.batch_size)
        self.seed = int(self.seed)
        self.transforms = check_transforms(self.transforms, self.model.config.image_shape)
        resolve_precision(self.precision, "cpu")  # checks the name
        if self.score is None:
            self.score = DEFAULT_SCORE
        self.score = str(self.score)
        self._check_score_name(self.score)

    def get_params(self, deep: bool = True) -> Dict[str, object]:
        """The constructor's parameters (:data:`PARAMETERS`) as they are now (``deep`` is
        accepted for scikit-learn's sake: no parameter is itself an estimator)."""
        return {name: getattr(self, name) for name in PARAMETERS}

    def set_params(self, **params) -> OutlierDetector:
        """Change parameters of the constructor, each checked (nothing changes when one is
        refused). ``score`` and ``tpr`` keep the fit (every score's held-back scores are kept:
        the threshold moves, no refit), as do ``batch_size``, ``device``, ``progress`` and ``precision``. A
        change of ``model``, ``fit_images``, ``threshold_fraction``, ``seed``, ``codec`` or
        ``transforms`` (:data:`REFIT_PARAMETERS`) makes the detector unfitted: call :meth:`fit`
        again."""
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise GlowflowError(
                f"unknown OutlierDetector parameter {unknown[0]!r}; choose from {', '.join(PARAMETERS)}"
            )
        before = self.get_params()
        for name, value in params.items():
            setattr(self, name, value)
        try:
            self._check_params()
        except GlowflowError:
            for name, value in before.items():
                setattr(self, name, value)
            raise
        after = self.get_params()
        changed = {name for name in params if after[name] is not before[name] and not _equal(after[name], before[name])}
        if changed & REFIT_PARAMETERS:
            for name in FITTED:
                self.__dict__.pop(name, None)
        elif self._fitted():
            self._set_threshold()
        return self

    def score_names(self) -> Tuple[str, ...]:
        """Every score the detector computes (the keys of ``threshold_scores_``), in order."""
        names = ["nll"] + (["complexity"] if self.codec is not None else []) + ["typicality"]
        levels = int(self.model.config.L)
        names += [f"level_{i + 1}_bpd" for i in range(levels)]
        names += ["hierarchy_ratio"] if levels >= 2 else []
        names += ["top_gaussian", "dos"]
        names += ["orientation", "dos_orientation"] if self.transforms else []
        reference = self.__dict__.get("reference_")
        return tuple(names + (["classifier"] if reference is not None and reference.classifier else []) + ["combined"])

    def _check_score_name(self, name: str) -> None:
        if name not in self.score_names() and name != "classifier":
            raise GlowflowError(f"unknown detector score {name!r}; choose from {', '.join(self.score_names())}")
        if self._fitted() and name not in self.threshold_scores_:
            self._no_score(name)

    def _no_score(self, name: str) -> None:
        raise GlowflowError(
            f"the detector has no {name!r} score: its fit images had no class labels to train "
            f"the classifier on; choose another score ({', '.join(self.threshold_scores_)})"
        )

    @property
    def settings(self) -> StatisticsSettings:
        """How the detector reads images (:func:`glowflow.ood.compute_statistics`'s settings)."""
        classifier = getattr(self.__dict__.get("reference_"), "classifier", None)
        return StatisticsSettings(
            device=self.device,
            seed=self.seed,
            codec=self.codec,
            progress=self.progress,
            transforms=self.transforms,
            precision=self.precision,
            features=None if classifier is None else partial(classifier_features, classifier.net),
        )

    # ------------------------------------------------------------------ fitted state

    def _fitted(self) -> bool:
        return "reference_" in self.__dict__

    def __getattr__(self, name: str):
        if name in FITTED:
            raise NotFittedError(
                f"the outlier detector is not fitted yet ({name}): call fit(images) or OutlierDetector.load"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _check_fitted(self) -> None:
        if not self._fitted():
            raise NotFittedError("the outlier detector is not fitted yet: call fit(images) or OutlierDetector.load")

    def _adopt(self, reference: Reference, threshold_scores: Mapping[str, np.ndarray]) -> OutlierDetector:
        """Make ``reference`` and the held-back ``threshold_scores`` (every score) the fit."""
        if reference.classifier is not None:
            reference.classifier.net.to(self._device())
        self.reference_ = reference
        self.threshold_scores_ = dict(threshold_scores)
        self._set_threshold()
        return self

    def _set_threshold(self) -> None:
        """Every fitted attribute that depends on ``score`` and ``tpr``, computed once."""
        if self.score not in self.threshold_scores_:
            self._no_score(self.score)
        self.thresholds_ = {name: threshold_at_tpr(s, self.tpr) for name, s in self.threshold_scores_.items()}
        self.threshold_ = self.thresholds_[self.score]
        self.offset_ = -self.threshold_
        self.decision_scores_ = np.asarray(self.threshold_scores_[self.score], dtype=np.float64)
        self.labels_ = self._decide(self.decision_scores_)[1].astype(np.int64)
        self.n_threshold_ = int(self.decision_scores_.size)

    def _decide(self, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The rule, in one place: ``(decision, is_outlier)`` (N,) from scores of ``score``
        (higher = more outlying): ``decision = threshold_ - score`` and an outlier where the
        score is above the threshold or not a number (where ``decision`` is not ``>= 0``)."""
        scores = np.asarray(scores, dtype=np.float64)
        return self.threshold_ - scores, ~(scores <= self.threshold_)

    # ------------------------------------------------------------------ reading images

    def statistics(
        self, images: Images, desc: str = "images", max_images: Optional[int] = None, keep_images: bool = False
    ):
        """:func:`glowflow.ood.compute_statistics` of ``images`` with the detector's settings (with
        the label classifier's features once it has one; with the images themselves when
        ``keep_images``, as fitting needs them)."""
        settings = replace(self.settings, max_images=max_images, keep_images=keep_images)
        return settings.compute(self.model, as_loader(images, self.batch_size), desc)

    # ------------------------------------------------------------------ fitting

    def fit(self, X: Images, y=None, threshold_images: Optional[Images] = None) -> OutlierDetector:
        """Fit the reference on inlier images ``X`` and set the threshold on held-back inliers;
        returns the detector.

        ``y`` (N,): integer class labels of ``X`` (one top-latent Gaussian per class); None: the
        labels ``X`` yields as ``(image, label)`` pairs, if any (none: one Gaussian). Without
        ``threshold_images``: at most ``fit_images`` of ``X`` are used (a random subset seeded
        with ``seed`` when they are a tensor, a Dataset or a DataLoader over a map-style dataset;
        the first ones otherwise), and a seeded random ``threshold_fraction`` of them is held
        back: the reference is fitted on the rest and the threshold set on them. With
        ``threshold_images`` (inlier images the model was not trained on and not among ``X``,
        e.g. the training run's validation split): the same split of the budget, the reference
        on at most ``(1 - threshold_fraction) * fit_images`` of ``X`` and the threshold on at
        most ``threshold_fraction * fit_images`` of ``threshold_images`` (seeded subsets; all of
        them when ``fit_images`` is None). Every parameter is checked first.
        """
        return self._fit(X, y, threshold_images)

    def _fit(self, images: Images, y=None, threshold_images: Optional[Images] = None, key: str = "") -> OutlierDetector:
        """:meth:`fit`, storing ``key`` as the reference's key (the commands' cache key,
        :func:`glowflow.ood.cache.detector_for`; '' when not cached)."""
        self._check_params()
        if y is not None:
            images = with_labels(images, y, self.batch_size)
        if threshold_images is not None:
            stats = self._subset_statistics(images, self._share(1.0 - self.threshold_fraction), "fit images")
            limit = self._share(self.threshold_fraction)
            threshold_stats = self._subset_statistics(threshold_images, limit, "threshold images")
            return self._fit_statistics(stats, threshold_stats, key)
        stats = self._subset_statistics(images, self.fit_images, "fit images")
        n = stats["bpd"].size
        held = int(round(self.threshold_fraction * n))
        if held < 1 or n - held < 1:
            raise GlowflowError(f"fitting a detector on {n} image(s) leaves none to hold back for the threshold")
        order = np.random.default_rng(self.seed).permutation(n)
        threshold_stats = _rows(stats, np.sort(order[:held]))
        return self._fit_statistics(_rows(stats, np.sort(order[held:])), threshold_stats, key)

    def fit_predict(self, X: Images, y=None, threshold_images: Optional[Images] = None) -> np.ndarray:
        """:meth:`fit` on ``X``, then :meth:`predict` of every image of ``X`` (int (N,): +1
        inlier, -1 outlier, scikit-learn's; PyOD's 0/1 labels of the held-back images: ``labels_``)."""
        return self.fit(X, y, threshold_images).predict(X)

    def _share(self, fraction: float) -> Optional[int]:
        """``fraction`` of ``fit_images`` (at least 1), or None when ``fit_images`` is None (all)."""
        return None if self.fit_images is None else max(1, int(round(fraction * self.fit_images)))

    def _subset_statistics(self, images: Images, limit: Optional[int], desc: str):
        """Statistics of at most ``limit`` of ``images`` (None: all): a seeded random subset when
        they are indexable, the first ones otherwise (see :meth:`fit`)."""
        dataset = as_indexable(images)
        if dataset is not None and limit is not None and len(dataset) > limit:
            keep = np.random.default_rng(self.seed).choice(len(dataset), limit, replace=False)
            batch = images.batch_size if isinstance(images, DataLoader) and images.batch_size else self.batch_size
            subset = Subset(dataset, np.sort(keep).tolist())
            settings = replace(self.settings, keep_images=True)
            return settings.compute(self.model, make_loader(subset, batch, shuffle=False), desc)
        return self.statistics(images, desc, max_images=limit, keep_images=True)

    def fit_statistics(
        self, train_stats: Mapping[str, np.ndarray], threshold_stats: Mapping[str, np.ndarray]
    ) -> OutlierDetector:
        """Fit from already computed statistics (:func:`glowflow.ood.compute_statistics` with the
        detector's codec and transforms): the reference (:func:`fit_reference`, seeded with
        ``seed``) on ``train_stats``, then every score of ``threshold_stats`` kept for the thresholds.
        When both hold the ``images`` (``compute_statistics(..., keep_images=True)``) and every
        training image a class label, a label classifier is trained on them first
        (:mod:`glowflow.ood.classifier`: the ``classifier`` and ``combined`` scores)."""
        self._check_params()
        return self._fit_statistics(train_stats, threshold_stats, "")

    def _fit_statistics(self, train_stats, threshold_stats, key: str) -> OutlierDetector:
        device = self._device()
        classifier, train_stats, threshold_stats = classifier_for(train_stats, threshold_stats, self.seed, device)
        # the combinations are standardised on the held-back images, as the thresholds are set on them
        reference = fit_reference(
            train_stats,
            key=key,
            seed=self.seed,
            transforms=self.transforms,
            calibration_stats=threshold_stats,
            classifier=classifier,
        )
        return self._adopt(reference, outlier_scores(threshold_stats, reference))

    def _device(self):
        """Where the detector computes: ``device``, else where the model's parameters are."""
        return next(self.model.parameters()).device if self.device is None else self.device

    # ------------------------------------------------------------------ scoring

    def outlier_scores(self, X: Images) -> np.ndarray:
        """The detector's ``score`` (N,) of the images ``X``: higher = more outlying (every score
        at once: ``glowflow.ood.outlier_scores(detector.statistics(X), detector.reference_)``)."""
        self._check_fitted()
        return outlier_scores(self.statistics(X), self.reference_)[self.score]

    def score_samples(self, X: Images) -> np.ndarray:
        """scikit-learn's convention: ``-outlier_scores``, higher = more normal."""
        return -self.outlier_scores(X)

    def decision_function(self, X: Images) -> np.ndarray:
        """``threshold_ - outlier_scores``: negative = outlier, positive = inlier (scikit-learn's
        sign; PyOD's ``decision_function`` is :meth:`outlier_scores`). NaN for an image whose
        score is not a number (an outlier)."""
        return self._decide(self.outlier_scores(X))[0]

    def is_outlier(self, X: Images) -> np.ndarray:
        """Bool (N,): True for an outlier (score above the threshold, or not a number)."""
        return self._decide(self.outlier_scores(X))[1]

    def predict(self, X: Images) -> np.ndarray:
        """int (N,): +1 inlier, -1 outlier (scikit-learn's convention)."""
        return np.where(self.is_outlier(X), -1, 1)

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
            seed=self.seed,
            codec=self.codec,
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
        expected = detector.score_names() + (("classifier",) if stored.reference.classifier is not None else ())
        if set(stored.names) != set(expected):
            raise GlowflowError(
                f"the outlier detector {path} has scores {list(stored.names)}, the model gives {expected}"
            )
        held = {n: stored.held[:, i] for i, n in enumerate(stored.names)}
        broken = {
            n: t for n, t in ((n, threshold_at_tpr(s, detector.tpr)) for n, s in held.items()) if not math.isfinite(t)
        }
        if broken:
            name, value = next(iter(broken.items()))
            raise GlowflowError(
                f"unusable outlier detector file {path}: the {name} threshold at tpr {detector.tpr:g} is {value} "
                f"(its held-back scores are not finite numbers)"
            )
        return detector._adopt(stored.reference, held)

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
        detector = cls.load(pretrained_detector_path(folder, name, int(model.config.n_bits)), model, device=device)
        return detector.set_params(**{k: v for k, v in dict(score=score, tpr=tpr).items() if v is not None})


def _equal(a, b) -> bool:
    """Whether two parameter values are the same (a model only as itself)."""
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _rows(stats: Mapping[str, np.ndarray], index: np.ndarray) -> Dict[str, np.ndarray]:
    return {k: np.asarray(v)[index] for k, v in stats.items()}
