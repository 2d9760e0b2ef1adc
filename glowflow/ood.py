"""Outlier detection with a trained Glow: scores, metrics, reports and plots.

A flow's likelihood alone is a poor outlier detector: a Glow trained on Fashion-MNIST gives
MNIST digits *higher* likelihood than its own test images (Nalisnick et al., 2019). This module
computes, from one trained model (plus an optional background model), the raw score and the
label-free corrections from the literature, each oriented so that **higher = more outlying**:

==================  =========================================================================
``nll``             bits/dim of the image under the model (the seed's score).
``complexity``      ``nll`` minus the bits/dim a real lossless codec needs for the same image
                    (Serra et al., 2020, "Input complexity and out-of-distribution detection
                    with likelihood-based generative models"). Codec: PNG by default (Pillow,
                    ``optimize=True, compress_level=9``), or WebP lossless; see
                    :func:`codec_bits_per_dim`.
``typicality``      ``|nll - mean training nll|``: the per-sample form of the typicality test of
                    Nalisnick et al., 2019b ("Detecting out-of-distribution inputs to deep
                    generative models using typicality").
``level_<i>_bpd``   bits/dim the latents of level ``i`` contribute (``i = 1`` is the first split,
                    the finest scale; ``i = L`` is the top). They sum to ``nll`` exactly; see
                    :func:`compute_statistics`. ``level_<L>_bpd`` is the "final scale only" score
                    of Schirrmeister et al., 2020.
``hierarchy_ratio`` ``nll - level_1_bpd``: the log-likelihood ratio of the full model to its
                    level-1 (local, texture) factor, in bits/dim (Schirrmeister et al., 2020,
                    "Understanding anomaly detection with deep invertible networks through
                    hierarchies of distributions and features"). Only when L >= 2.
``dos``             minus the log-density, under a density fitted on the training images' own
                    statistics (each level's bits/dim and the codec's bits/dim; a Gaussian
                    mixture), of the test image's statistics ("Density of States", Morningstar
                    et al., 2021).
``likelihood_ratio`` ``nll - nll_background`` = ``-(log p_model - log p_background) / (D ln 2)``
                    with a background model trained on perturbed inputs (Ren et al., 2019,
                    "Likelihood ratios for out-of-distribution detection"). Only when a
                    background model is given.
==================  =========================================================================

Metrics (:func:`outlier_metrics`): AUROC, AUPR-in, AUPR-out and FPR at 95% TPR, with the
outliers as positives.

Background-model recipe (Ren et al., 2019): train a second model with the same architecture on
the same in-distribution training set, with every input perturbed by :func:`perturb` (each
pixel value independently replaced, with probability ``rate``, by a different uniformly random
8-bit value). The rate is a hyper-parameter that Ren et al. tune (0.1-0.3 is a reasonable
start); they also regularise the background model with L2 weight decay (``--decay``). On the
command line::

    glowflow --train --dataset D --perturb 0.2 --decay 5e-5 --output_dir bg/
    glowflow --outlier_detection --dataset D --checkpoint model.pt --background_checkpoint bg/<checkpoint>

The background model learns the population-level "background" statistics (local smoothness,
pixel histograms) that dominate the likelihood, and the ratio cancels them.

Entry points: :func:`compute_statistics` (one pass over a loader), :func:`fit_reference` /
:func:`save_reference` / :func:`load_reference` (training statistics, cached as .npz),
:func:`outlier_scores`, :func:`outlier_metrics` and :func:`run_outlier_detection` (everything,
with the printed table, the JSON reports and the PNG figures).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from glowflow.config import RunConfig, dataset_slug
from glowflow.errors import GlowflowError
from glowflow.pixels import dequantize, perturb, preprocess  # noqa: F401 (perturb: its old home)

REFERENCE_FORMAT = "glowflow-ood-reference-v4"
CODECS = ("png", "webp")

SCORE_DEFINITIONS: Dict[str, str] = {
    "nll": "bits/dim under the model (Nalisnick et al., 2019 show it alone fails)",
    "complexity": "bits/dim minus the bits/dim of a lossless codec (Serra et al., 2020)",
    "typicality": "|bits/dim - mean training bits/dim| (Nalisnick et al., 2019b)",
    "level_bpd": "bits/dim contributed by one level's latents (Schirrmeister et al., 2020)",
    "hierarchy_ratio": "bits/dim minus the level-1 (local) contribution (Schirrmeister et al., 2020)",
    "dos": "-log density of the image's statistics under their training density (Morningstar et al., 2021)",
    "likelihood_ratio": "bits/dim minus a background model's bits/dim (Ren et al., 2019)",
}


# ----------------------------------------------------------------------------- metrics


def _clean_pair(scores_in, scores_out) -> Tuple[np.ndarray, np.ndarray]:
    """float64 copies of both sets; NaN and +inf become more outlying than every finite score of
    either set, -inf less (with a warning)."""
    a = np.asarray(scores_in, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_out, dtype=np.float64).reshape(-1)
    both = np.concatenate([a, b])
    bad = ~np.isfinite(both)
    if bad.any():
        warnings.warn(f"{int(bad.sum())} non-finite score(s): NaN and +inf ranked most outlying, -inf least",
                      RuntimeWarning, stacklevel=3)
        finite = both[~bad]
        hi = finite.max() + 1.0 if finite.size else 1.0
        lo = finite.min() - 1.0 if finite.size else -1.0
        both[np.isnan(both) | (both == np.inf)] = hi
        both[both == -np.inf] = lo
        a, b = both[:a.size], both[a.size:]
    return a, b


def fpr_at_tpr(scores_in: np.ndarray, scores_out: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at ``tpr`` true-positive rate (outliers positive, flagged if score >= t).

    The threshold is the strictest one that still catches at least ``tpr`` of the outliers:
    ``t* = max{t : mean(scores_out >= t) >= tpr}``, which is the k-th largest outlier score with
    ``k = ceil(tpr * n_out)``. Ties: every sample whose score equals ``t*`` is flagged, outliers
    and in-distribution samples alike (so the achieved TPR may exceed ``tpr`` when outliers tie at
    ``t*``, and in-distribution samples tied with ``t*`` count as false positives). Returns
    ``mean(scores_in >= t*)``.
    """
    s_in = np.asarray(scores_in, dtype=np.float64).reshape(-1)
    s_out = np.sort(np.asarray(scores_out, dtype=np.float64).reshape(-1))[::-1]
    if s_out.size == 0 or s_in.size == 0:
        raise GlowflowError("FPR at TPR needs at least one in-distribution and one outlier score")
    percent = round(tpr * 100)
    if abs(percent - tpr * 100) < 1e-9:
        k = (percent * s_out.size + 99) // 100   # exact ceil(tpr * n) for whole percentages
    else:
        k = int(math.ceil(tpr * s_out.size - 1e-12))
    k = min(max(k, 1), s_out.size)
    threshold = s_out[k - 1]
    return float(np.mean(s_in >= threshold))


def outlier_metrics(scores_in: Sequence[float], scores_out: Sequence[float]) -> Dict[str, float]:
    """AUROC, AUPR-in, AUPR-out and FPR95 of a score where higher means more outlying.

    * ``auroc``: area under the ROC curve with outliers as positives
      (:func:`sklearn.metrics.roc_auc_score`; ties count one half). 0.5 = chance, 1 = perfect,
      0 = perfectly inverted.
    * ``aupr_out``: average precision with outliers as positives and the score as is.
    * ``aupr_in``: average precision with in-distribution samples as positives and the score
      negated. Both use :func:`sklearn.metrics.average_precision_score`, the step-wise sum
      ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds (tied scores form one step; no
      interpolation). Chance level is the positives' share of the samples.
    * ``fpr95``: :func:`fpr_at_tpr` at 95% (the tie rule is stated there); lower is better.

    Non-finite scores are ranked: NaN and +inf most outlying, -inf least (a warning is issued).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s_in, s_out = _clean_pair(scores_in, scores_out)
    if s_in.size == 0 or s_out.size == 0:
        raise GlowflowError("outlier metrics need at least one in-distribution and one outlier score")
    scores = np.concatenate([s_in, s_out])
    is_out = np.concatenate([np.zeros(s_in.size, dtype=int), np.ones(s_out.size, dtype=int)])
    return {
        "auroc": float(roc_auc_score(is_out, scores)),
        "aupr_in": float(average_precision_score(1 - is_out, -scores)),
        "aupr_out": float(average_precision_score(is_out, scores)),
        "fpr95": fpr_at_tpr(s_in, s_out, 0.95),
    }


# ----------------------------------------------------------------------------- codec


def _png_payload_bytes(data: bytes) -> int:
    """Bytes of the IDAT chunks' data (the zlib stream) in a PNG file."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise GlowflowError("not a PNG file")
    pos, total = 8, 0
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            total += length
        pos += 12 + length
    return total


def _webp_payload_bytes(data: bytes) -> int:
    """Bytes of the VP8L chunk's data (the lossless bitstream) in a WebP file."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise GlowflowError("not a WebP file")
    pos, total = 12, 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        if data[pos:pos + 4] == b"VP8L":
            total += size
        pos += 8 + size + (size & 1)
    if total == 0:
        raise GlowflowError("WebP file has no lossless (VP8L) bitstream")
    return total


def codec_description(codec: str) -> str:
    """One line naming the codec, its library and settings, and what is counted."""
    import PIL

    if codec == "png":
        return (f"PNG (Pillow {PIL.__version__}, zlib; optimize=True, compress_level=9; "
                f"bits of the IDAT payload, container framing excluded)")
    if codec == "webp":
        return (f"WebP lossless (Pillow {PIL.__version__}, libwebp; lossless=True, quality=100, method=6; "
                f"bits of the VP8L payload, RIFF framing excluded)")
    raise GlowflowError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")


def _to_pil(pixels: np.ndarray):
    """uint8 (C, H, W) -> a PIL image: 'L' for C = 1, 'RGB' for C = 3, otherwise the channels
    stacked vertically as one (C*H, W) 'L' image."""
    from PIL import Image

    c = pixels.shape[0]
    if c == 1:
        return Image.fromarray(np.ascontiguousarray(pixels[0]))
    if c == 3:
        return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    return Image.fromarray(np.ascontiguousarray(pixels.reshape(-1, pixels.shape[2])))


def codec_bits_per_dim(images01: torch.Tensor, n_bits: int = 8, codec: str = "png") -> np.ndarray:
    """Bits per dimension a real lossless codec needs for each image, shape (N,).

    ``images01``: (N, C, H, W) in [0, 1] on the 8-bit grid. Each image is first put on the grid
    the model sees: 8-bit pixels ``p``, and with ``n_bits`` < 8 the integers
    ``floor(p / 2**(8 - n_bits))`` (stored as 8-bit samples). It is then encoded with Pillow:

    * ``"png"``: ``Image.save(format="PNG", optimize=True, compress_level=9)``; counted are the
      bytes of the IDAT chunks (the zlib-compressed, filtered scanlines), not the 8-byte signature
      or chunk framing (57 bytes for one image data chunk), which are the same for every image
      of a size and would otherwise add ``456 / D`` bits/dim.
    * ``"webp"``: ``Image.save(format="WEBP", lossless=True, quality=100, method=6)``; counted is
      the VP8L bitstream, not the RIFF framing.

    Grey images (C = 1) are encoded as 8-bit grey, C = 3 as RGB, other C as the channels stacked
    vertically into one grey image. Result: ``8 * bytes / (C * H * W)``.
    """
    if codec not in CODECS:
        raise GlowflowError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    pixels = torch.round(images01.detach().to("cpu", torch.float64) * 255.0).clamp(0, 255)
    if n_bits < 8:
        pixels = torch.floor(pixels / 2 ** (8 - n_bits))
    pixels = pixels.to(torch.uint8).numpy()
    dims = int(np.prod(pixels.shape[1:]))
    out = np.empty(pixels.shape[0], dtype=np.float64)
    for i, img in enumerate(pixels):
        buffer = io.BytesIO()
        pil = _to_pil(img)
        if codec == "png":
            pil.save(buffer, format="PNG", optimize=True, compress_level=9)
            nbytes = _png_payload_bytes(buffer.getvalue())
        else:
            pil.save(buffer, format="WEBP", lossless=True, quality=100, method=6)
            nbytes = _webp_payload_bytes(buffer.getvalue())
        out[i] = 8.0 * nbytes / dims
    return out


# ----------------------------------------------------------------------------- per-image statistics


def _images_of(batch):
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        return batch.get("image", batch.get("images"))
    return batch


@torch.inference_mode()
def compute_statistics(
    model,
    loader: Iterable,
    n_bits: int,
    device=None,
    seed: int = 0,
    max_images: Optional[int] = None,
    codec: Optional[str] = "png",
    desc: str = "statistics",
    progress: bool = True,
) -> Dict[str, np.ndarray]:
    """One pass over ``loader`` computing every per-image statistic the scores need.

    ``loader`` yields ``(images, labels)`` (or bare images) with images (N, C, H, W) in [0, 1]
    on the 8-bit grid; they are moved to ``device`` (default: where the model's parameters are);
    the model is not moved. The model runs in eval mode under ``torch.inference_mode`` (its
    training flag is restored afterwards); labels are ignored, so a class-conditional model is scored
    with its class-marginal prior. Dequantisation noise U(0, 1/n_bins) is drawn from a CPU
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
    """
    from tqdm.auto import tqdm

    if codec is not None and codec not in CODECS:
        raise GlowflowError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    if not model.is_initialized():
        raise GlowflowError("the model was never initialised from data (ActNorm); "
                            "outlier detection needs a trained checkpoint")
    image_shape = tuple(model.config.image_shape)
    dims = int(np.prod(image_shape))
    latent_dims = [int(np.prod(s)) for s in model.latent_shapes]
    param = next(model.parameters())
    dtype = param.dtype
    device = param.device if device is None else torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    ln2 = math.log(2.0)
    columns: Dict[str, List[np.ndarray]] = {k: [] for k in ("bpd", "level_bpd", "logdet", "latent_rms", "codec_bpd")}
    seen = 0
    try:
        total = len(loader.dataset)
    except (AttributeError, TypeError):
        total = None
    if max_images is not None:
        total = max_images if total is None else min(total, max_images)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for batch in loader:
            if max_images is not None and seen >= max_images:
                break
            images = _images_of(batch)
            if not torch.is_tensor(images):
                raise GlowflowError(f"the {desc} loader must yield image tensors, got {type(images).__name__}")
            if max_images is not None:
                images = images[: max_images - seen]
            if tuple(images.shape[1:]) != image_shape:
                raise GlowflowError(f"the {desc} images have shape {tuple(images.shape[1:])} but the model "
                                    f"expects {image_shape}")
            images = images.to(torch.float32)
            if images.numel() and (images.min().item() < 0.0 or images.max().item() > 1.0):
                raise GlowflowError(f"the {desc} images must lie in [0, 1] (uint8 / 255), got values in "
                                    f"[{images.min().item():.3g}, {images.max().item():.3g}]")
            x = preprocess(images, n_bits)
            x = dequantize(x, n_bits, generator).to(device=device, dtype=dtype)
            terms = model.forward_terms(x)
            # per-level terms, then float64 on the CPU (some accelerators have no float64)
            log_priors = torch.stack(terms.level_log_priors, 1).cpu().double()
            logdets = torch.stack(terms.level_logdets, 1).cpu().double()
            shares = torch.tensor(latent_dims, dtype=torch.float64) * n_bits * ln2
            level_bpd = (-(log_priors + logdets) + shares) / (dims * ln2)
            log_prob = log_priors.sum(1) + logdets.sum(1)
            bpd = -(log_prob - dims * n_bits * ln2) / (dims * ln2)
            rms = torch.stack([z.flatten(1).pow(2).mean(1).sqrt() for z in terms.latents], 1).cpu().double()
            columns["bpd"].append(bpd.numpy())
            columns["level_bpd"].append(level_bpd.numpy())
            columns["logdet"].append(logdets.sum(1).numpy())
            columns["latent_rms"].append(rms.numpy())
            if codec is not None:
                columns["codec_bpd"].append(codec_bits_per_dim(images, n_bits, codec))
            seen += images.shape[0]
            bar.update(images.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    if seen == 0:
        raise GlowflowError(f"the {desc} loader yielded no images")
    levels = len(latent_dims)
    stats = {
        "bpd": np.concatenate(columns["bpd"]),
        "level_bpd": np.concatenate(columns["level_bpd"]).reshape(-1, levels),
        "logdet": np.concatenate(columns["logdet"]),
        "latent_rms": np.concatenate(columns["latent_rms"]).reshape(-1, levels),
    }
    if codec is not None:
        stats["codec_bpd"] = np.concatenate(columns["codec_bpd"])
    return stats


# ----------------------------------------------------------------------------- training reference


DOS_STATISTICS = ("level_bpd", "codec_bpd")
"""The statistics the density of states uses by default (groups of :func:`statistic_columns`)."""
STATISTIC_GROUPS = ("level_bpd", "logdet", "latent_rms", "codec_bpd", "bpd")


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


def dos_features(stats: Mapping[str, np.ndarray],
                 statistics: Sequence[str] = DOS_STATISTICS) -> Tuple[List[str], np.ndarray]:
    """The statistics the density of states is fitted on: names and an (N, d) matrix.

    ``statistics`` are groups of :func:`statistic_columns`, in this order: ``level_bpd`` (one
    column per level), ``logdet``, ``latent_rms`` (one per level), ``codec_bpd`` (taken only when
    ``stats`` has it), ``bpd``. The default, each level's bits/dim and the codec's bits/dim: the
    levels sum to the total bits/dim, and the codec's bits say how complex the image is, which
    the model's bits confound with how typical it is (Serra et al., 2020); jointly they separate
    what each alone does not. The whole-flow log-det and the latents' RMS were tried as further
    columns and left out: on the development sets (sklearn digits, flipped Fashion-MNIST) they
    lowered the AUROC (README, "Choosing the statistics"; ``benchmarks/dos_statistics.py``).
    """
    unknown = [g for g in statistics if g not in STATISTIC_GROUPS]
    if unknown:
        raise GlowflowError(f"unknown density-of-states statistic {unknown[0]!r}; "
                            f"choose from {', '.join(STATISTIC_GROUPS)}")
    columns = statistic_columns(stats)
    names = [name for group in STATISTIC_GROUPS if group in statistics
             for name in columns if re.sub(r"_\d+", "", name) == group]  # level_2_bpd -> level_bpd
    if not names:
        raise GlowflowError(f"the statistics have none of {list(statistics)}")
    return names, np.column_stack([columns[n] for n in names])


@dataclass
class Reference:
    """What the scores need from the training set, fitted by :func:`fit_reference`.

    key: the cache key the training statistics were computed under ('' when not cached).
    num_levels, n_train: levels of the model; training images used.
    bpd_mean, bpd_std: mean and standard deviation of the training bits/dim (typicality).
    dos_features: names of the density-of-states statistics (see :func:`dos_features`).
    dos_mean, dos_std (d,): their training mean and standard deviation (standardisation).
    dos_log_weights (k,), dos_means (k, d), dos_precision_cholesky (k, d, d): the Gaussian
    mixture fitted on the standardised statistics (``precision = P P^T`` per component).
    """

    key: str
    num_levels: int
    n_train: int
    bpd_mean: float
    bpd_std: float
    dos_features: Tuple[str, ...]
    dos_mean: np.ndarray
    dos_std: np.ndarray
    dos_log_weights: np.ndarray
    dos_means: np.ndarray
    dos_precision_cholesky: np.ndarray


DOS_COMPONENTS = 8


def fit_reference(train_stats: Mapping[str, np.ndarray], key: str = "", max_dos_points: int = 60_000,
                  seed: int = 0, components: int = DOS_COMPONENTS,
                  statistics: Sequence[str] = DOS_STATISTICS) -> Reference:
    """Fit the training-set reference from :func:`compute_statistics` of the training images.

    Typicality: the mean (and std) of the training bits/dim.

    Density of states: the ``statistics`` of :func:`dos_features` (by default each level's
    bits/dim, and the codec's bits/dim when the statistics have it) are standardised with their
    training mean and std, and a full-covariance Gaussian mixture of ``components`` components
    (scikit-learn's ``GaussianMixture``, ``reg_covar=1e-6``, seeded) is fitted on up to
    ``max_dos_points`` training images. A joint density matters: on Fashion-MNIST a product of per-statistic
    densities missed most of what separates outliers, which lies in how the statistics move
    together (a level's bits/dim against the others' and against the image's complexity).
    """
    from sklearn.mixture import GaussianMixture

    bpd = np.asarray(train_stats["bpd"], dtype=np.float64)
    names, matrix = dos_features(train_stats, statistics)
    finite = np.isfinite(matrix).all(1) & np.isfinite(bpd)
    if finite.sum() < 2 * matrix.shape[1] + 2:
        raise GlowflowError("fitting the outlier reference needs more training images with finite statistics "
                            f"(have {int(finite.sum())})")
    if not finite.all():
        warnings.warn(f"{int((~finite).sum())} training image(s) with non-finite statistics left out of "
                      f"the outlier reference", RuntimeWarning, stacklevel=2)
    matrix, bpd_f = matrix[finite], bpd[finite]
    mean = matrix.mean(0)
    std = matrix.std(0)
    std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    points = (matrix - mean) / std
    if points.shape[0] > max_dos_points:
        keep = np.random.default_rng(seed).choice(points.shape[0], max_dos_points, replace=False)
        points = points[np.sort(keep)]
    components = max(1, min(components, points.shape[0] // (2 * points.shape[1] + 2)))
    mixture = GaussianMixture(components, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(points)
    return Reference(
        key=key, num_levels=int(np.asarray(train_stats["level_bpd"]).shape[1]), n_train=int(bpd_f.size),
        bpd_mean=float(bpd_f.mean()), bpd_std=float(bpd_f.std()), dos_features=tuple(names),
        dos_mean=mean, dos_std=std, dos_log_weights=np.log(mixture.weights_),
        dos_means=mixture.means_, dos_precision_cholesky=mixture.precisions_cholesky_,
    )


def dos_log_density(reference: Reference, stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """Log-density (N,) of each image's standardised statistics under the reference's mixture."""
    from scipy.special import logsumexp

    columns = statistic_columns(stats)
    missing = [n for n in reference.dos_features if n not in columns]
    if missing == ["codec_bpd"]:
        raise GlowflowError("the outlier reference was fitted with the codec's bits/dim: compute the "
                            "statistics with the same codec (compute_statistics(..., codec=...))")
    if missing:
        raise GlowflowError(f"the statistics lack {missing} of the reference's {list(reference.dos_features)} "
                            f"(a model with another number of levels?)")
    matrix = np.column_stack([columns[n] for n in reference.dos_features])
    z = (matrix - reference.dos_mean) / reference.dos_std
    d = z.shape[1]
    per_component = []
    for log_w, mu, chol in zip(reference.dos_log_weights, reference.dos_means, reference.dos_precision_cholesky):
        y = (z - mu) @ chol
        log_det = np.log(np.diagonal(chol)).sum()
        per_component.append(log_w + log_det - 0.5 * (d * math.log(2 * math.pi) + (y * y).sum(1)))
    return logsumexp(np.stack(per_component), axis=0)


def save_reference(path: str, reference: Reference) -> None:
    """Write ``reference`` to ``path`` as a .npz of plain arrays (no pickle), atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    arrays = dict(
        format=np.array(REFERENCE_FORMAT), key=np.array(reference.key),
        num_levels=np.array(reference.num_levels, dtype=np.int64), n_train=np.array(reference.n_train, dtype=np.int64),
        bpd_mean=np.array(reference.bpd_mean), bpd_std=np.array(reference.bpd_std),
        dos_features=np.array(list(reference.dos_features), dtype=str),
        dos_mean=reference.dos_mean, dos_std=reference.dos_std, dos_log_weights=reference.dos_log_weights,
        dos_means=reference.dos_means, dos_precision_cholesky=reference.dos_precision_cholesky,
    )
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_reference(path: str) -> Reference:
    """Read a reference written by :func:`save_reference` (``np.load(allow_pickle=False)``).

    Raises :class:`GlowflowError` when the file is missing, unreadable or of another format.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["format"]) != REFERENCE_FORMAT:
                raise GlowflowError(f"{path} is not a {REFERENCE_FORMAT} file")
            return Reference(
                key=str(data["key"]), num_levels=int(data["num_levels"]), n_train=int(data["n_train"]),
                bpd_mean=float(data["bpd_mean"]), bpd_std=float(data["bpd_std"]),
                dos_features=tuple(str(s) for s in data["dos_features"]),
                dos_mean=np.array(data["dos_mean"]), dos_std=np.array(data["dos_std"]),
                dos_log_weights=np.array(data["dos_log_weights"]), dos_means=np.array(data["dos_means"]),
                dos_precision_cholesky=np.array(data["dos_precision_cholesky"]),
            )
    except GlowflowError:
        raise
    except FileNotFoundError:
        raise GlowflowError(f"no outlier reference at {path}") from None
    except Exception as exc:  # zipfile / KeyError / ValueError from a damaged file
        raise GlowflowError(f"cannot read the outlier reference {path}: {exc}") from None


def model_fingerprint(model) -> str:
    """SHA-256 of the model's configuration and every tensor of its state dict (names, dtypes,
    shapes, bytes): changes whenever the checkpoint's weights or architecture do."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def reference_key(model, n_bits: int, dataset: str, seed: int = 0, max_images: Optional[int] = None,
                  codec: Optional[str] = "png") -> str:
    """The cache key of a training reference: JSON of the model fingerprint, n_bits, the training
    dataset's name, the noise seed, the image cap and the codec. A cached reference is reused only
    when its key is identical, so a changed checkpoint (weights or architecture), bit depth,
    dataset, seed, cap or codec recomputes it. (Changed *contents* under the same dataset name
    are not detected.)"""
    return json.dumps({"format": REFERENCE_FORMAT, "model_sha256": model_fingerprint(model), "n_bits": int(n_bits),
                       "dataset": str(dataset), "seed": int(seed), "max_images": max_images, "codec": codec},
                      sort_keys=True)


def reference_cache_path_for(checkpoint_path: str, dataset: str, n_bits: int) -> str:
    """Where the command line caches a checkpoint's training reference: beside the checkpoint,
    ``<checkpoint stem>.ood_reference_<dataset>_<n_bits>bit.npz``."""
    stem = os.path.splitext(os.path.abspath(checkpoint_path))[0]
    return f"{stem}.ood_reference_{dataset_slug(dataset)}_{int(n_bits)}bit.npz"


# ----------------------------------------------------------------------------- scores


def outlier_scores(stats: Mapping[str, np.ndarray], reference: Reference,
                   background_stats: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Every outlier score (N,) from :func:`compute_statistics` output; higher = more outlying.

    * ``nll``: ``bpd``.
    * ``complexity``: ``bpd - codec_bpd`` (Serra et al., 2020; their S(x) with the sign making
      outliers high). Present when ``stats`` has ``codec_bpd``.
    * ``typicality``: ``|bpd - reference.bpd_mean|`` (Nalisnick et al., 2019b, per sample).
    * ``level_<i>_bpd`` for i = 1..L: the level contributions of :func:`compute_statistics`.
    * ``hierarchy_ratio`` (L >= 2): ``bpd - level_1_bpd = sum_{i >= 2} level_<i>_bpd``, i.e.
      ``-log2(p(x) / p_1(x)) / D`` with ``p_1`` the level-1 factor of the likelihood (prior of the
      first split latent times the first level's Jacobian). Schirrmeister et al. (2020) show that
      the likelihood of natural images is dominated by local, low-level features that any
      natural-image dataset shares and that Glow captures mainly at its early scales; they
      score with the final scale's contribution alone (``level_<L>_bpd`` here) or with a
      likelihood ratio to a model of a more general distribution. This score applies the ratio
      idea inside one model: the level-1 factor stands in for the general (local) model, so
      only the finest scale is subtracted and every coarser level is kept; for L = 2 it
      coincides with the final-scale score.
    * ``dos``: ``-log`` density of the statistics under the reference (Morningstar et al., 2021).
    * ``likelihood_ratio`` (when ``background_stats`` is given): ``bpd - background bpd``
      = ``-(log p_model(x) - log p_background(x)) / (D ln 2)`` (Ren et al., 2019); both models
      must see the same n_bits and image size, so the discretisation constants cancel.
    """
    bpd = np.asarray(stats["bpd"], dtype=np.float64)
    level_bpd = np.asarray(stats["level_bpd"], dtype=np.float64)
    if level_bpd.shape[1] != reference.num_levels:
        raise GlowflowError(f"statistics have {level_bpd.shape[1]} levels, the reference {reference.num_levels}")
    scores: Dict[str, np.ndarray] = {"nll": bpd}
    if "codec_bpd" in stats:
        scores["complexity"] = bpd - np.asarray(stats["codec_bpd"], dtype=np.float64)
    scores["typicality"] = np.abs(bpd - reference.bpd_mean)
    for i in range(level_bpd.shape[1]):
        scores[f"level_{i + 1}_bpd"] = level_bpd[:, i]
    if level_bpd.shape[1] >= 2:
        scores["hierarchy_ratio"] = bpd - level_bpd[:, 0]
    scores["dos"] = -dos_log_density(reference, stats)
    if background_stats is not None:
        bg = np.asarray(background_stats["bpd"], dtype=np.float64)
        if bg.shape != bpd.shape:
            raise GlowflowError(f"background statistics cover {bg.size} images, the model's {bpd.size}")
        scores["likelihood_ratio"] = bpd - bg
    return scores


def score_definition(name: str) -> str:
    """One-line definition of a score name from :func:`outlier_scores`."""
    match = re.fullmatch(r"level_(\d+)_bpd", name)
    if match:
        return f"bits/dim contributed by level {match.group(1)}'s latents (Schirrmeister et al., 2020)"
    return SCORE_DEFINITIONS[name]


# ----------------------------------------------------------------------------- report


def format_table(report: Mapping) -> str:
    """The printed table of one report: score | AUROC | AUPR-in | AUPR-out | FPR95."""
    bpd = report["bits_per_dim"]
    lines = [
        f"Outlier detection: {report['in_dataset']} (in, n={report['n_in']}, {bpd['in']:.4f} bits/dim) vs "
        f"{report['out_dataset']} (out, n={report['n_out']}, {bpd['out']:.4f} bits/dim)",
        f"{'score':<18} {'AUROC':>7} {'AUPR-in':>8} {'AUPR-out':>9} {'FPR95':>7}",
    ]
    for name, m in report["scores"].items():
        lines.append(f"{name:<18} {m['auroc']:>7.4f} {m['aupr_in']:>8.4f} {m['aupr_out']:>9.4f} {m['fpr95']:>7.4f}")
    return "\n".join(lines)


def format_summary(reports: Mapping[str, Mapping]) -> str:
    """AUROC of every score (rows) against every outlier set (columns), and each set's bits/dim;
    the best score of each column is marked with ``*``."""
    names = list(reports)
    scores = list(next(iter(reports.values()))["scores"])
    width = max(12, *(len(n) + 1 for n in names))
    in_name = next(iter(reports.values()))["in_dataset"]
    lines = [f"AUROC, {in_name} (in) against each outlier set",
             f"{'score':<18}" + "".join(f"{n:>{width}}" for n in names)]
    best = {}
    for n in names:
        values = {k: reports[n]["scores"][k]["auroc"] for k in scores if reports[n]["scores"][k]["auroc"] is not None}
        best[n] = max(values, key=values.get) if values else None
    for k in scores:
        cells = []
        for n in names:
            v = reports[n]["scores"][k]["auroc"]
            cells.append(f"{'-' if v is None else f'{v:.4f}' + ('*' if best[n] == k else ' '):>{width}}")
        lines.append(f"{k:<18}" + "".join(cells))
    lines.append(f"{'bits/dim in/out':<18}" + "".join(
        f"{reports[n]['bits_per_dim']['in']:.2f}/{reports[n]['bits_per_dim']['out']:.2f} ".rjust(width) for n in names))
    return "\n".join(lines)


def _figure(n_panels: int, cols: int = 4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(n_panels / cols))
    cols = min(cols, max(1, n_panels))
    fig = Figure(figsize=(3.6 * cols, 2.9 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]
    return fig, axes


def _iqr(v: np.ndarray) -> float:
    q75, q25 = np.percentile(v, [75, 25])
    return float(q75 - q25)


def save_histograms(path: str, scores_in: Mapping[str, np.ndarray], scores_out: Mapping[str, np.ndarray],
                    in_name: str, out_name: str, metrics: Optional[Mapping] = None) -> None:
    """One panel per score: histograms of the in-distribution and outlier scores (Agg, PNG).

    Bars are the fraction of each set per bin. The bins span the 0.5-99.5 percentiles of both
    sets together; values beyond are counted in the edge bins, so one far-off outlier cannot
    squash the rest. When the two sets live on very different scales (the range exceeds 200
    times the smaller interquartile range), the x axis is symmetric-log (linear within that
    interquartile range of zero) with bins evenly spaced on it."""
    names = list(scores_in)
    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        a, b = _clean_pair(scores_in[name], scores_out[name])
        lo, hi = np.percentile(np.concatenate([a, b]), [0.5, 99.5])
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        scale = min(_iqr(a), _iqr(b))
        if scale <= 0:
            scale = (hi - lo) / 1000.0
        if hi - lo > 200 * scale:
            # bins even in t(v) = sign(v) log1p(|v| / scale), close to matplotlib's symlog
            t = lambda v: np.sign(v) * np.log1p(np.abs(v) / scale)
            u = np.linspace(t(lo), t(hi), 41)
            bins = np.sign(u) * np.expm1(np.abs(u)) * scale
            ax.set_xscale("symlog", linthresh=scale)
        else:
            bins = np.linspace(lo, hi, 41)
        ax.hist(np.clip(a, lo, hi), bins=bins, weights=np.full(a.size, 1.0 / a.size), alpha=0.55,
                label=f"{in_name} (in)")
        ax.hist(np.clip(b, lo, hi), bins=bins, weights=np.full(b.size, 1.0 / b.size), alpha=0.55,
                label=f"{out_name} (out)")
        title = name if metrics is None else f"{name}  AUROC {metrics[name]['auroc']:.3f}"
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    if axes:
        axes[0].legend(fontsize=7)
        axes[0].set_ylabel("fraction of images", fontsize=8)
    fig.suptitle(f"Outlier scores (higher = more outlying): {in_name} vs {out_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def save_roc_curves(path: str, scores_in: Mapping[str, np.ndarray], scores_out: Mapping[str, np.ndarray],
                    in_name: str, out_name: str) -> None:
    """The ROC curves of every score on one axis (outliers positive), AUROC in the legend (Agg, PNG)."""
    from sklearn.metrics import roc_curve, roc_auc_score

    fig, (ax,) = _figure(1, cols=1)
    fig.set_size_inches(6.5, 6.0)
    for name in scores_in:
        a, b = _clean_pair(scores_in[name], scores_out[name])
        y = np.concatenate([np.zeros(a.size), np.ones(b.size)])
        s = np.concatenate([a, b])
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(y, s):.3f})", linewidth=1.2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.6)
    ax.set_xlabel("false-positive rate (in-distribution flagged)")
    ax.set_ylabel("true-positive rate (outliers flagged)")
    ax.set_title(f"ROC: {in_name} (in) vs {out_name} (out)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def _json_float(v: float) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


def _mean(a: np.ndarray) -> Optional[float]:
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return _json_float(a.mean()) if a.size else None


def _write_json(path: str, payload) -> None:
    """``payload`` as indented JSON at ``path``, written to a temporary file and renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _reference(model, n_bits, train_loader, in_name, reference_cache_path, device, seed, max_images,
               progress, codec) -> Tuple[Reference, bool]:
    key = reference_key(model, n_bits, in_name, seed, max_images, codec)
    if reference_cache_path is not None and os.path.exists(reference_cache_path):
        try:
            cached = load_reference(reference_cache_path)
        except GlowflowError as exc:
            print(f"ignoring the outlier reference cache: {exc}")
        else:
            if cached.key == key:
                print(f"reusing the training statistics cached in {reference_cache_path}")
                return cached, True
            print(f"the cached training statistics in {reference_cache_path} are for another "
                  f"checkpoint or settings; recomputing")
    if train_loader is None:
        raise GlowflowError("outlier detection needs the training images (no valid cached reference)")
    train_stats = compute_statistics(model, train_loader, n_bits, device, seed, max_images, codec=codec,
                                     desc=f"{in_name} train", progress=progress)
    reference = fit_reference(train_stats, key=key, seed=seed)
    if reference_cache_path is not None:
        save_reference(reference_cache_path, reference)
        print(f"wrote {reference_cache_path}")
    return reference, False


def run_outlier_detection(
    model,
    n_bits: int,
    in_test_loader: Iterable,
    train_loader: Optional[Iterable],
    out_loaders: Mapping[str, Iterable],
    output_dir: str,
    in_name: str,
    reference_cache_path: Optional[str] = None,
    background_model=None,
    device=None,
    max_images: Optional[int] = None,
    codec: str = "png",
    seed: int = 0,
    progress: bool = True,
) -> Dict[str, dict]:
    """Every score, metric, table, JSON report and figure for one model and several outlier sets.

    ``model`` (and ``background_model``) are trained :class:`glowflow.Glow` models already on
    ``device`` (default: wherever each model's parameters are); the background model must have
    been trained at the same ``n_bits``. Loaders yield ``(images in [0, 1], labels)``.
    ``train_loader`` (the in-distribution training set, read in a fixed order) provides the
    typicality and density-of-states reference; with ``reference_cache_path`` that reference is
    loaded from there when its key (:func:`reference_key`) matches, and otherwise computed and
    written there (``train_loader`` may then be None once a valid cache exists). If the model
    fits its training images visibly better than its test images, pass a held-out
    in-distribution split (not the one in ``in_test_loader``) as ``train_loader`` instead, so
    that typicality and the density of states see the bits/dim of unseen images.
    ``max_images`` caps every loader.

    For each ``out_name, loader`` in ``out_loaders`` this prints a table
    (:func:`format_table`) and writes, in ``output_dir`` (file names use the datasets' base names):

    * ``ood_<in>_vs_<out>.json``: ``{"scores": {name: {"auroc", "aupr_in", "aupr_out", "fpr95"}},
      "in_dataset", "out_dataset", "n_in", "n_out", "n_bits", "codec", "bits_per_dim": {"in", "out"},
      ["background_bits_per_dim": {"in", "out"}], "reference": {...}, "score_definitions": {...},
      "files": {...}}``;
    * ``ood_<in>_vs_<out>_histograms.png``: one panel per score, in vs out;
    * ``ood_<in>_vs_<out>_roc.png``: the ROC curves of all scores.

    With several outlier sets, an AUROC table of every score against every set is printed last
    (:func:`format_summary`) and written as ``ood_<in>_summary.json``
    (``{"in_dataset", "auroc": {out: {score: auroc}}, "reports": {out: json path}}``).

    Returns ``{out_name: report}`` (each report as written to its JSON).
    """
    if background_model is not None:
        if tuple(background_model.config.image_shape) != tuple(model.config.image_shape):
            raise GlowflowError(f"the background model is for images of shape {background_model.config.image_shape}, "
                                f"the model for {model.config.image_shape}")
    if not out_loaders:
        raise GlowflowError("outlier detection needs at least one outlier dataset (--out_dataset)")
    os.makedirs(output_dir, exist_ok=True)
    description = codec_description(codec)
    reference, reused = _reference(model, n_bits, train_loader, in_name, reference_cache_path, device, seed,
                                   max_images, progress, codec)

    def stats_of(loader, name):
        s = compute_statistics(model, loader, n_bits, device, seed, max_images, codec=codec, desc=name,
                               progress=progress)
        bg = None
        if background_model is not None:
            bg = compute_statistics(background_model, loader, n_bits, device, seed, max_images, codec=None,
                                    desc=f"{name} (background)", progress=progress)
            if bg["bpd"].shape != s["bpd"].shape:
                raise GlowflowError(f"the {name} loader gave {s['bpd'].size} images to the model and "
                                    f"{bg['bpd'].size} to the background model; it must be deterministic")
        return s, bg

    in_stats, in_bg = stats_of(in_test_loader, f"{in_name} test")
    in_scores = outlier_scores(in_stats, reference, in_bg)
    reports: Dict[str, dict] = {}
    for out_name, loader in out_loaders.items():
        out_stats, out_bg = stats_of(loader, out_name)
        out_scores = outlier_scores(out_stats, reference, out_bg)
        metrics = {name: outlier_metrics(in_scores[name], out_scores[name]) for name in in_scores}
        stem = f"ood_{dataset_slug(in_name)}_vs_{dataset_slug(out_name)}"
        files = {
            "json": os.path.join(output_dir, f"{stem}.json"),
            "histograms": os.path.join(output_dir, f"{stem}_histograms.png"),
            "roc": os.path.join(output_dir, f"{stem}_roc.png"),
        }
        report = {
            "in_dataset": in_name,
            "out_dataset": out_name,
            "n_in": int(in_stats["bpd"].size),
            "n_out": int(out_stats["bpd"].size),
            "n_bits": int(n_bits),
            "codec": description,
            "bits_per_dim": {"in": _mean(in_stats["bpd"]), "out": _mean(out_stats["bpd"])},
            "scores": {name: {k: _json_float(v) for k, v in m.items()} for name, m in metrics.items()},
            "score_definitions": {name: score_definition(name) for name in metrics},
            "reference": {"n_train": reference.n_train, "train_bits_per_dim_mean": reference.bpd_mean,
                          "train_bits_per_dim_std": reference.bpd_std, "cache": reference_cache_path,
                          "reused_cache": reused},
            "files": files,
        }
        if in_bg is not None:
            report["background_bits_per_dim"] = {"in": _mean(in_bg["bpd"]), "out": _mean(out_bg["bpd"])}
        print(format_table(report))
        _write_json(files["json"], report)
        save_histograms(files["histograms"], in_scores, out_scores, in_name, out_name, metrics)
        save_roc_curves(files["roc"], in_scores, out_scores, in_name, out_name)
        for path in files.values():
            print(f"wrote {path}")
        reports[out_name] = report
    if len(reports) > 1:
        summary_path = os.path.join(output_dir, f"ood_{dataset_slug(in_name)}_summary.json")
        summary = {"in_dataset": in_name, "auroc": {out: {k: m["auroc"] for k, m in r["scores"].items()}
                                                     for out, r in reports.items()},
                   "reports": {out: r["files"]["json"] for out, r in reports.items()}}
        _write_json(summary_path, summary)
        print()
        print(format_summary(reports))
        print(f"wrote {summary_path}")
    return reports


# ----------------------------------------------------------------------------- the command


def run_outlier_detection_command(run: RunConfig, dataset: Optional[str] = None) -> Dict[str, dict]:
    """``glowflow --outlier_detection``: the model from ``run.checkpoint`` alone, the in-distribution
    ``dataset`` (default: the one the checkpoint was trained on) against every ``run.out_dataset``.

    Outlier sets of another shape are converted to the model's (:func:`glowflow.data.match_shape`);
    the synthetic development sets are generated at the model's size.
    """
    from glowflow import data as data_module
    from glowflow.checkpoint import Checkpoint, check_image_shape
    from glowflow.runtime import resolve_device

    device = resolve_device(run.device)
    checkpoint = Checkpoint.read(run.checkpoint)
    model = checkpoint.load_model(device)
    n_bits = model.config.n_bits
    in_name = dataset or checkpoint.dataset or run.dataset
    image_size = checkpoint.image_size if in_name == checkpoint.dataset else None
    shape = tuple(model.config.image_shape)
    divisor = 2 ** model.config.L
    test_set = data_module.load_dataset(in_name, "test", run.data_root, image_size, divisor=divisor)
    check_image_shape(model, test_set.info.image_shape, run.checkpoint, in_name)
    train_set = data_module.load_dataset(in_name, "train", run.data_root, image_size, divisor=divisor)
    background = None
    if run.background_checkpoint:
        background = Checkpoint.read(run.background_checkpoint).load_model(device)
        if background.config.n_bits != n_bits:
            raise GlowflowError(f"the background model was trained at n_bits {background.config.n_bits}, "
                                f"the model at {n_bits}: the likelihood ratio needs the same bit depth")

    def loader(ds):
        return data_module.make_loader(ds, batch_size=run.eval_batch_size, shuffle=False,
                                       num_workers=run.num_workers, seed=run.seed, device=device)

    out_loaders = {}
    for name in run.out_dataset:
        size = shape[1] if name in data_module.SYNTHETIC else None
        out_set = data_module.load_dataset(name, "test", run.data_root, size)
        out_loaders[name] = loader(data_module.match_shape(out_set, shape))
    output_dir = run.output_dir or RunConfig(dataset=checkpoint.dataset or in_name).resolved_output_dir()
    return run_outlier_detection(
        model, n_bits, loader(test_set), loader(train_set), out_loaders, output_dir, in_name,
        reference_cache_path=reference_cache_path_for(run.checkpoint, in_name, n_bits),
        background_model=background, device=device, max_images=run.max_eval_images, seed=run.eval_seed)
