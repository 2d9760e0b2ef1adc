"""Configuration dataclasses and the choices of every flag: the one place where defaults live.

``GlowConfig`` describes a model: the architecture and its data space (image shape and bit
depth), everything needed to rebuild it from a checkpoint. ``RunConfig`` holds the run flags of
GenerativeZoo's Glow script (same names, same defaults) plus the ones glowflow adds. The command
line builds its flags from these fields and choices, so a default changed here changes everywhere.

Both validate every field strictly (its type from the dataclass annotation: a bool is a bool, an
int an int and never a bool or a float; then its range), because their values also come from
checkpoints, which may be corrupt or crafted: a bad value is a one-line :class:`GlowflowError`
naming the field, raised before anything is built or written. The limits are the constants below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import os
import re
import shlex
import typing
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from glowflow.errors import GlowflowError
from glowflow.names import shipped_name

FLOW_PERMUTATIONS = ("invconv", "shuffle", "reverse")
FLOW_COUPLINGS = ("additive", "affine")
AMP_CHOICES = ("none", "bf16")
SEED_STRIDE = 1_000_003
"""Every seeded draw of a run uses a generator seeded ``seed * SEED_STRIDE + offset`` (epoch order:
+ epoch; dequantisation noise of step s: + s; ...), so the draws of different run seeds stay apart."""
EVAL_BATCH_SIZE = 256
"""Smallest batch for evaluation and scoring passes (no gradients, so larger batches are cheap)."""
SEED_LIMIT = 2**32
"""Seeds (``--seed``, ``eval_seed``) are 0 <= seed < SEED_LIMIT, so that ``seed * SEED_STRIDE +
offset`` (offsets below 2**31) stays inside what ``torch.Generator.manual_seed`` takes (< 2**64)."""
MAX_PARAMETERS = 2**30
"""Largest model glowflow builds: elements of its state dict (parameters and buffers, 4 GiB of
float32), estimated from the configuration alone by :meth:`GlowConfig.num_weights`."""
MAX_K = 1024
"""Most steps of flow per level (the Glow paper uses 32 to 48)."""
MAX_L = 16
"""Most levels (each halves the image side)."""
MAX_IMAGE_DIMS = 2**24
"""Largest image, in dimensions C*H*W (e.g. 3 x 2048 x 2048 fits)."""
MAX_IMAGE_SIZE = 4096
"""Largest ``--image_size``."""
OUTPUT_ROOT = "outputs"
"""Where the default output folders (``outputs/Glow_<dataset>``) are made."""
SLUG_LENGTH = 80
"""Longest :func:`dataset_slug`, so that every file name built from it fits in 255 bytes."""

# ----------------------------------------------------------------------------- splits
VAL_FRACTION = 0.1
VAL_MAX = 5000
"""The default validation split (``--val_size`` not given): ``min(VAL_MAX, round(VAL_FRACTION * n))``
images of the ``n`` training images (:func:`default_val_size`), drawn by ``--seed``; it chooses the
best checkpoint, and the training split keeps the rest."""
TEST_FRACTION = 0.1
PARTITION_SEED = 0
"""Data without its own test split (a flat folder, an .npz with only ``images``) holds out
``max(1, round(TEST_FRACTION * n))`` images as its test split, drawn by a generator seeded
PARTITION_SEED (not ``--seed``: every command that reads the test split gets the same images);
the validation split is then carved from the rest like any training split's (81/9/10 in all)."""

# ----------------------------------------------------------------------------- the recipe
AUGMENT_SHIFT_FRACTION = 0.1
"""``--augment`` shifts each image by a whole number of pixels drawn uniformly from
``-s..s`` in each direction, ``s = max(1, floor(AUGMENT_SHIFT_FRACTION * side))`` (3 at 32
pixels), after openai/glow's width/height shift range of 0.1; the pixels shifted in repeat the
edge (Keras' 'nearest' fill). RGB images are also flipped left-right with probability 1/2."""
PRESETS: Dict[str, Dict[str, Any]] = {
    # Kingma & Dhariwal (2018), CIFAR-10, as openai/glow trains it: depth 32, 3 levels, width 512,
    # affine coupling, learnt top prior, batch 64, Adamax at 1e-3 warmed up over 10 epochs
    # (--epochs_warmup), Polyak averaging (0.999: its 1 - 1/steps-per-epoch at batch 64), shifts.
    "cifar10": {
        "dataset": "cifar10",
        "K": 32,
        "L": 3,
        "hidden_channels": 512,
        "flow_coupling": "affine",
        "learn_top": True,
        "batch_size": 64,
        "lr": 1e-3,
        "warmup": 10,
        "ema": 0.999,
        "augment": True,
    },
}
"""``--preset NAME``: flag values set where the command line does not set the flag itself."""


def default_val_size(n_train: int) -> int:
    """Images the default validation split takes from ``n_train`` training images."""
    return min(VAL_MAX, int(round(VAL_FRACTION * n_train)))


def default_test_size(n: int) -> int:
    """Images held out as the test split of ``n`` images that come without one (at least 1)."""
    return max(1, int(round(TEST_FRACTION * n)))


# Inclusive (low, high) bounds of RunConfig's integer fields (None: unbounded above).
RUN_INT_RANGES = {
    "batch_size": (1, 2**20),
    "n_epochs": (0, 10**6),
    "warmup": (0, 10**6),
    "num_workers": (0, 256),
    "sample_and_save_freq": (0, None),
    "seed": (0, SEED_LIMIT - 1),
    "eval_seed": (0, SEED_LIMIT - 1),
    "num_classes": (1, 2**20),
    "max_steps": (1, None),
    "image_size": (1, MAX_IMAGE_SIZE),
    "actnorm_init_images": (1, None),
    "max_nonfinite_steps": (1, None),
    "n_samples": (1, None),
    "sample_class": (0, None),
    "n_interpolation_steps": (1, 1024),
    "max_eval_images": (1, None),
    "fit_images": (0, None),
    "val_size": (0, None),
}
# RunConfig's float fields: (lowest allowed, whether the lowest itself is allowed); all must be finite.
RUN_FLOAT_RANGES = {
    "lr": (0.0, False),
    "decay": (0.0, True),
    "y_weight": (0.0, True),
    "max_grad_clip": (0.0, True),
    "max_grad_norm": (0.0, True),
}


@dataclass
class GlowConfig:
    """A Glow model (Kingma & Dhariwal, 2018): its architecture and its data space.

    image_shape: (C, H, W) of the model-space input; H and W divisible by 2**L.
    n_bits: bit depth of the pixels the model sees (1..8); bits/dim uses 2**n_bits bins.
    hidden_channels: width of each coupling network.
    K: steps of flow per level; L: number of levels (squeeze + K steps [+ split]).
    actnorm_scale: ActNorm's data-dependent init makes outputs have this std.
    flow_permutation: 'invconv' (1x1 convolution), 'shuffle' or 'reverse'.
    flow_coupling: 'additive' or 'affine'.
    LU_decomposed: parametrise the 1x1 convolution as P L (U + diag(s)).
    learn_top: learn the mean/log-scale of the top prior (else standard normal).
    y_condition: class-conditional top prior plus a classifier head on the top latent.
    num_classes: classes for y_condition.
    y_multilabel: labels are multi-hot (e.g. ChestMNIST): the classifier uses binary cross-entropy.
    coupling_scale_min: lower bound of the affine coupling's scale, which becomes
    s_min + (1 - s_min) * sigmoid(raw + 2); 0 (default) is the paper's sigmoid(raw + 2). A bound
    caps what one reverse coupling can multiply a value by at 1 / s_min (docs/sampling.md).
    """

    image_shape: Tuple[int, int, int] = (1, 32, 32)
    hidden_channels: int = 64
    K: int = 8
    L: int = 3
    actnorm_scale: float = 1.0
    flow_permutation: str = "invconv"
    flow_coupling: str = "affine"
    LU_decomposed: bool = False
    learn_top: bool = False
    y_condition: bool = False
    num_classes: int = 10
    y_multilabel: bool = False
    n_bits: int = 8
    coupling_scale_min: float = 0.0

    def __post_init__(self):
        check_field_types(self, self.__dict__)
        self.image_shape = tuple(int(s) for s in self.image_shape)
        self.validate()

    def validate(self) -> None:
        """Raise GlowflowError with a one-line reason if a field has the wrong type, the
        architecture is impossible, or the model would be larger than the limits above."""
        check_field_types(self, self.__dict__)
        if len(self.image_shape) != 3:
            raise GlowflowError(f"image_shape must be (C, H, W), got {self.image_shape}")
        c, h, w = self.image_shape
        if c < 1 or h < 1 or w < 1:
            raise GlowflowError(f"image_shape must be positive, got {self.image_shape}")
        if c * h * w > MAX_IMAGE_DIMS:
            raise GlowflowError(
                f"image_shape {tuple(self.image_shape)} has {c * h * w} dimensions, "
                f"more than the limit {MAX_IMAGE_DIMS}"
            )
        if not 1 <= self.n_bits <= 8:
            raise GlowflowError(f"n_bits must be between 1 and 8, got {self.n_bits}")
        if not 1 <= self.K <= MAX_K:
            if self.K < 1:
                raise GlowflowError(f"K (steps of flow per level) must be at least 1, got {self.K}")
            raise GlowflowError(f"K (steps of flow per level) must be at most {MAX_K}, got {self.K}")
        if not 1 <= self.L <= MAX_L:
            if self.L < 1:
                raise GlowflowError(f"L (number of levels) must be at least 1, got {self.L}")
            raise GlowflowError(f"L (number of levels) must be at most {MAX_L}, got {self.L}")
        if self.hidden_channels < 1:
            raise GlowflowError(f"hidden_channels must be at least 1, got {self.hidden_channels}")
        if not (math.isfinite(self.actnorm_scale) and self.actnorm_scale > 0):
            raise GlowflowError(f"actnorm_scale must be a positive finite number, got {self.actnorm_scale}")
        if not (math.isfinite(self.coupling_scale_min) and 0.0 <= self.coupling_scale_min < 1.0):
            raise GlowflowError(f"coupling_scale_min must be in [0, 1), got {self.coupling_scale_min}")
        if self.num_classes < 1:
            raise GlowflowError(f"num_classes must be at least 1, got {self.num_classes}")
        factor = 2**self.L
        if h % factor or w % factor:
            raise GlowflowError(
                f"image size {h}x{w} is not divisible by 2**L = {factor} (L={self.L}); "
                f"choose an image size that is a multiple of {factor} or a smaller L"
            )
        if self.flow_permutation not in FLOW_PERMUTATIONS:
            raise GlowflowError(
                f"flow_permutation must be one of {', '.join(FLOW_PERMUTATIONS)}, got {self.flow_permutation!r}"
            )
        if self.flow_coupling not in FLOW_COUPLINGS:
            raise GlowflowError(f"flow_coupling must be one of {', '.join(FLOW_COUPLINGS)}, got {self.flow_coupling!r}")
        size = self.num_weights()
        if size > MAX_PARAMETERS:
            raise GlowflowError(
                f"this model would have about {size:.3g} weights, more than the limit of {MAX_PARAMETERS:.3g} "
                f"(hidden_channels={self.hidden_channels}, K={self.K}, L={self.L}, image_shape={self.image_shape})"
            )

    def num_weights(self) -> int:
        """Elements of the state dict of ``Glow(self)`` (parameters and buffers), from the
        configuration alone: the size check before a model is built (tests compare it with the model)."""
        c = self.image_shape[0]
        hidden = self.hidden_channels
        total = 0
        for level in range(self.L):
            c *= 4
            half = c // 2
            out = 2 * (c - half) if self.flow_coupling == "affine" else c - half
            step = 2 * c + 1  # ActNorm: bias, log-scale, "initialised" flag
            if self.flow_permutation == "invconv":  # LU: P, L, U, the mask, the identity; signs, log|s|
                step += 5 * c * c + 2 * c if self.LU_decomposed else c * c
            else:
                step += 2 * c  # the permutation and its inverse
            step += 9 * half * hidden + 2 * hidden + 1  # 3x3 convolution + ActNorm
            step += hidden * hidden + 2 * hidden + 1  # 1x1 convolution + ActNorm
            step += 9 * hidden * out + 2 * out  # zero-initialised 3x3 convolution: weights, bias, log-scale
            total += self.K * step
            if level < self.L - 1:
                z = 2 * (c - half)
                total += 9 * half * z + 2 * z
                c = half
        if self.learn_top:
            total += 9 * (2 * c) ** 2 + 4 * c
        if self.y_condition:
            total += self.num_classes * 2 * c + 4 * c + c * self.num_classes + 2 * self.num_classes
        return total

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GlowConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise GlowflowError(f"unknown model configuration keys: {sorted(map(str, unknown))}")
        return cls(**d)


@dataclass
class RunConfig:
    """Run flags: GenerativeZoo's Glow script's (same names, same defaults) and glowflow's own.
    The architecture flags, ``--n_bits`` included, are :class:`GlowConfig`'s.

    dataset: in-distribution dataset name or path; out_dataset: outlier dataset(s).
    batch_size, n_epochs, lr, warmup (epochs of linear LR warm-up), decay (Adamax weight decay).
    y_weight: weight of the classification loss when y_condition.
    max_grad_clip / max_grad_norm: gradient value clip / norm clip, 0 = off.
    sample_and_save_freq: epochs between sample grids.
    val_size: validation images carved from the training split (None: :func:`default_val_size`;
    0: none); ema: Polyak averaging decay (0: off); augment: random shifts and RGB flips;
    grad_checkpoint: recompute activations in the backward pass; preset: a key of PRESETS.
    """

    dataset: str = "mnist"
    out_dataset: Tuple[str, ...] = ("fashionmnist",)
    no_wandb: bool = False
    batch_size: int = 128
    n_epochs: int = 100
    lr: float = 0.0002
    y_weight: float = 0.01
    sample_and_save_freq: int = 5
    checkpoint: Optional[str] = None
    max_grad_clip: float = 0.0
    max_grad_norm: float = 0.0
    num_workers: int = 0
    warmup: int = 10
    decay: float = 0.0
    # glowflow's own
    data_root: str = "./data"
    output_dir: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    num_classes: Optional[int] = None  # None: the dataset's own number of classes
    max_steps: Optional[int] = None
    resume: Optional[str] = None
    overwrite: bool = False  # a new run may replace the run its --output_dir holds
    image_size: Optional[int] = None
    tensorboard: bool = False
    compile: bool = False  # torch.compile the training step (pays off on CUDA)
    amp: str = AMP_CHOICES[0]  # "bf16": bfloat16 autocast for the coupling networks (log-dets and priors stay float32)
    perturb: float = 0.0
    actnorm_init_images: int = 512
    max_nonfinite_steps: int = 5
    eval_seed: int = 0
    # the recipe of the paper (openai/glow), and choosing the checkpoint
    val_size: Optional[int] = None  # None: default_val_size(training images); 0: no validation split
    ema: float = 0.0  # Polyak averaging decay (e.g. 0.999); 0: off
    augment: bool = False  # random shifts (and left-right flips of RGB images), seeded by (seed, step)
    grad_checkpoint: bool = False  # recompute each flow step's activations in the backward pass
    preset: Optional[str] = None  # the --preset whose values the command line filled in (a record)
    # sampling and manipulation
    n_samples: int = 64
    temperature: Tuple[float, ...] = (0.7,)
    sample_class: Optional[int] = None
    reconstruct: bool = False
    interpolate: bool = False
    manipulate: Optional[Tuple[int, int]] = None
    manipulate_attribute: Optional[Tuple[int, ...]] = None  # class / finding indices: one attribute
    manipulate_scales: Tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
    n_interpolation_steps: int = 8
    # outlier detection
    background_checkpoint: Optional[str] = None
    max_eval_images: Optional[int] = None
    # the deployable detector (--score, and the reference of --outlier_detection)
    score_path: Optional[str] = None  # --score PATH: the folder or .npz whose images are scored
    detector: Optional[str] = None  # a file written by OutlierDetector.save (else fitted and cached)
    fit_images: int = 10_000  # training images the detector fits on (a seeded subset); 0 = all
    tpr: float = 0.95  # share of held-back inlier images the threshold keeps
    detector_score: str = "dos_orientation"

    def validate(self) -> None:
        """Raise GlowflowError with a one-line reason for a flag value that cannot work: a wrong
        type, or a value outside RUN_INT_RANGES / RUN_FLOAT_RANGES or the choices."""
        check_field_types(self, self.__dict__)
        for name, (low, high) in RUN_INT_RANGES.items():
            _check_int_range(name, getattr(self, name), low, high)
        for name, (low, low_allowed) in RUN_FLOAT_RANGES.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > low or (low_allowed and value == low))):
                kind = "non-negative" if low_allowed else "positive"
                raise GlowflowError(f"{name} must be a {kind} finite number, got {value}")
        if not (math.isfinite(self.ema) and 0.0 <= self.ema < 1.0):
            raise GlowflowError(f"ema must be in [0, 1) (0 = off; e.g. 0.999), got {self.ema}")
        if self.preset is not None and self.preset not in PRESETS:
            raise GlowflowError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if not 0.0 <= self.perturb < 1.0:
            raise GlowflowError(f"perturb must be in [0, 1), got {self.perturb}")
        if self.amp not in AMP_CHOICES:
            raise GlowflowError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
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
        if not self.dataset:
            raise GlowflowError("dataset must not be empty")
        if not self.out_dataset:
            raise GlowflowError("out_dataset needs at least one dataset")
        if not (math.isfinite(self.tpr) and 0.0 < self.tpr <= 1.0):
            raise GlowflowError(f"tpr must be in (0, 1], got {self.tpr}")
        if self.score_path is not None and not self.score_path:
            raise GlowflowError("score needs the path of a folder of images or a .npz file")

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

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def eval_batch_size(self) -> int:
        """Batch size of evaluation and scoring passes: the training batch, at least EVAL_BATCH_SIZE."""
        return max(self.batch_size, EVAL_BATCH_SIZE)

    def resolved_output_dir(self) -> str:
        """--output_dir, or outputs/Glow_<dataset>; outputs/pretrained_<NAME> for --checkpoint pretrained:NAME."""
        shipped = shipped_name(self.checkpoint)
        name = f"pretrained_{dataset_slug(shipped)}" if shipped else f"Glow_{dataset_slug(self.dataset)}"
        return self.output_dir or os.path.join(OUTPUT_ROOT, name)


TRAINING_COMMAND_FIELDS = (
    "dataset",
    "image_size",
    "n_epochs",
    "max_steps",
    "batch_size",
    "lr",
    "warmup",
    "decay",
    "max_grad_clip",
    "max_grad_norm",
    "y_weight",
    "num_classes",
    "seed",
    "val_size",
    "ema",
    "augment",
    "perturb",
    "amp",
)
"""The run flags that decide what a training run learns (not where it reads or writes, or how
fast), in the order :func:`training_command` writes them."""


def training_command(run_values: Dict[str, Any], model: GlowConfig) -> str:
    """The ``glowflow --train`` command that trains ``model`` as the stored run configuration
    ``run_values`` (a checkpoint's ``run_config``) records: the flags of TRAINING_COMMAND_FIELDS and
    the architecture flags that differ from their defaults (``--dataset`` always)."""
    run_defaults, arch_defaults = RunConfig(), GlowConfig()
    words = ["glowflow", "--train"]

    def add(name: str, value: Any, default: Any) -> None:
        if value == default and name != "dataset":
            return
        if isinstance(value, bool):
            words.extend([f"--{name}"] if value else [])
        elif value is not None:
            values = value if isinstance(value, (list, tuple)) else [value]
            words.extend([f"--{name}", *(shlex.quote(str(v)) for v in values)])

    for name in TRAINING_COMMAND_FIELDS:
        if name in run_values:
            add(name, run_values[name], getattr(run_defaults, name))
    for field in dataclasses.fields(GlowConfig):
        if field.name not in ("image_shape", "num_classes", "y_multilabel"):  # these follow the dataset
            add(field.name, getattr(model, field.name), getattr(arch_defaults, field.name))
    return " ".join(words)


def dataset_slug(dataset: str) -> str:
    """A file-name-safe short name of a dataset name or path: 'fashionmnist:classes=0,1' ->
    'fashionmnist_classes_0_1', '/data/my_set.npz' -> 'my_set'. At most SLUG_LENGTH characters: a
    longer one keeps its start and ends with '_' and 8 hex digits of a hash of the whole name."""
    name = str(dataset)
    if os.sep in name or name.endswith(".npz"):
        name = os.path.splitext(os.path.basename(os.path.normpath(name)))[0] or "custom"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "custom"
    if len(slug) <= SLUG_LENGTH:
        return slug
    digest = hashlib.sha1(str(dataset).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{slug[: SLUG_LENGTH - 9]}_{digest}"


# ----------------------------------------------------------------------------- strict field types


def check_field_types(config: Any, values: Dict[str, Any]) -> None:
    """GlowflowError naming the first field of ``values`` whose value does not have the type the
    dataclass ``config`` (a class or an instance) declares. Tuples may be given as lists."""
    hints = typing.get_type_hints(config if isinstance(config, type) else type(config))
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not _has_type(value, hint):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise GlowflowError(f"{name} must be {_describe(hint)}, got {shown}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return any(_has_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args))
    raise TypeError(f"check_field_types does not know the type {hint}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    names = {type(None): "none", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names[hint]


def _check_int_range(name: str, value: Optional[int], low: int, high: Optional[int]) -> None:
    if value is None:
        return
    if value < low:
        raise GlowflowError(f"{name} must be {'non-negative' if low == 0 else f'at least {low}'}, got {value}")
    if high is not None and value > high:
        raise GlowflowError(f"{name} must be at most {high}, got {value}")
