"""The priors' fitted Gaussians in training (``--prior_fit``, glowflow/latent_fit.py):
:class:`PriorFitting`, the fixed training images they are fitted on and the refit at the end of
every epoch, before the evaluation that chooses the checkpoint.

The images are --prior_fit_images of the training split spread evenly over it, dequantised with
noise seeded by --eval_seed: the same at every epoch, after a resume and in every process under
torchrun (each process fits on all of them, so all hold the same fit). Training continues with the
new fit. The trained weights are fitted to their own latents and, with --ema, the averaged weights
to theirs. A run stopped between epoch ends (--max_steps) evaluates and saves its best checkpoint
fitted, then puts the earlier fit back before writing last.pt, so a resumed run trains exactly as
an uninterrupted one.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Subset

from glowflow.config import RunConfig
from glowflow.data import make_loader
from glowflow.model import Glow
from glowflow.training.evaluation import dequantised_batches


class PriorFitting:
    """The fitting images of a run (``train_set``'s, for ``model``'s fitted priors; nothing to do
    when it has none) and the refit of a list of models."""

    def __init__(self, train_set, model: Glow, run: RunConfig, device, show: bool = True):
        self.run, self.device, self.show = run, device, show
        self.loader = None
        if model.fitted_gaussians():
            n = min(run.prior_fit_images, len(train_set))
            indices = sorted({int(i * len(train_set) / n) for i in range(n)})
            self.loader = make_loader(
                Subset(train_set, indices),
                batch_size=run.eval_batch_size,
                shuffle=False,
                num_workers=run.num_workers,
                seed=run.seed,
                device=device,
            )

    def refit(self, models: Sequence[Glow]) -> List[List[Dict[str, torch.Tensor]]]:
        """Fit every model's priors to its own latents of the fitting images (a model whose
        latents are not finite keeps its fit: the evaluation that follows finds it); returns the
        fits they held before, for :meth:`put_back`."""
        before = [[_copy(g.state_dict()) for g in model.fitted_gaussians()] for model in models]
        if self.loader is not None:
            for model in models:
                batches = dequantised_batches(
                    self.loader,
                    model.config.n_bits,
                    self.device,
                    self.run.eval_seed,
                    use_labels=model.config.y_condition,
                    desc="fitting the priors",
                    show=self.show,
                )
                model.fit_priors(batches)
        return before

    @staticmethod
    def put_back(models: Sequence[Glow], before: Optional[List[List[Dict[str, torch.Tensor]]]]) -> None:
        """Give ``models`` back the fits :meth:`refit` returned."""
        for model, fits in zip(models, before or ()):
            for gaussian, state in zip(model.fitted_gaussians(), fits):
                gaussian.load_state_dict(state)
            model.clear_fast_cache()


def _copy(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in state.items()}
