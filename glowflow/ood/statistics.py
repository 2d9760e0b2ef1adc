"""The per-image statistics of one pass of a model over a loader (bits/dim, each level's share of
it, log-determinant, latent RMS, a codec's bits/dim, the top latent as a feature vector, the class
label, and the bits/dim of the image turned over or on its side): what every outlier score is
computed from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from glowflow.config import DetectorConfig
from glowflow.errors import GlowflowError
from glowflow.ood.codecs import check_codec, codec_bits_per_dim
from glowflow.pixels import bits_per_dim, dequantize, preprocess
from glowflow.progress import progress_bar
from glowflow.runtime import autocast_context, resolve_precision

MAX_LATENT_FEATURES = 1024
"""Largest size of the ``top_latent`` feature vector: a larger top latent is average-pooled over
2x2 spatial blocks until it fits (so the class Gaussians' covariances stay small)."""
NO_LABEL = -1
"""The ``labels`` entry of an image that has no single class label."""
TRANSFORMS = {
    "vflip": lambda x: x.flip(-2),
    "hflip": lambda x: x.flip(-1),
    "rot90": lambda x: x.rot90(1, (-2, -1)),
    "rot180": lambda x: x.flip(-2).flip(-1),
    "rot270": lambda x: x.rot90(3, (-2, -1)),
}
"""The image transforms whose bits/dim :func:`compute_statistics` can add (``transform_bpd``):
turned upside down (``vflip``), mirrored, or rotated by 90, 180 or 270 degrees (square images)."""
ORIENTATION_TRANSFORMS = ("vflip", "rot90")
"""The transforms the detector's ``orientation`` score compares each image with by default
(docs/outlier_detection.md, "Near outliers: the model's view of orientation", says why these two)."""


@torch.inference_mode()
def compute_statistics(
    model,
    loader: Iterable,
    n_bits: Optional[int] = None,
    device=None,
    seed: int = 0,
    max_images: Optional[int] = None,
    codec: Optional[str] = "png",
    desc: str = "statistics",
    progress: bool = True,
    transforms: Sequence[str] = (),
    features: Optional[Callable[[torch.Tensor], np.ndarray]] = None,
    keep_images: bool = False,
    precision: str = "float32",
) -> Dict[str, np.ndarray]:
    """One pass over ``loader`` computing every per-image statistic the scores need.

    ``loader`` yields ``(images, labels)`` (or bare images) with images (N, C, H, W) in [0, 1]
    on the 8-bit grid; they are moved to ``device`` (default: where the model's parameters are);
    the model is not moved. ``n_bits`` defaults to the model's own (``model.config.n_bits``); if
    given it must equal it. The model runs in eval mode under ``torch.inference_mode`` (its
    training flag is restored afterwards); the likelihood ignores labels, so a class-conditional
    model is scored with its class-marginal prior (the labels are only passed through, as ``labels``).
    Dequantisation noise U(0, 1/n_bins) is drawn from a CPU
    generator seeded with ``seed`` in loader order, so two passes over the same loader (same
    order, same batch size) give the same numbers on any device. Stops after ``max_images``.

    Returns float64 arrays, N = images seen, L = levels, D = C*H*W:

    * ``bpd`` (N,): bits/dim ``-(log p(x) - D log n_bins) / (D ln 2)``.
    * ``level_bpd`` (N, L): what level ``i`` (column ``i - 1``; level 1 = first split, the finest
      scale; level L = top) contributes: ``(-(log_prior_i + logdet_i) + D_i n_bits ln 2) /
      (D ln 2)``, where ``log_prior_i`` is the log-density of that level's latent under its prior
      (split prior conditioned on the kept half, or the top prior), ``logdet_i`` the log|det| of
      that level's K flow steps (all channels they act on, including those passed upwards), and
      ``D_i`` the latent's size, so the level takes the share ``D_i / D`` of the discretisation
      constant. The columns sum to ``bpd`` exactly (up to rounding).
    * ``logdet`` (N,): log|det dz/dx| of the whole flow, nats per image.
    * ``latent_rms`` (N, L): root-mean-square of each level's latent, ``||z_i||_2 / sqrt(D_i)``.
    * ``codec_bpd`` (N,): :func:`codec_bits_per_dim` with ``codec`` (absent when ``codec`` is None).
    * ``top_latent`` (N, F) float32: the top level's latent (C_L, H_L, W_L) flattened, F = C_L H_L
      W_L, or average-pooled over 2x2 blocks until F <= :data:`MAX_LATENT_FEATURES`.
    * ``labels`` (N,) int64: each image's class (a single integer label from the loader), or
      :data:`NO_LABEL` where the loader gives none (bare images, ``None``, multi-label vectors).
    * ``transform_bpd`` (N, T), only when ``transforms`` (names of :data:`TRANSFORMS`) are given:
      the bits/dim of each image after each transform, column ``j`` for ``transforms[j]``, with
      the same dequantisation noise transformed alike (so ``bpd - transform_bpd[:, j]`` compares
      the same values in two orientations). Each transform costs one more pass of the model.

    ``precision`` (``--ood_precision``): "float32", "bf16" (the model passes under bf16 autocast:
    the coupling networks in bf16, every log-determinant and prior in float32; bits/dim then moves
    by about 0.01 per image, which changes no AUROC by more than 0.001 on the development sets,
    docs/outlier_detection.md) or "auto" (bf16 where the device computes it natively).
    """
    n_bits = _model_n_bits(model, n_bits)
    _check_ready(model, codec)
    transforms = check_transforms(transforms, model.config.image_shape)
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    amp = "bf16" if resolve_precision(precision, device) == "bf16" else "none"
    generator = torch.Generator(device="cpu").manual_seed(seed)
    batches: List[Dict[str, np.ndarray]] = []
    bar = _progress_bar(loader, max_images, desc, progress)
    was_training = model.training
    model.eval()
    try:
        for images, labels in _checked_images(loader, tuple(model.config.image_shape), max_images, desc):
            x = dequantize(preprocess(images, n_bits), n_bits, generator).to(device=device, dtype=param.dtype)
            with autocast_context(device, amp):
                batch = _batch_statistics(model, x, n_bits)
                if transforms:
                    batch["transform_bpd"] = _transform_bits_per_dim(model, x, n_bits, transforms)
            batch["labels"] = labels
            if features is not None:
                batch["classifier_features"] = features(images.to(device))
            if keep_images:
                batch["images"] = (images * 255.0).round().to(torch.uint8).cpu().numpy()
            if codec is not None:
                batch["codec_bpd"] = codec_bits_per_dim(images, n_bits, codec)
            batches.append(batch)
            bar.update(images.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    if sum(batch["bpd"].size for batch in batches) == 0:
        raise GlowflowError(f"the {desc} loader yielded no images")
    return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def check_transforms(transforms: Sequence[str], image_shape: Sequence[int]) -> Tuple[str, ...]:
    """``transforms`` as a tuple of known names (:data:`TRANSFORMS`), each at most once; a
    rotation by 90 or 270 degrees needs square images."""
    transforms = tuple(str(t) for t in transforms)
    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise GlowflowError(f"unknown image transform {unknown[0]!r}; choose from {', '.join(TRANSFORMS)}")
    if len(set(transforms)) != len(transforms):
        raise GlowflowError(f"image transforms must differ, got {list(transforms)}")
    if {"rot90", "rot270"} & set(transforms) and image_shape[-1] != image_shape[-2]:
        raise GlowflowError(f"rotating by 90 degrees needs square images, not {tuple(image_shape)}")
    return transforms


def _transform_bits_per_dim(model, x: torch.Tensor, n_bits: int, transforms: Sequence[str]) -> np.ndarray:
    """(n, T) float64 bits/dim of the dequantised batch ``x`` (n, C, H, W) after each transform,
    the transformed batches run through the model as one batch."""
    turned = torch.cat([TRANSFORMS[t](x) for t in transforms]).contiguous()
    terms = model.forward_terms(turned)
    log_prob = (torch.stack(terms.level_log_priors, 1).sum(1) + torch.stack(terms.level_logdets, 1).sum(1)).double()
    bpd = bits_per_dim(log_prob.cpu(), int(np.prod(model.config.image_shape)), n_bits)
    return bpd.reshape(len(transforms), x.shape[0]).T.numpy()


def _model_n_bits(model, n_bits: Optional[int]) -> int:
    """The model's bit depth; ``n_bits``, when given, must be the same."""
    own = int(model.config.n_bits)
    if n_bits is not None and int(n_bits) != own:
        raise GlowflowError(f"the model sees {own}-bit pixels, but its statistics were asked for at n_bits {n_bits}")
    return own


def _check_ready(model, codec: Optional[str]) -> None:
    """A known codec (or None) and a model whose ActNorm layers were initialised from data."""
    if codec is not None:
        check_codec(codec)
    if not model.is_initialized():
        raise GlowflowError(
            "the model was never initialised from data (ActNorm); outlier detection needs a trained checkpoint"
        )


def _progress_bar(loader: Iterable, max_images: Optional[int], desc: str, progress: bool):
    """A progress bar counting images, with the loader's dataset size (capped) as its total."""
    try:
        total = len(loader.dataset)
    except (AttributeError, TypeError):
        total = None
    if max_images is not None:
        total = max_images if total is None else min(total, max_images)
    return progress_bar(total=total, desc=desc, unit="img", disable=not progress, leave=False)


def _images_of(batch):
    """(images, labels or None) of a batch: ``(images, labels)``, ``{"image": ..., "label": ...}``
    or bare images."""
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        return batch.get("image", batch.get("images")), batch.get("label", batch.get("labels"))
    return batch, None


def _class_labels(labels, n: int) -> np.ndarray:
    """(n,) int64 class labels from a batch's labels: a vector of n integers (or an (n, 1)
    column); anything else (None, multi-label rows, floats, the wrong length) is
    :data:`NO_LABEL` for every image."""
    none = np.full(n, NO_LABEL, dtype=np.int64)
    if labels is None:
        return none
    try:
        array = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels)
    except (TypeError, ValueError):
        return none
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
        return none
    return np.where(array >= 0, array, NO_LABEL).astype(np.int64)


def _checked_images(
    loader: Iterable, image_shape: tuple, max_images: Optional[int], desc: str
) -> Iterator[Tuple[torch.Tensor, np.ndarray]]:
    """The loader's images as float32 (n, C, H, W) in [0, 1] with their class labels (n,) (see
    :func:`_class_labels`), at most ``max_images`` in all."""
    seen = 0
    for batch in loader:
        if max_images is not None and seen >= max_images:
            return
        images, labels = _images_of(batch)
        if not torch.is_tensor(images):
            raise GlowflowError(f"the {desc} loader must yield image tensors, got {type(images).__name__}")
        labels = _class_labels(labels, images.shape[0])
        if max_images is not None:
            images, labels = images[: max_images - seen], labels[: max_images - seen]
        if tuple(images.shape[1:]) != image_shape:
            raise GlowflowError(
                f"the {desc} images have shape {tuple(images.shape[1:])} but the model expects {image_shape}"
            )
        images = images.to(torch.float32)
        if images.numel() and not torch.isfinite(images).all().item():
            raise GlowflowError(
                f"the {desc} images hold values that are not numbers (NaN or infinite); "
                f"images must lie in [0, 1] (uint8 / 255)"
            )
        if images.numel() and (images.min().item() < 0.0 or images.max().item() > 1.0):
            raise GlowflowError(
                f"the {desc} images must lie in [0, 1] (uint8 / 255), got values in "
                f"[{images.min().item():.3g}, {images.max().item():.3g}]"
            )
        seen += images.shape[0]
        yield images, labels


def _batch_statistics(model, x: torch.Tensor, n_bits: int) -> Dict[str, np.ndarray]:
    """``bpd``, ``level_bpd``, ``logdet``, ``latent_rms`` (float64) and ``top_latent`` (float32)
    (see :func:`compute_statistics`) of one dequantised model-space batch ``x`` (n, C, H, W)."""
    terms = model.forward_terms(x)
    # per-level terms (n, L), then float64 on the CPU (some accelerators have no float64)
    log_priors = torch.stack(terms.level_log_priors, 1).cpu().double()
    logdets = torch.stack(terms.level_logdets, 1).cpu().double()
    rms = torch.stack([z.flatten(1).pow(2).mean(1).sqrt() for z in terms.latents], 1).cpu().double()
    dims = int(np.prod(model.config.image_shape))
    latent_dims = [int(np.prod(shape)) for shape in model.latent_shapes]
    return {
        "bpd": bits_per_dim(log_priors.sum(1) + logdets.sum(1), dims, n_bits).numpy(),
        "level_bpd": _level_bits_per_dim(log_priors + logdets, latent_dims, dims, n_bits).numpy(),
        "logdet": logdets.sum(1).numpy(),
        "latent_rms": rms.numpy(),
        "top_latent": latent_features(terms.latents[-1]).cpu().float().numpy(),
    }


def latent_features(top: torch.Tensor) -> torch.Tensor:
    """The top latent (n, C, H, W) as (n, F) features: flattened, after average-pooling over 2x2
    spatial blocks while F = C H W > :data:`MAX_LATENT_FEATURES` (and H, W are even)."""
    while top[0].numel() > MAX_LATENT_FEATURES and top.shape[2] % 2 == 0 and top.shape[3] % 2 == 0:
        top = torch.nn.functional.avg_pool2d(top, 2)
    return top.reshape(top.shape[0], -1)


def _level_bits_per_dim(
    level_log_probs: torch.Tensor, latent_dims: Sequence[int], dims: int, n_bits: int
) -> torch.Tensor:
    """Each level's share of the image's bits/dim, (n, L), from the levels' log-densities (n, L):
    level ``i``'s own bits/dim over its ``D_i`` latent dimensions, weighted by ``D_i / D``
    (``D = dims``, the image's size, which the latents' sizes sum to). So each level carries
    ``D_i / D`` of the discretisation constant and the columns sum to the image's bits/dim."""
    return torch.stack(
        [bits_per_dim(level_log_probs[:, i], d, n_bits) * (d / dims) for i, d in enumerate(latent_dims)], 1
    )


def statistic_columns(stats: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Every per-image statistic of :func:`compute_statistics` as named (N,) columns:
    ``level_<i>_bpd`` and ``latent_rms_<i>`` for i = 1..L, ``logdet``, ``bpd``, and ``codec_bpd``
    when present."""
    level_bpd = np.asarray(stats["level_bpd"], dtype=np.float64)
    columns = {f"level_{i + 1}_bpd": level_bpd[:, i] for i in range(level_bpd.shape[1])}
    for key in ("logdet", "bpd", "codec_bpd"):
        if key in stats:
            columns[key] = np.asarray(stats[key], dtype=np.float64).reshape(-1)
    if "latent_rms" in stats:
        rms = np.asarray(stats["latent_rms"], dtype=np.float64)
        columns.update({f"latent_rms_{i + 1}": rms[:, i] for i in range(rms.shape[1])})
    return columns


@dataclass(frozen=True)
class StatisticsSettings:
    """How :func:`compute_statistics` reads every loader of one outlier-detection run: the
    device, the dequantisation noise seed, the cap on images per loader, the codec (None: no
    ``codec_bpd``), whether to show a progress bar, and the transforms whose bits/dim the
    ``orientation`` score compares (empty: none, and no ``orientation`` score), the label
    classifier's ``features`` (None: no ``classifier_features``), whether to keep the images, and
    the ``precision`` of the model passes (:data:`glowflow.config.OOD_PRECISIONS`)."""

    device: Optional[Union[str, torch.device]] = None
    seed: int = 0
    max_images: Optional[int] = None
    codec: Optional[str] = "png"
    progress: bool = True
    transforms: Tuple[str, ...] = ORIENTATION_TRANSFORMS
    features: Optional[Callable[[torch.Tensor], np.ndarray]] = None
    keep_images: bool = False
    precision: str = DetectorConfig.ood_precision

    def compute(self, model, loader: Iterable, desc: str) -> Dict[str, np.ndarray]:
        """:func:`compute_statistics` of ``model`` over ``loader`` with these settings, at the
        model's bit depth."""
        return compute_statistics(
            model,
            loader,
            device=self.device,
            seed=self.seed,
            max_images=self.max_images,
            codec=self.codec,
            desc=desc,
            progress=self.progress,
            transforms=self.transforms,
            features=self.features,
            keep_images=self.keep_images,
            precision=self.precision,
        )
