"""The top latent's prior and the classifier head's loss: :class:`TopPrior` (standard normal, learned
(``learn_top``) and/or class-conditional (``y_condition``); its mean and log-std, its log-density,
a draw from it) and :func:`classification_loss`. The split latents' priors are
glowflow/layers.py's ``SplitPrior``. The mathematics is stated in docs/math.md.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from glowflow.config import GlowConfig
from glowflow.fused import autocast_off, gaussian_log_density_sum
from glowflow.latent_fit import LatentGaussian, prior_draw, prior_log_density
from glowflow.layers import gaussian_log_density, sum_except_batch


def classification_loss(y_logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean classification loss of the head on the top latent.

    Single-label (``y`` integer classes (N,) or one-hot (N, K)): softmax cross-entropy.
    Multi-label (``y`` multi-hot (N, K)): binary cross-entropy on the logits.
    """
    if multilabel:
        return F.binary_cross_entropy_with_logits(y_logits, y.to(y_logits.dtype))
    if y.dim() == 2:
        y = y.argmax(dim=1)
    return F.cross_entropy(y_logits, y.long())


def plain_log_density_sum(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """(N,) Gaussian log-density summed over all but the batch dimension (the reference computation)."""
    return sum_except_batch(gaussian_log_density(x, mean, log_std))


class TopPrior:
    """The prior of the top latent (N, c, h, w), a view over the model's modules (``learned``: the
    ``learn_top`` ZeroConv2d or None; ``y_prior``: the class embedding ZeroLinear or None;
    ``gaussian``: the fitted :class:`glowflow.latent_fit.LatentGaussian` of the standardised top
    latent, or None), which stay registered on the model under their own names. Every method takes
    ``like``, a parameter of the model, for the device and floating-point type."""

    def __init__(
        self,
        config: GlowConfig,
        shape: Tuple[int, int, int],
        learned: Optional[nn.Module],
        y_prior: Optional[nn.Module],
        gaussian: Optional[LatentGaussian] = None,
    ):
        self.config, self.shape, self.learned, self.y_prior = config, shape, learned, y_prior
        self.gaussian = gaussian

    def condition(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Class labels (N,) integer, or one-/multi-hot (N, num_classes) -> float (N, num_classes)."""
        if y.dim() == 1 and not y.is_floating_point():
            return F.one_hot(y.long(), self.config.num_classes).to(dtype)
        return y.to(dtype)

    def mean_log_std(self, n: int, y: Optional[torch.Tensor], like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std, each (n, c, h, w); ``y`` conditions a class-conditional prior."""
        c, h, w = self.shape
        with autocast_off(like):  # priors stay in the parameters' precision under bf16 autocast
            params = torch.zeros(n, 2 * c, h, w, dtype=like.dtype, device=like.device)
            if self.learned is not None:
                params = self.learned(params)
            if self.y_prior is not None and y is not None:
                params = params + self.y_prior(self.condition(y, like.dtype))[:, :, None, None]
        return params[:, :c], params[:, c:]

    def log_density(self, z: torch.Tensor, y: Optional[torch.Tensor], like: torch.Tensor, fused: bool) -> torch.Tensor:
        """(N,) log-density of the top latent ``z``. A class-conditional prior without ``y``: the
        uniform mixture over classes (single-label, a normalised density) or the no-label prior
        (multi-label). ``fused``: the fast path's summed density, else the reference one."""
        n = z.shape[0]
        summed = gaussian_log_density_sum if fused else plain_log_density_sum

        def density(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
            return prior_log_density(summed(z, mean, log_std), self.gaussian, z, mean, log_std)

        if self.y_prior is None or y is not None:
            return density(z, *self.mean_log_std(n, y, like))
        if self.config.y_multilabel:
            no_label = torch.zeros(n, self.config.num_classes, device=z.device)
            return density(z, *self.mean_log_std(n, no_label, like))
        k = self.config.num_classes
        per_class = []
        for cls in range(k):
            mean, log_std = self.mean_log_std(n, torch.full((n,), cls, dtype=torch.long, device=z.device), like)
            per_class.append(density(z, mean, log_std))
        return torch.logsumexp(torch.stack(per_class), dim=0) - math.log(k)

    def draw(self, n: int, y: Optional[torch.Tensor], temperature: float, like: torch.Tensor) -> torch.Tensor:
        """``n`` top latents drawn with the std scaled by ``temperature``. A class-conditional prior
        without ``y`` draws classes uniformly (single-label) or takes no label (multi-label)."""
        if self.y_prior is not None and y is None:
            if self.config.y_multilabel:
                y = torch.zeros(n, self.config.num_classes, device=like.device)
            else:
                y = torch.randint(self.config.num_classes, (n,), device=like.device)
        mean, log_std = self.mean_log_std(n, y, like)
        return prior_draw(self.gaussian, mean, log_std, torch.randn_like(mean), temperature)

    def standardise(self, z: torch.Tensor, y: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The top latent standardised by the learned prior, (z - mean) / std (N, c, h, w): what
        the fitted Gaussian models (``y`` the true classes of a class-conditional prior)."""
        mean, log_std = self.mean_log_std(z.shape[0], y, like)
        return (z - mean) * torch.exp(-log_std)
