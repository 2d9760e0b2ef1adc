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
                    statistics (nll, level contributions, log-det, latent norms), of the test
                    image's statistics ("Density of States", Morningstar et al., 2021).
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

import io
import math
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from glowflow.errors import GlowflowError

REFERENCE_FORMAT = "glowflow-ood-reference-v1"
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


# ----------------------------------------------------------------------------- background-model inputs


def perturb(images01: torch.Tensor, rate: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Ren et al. (2019)'s input perturbation for training a background model.

    ``images01``: images in [0, 1] on the 8-bit grid (uint8 / 255, as ToTensor gives), any shape.
    Every value (each channel of each pixel) is independently selected with probability ``rate``
    and replaced by one of the *other* 255 8-bit values, uniformly (as in the paper, the
    substitute always differs from the original). Returns a new tensor on the same grid, same
    dtype and device. ``generator`` (on any device) makes the draw reproducible.
    """
    if not 0.0 <= rate <= 1.0:
        raise GlowflowError(f"perturbation rate must be in [0, 1], got {rate}")
    gen_device = generator.device if generator is not None else images01.device
    pixels = torch.round(images01.detach() * 255.0).to(torch.int64)
    select = torch.rand(images01.shape, generator=generator, device=gen_device).to(images01.device) < rate
    offset = torch.randint(1, 256, images01.shape, generator=generator, device=gen_device).to(images01.device)
    new = torch.where(select, (pixels + offset) % 256, pixels)
    return (new.to(images01.dtype) / 255.0)


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
