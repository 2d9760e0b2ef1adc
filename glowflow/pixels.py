"""Every map between pixels and the model's space, and the one source of dequantisation noise.

Pixels are uint8 in [0, 255], handed around as float images in [0, 1] (``uint8 / 255``, as
torchvision's ``ToTensor`` gives). With ``n_bits`` < 8 they become ``floor(p / 2**(8 - n_bits))``,
``n_bins = 2**n_bits``. Model space is ``p / n_bins - 0.5``, in [-0.5, 0.5). Training, evaluation
and outlier scoring all add dequantisation noise U(0, 1/n_bins) through
:func:`dequantization_noise`. Bits/dim is ``-(log_prob - D log n_bins) / (D ln 2)``
(:func:`bits_per_dim`). Also here: the input perturbation of a likelihood-ratio background model
(:func:`perturb`), training's data augmentation (:func:`shift_and_flip`: whole-pixel shifts with
the edge repeated, left-right flips; pixels stay on their grid) and saving model-space images as
a PNG grid (:func:`save_grid`, written atomically). Every map takes ``n_bits`` explicitly (no
default: a forgotten bit depth must not silently mean 8); a model's own maps are
``Glow.preprocess``/``dequantize``/``postprocess``/``bits_per_dim``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from glowflow.errors import GlowflowError
from glowflow.files import atomic_write

LN2 = math.log(2.0)


def quantize(images: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Images in [0, 1] on the 8-bit grid -> the integer levels the model sees, 0..2**n_bits - 1
    (as a float tensor of the input's dtype)."""
    pixels = torch.round(images * 255.0)
    if n_bits < 8:
        pixels = torch.floor(pixels / 2 ** (8 - n_bits))
    return pixels


def preprocess(images: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Images in [0, 1] (uint8 / 255, as torchvision's ToTensor) -> model space [-0.5, 0.5), no noise."""
    return quantize(images, n_bits) / 2**n_bits - 0.5


def dequantization_noise(
    shape: Sequence[int],
    n_bits: int,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Uniform noise U(0, 1/n_bins) of ``shape``, drawn from ``generator`` on its own device (CPU
    for a default or CPU generator): every caller draws the same numbers for the same generator
    state, whatever device the model is on."""
    device = generator.device if generator is not None else None
    return torch.rand(tuple(shape), generator=generator, dtype=dtype, device=device) / 2**n_bits


def dequantize(x: torch.Tensor, n_bits: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Model-space ``x`` plus dequantisation noise U(0, 1/n_bins) on every dimension."""
    return x + dequantization_noise(x.shape, n_bits, generator, x.dtype).to(x.device)


def postprocess(x: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Model space -> images in [0, 1] on the n_bits grid (for saving pictures)."""
    n_bins = 2**n_bits
    pixels = torch.floor((x + 0.5) * n_bins).clamp(0, n_bins - 1)
    return pixels * (2 ** (8 - n_bits)) / 255.0


def discretisation_nats(num_dims: int, n_bits: int) -> float:
    """``D log n_bins``: what turns a continuous log-density into a discrete log-probability."""
    return num_dims * n_bits * LN2


def bits_per_dim(log_prob: torch.Tensor, num_dims: int, n_bits: int) -> torch.Tensor:
    """Discrete NLL in bits per dimension: ``-(log_prob - D log n_bins) / (D ln 2)``."""
    return -(log_prob - discretisation_nats(num_dims, n_bits)) / (num_dims * LN2)


def perturb(images01: torch.Tensor, rate: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Ren et al. (2019)'s input perturbation for training a likelihood-ratio background model.

    ``images01``: images in [0, 1] on the 8-bit grid, any shape. Every value (each channel of each
    pixel) is independently selected with probability ``rate`` and replaced by one of the *other*
    255 8-bit values, uniformly. Returns a new tensor on the same grid, dtype and device.
    ``generator`` (on any device) makes the draw reproducible.
    """
    if not 0.0 <= rate <= 1.0:
        raise GlowflowError(f"perturbation rate must be in [0, 1], got {rate}")
    gen_device = generator.device if generator is not None else images01.device
    pixels = torch.round(images01.detach() * 255.0).to(torch.int64)
    select = torch.rand(images01.shape, generator=generator, device=gen_device).to(images01.device) < rate
    offset = torch.randint(1, 256, images01.shape, generator=generator, device=gen_device).to(images01.device)
    new = torch.where(select, (pixels + offset) % 256, pixels)
    return new.to(images01.dtype) / 255.0


def shift_and_flip(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Each image of ``images`` (N, C, H, W) moved by whole pixels and, where ``flips`` says, flipped
    left to right: output pixel (y, x) of image n is input pixel (clamp(y - dy), clamp(x' - dx))
    with (dy, dx) = ``shifts[n]`` (N, 2) integers, x' = W - 1 - x for a flipped image, and the
    clamp to the image repeating its edge (Keras' 'nearest' fill). Only copies values, so images on
    the 8-bit grid stay on it, exactly."""
    n, _, h, w = images.shape
    shifts = shifts.to(images.device, torch.int64)
    flips = flips.to(images.device, torch.bool)
    rows = (torch.arange(h, device=images.device)[None, :] - shifts[:, :1]).clamp(0, h - 1)  # (N, H)
    columns = torch.arange(w, device=images.device)[None, :].expand(n, w)
    columns = torch.where(flips[:, None], w - 1 - columns, columns)
    columns = (columns - shifts[:, 1:]).clamp(0, w - 1)  # (N, W)
    batch = torch.arange(n, device=images.device)[:, None, None]
    moved = images.permute(0, 2, 3, 1)[batch, rows[:, :, None], columns[:, None, :]]  # (N, H, W, C)
    return moved.permute(0, 3, 1, 2).contiguous()


def save_grid(x: torch.Tensor, n_bits: int, path: str, nrow: int = 8) -> str:
    """Save model-space images (N, C, H, W) as one PNG grid with ``nrow`` images per row."""
    from torchvision.utils import save_image

    images = postprocess(x.detach().float().cpu(), n_bits)
    return atomic_write(
        path, lambda handle: save_image(images, handle, format="png", nrow=nrow, padding=2, pad_value=1.0)
    )
