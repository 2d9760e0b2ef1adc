"""Running outlier detection: one model (and an optional background model) against several
outlier sets, with every score, metric, table, report and figure, the reference and scores
coming from the same :class:`OutlierDetector` that ``glowflow --score`` deploys; and the
``glowflow --outlier_detection`` command that loads the checkpoint and the datasets for it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, Mapping, Optional, Union

from glowflow import data
from glowflow.checkpoint import Checkpoint, check_image_shape
from glowflow.config import OUTPUT_ROOT, DetectorConfig, RunConfig
from glowflow.errors import GlowflowError
from glowflow.files import check_writable_folder
from glowflow.ood.cache import detector_cache_path_for, detector_for
from glowflow.ood.codecs import codec_description
from glowflow.ood.detector import FIT_IMAGES, OutlierDetector
from glowflow.ood.metrics import outlier_metrics
from glowflow.ood.report import (
    build_report,
    file_slugs,
    reference_summary,
    report_files,
    write_report,
    write_summary,
)
from glowflow.ood.scores import ScoredSet, outlier_scores
from glowflow.ood.statistics import StatisticsSettings
from glowflow.runtime import resolve_device, resolve_precision


@dataclass(frozen=True)
class OutlierDetectionSettings:
    """Where a run writes and how it reads: ``output_dir`` for the reports and figures,
    ``in_name`` the in-distribution dataset's name, ``reference_cache_path`` where the fitted
    detector (the training reference and its threshold) is cached (None: not cached),
    ``statistics`` for every pass over a loader (device, noise seed, image cap, codec, progress
    bar), ``fit_images`` the training images the detector fits on (a seeded subset; None: all;
    also capped by ``statistics.max_images``), ``detector_score`` the score whose threshold
    (at ``tpr`` of held-back training images) each report evaluates on the test images, and
    ``batch_size`` the detector's batch size for images that are not already a DataLoader.
    :func:`command_settings` makes them from the command line's settings."""

    output_dir: str
    in_name: str
    reference_cache_path: Optional[str] = None
    statistics: StatisticsSettings = field(default_factory=StatisticsSettings)
    fit_images: Optional[int] = FIT_IMAGES
    detector_score: str = DetectorConfig.detector_score
    tpr: float = DetectorConfig.tpr
    batch_size: int = 256

    def detector(self, model) -> OutlierDetector:
        """An unfitted :class:`OutlierDetector` of ``model`` with these settings."""
        caps = [n for n in (self.fit_images, self.statistics.max_images) if n is not None]
        return OutlierDetector(
            model,
            self.detector_score,
            tpr=self.tpr,
            fit_images=min(caps) if caps else None,
            batch_size=self.batch_size,
            device=self.statistics.device,
            seed=self.statistics.seed,
            codec=self.statistics.codec,
            progress=self.statistics.progress,
            transforms=self.statistics.transforms,
            precision=self.statistics.precision,
        )


def run_outlier_detection(
    model,
    in_test_loader: Iterable,
    train_loader: Union[None, Iterable, Callable[[], Iterable]],
    out_loaders: Mapping[str, Iterable],
    settings: OutlierDetectionSettings,
    background_model=None,
    threshold_loader: Union[None, Iterable, Callable[[], Iterable]] = None,
) -> Dict[str, dict]:
    """Every score, metric, table, JSON report and figure for one model and several outlier sets.

    ``model`` (and ``background_model``, trained at the same ``n_bits`` on images of the same
    shape) are trained :class:`glowflow.Glow` models already on the device of
    ``settings.statistics`` (default: wherever each model's parameters are). Loaders yield
    ``(images in [0, 1], labels)``. ``train_loader`` (the in-distribution training set, read in
    a fixed order) provides the typicality and density-of-states reference
    (:func:`detector_for`: an :class:`OutlierDetector` fitted on a seeded subset of
    ``settings.fit_images`` training images, a fifth of them held back for its threshold unless
    ``threshold_loader`` is given; it
    may be None once ``settings.reference_cache_path`` holds a valid one, or a function that
    returns the loader, called only when there is none). ``threshold_loader`` (or a function
    returning it): in-distribution images the model never trained on (the training run's
    validation split) for the detector's threshold, instead of held-back training images (the
    budget then splits the same way, :meth:`OutlierDetector.fit`). If the model fits
    its training images visibly better than its test images, pass a held-out in-distribution
    split (not the one in ``in_test_loader``) as ``train_loader`` instead, so that typicality
    and the density of states see the bits/dim of unseen images.

    For each ``out_name, loader`` in ``out_loaders`` this prints a table and writes, in
    ``settings.output_dir``, ``ood_<in>_vs_<out>.json`` (:func:`build_report`),
    ``ood_<in>_vs_<out>_histograms.png`` (one panel per score, in vs out) and
    ``ood_<in>_vs_<out>_roc.png`` (the ROC curves of all scores); file names use the datasets'
    base names, given a suffix where two share one (:func:`file_slugs`: ``d1/set.npz`` and
    ``d2/set.npz`` -> ``set_d1`` and ``set_d2``), so no report overwrites another. With several
    outlier sets, an AUROC table of every score against every set is printed last and written as
    ``ood_<in>_summary.json`` (:func:`write_summary`), each set's entry naming its own report.

    Returns ``{out_name: report}`` (each report as written to its JSON).
    """
    _check_models(model, background_model)
    if not out_loaders:
        raise GlowflowError("outlier detection needs at least one outlier dataset (--out_dataset)")
    os.makedirs(settings.output_dir, exist_ok=True)
    description = codec_description(settings.statistics.codec)
    detector, reused = detector_for(
        model,
        train_loader,
        settings.in_name,
        settings.detector(model),
        settings.reference_cache_path,
        threshold_images=threshold_loader,
    )
    statistics = replace(settings.statistics, features=detector.settings.features)  # the classifier's, if any
    scorer = _Scorer(model, background_model, detector, statistics)
    in_set = scorer.score(in_test_loader, settings.in_name, f"{settings.in_name} test")
    reference = reference_summary(detector.reference_, settings.reference_cache_path, reused)
    reference.update(n_threshold=detector.n_threshold_, tpr=detector.tpr)
    precision = resolve_precision(settings.statistics.precision, next(model.parameters()).device)
    print(f"model passes in {precision}" + (" (autocast of the coupling networks)" if precision == "bf16" else ""))
    header = dict(n_bits=model.config.n_bits, codec=description, reference=reference)
    in_slug, out_slugs = file_slugs(settings.in_name, list(out_loaders))
    reports: Dict[str, dict] = {}
    for out_name, loader in out_loaders.items():
        out_set = scorer.score(loader, out_name, out_name)
        metrics = {name: outlier_metrics(in_set.scores[name], out_set.scores[name]) for name in in_set.scores}
        files = report_files(settings.output_dir, in_slug, out_slugs[out_name])
        reports[out_name] = build_report(in_set, out_set, metrics, files=files, **header)
        reports[out_name]["detector"] = _decisions(detector, in_set, out_set)
        reports[out_name]["model_precision"] = precision
        write_report(reports[out_name], in_set, out_set, metrics)
    if len(reports) > 1:
        write_summary(reports, settings.output_dir, settings.in_name, in_slug)
    return reports


def _check_models(model, background_model) -> None:
    """A background model must see images of the model's shape at the model's bit depth."""
    if background_model is None:
        return
    if tuple(background_model.config.image_shape) != tuple(model.config.image_shape):
        raise GlowflowError(
            f"the background model is for images of shape {background_model.config.image_shape}, "
            f"the model for {model.config.image_shape}"
        )
    if background_model.config.n_bits != model.config.n_bits:
        raise GlowflowError(
            f"the background model was trained at n_bits {background_model.config.n_bits}, "
            f"the model at {model.config.n_bits}: the likelihood ratio needs the same bit depth"
        )


def _decisions(detector: OutlierDetector, in_set: ScoredSet, out_set: ScoredSet) -> dict:
    """The ``"detector"`` entry of a report: the detector's score and threshold (set on held-back
    training images), and the share of the in-distribution test images it keeps and of the
    outliers it flags there."""
    name = detector.score
    return {
        "score": name,
        "tpr_target": detector.tpr,
        "threshold": detector.threshold_,
        "in_kept": float(1.0 - detector._decide(in_set.scores[name])[1].mean()),
        "out_flagged": float(detector._decide(out_set.scores[name])[1].mean()),
    }


@dataclass(frozen=True)
class _Scorer:
    """Scores image sets with one model, its optional background model and the fitted detector."""

    model: object
    background_model: Optional[object]
    detector: OutlierDetector
    statistics: StatisticsSettings

    def score(self, loader: Iterable, name: str, desc: str) -> ScoredSet:
        """The statistics and scores of ``loader``'s images (``desc`` names it in messages); the
        background model's pass uses no codec and must see the same number of images."""
        stats = self.statistics.compute(self.model, loader, desc)
        background = None
        if self.background_model is not None:
            background = replace(self.statistics, codec=None).compute(
                self.background_model, loader, f"{desc} (background)"
            )
            if background["bpd"].shape != stats["bpd"].shape:
                raise GlowflowError(
                    f"the {desc} loader gave {stats['bpd'].size} images to the model and "
                    f"{background['bpd'].size} to the background model; it must be deterministic"
                )
        return ScoredSet(name, stats, background, outlier_scores(stats, self.detector.reference_, background))


def run_outlier_detection_command(run: RunConfig, dataset: Optional[str] = None) -> Dict[str, dict]:
    """``glowflow --outlier_detection``: the model from ``run.checkpoint`` alone, the in-distribution
    ``dataset`` (default: the one the checkpoint was trained on) against every ``run.out_dataset``.

    Outlier sets of another shape are converted to the model's (:func:`glowflow.data.match_shape`);
    the synthetic development sets are generated at the model's size. The detector (reference on
    the training images, threshold on the training run's validation split when it has one:
    :class:`FitSets`) is cached beside the checkpoint, or inside a model folder, where a shipped
    model's comes fitted (:func:`detector_cache_path_for`).
    """
    check_writable_folder(run.output_dir or OUTPUT_ROOT)  # before any work; creates nothing
    device = resolve_device(run.device)
    checkpoint = Checkpoint.read(run.checkpoint)
    model = checkpoint.load_model(device)
    in_name, image_size = checkpoint.data_to_read(dataset, run.dataset)
    divisor = 2**model.config.L
    test_set = data.load_dataset(in_name, "test", run.data_root, image_size, divisor=divisor)
    check_image_shape(model, test_set.info.image_shape, run.checkpoint, in_name)
    background = None
    if run.background_checkpoint:
        background = Checkpoint.read(run.background_checkpoint).load_model(device)
        _check_models(model, background)
    out_loaders = {
        name: _loader(_outlier_set(name, run, tuple(model.config.image_shape)), run, device) for name in run.out_dataset
    }
    output_dir = run.output_dir or RunConfig(dataset=checkpoint.dataset or in_name).resolved_output_dir()
    settings = command_settings(run, in_name, model.config.n_bits, device, output_dir)
    fit_sets = FitSets(checkpoint, in_name, run, image_size, divisor)  # read only when no cached detector can be used
    return run_outlier_detection(
        model,
        _loader(test_set, run, device),
        lambda: _loader(fit_sets.training(), run, device),
        out_loaders,
        settings,
        background_model=background,
        threshold_loader=(lambda: _loader(fit_sets.validation(), run, device)) if fit_sets.has_validation else None,
    )


def command_settings(run: RunConfig, in_name: str, n_bits: int, device, output_dir: str) -> OutlierDetectionSettings:
    """The settings of ``glowflow --outlier_detection`` and ``glowflow --score`` (``in_name`` the
    dataset the checkpoint ``run.checkpoint`` trained on, at ``n_bits``), from the command line's:
    both build their detector with ``command_settings(...).detector(model)``, so that the one
    fitted and cached by either (at :func:`detector_cache_path_for`) is the one the other reuses."""
    return OutlierDetectionSettings(
        output_dir=output_dir,
        in_name=in_name,
        reference_cache_path=detector_cache_path_for(run.checkpoint, in_name, n_bits),
        statistics=StatisticsSettings(
            device=device,
            seed=run.eval_seed,
            max_images=run.max_eval_images,
            transforms=tuple(run.orientation_transforms),
            precision=run.ood_precision,
        ),
        fit_images=run.fit_images or None,
        detector_score=run.detector_score,
        tpr=run.tpr,
        batch_size=run.eval_batch_size,
    )


class FitSets:
    """The images a command fits a checkpoint's detector on, read once and only when asked for:
    the training split of ``in_name`` less the training run's validation split (the model's
    training images), and that validation split (images it never trained on, for the
    threshold) when the checkpoint records one for ``in_name`` (:meth:`Checkpoint.validation_split`)."""

    def __init__(self, checkpoint: Checkpoint, in_name: str, run: RunConfig, image_size, divisor: int):
        self.split = checkpoint.validation_split(in_name)
        self._read = (in_name, run.data_root, image_size, divisor)
        self._sets = None

    @property
    def has_validation(self) -> bool:
        return self.split is not None

    def _load(self):
        if self._sets is None:
            name, root, image_size, divisor = self._read
            train_set = data.load_dataset(name, "train", root, image_size, divisor=divisor)
            if self.split is None:
                self._sets = (train_set, None)
            else:
                rest, validation, _ = data.split_validation(train_set, *self.split)
                self._sets = (rest, validation)
        return self._sets

    def training(self):
        """The training images (less the validation split, when there is one)."""
        return self._load()[0]

    def validation(self):
        """The validation split (None when the checkpoint records none)."""
        return self._load()[1]


def _outlier_set(name: str, run: RunConfig, shape: tuple):
    """Outlier set ``name`` (:func:`glowflow.data.load_scored_images`: its test split, or every
    image of a file without one) as images of ``shape`` (C, H, W); a synthetic development set is
    generated at that size."""
    size = shape[1] if name in data.SYNTHETIC else None
    return data.match_shape(data.load_scored_images(name, run.data_root, size), shape)


def _loader(dataset, run: RunConfig, device):
    """A loader over ``dataset`` in a fixed order, at the evaluation batch size."""
    return data.make_loader(
        dataset,
        batch_size=run.eval_batch_size,
        shuffle=False,
        num_workers=run.num_workers,
        seed=run.seed,
        device=device,
    )
