"""The ``reference`` recipe of benchmarks/time_to_quality.py: y0ast/Glow-PyTorch's Glow (its own
model.py, imported from a local checkout given by ``--reference PATH``; nothing of it is copied
here) trained by a minimal loop that does what its train.py does at its published defaults, on
glowflow's default architecture (the seed's), so that only the training differs.

What train.py does, and where (y0ast/Glow-PyTorch at 13c7b01):

* Adamax, ``lr`` 5e-4 (train.py:409), ``weight_decay=5e-5`` (train.py:145);
* a linear warm-up over ``warmup`` = 5 epochs (train.py:412-416): ``LambdaLR`` with
  ``min(1, (epoch + 1) / warmup)`` (train.py:147-148), stepped once per *epoch*, after the epoch's
  evaluation (train.py:274-278), so epoch e (from 0) runs at lr * min(1, (e + 1) / 5);
* batch 64 (train.py:395), shuffled, the incomplete last batch dropped (train.py:115-121);
* ActNorm initialised by one forward pass, in training mode, of the first ``n_init_batches`` = 8
  batches (512 images) of a pass over the training loader (train.py:251-272, 419-423);
* pixels ``x * 255 / 256 - 0.5`` (datasets.py:11-22), dequantised inside the model with
  U(0, 1/256) noise from torch's global generator, minus ``D log 256`` nats
  (utils.py:19-35, model.py:274); the loss is the batch's mean bits/dim (model.py:286-287,
  train.py:41-49, 162-165); no gradient clipping (train.py:376-388: 0 = off);
* its defaults that are *not* used here: the architecture (hidden 512, K 32, LU-decomposed 1x1
  convolutions, a learned top prior; train.py:326-366: glowflow's defaults instead, hidden 64, K 8,
  L 3, no LU, no learned top), data augmentation (on by default, train.py:319-324: random
  translations of 0.1 and, for CIFAR-10, left-right flips, datasets.py:47-51; not done here, as
  for glowflow's recipes), 6 loader workers (train.py:390-392: none here; the batches come from
  the same in-memory tensors as glowflow's) and seed 0 (train.py:451, which train.py:23 turns into
  a random seed: ``seed or random.randint(...)``; ``--seed`` here).

``torch.qr``, which the reference's InvertibleConv1x1 calls (modules.py:318), is gone from current
PyTorch; while the model is built it is stood in for by ``torch.linalg.qr(A, mode="reduced")``, the
replacement PyTorch's own error message names (same Q).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Dict, Tuple

import torch
from torch.utils.data import DataLoader

from glowflow.config import GlowConfig
from glowflow.data.resolve import load_dataset
from glowflow.pixels import bits_per_dim

DEFAULTS = {
    "optimizer": "Adamax",
    "lr": 5e-4,
    "weight_decay": 5e-5,
    "warmup_epochs": 5,
    "warmup_stepped": "per epoch",
    "batch_size": 64,
    "n_init_batches": 8,
    "max_grad_clip": 0.0,
    "max_grad_norm": 0.0,
}
SOURCES = {
    "optimizer, weight_decay": "train.py:145",
    "warm-up schedule": "train.py:147-148 (LambdaLR min(1, (epoch + 1) / warmup)), stepped per epoch at train.py:278",
    "lr": "train.py:409 (default 5e-4)",
    "warmup": "train.py:412-416 (default 5 epochs)",
    "batch_size": "train.py:395 (default 64); shuffle, drop_last: train.py:115-121",
    "n_init_batches": "train.py:419-423 (default 8); ActNorm init: train.py:251-272",
    "dequantisation and loss": "datasets.py:11-22, utils.py:19-35, model.py:271-289, train.py:41-49 and 162-165",
    "not used: architecture defaults": "train.py:326-366 (hidden 512, K 32, LU-decomposed, learn_top)",
    "not used: augmentation": "train.py:319-324, datasets.py:47-51",
    "sampling": "model.py:246-251 (32 samples per call), 291-297; modules.py:25-29",
}
SAMPLES_PER_CALL = 32  # the reference's prior draws this many when no input is given (model.py:250-251)


@contextlib.contextmanager
def _torch_qr_stand_in():
    """``torch.qr`` as ``torch.linalg.qr`` while the reference builds its 1x1 convolutions."""
    original = torch.qr

    def qr(matrix, some=True):
        return torch.linalg.qr(matrix, mode="reduced" if some else "complete")

    try:
        original(torch.eye(2))
        works = True
    except RuntimeError:
        works = False
    if works:
        yield False
        return
    torch.qr = qr
    try:
        yield True
    finally:
        torch.qr = original


def import_reference(path: str):
    """(its model module, its modules module, its datasets module), imported from the checkout
    at ``path``; each must come from there (not from another module of the same name)."""
    path = os.path.abspath(path)
    if not os.path.isfile(os.path.join(path, "model.py")):
        raise SystemExit(f"--reference {path}: no model.py there (a checkout of y0ast/Glow-PyTorch is expected)")
    sys.path.insert(0, path)
    try:
        loaded = [importlib.import_module(name) for name in ("model", "modules", "datasets", "utils")]
    finally:
        sys.path.remove(path)
    for module in loaded:
        if os.path.dirname(os.path.abspath(module.__file__)) != path:
            raise SystemExit(f"the reference's {module.__name__} came from {module.__file__}, not from {path}")
    return loaded[0], loaded[1], loaded[2]


class ReferenceRecipe:
    """The reference model and its training loop, one optimizer step at a time (:meth:`step`)."""

    name = "reference"

    def __init__(self, path: str, config: GlowConfig, seed: int, data_root: str):
        self.path, self.config, self.seed, self.data_root = path, config, seed, data_root
        self.steps, self.nonfinite_losses = 0, 0
        self.qr_stand_in = False

    def describe(self) -> Dict:
        return {
            "what": "y0ast/Glow-PyTorch's model.py and a loop mirroring its train.py",
            "checkout": os.path.abspath(self.path),
            "defaults": DEFAULTS,
            "sources": SOURCES,
            "torch_qr_stand_in": self.qr_stand_in,
            "data": "the same 60000 training images as glowflow's recipes, in-memory, no workers, no augmentation",
        }

    def setup(self) -> None:
        """Read the training split, build the model and optimizer, and initialise ActNorm, as
        train.py does."""
        model_module, self.modules, self.datasets = import_reference(self.path)
        c, h, w = self.config.image_shape
        train_set = load_dataset("fashionmnist", "train", data_root=self.data_root, image_size=h, download=False)
        torch.manual_seed(self.seed)
        with _torch_qr_stand_in() as self.qr_stand_in:
            self.model = model_module.Glow(
                (h, w, c),
                self.config.hidden_channels,
                self.config.K,
                self.config.L,
                self.config.actnorm_scale,
                self.config.flow_permutation,
                self.config.flow_coupling,
                self.config.LU_decomposed,
                10,
                self.config.learn_top,
                False,
            )
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=DEFAULTS["lr"], weight_decay=5e-5)
        warmup = DEFAULTS["warmup_epochs"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda=lambda epoch: min(1.0, (epoch + 1) / warmup)
        )
        generator = torch.Generator().manual_seed(self.seed)
        self.loader = DataLoader(
            train_set, batch_size=DEFAULTS["batch_size"], shuffle=True, drop_last=True, generator=generator
        )
        self.steps_per_epoch = len(self.loader)
        self._initialise_actnorm()
        self.batches = iter(self.loader)

    @torch.no_grad()
    def _initialise_actnorm(self) -> None:
        self.model.train()
        batches = []
        for images, _ in self.loader:
            batches.append(self.datasets.preprocess(images))
            if len(batches) == DEFAULTS["n_init_batches"]:
                break
        self.model(torch.cat(batches), None)

    def step(self) -> None:
        """One optimizer step; at the end of an epoch the scheduler's step (train.py:278)."""
        try:
            images, _ = next(self.batches)
        except StopIteration:
            self.scheduler.step()
            self.batches = iter(self.loader)
            images, _ = next(self.batches)
        self.model.train()
        self.optimizer.zero_grad()
        _, nll, _ = self.model(self.datasets.preprocess(images), None)
        loss = torch.mean(nll)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        if not torch.isfinite(loss).item():  # ignite's RunningAverage reads the loss every step too
            self.nonfinite_losses += 1

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def before_evaluation(self):
        """Nothing to prepare (glowflow's recipes refit their priors here)."""
        return None

    def after_evaluation(self, earlier) -> None:
        """Nothing to put back."""

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density (nats per image) of dequantised model-space ``x``: the reference's own flow and
        prior (model.py:271-279) without its internal noise, so every recipe sees the same noise."""
        self.model.eval()
        z, logdet = self.model.flow(x, logdet=torch.zeros(x.shape[0]), reverse=False)
        mean, logs = self.model.prior(x, None)
        return logdet + self.modules.gaussian_likelihood(mean, logs, z)

    @torch.no_grad()
    def check_log_prob(self, x: torch.Tensor, seed: int = 12345) -> float:
        """max |bits/dim of the reference's own forward (its noise) - bits/dim of :meth:`log_prob` on
        the same noise| over the images ``x`` (model space, not dequantised)."""
        self.model.eval()
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        noise = torch.zeros_like(x).uniform_(0, 1.0 / 256)  # what uniform_binning_correction draws (utils.py:32)
        torch.manual_seed(seed)
        _, own, _ = self.model(x.clone(), None)
        ours = bits_per_dim(self.log_prob(x + noise), x[0].numel(), 8)
        torch.set_rng_state(state)
        return float((own - ours).abs().max())

    @torch.no_grad()
    def sample(self, n: int, temperature: float) -> Tuple[torch.Tensor, Dict]:
        """``n`` model-space samples from the reference's own reverse pass, 32 per call, as they come
        (non-finite values included). A call that raises (its reverse pass reached a split prior
        with a non-finite std: ``torch.normal`` refuses it) is counted and drawn again, like
        glowflow's redraws of failed samples; after 50 such calls the samples are NaN."""
        self.model.eval()
        parts, drawn, failed_calls = [], 0, 0
        while drawn < n:
            try:
                parts.append(self.model(temperature=temperature, reverse=True).detach())
            except RuntimeError:
                failed_calls += 1
                if failed_calls < 50:
                    continue
                parts.append(torch.full((SAMPLES_PER_CALL, *self.config.image_shape), float("nan")))
            drawn += parts[-1].shape[0]
        info = {
            "sampler": f"model(temperature=T, reverse=True), {SAMPLES_PER_CALL} a call",
            "failed_calls": failed_calls,
            "failed_calls_meaning": "calls that raised (a non-finite std in a split prior), drawn again",
        }
        return torch.cat(parts)[:n], info

    def close(self) -> None:
        self.model = self.optimizer = self.loader = self.batches = None
