"""Configuration dataclasses and the choices of every flag: the one place where defaults live.

``GlowConfig`` describes a model: the architecture and its data space (image shape and bit
depth), everything needed to rebuild it from a checkpoint. ``RunConfig`` holds the run flags of
GenerativeZoo's Glow script (same names, same defaults) plus the ones glowflow adds. The command
line builds its flags from these fields and choices, so a default changed here changes everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple

from glowflow.errors import GlowflowError

FLOW_PERMUTATIONS = ("invconv", "shuffle", "reverse")
FLOW_COUPLINGS = ("additive", "affine")
AMP_CHOICES = ("none", "bf16")
SEED_STRIDE = 1_000_003
"""Every seeded draw of a run uses a generator seeded ``seed * SEED_STRIDE + offset`` (epoch order:
+ epoch; dequantisation noise of step s: + s; ...), so the draws of different run seeds stay apart."""
EVAL_BATCH_SIZE = 256
"""Smallest batch for evaluation and scoring passes (no gradients, so larger batches are cheap)."""


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

    def __post_init__(self):
        self.image_shape = tuple(int(s) for s in self.image_shape)
        self.validate()

    def validate(self) -> None:
        """Raise GlowflowError with a one-line reason if the architecture is impossible."""
        if len(self.image_shape) != 3:
            raise GlowflowError(f"image_shape must be (C, H, W), got {self.image_shape}")
        c, h, w = self.image_shape
        if c < 1 or h < 1 or w < 1:
            raise GlowflowError(f"image_shape must be positive, got {self.image_shape}")
        if not 1 <= self.n_bits <= 8:
            raise GlowflowError(f"n_bits must be between 1 and 8, got {self.n_bits}")
        if self.K < 1:
            raise GlowflowError(f"K (steps of flow per level) must be at least 1, got {self.K}")
        if self.L < 1:
            raise GlowflowError(f"L (number of levels) must be at least 1, got {self.L}")
        if self.hidden_channels < 1:
            raise GlowflowError(f"hidden_channels must be at least 1, got {self.hidden_channels}")
        if self.actnorm_scale <= 0:
            raise GlowflowError(f"actnorm_scale must be positive, got {self.actnorm_scale}")
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
        if self.y_condition and self.num_classes < 1:
            raise GlowflowError(f"num_classes must be at least 1, got {self.num_classes}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_shape"] = list(self.image_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GlowConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise GlowflowError(f"unknown model configuration keys: {sorted(unknown)}")
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
    image_size: Optional[int] = None
    tensorboard: bool = False
    compile: bool = False  # torch.compile the training step (pays off on CUDA)
    amp: str = AMP_CHOICES[0]  # "bf16": bfloat16 autocast for the coupling networks (log-dets and priors stay float32)
    perturb: float = 0.0
    actnorm_init_images: int = 512
    max_nonfinite_steps: int = 5
    eval_seed: int = 0
    # sampling and manipulation
    n_samples: int = 64
    temperature: Tuple[float, ...] = (0.7,)
    sample_class: Optional[int] = None
    reconstruct: bool = False
    interpolate: bool = False
    manipulate: Optional[Tuple[int, int]] = None
    n_interpolation_steps: int = 8
    # outlier detection
    background_checkpoint: Optional[str] = None
    max_eval_images: Optional[int] = None

    def validate(self) -> None:
        """Raise GlowflowError with a one-line reason for a flag value that cannot work."""
        if self.batch_size < 1:
            raise GlowflowError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.n_epochs < 0:
            raise GlowflowError(f"n_epochs must be non-negative, got {self.n_epochs}")
        if self.lr <= 0:
            raise GlowflowError(f"lr must be positive, got {self.lr}")
        if self.warmup < 0:
            raise GlowflowError(f"warmup must be non-negative, got {self.warmup}")
        if self.num_workers < 0:
            raise GlowflowError(f"num_workers must be non-negative, got {self.num_workers}")
        if self.max_steps is not None and self.max_steps < 1:
            raise GlowflowError(f"max_steps must be at least 1, got {self.max_steps}")
        if not 0.0 <= self.perturb < 1.0:
            raise GlowflowError(f"perturb must be in [0, 1), got {self.perturb}")
        if self.n_samples < 1:
            raise GlowflowError(f"n_samples must be at least 1, got {self.n_samples}")
        if self.amp not in AMP_CHOICES:
            raise GlowflowError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if any(t < 0 for t in self.temperature):
            raise GlowflowError(f"temperatures must be non-negative, got {list(self.temperature)}")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def eval_batch_size(self) -> int:
        """Batch size of evaluation and scoring passes: the training batch, at least EVAL_BATCH_SIZE."""
        return max(self.batch_size, EVAL_BATCH_SIZE)

    def resolved_output_dir(self) -> str:
        """--output_dir, or outputs/Glow_<dataset>."""
        return self.output_dir or os.path.join("outputs", f"Glow_{dataset_slug(self.dataset)}")


def dataset_slug(dataset: str) -> str:
    """A file-name-safe short name of a dataset name or path: 'fashionmnist:classes=0,1' ->
    'fashionmnist_classes_0_1', '/data/my_set.npz' -> 'my_set'."""
    name = str(dataset)
    if os.sep in name or name.endswith(".npz"):
        name = os.path.splitext(os.path.basename(os.path.normpath(name)))[0] or "custom"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "custom"
