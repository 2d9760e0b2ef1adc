"""glowflow's recipes in benchmarks/time_to_quality.py: glowflow's own :class:`Trainer` (its model,
optimizer, learning-rate warm-up, ActNorm initialisation, per-step noise and non-finite guard),
driven one optimizer step at a time (:meth:`Trainer.train_step`, the step ``glowflow --train``
takes) so that the benchmark can stop the clock between any two steps. Of the Trainer's own
per-epoch work only the priors' refit (``--prior_fit``, glowflow/training/prior_fitting.py) runs,
at every epoch's end inside the clock, as in ``glowflow --train``; before an evaluation between
epoch ends the priors are refitted inside the clock (what a run stopped there saves) and the
earlier fit put back afterwards, outside it. Validation and test evaluation, checkpoints and
sample grids are not run: the benchmark evaluates every recipe alike, outside the clock.

Every recipe trains on the whole training split (``val_size=0``: the benchmark chooses no
checkpoint, and the reference trains on all 60000 images too); nothing else departs from the
recipe's flags.
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, Tuple

import torch

from glowflow.config import GlowConfig, RunConfig
from glowflow.training.trainer import Trainer

RECIPES: Dict[str, Dict] = {  # RunConfig flags; "architecture": GlowConfig fields
    # the seed's (GenerativeZoo's) defaults, which glowflow keeps: lr 2e-4, warm-up over 10 epochs,
    # batch 128, Adamax without weight decay
    "glowflow-seed": {},
    # README.md's flags for a CPU ("the flags a CPU run should use")
    "glowflow-cpu": {"lr": 1e-3, "warmup": 1},
    # the same with docs/training.md's headline Polyak averaging (not among the default recipes)
    "glowflow-cpu-ema": {"lr": 1e-3, "warmup": 1, "ema": 0.999},
    # the CPU flags with bf16 autocast of the coupling networks (--amp bf16): for a CPU that computes
    # bf16 natively (AVX-512 BF16, AMX); evaluated in float32 like every recipe
    "glowflow-cpu-bf16": {"lr": 1e-3, "warmup": 1, "amp": "bf16"},
    # the CPU flags with the paper's priors (--prior_fit none): what the fitted priors buy
    "glowflow-cpu-nofit": {"lr": 1e-3, "warmup": 1, "architecture": {"prior_fit": "none"}},
}


class GlowflowRecipe:
    """One glowflow recipe: a Trainer, one optimizer step at a time (:meth:`step`)."""

    def __init__(self, name: str, config: GlowConfig, seed: int, data_root: str, workdir: str):
        self.flags = {k: v for k, v in RECIPES[name].items() if k != "architecture"}
        config = GlowConfig(**{**config.to_dict(), **RECIPES[name].get("architecture", {})})
        self.name, self.config, self.seed, self.data_root, self.workdir = name, config, seed, data_root, workdir
        self.skipped, self.rollbacks = 0, 0

    def run_config(self, output_dir: str) -> RunConfig:
        return RunConfig(
            dataset="fashionmnist",
            data_root=self.data_root,
            image_size=self.config.image_shape[-1],
            seed=self.seed,
            device="cpu",
            no_wandb=True,
            sample_and_save_freq=0,
            val_size=0,
            output_dir=output_dir,
            **self.flags,
        )

    def describe(self) -> Dict:
        run = self.run_config("-")
        keys = ("lr", "warmup", "batch_size", "decay", "ema", "augment", "max_grad_clip", "max_grad_norm", "amp")
        settings = {key: getattr(run, key) for key in keys}
        settings.update(actnorm_init_images=run.actnorm_init_images, max_rollbacks=run.max_rollbacks, val_size=0)
        return {
            "what": "glowflow's Trainer.train_step, one optimizer step at a time",
            "flags": self.flags,
            "prior_fit": self.config.prior_fit,
            "settings": settings,
            "warmup_stepped": "per optimizer step",
        }

    def setup(self) -> None:
        """The Trainer: data, model, optimizer, ActNorm's initialisation (its output folder a
        temporary one, removed by :meth:`close`)."""
        self.folder = tempfile.TemporaryDirectory(prefix=f"ttq-{self.name}-", dir=self.workdir)
        self.trainer = Trainer(self.run_config(os.path.join(self.folder.name, "run")), self.config)
        self.batches = self._batches()

    def _batches(self):
        trainer = self.trainer
        while True:
            trainer.sampler.set_epoch(trainer.epoch)
            yield from trainer.train_loader
            trainer.prior_fitting.refit(self._models())  # the epoch's end, as --train does
            trainer.epoch += 1

    def _models(self):
        trainer = self.trainer
        return [trainer.model] + ([trainer.average.model] if trainer.average is not None else [])

    def before_evaluation(self):
        """Inside the clock: the priors refitted (what a run stopped here evaluates and saves);
        returns what :meth:`after_evaluation` puts back."""
        return self.trainer.prior_fitting.refit(self._models())  # at an epoch's end: the same fit again

    def after_evaluation(self, earlier) -> None:
        """Outside the clock: the fit training continues with, as an uninterrupted run."""
        if earlier is not None:
            self.trainer.prior_fitting.put_back(self._models(), earlier)

    def step(self) -> None:
        """One optimizer step; a non-finite one is rolled back as --train does (--max_rollbacks)."""
        trainer = self.trainer
        images, labels = next(self.batches)
        trainer.model.train()
        bpd = trainer.train_step(images, labels)
        trainer.step += 1  # batches consumed, as Trainer counts them
        if bpd is None:
            self.skipped += 1
            rollback = trainer.rollback
            if not (rollback.enabled and rollback.left):
                raise RuntimeError(f"{self.name}: non-finite step {trainer.step} and no rollback left")
            rollback.roll_back(trainer.step)
            self.rollbacks += 1

    @property
    def steps(self) -> int:
        return self.trainer.step

    @property
    def epochs(self) -> float:
        return self.trainer.step / self.trainer.steps_per_epoch

    @property
    def learning_rate(self) -> float:
        return self.trainer.learning_rate()

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density (nats per image) of dequantised model-space ``x``, by the evaluation model
        (the Polyak average with --ema)."""
        model = self.trainer.eval_model
        model.eval()
        return model.log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, temperature: float) -> Tuple[torch.Tensor, Dict]:
        """``n`` model-space samples by ``sample_with_report`` (samples that fail its check are
        redrawn) and what the report says."""
        model = self.trainer.eval_model
        model.eval()
        x, report = model.sample_with_report(n, temperature)
        return x, {
            "sampler": "Glow.sample_with_report (failed samples redrawn)",
            "first_draw_failures": report.first_draw_failures,
            "first_draw_nonfinite": sum(report.failed_nonfinite),
            "redrawn": report.redrawn,
            "left": report.left,
            "report": report.describe(),
        }

    def close(self) -> None:
        self.trainer.close()
        self.folder.cleanup()
