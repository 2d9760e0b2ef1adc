"""The model's configuration: :class:`GlowConfig` (the architecture and its data space, everything
needed to rebuild a model from a checkpoint) and the limits it is checked against, so that a
corrupt or crafted checkpoint cannot make glowflow build an absurd model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Tuple

from glowflow.config.fields import check_field_types
from glowflow.errors import GlowflowError

FLOW_PERMUTATIONS = ("invconv", "shuffle", "reverse")
FLOW_COUPLINGS = ("additive", "affine")
PRIOR_FITS = ("full", "diag", "none")
FULL_COVARIANCE_MAX_DIMS = 4096
"""Largest latent (values per image) whose fitted prior has a full covariance (a d x d triangular
factor: 64 MiB of float32 at this size); larger latents get a diagonal one."""
PRIOR_FIT_BEFORE_ITS_FIELD = "none"
"""What a stored configuration without ``prior_fit`` (written before the field existed) means."""
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
    prior_fit: each prior's Gaussian on its standardised latent (glowflow/latent_fit.py), fitted
    in closed form to the training images at the end of every epoch: 'full' (default; a full
    covariance for latents of at most 4096 values, diagonal above), 'diag', or 'none' (the paper's
    priors exactly; what checkpoints written before this field read as).
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
    prior_fit: str = "full"

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
        if self.prior_fit not in PRIOR_FITS:
            raise GlowflowError(f"prior_fit must be one of {', '.join(PRIOR_FITS)}, got {self.prior_fit!r}")
        size = self.num_weights()
        if size > MAX_PARAMETERS:
            raise GlowflowError(
                f"this model would have about {size:.3g} weights, more than the limit of {MAX_PARAMETERS:.3g} "
                f"(hidden_channels={self.hidden_channels}, K={self.K}, L={self.L}, image_shape={self.image_shape})"
            )

    def num_weights(self) -> int:
        """Elements of the state dict of ``Glow(self)`` (parameters and buffers), from the
        configuration alone: the size check before a model is built (tests compare it with the model)."""
        c, h, w = self.image_shape
        hidden = self.hidden_channels
        total = 0
        for level in range(self.L):
            c, h, w = c * 4, h // 2, w // 2
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
                total += 9 * half * z + 2 * z + self._fitted_gaussian_size((c - half) * h * w)
                c = half
        total += self._fitted_gaussian_size(c * h * w)
        if self.learn_top:
            total += 9 * (2 * c) ** 2 + 4 * c
        if self.y_condition:
            total += self.num_classes * 2 * c + 4 * c + c * self.num_classes + 2 * self.num_classes
        return total

    def _fitted_gaussian_size(self, d: int) -> int:
        """Elements of the buffers of a prior's fitted Gaussian over ``d`` latent values."""
        if self.prior_fit == "none":
            return 0
        full = self.prior_fit == "full" and d <= FULL_COVARIANCE_MAX_DIMS
        return d + (d * d if full else d) + 1

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
