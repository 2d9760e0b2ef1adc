"""The run's configuration, one section per command, each the one home of its flags' defaults:

* :class:`CommonConfig` -- what every command reads: data, checkpoint, output folder, device, seeds;
* :class:`TrainConfig` -- ``--train`` (GenerativeZoo's Glow flags, same names and defaults, and
  glowflow's own: resuming, the paper's recipe, speed);
* :class:`SampleConfig` -- ``--sample`` and its sub-modes;
* :class:`DetectorConfig` -- the outlier detector: how many images it fits on, its threshold's
  true-positive rate, the score it decides with;
* :class:`OutlierConfig` -- ``--outlier_detection`` and ``--score``: the outlier data, the
  background model, the images to score, a saved detector (plus DetectorConfig's fields);
* :class:`RunConfig` -- all of them at once: what the command line fills and a checkpoint's
  ``run_config`` stores (flat, one key per flag).

Each section checks its own fields (:meth:`validate`: the type from the annotation, then the
range), because values also come from checkpoints, which may be corrupt or crafted.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Tuple

from glowflow.config.architecture import MAX_IMAGE_SIZE
from glowflow.config.fields import check_field_types, check_int_range
from glowflow.config.paths import OUTPUT_ROOT, dataset_slug
from glowflow.config.recipe import PRESETS
from glowflow.errors import GlowflowError
from glowflow.names import shipped_name

AMP_CHOICES = ("none", "bf16", "auto")
"""``--amp``: float32, bf16 autocast of the coupling networks, or "auto": bf16 where the device computes it
natively (glowflow.runtime.native_bf16), else float32 (docs/time_to_quality.md: the CPU recipe uses it)."""
OOD_PRECISIONS = ("auto", "float32", "bf16")
"""``--ood_precision``: the outlier detector's model passes in float32, under bf16 autocast, or "auto":
bf16 where the device computes it natively (glowflow.runtime.resolve_precision), else float32."""
SEED_STRIDE = 1_000_003
"""Every seeded draw of a run uses a generator seeded ``seed * SEED_STRIDE + offset`` (epoch order:
+ epoch; dequantisation noise of step s: + s; ...), so the draws of different run seeds stay apart."""
SEED_LIMIT = 2**32
"""Seeds (``--seed``, ``eval_seed``) are 0 <= seed < SEED_LIMIT, so that ``seed * SEED_STRIDE +
offset`` (offsets below 2**31) stays inside what ``torch.Generator.manual_seed`` takes (< 2**64)."""
EVAL_BATCH_SIZE = 256
"""Smallest batch for evaluation and scoring passes (no gradients, so larger batches are cheap)."""


class _Section:
    """What every section shares: :meth:`validate` checks the field types, then each section's
    INT_RANGES (inclusive (low, high); None: unbounded above), FLOAT_RANGES ((lowest, whether the
    lowest itself is allowed); all finite) and its own ``_check`` of the rest."""

    INT_RANGES: ClassVar[Dict[str, Tuple[int, Optional[int]]]] = {}
    FLOAT_RANGES: ClassVar[Dict[str, Tuple[float, bool]]] = {}

    def validate(self) -> None:
        """Raise GlowflowError with a one-line reason for a value that cannot work."""
        check_field_types(self, self.__dict__)
        for section in reversed(type(self).__mro__):
            for name, (low, high) in section.__dict__.get("INT_RANGES", {}).items():
                check_int_range(name, getattr(self, name), low, high)
            for name, (low, low_allowed) in section.__dict__.get("FLOAT_RANGES", {}).items():
                value = getattr(self, name)
                if not (math.isfinite(value) and (value > low or (low_allowed and value == low))):
                    kind = "non-negative" if low_allowed else "positive"
                    raise GlowflowError(f"{name} must be a {kind} finite number, got {value}")
            if "_check" in section.__dict__:
                section.__dict__["_check"](self)


@dataclass
class CommonConfig(_Section):
    """What every command reads. batch_size: the training batch, and the least evaluation batch
    (:attr:`eval_batch_size`); max_eval_images: at most this many images of each evaluated split."""

    dataset: str = "mnist"
    data_root: str = "./data"
    image_size: Optional[int] = None
    num_workers: int = 0
    batch_size: int = 128
    checkpoint: Optional[str] = None
    output_dir: Optional[str] = None
    seed: int = 0
    eval_seed: int = 0
    device: str = "auto"
    max_eval_images: Optional[int] = None

    INT_RANGES = {
        "batch_size": (1, 2**20),
        "num_workers": (0, 256),
        "seed": (0, SEED_LIMIT - 1),
        "eval_seed": (0, SEED_LIMIT - 1),
        "image_size": (1, MAX_IMAGE_SIZE),
        "max_eval_images": (1, None),
    }

    def _check(self) -> None:
        if not self.dataset:
            raise GlowflowError("dataset must not be empty")

    @property
    def eval_batch_size(self) -> int:
        """Batch size of evaluation and scoring passes: the training batch, at least EVAL_BATCH_SIZE."""
        return max(self.batch_size, EVAL_BATCH_SIZE)

    def resolved_output_dir(self) -> str:
        """--output_dir, or outputs/Glow_<dataset>; outputs/pretrained_<NAME> for --checkpoint pretrained:NAME."""
        shipped = shipped_name(self.checkpoint)
        name = f"pretrained_{dataset_slug(shipped)}" if shipped else f"Glow_{dataset_slug(self.dataset)}"
        return self.output_dir or os.path.join(OUTPUT_ROOT, name)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainConfig(CommonConfig):
    """``--train``: GenerativeZoo's Glow flags (same names, same defaults) and glowflow's own. The
    architecture flags, ``--n_bits`` included, are :class:`GlowConfig`'s.

    n_epochs, lr, warmup (epochs of linear LR warm-up), decay (Adamax weight decay).
    y_weight: weight of the classification loss when y_condition.
    max_grad_clip / max_grad_norm: gradient value clip / norm clip, 0 = off.
    max_nonfinite_steps: non-finite steps in a row that stop the run; max_rollbacks: how many times
    a non-finite step may put back the last finite state (glowflow/training/rollback.py; 0: skip only).
    sample_and_save_freq: epochs between sample grids.
    val_size: validation images carved from the training split (None: :func:`default_val_size`;
    0: none); ema: Polyak averaging decay (0: off); augment: random shifts and RGB flips;
    grad_checkpoint: recompute activations in the backward pass; preset: a key of PRESETS.
    """

    no_wandb: bool = False
    n_epochs: int = 100
    lr: float = 0.0002
    y_weight: float = 0.01
    sample_and_save_freq: int = 5
    max_grad_clip: float = 0.0
    max_grad_norm: float = 0.0
    warmup: int = 10
    decay: float = 0.0
    num_classes: Optional[int] = None  # None: the dataset's own number of classes
    max_steps: Optional[int] = None
    resume: Optional[str] = None
    overwrite: bool = False  # a new run may replace the run its --output_dir holds
    tensorboard: bool = False
    compile: bool = False  # torch.compile the training step (pays off on CUDA)
    amp: str = AMP_CHOICES[0]  # "bf16"/"auto": bfloat16 autocast for the coupling networks (log-dets, priors float32)
    perturb: float = 0.0
    actnorm_init_images: int = 512
    prior_fit_images: int = 10000  # training images the priors' Gaussians are fitted on each epoch (prior_fit)
    max_nonfinite_steps: int = 5
    max_rollbacks: int = 5  # a non-finite step goes back to the last finite state, this many times; 0: only skip it
    # the recipe of the paper (openai/glow), and choosing the checkpoint
    val_size: Optional[int] = None  # None: default_val_size(training images); 0: no validation split
    ema: float = 0.0  # Polyak averaging decay (e.g. 0.999); 0: off
    augment: bool = False  # random shifts (and left-right flips of RGB images), seeded by (seed, step)
    grad_checkpoint: bool = False  # recompute each flow step's activations in the backward pass
    preset: Optional[str] = None  # the --preset whose values the command line filled in (a record)

    INT_RANGES = {
        "n_epochs": (0, 10**6),
        "warmup": (0, 10**6),
        "sample_and_save_freq": (0, None),
        "num_classes": (1, 2**20),
        "max_steps": (1, None),
        "actnorm_init_images": (1, None),
        "prior_fit_images": (2, None),
        "max_nonfinite_steps": (1, None),
        "max_rollbacks": (0, 10**6),
        "val_size": (0, None),
    }
    FLOAT_RANGES = {
        "lr": (0.0, False),
        "decay": (0.0, True),
        "y_weight": (0.0, True),
        "max_grad_clip": (0.0, True),
        "max_grad_norm": (0.0, True),
    }

    def _check(self) -> None:
        if not (math.isfinite(self.ema) and 0.0 <= self.ema < 1.0):
            raise GlowflowError(f"ema must be in [0, 1) (0 = off; e.g. 0.999), got {self.ema}")
        if self.preset is not None and self.preset not in PRESETS:
            raise GlowflowError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if not 0.0 <= self.perturb < 1.0:
            raise GlowflowError(f"perturb must be in [0, 1), got {self.perturb}")
        if self.amp not in AMP_CHOICES:
            raise GlowflowError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")


@dataclass
class SampleConfig(CommonConfig):
    """``--sample``: grids at each temperature (of one class with sample_class), and the sub-modes
    reconstruct, interpolate, manipulate (class to class) and manipulate_attribute; compare_with:
    a sheet of this model's samples beside another checkpoint's, each row labelled."""

    n_samples: int = 64
    temperature: Tuple[float, ...] = (0.7,)
    sample_class: Optional[int] = None
    reconstruct: bool = False
    interpolate: bool = False
    manipulate: Optional[Tuple[int, int]] = None
    manipulate_attribute: Optional[Tuple[int, ...]] = None  # class / finding indices: one attribute
    manipulate_scales: Tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
    n_interpolation_steps: int = 8
    compare_with: Optional[str] = None  # another checkpoint whose samples go beside this one's

    INT_RANGES = {"n_samples": (1, None), "sample_class": (0, None), "n_interpolation_steps": (1, 1024)}

    def _check(self) -> None:
        if not self.temperature:
            raise GlowflowError("temperature needs at least one value")
        if any(not (math.isfinite(t) and t >= 0) for t in self.temperature):
            raise GlowflowError(f"temperatures must be non-negative finite numbers, got {list(self.temperature)}")
        if self.manipulate is not None and min(self.manipulate) < 0:
            raise GlowflowError(f"manipulate needs two class numbers (0 or more), got {list(self.manipulate)}")
        if self.manipulate_attribute is not None and (
            not self.manipulate_attribute or min(self.manipulate_attribute) < 0
        ):
            raise GlowflowError(
                "manipulate_attribute needs class or finding numbers (0 or more), "
                f"got {list(self.manipulate_attribute)}"
            )
        if not self.manipulate_scales or any(not math.isfinite(s) for s in self.manipulate_scales):
            raise GlowflowError(f"manipulate_scales must be finite numbers, got {list(self.manipulate_scales)}")


IMAGE_TRANSFORMS = ("vflip", "hflip", "rot90", "rot180", "rot270")
"""The image transforms the outlier detector's orientation score can compare images with
(glowflow.ood.statistics.TRANSFORMS computes them)."""


@dataclass
class DetectorConfig(_Section):
    """The outlier detector (glowflow.ood.OutlierDetector), the one home of its defaults.

    fit_images: training images it fits on (a seeded subset); 0 = all.
    tpr: share of held-back inlier images the decision threshold keeps.
    detector_score: the score it decides with (combined: dos_orientation plus, when the fit images have
    class labels, the label classifier's score; without labels and transforms it is dos).
    orientation_transforms: the transforms of IMAGE_TRANSFORMS the orientation score compares each
    image with, one more pass of the model each; empty: no orientation score, and "dos" decides.
    ood_precision: the detector's model passes (OOD_PRECISIONS): auto = bf16 autocast of the coupling
    networks where the CPU or GPU computes bf16 natively (2.5-3x faster on a CPU with AMX, the same
    AUROCs: docs/outlier_detection.md), else float32.
    """

    fit_images: int = 10_000
    tpr: float = 0.95
    detector_score: str = "combined"
    orientation_transforms: Tuple[str, ...] = ("vflip", "rot90")
    ood_precision: str = OOD_PRECISIONS[0]

    INT_RANGES = {"fit_images": (0, None)}

    def _check(self) -> None:
        if not (math.isfinite(self.tpr) and 0.0 < self.tpr <= 1.0):
            raise GlowflowError(f"tpr must be in (0, 1], got {self.tpr}")
        if self.ood_precision not in OOD_PRECISIONS:
            raise GlowflowError(f"ood_precision must be one of {', '.join(OOD_PRECISIONS)}, got {self.ood_precision!r}")
        unknown = [t for t in self.orientation_transforms if t not in IMAGE_TRANSFORMS]
        if unknown or len(set(self.orientation_transforms)) != len(self.orientation_transforms):
            raise GlowflowError(
                f"orientation_transforms must be distinct names of {', '.join(IMAGE_TRANSFORMS)}, "
                f"got {list(self.orientation_transforms)}"
            )


@dataclass
class OutlierConfig(DetectorConfig, CommonConfig):
    """``--outlier_detection`` (the in-distribution test split against each out_dataset) and
    ``--score PATH`` (score_path: the folder or .npz whose images are scored, by the detector
    file ``detector`` or one fitted and cached), with the detector's own fields."""

    out_dataset: Tuple[str, ...] = ("fashionmnist",)
    background_checkpoint: Optional[str] = None
    score_path: Optional[str] = None
    detector: Optional[str] = None  # a file written by OutlierDetector.save (else fitted and cached)

    def _check(self) -> None:
        if not self.out_dataset:
            raise GlowflowError("out_dataset needs at least one dataset")
        if self.score_path is not None and not self.score_path:
            raise GlowflowError("score needs the path of a folder of images or a .npz file")


@dataclass
class RunConfig(OutlierConfig, SampleConfig, TrainConfig):
    """Every command's section at once (:class:`TrainConfig`, :class:`SampleConfig`,
    :class:`OutlierConfig` with :class:`DetectorConfig`, over :class:`CommonConfig`): what the
    command line fills, and what a checkpoint's ``run_config`` stores, one key per flag."""

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> RunConfig:
        """The RunConfig of a stored dict (lists become tuples; unknown keys are ignored), every
        field's type and range checked."""
        if not isinstance(d, dict):
            raise GlowflowError(f"a run configuration must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        check_field_types(cls, values)
        run = cls(**values)
        run.validate()
        return run
