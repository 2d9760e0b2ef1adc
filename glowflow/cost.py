"""What a training run will cost, said before it starts: :class:`RunCost`.

One line at the start of training gives the model's parameters, the images and optimizer steps per
epoch, the steps the run will take (and whether ``--n_epochs`` or ``--max_steps`` ends it), and a
rough estimate of the memory of one batch, set against the memory the device has free. A run whose
estimate exceeds that memory is refused in one line before any work (ActNorm's initialisation, the
first epoch), instead of running for minutes and failing with an out-of-memory error.

The estimates come from the configuration alone (no forward pass): the activations a flow step
keeps for the backward pass, per image, are about ``(6 c + 2 hidden) h w`` floats for a step on a
``c x h x w`` tensor with ``hidden`` channels in its coupling network (measured on the fast path,
tests/training/test_training_runs.py checks it against the tensors autograd saves), ``c h w`` with
``--grad_checkpoint`` plus one step's full set recomputed in the backward pass. Evaluation and
ActNorm's initialisation (``max(actnorm_init_images, batch_size)`` images in one pass) keep no
activations, but hold their whole batch and one step's coupling network at once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional

from glowflow.config import GlowConfig
from glowflow.errors import GlowflowError

FLOAT_BYTES = 4


def _levels(config: GlowConfig) -> List[tuple]:
    """(channels, pixels) of the tensor each level's flow steps run on."""
    c, h, w = config.image_shape
    levels = []
    for level in range(config.L):
        c, h, w = c * 4, h // 2, w // 2
        levels.append((c, h * w))
        if level < config.L - 1:
            c //= 2
    return levels


def training_bytes_per_image(config: GlowConfig, grad_checkpoint: bool = False) -> int:
    """Estimated bytes of activations one training image keeps until (and needs during) the
    backward pass."""
    hidden = config.hidden_channels
    levels = _levels(config)
    step_full = [(6 * c + 2 * hidden) * hw for c, hw in levels]  # what one flow step keeps
    split = sum(2 * c * hw for c, hw in levels)  # the split priors and the top prior
    if grad_checkpoint:  # only each step's input, and one step recomputed at a time
        kept = sum(config.K * c * hw for c, hw in levels) + max(step_full)
    else:
        kept = sum(config.K * s for s in step_full)
    backward = max((2 * hidden + 2 * c) * hw for c, hw in levels)  # gradients of one step's activations
    dims = config.image_shape[0] * config.image_shape[1] * config.image_shape[2]
    return FLOAT_BYTES * (kept + split + backward + 2 * dims)


def inference_bytes_per_image(config: GlowConfig) -> int:
    """Estimated bytes one image needs in a pass without gradients (evaluation, ActNorm's
    initialisation): the image, its noise and latents, and one coupling network's activations."""
    c, h, w = config.image_shape
    c1, hw1 = _levels(config)[0]
    return FLOAT_BYTES * (4 * c * h * w + (3 * c1 + 3 * config.hidden_channels) * hw1)


def available_memory(device) -> Optional[int]:
    """Bytes free for this process on ``device`` (a torch.device): CUDA's free memory, the
    system's available memory for the CPU; None where unknown (MPS, or no /proc/meminfo)."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as handle:
                for line in handle:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            return None
    return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


@dataclasses.dataclass
class RunCost:
    """The cost of a training run, from its configuration: see the module's docstring."""

    parameters: int
    images_per_epoch: int
    steps_per_epoch: int
    n_epochs: int
    max_steps: Optional[int]
    start_step: int  # the step a resumed run starts from (0 for a new run)
    batch: int  # images per optimizer step on this process
    init_images: int  # images of ActNorm's initialisation (0: resumed, nothing to initialise)
    eval_batch: int
    train_bytes: int  # activations of one training batch
    init_bytes: int
    eval_bytes: int
    state_bytes: int  # weights, gradients, optimizer state (and the averaged weights with --ema; the kept copy)
    available: Optional[int]  # free memory of the device, None where unknown
    device: str

    @classmethod
    def estimate(
        cls,
        config: GlowConfig,
        parameters: int,
        images_per_epoch: int,
        steps_per_epoch: int,
        run,
        start_step: int,
        batch: int,
        init_images: int,
        device,
        processes_sharing_memory: int = 1,
    ) -> RunCost:
        """The cost of ``run`` (a RunConfig) training a Glow of ``config`` on ``device``: batches of
        ``batch`` images on this process; ``processes_sharing_memory`` processes of the run share
        the device's memory (CPU runs under torchrun), so each gets its share."""
        # weights, gradients, Adamax's two moments, the fast path's folded copy of the weights; the
        # average; the copy of weights, moments (and average) that --max_rollbacks keeps
        averages = 1 if run.ema > 0 else 0
        state_copies = 5 + averages + ((3 + averages) if run.max_rollbacks > 0 else 0)
        available = available_memory(device)
        if available is not None:
            available //= max(1, processes_sharing_memory)
        return cls(
            parameters=parameters,
            images_per_epoch=images_per_epoch,
            steps_per_epoch=steps_per_epoch,
            n_epochs=run.n_epochs,
            max_steps=run.max_steps,
            start_step=start_step,
            batch=batch,
            init_images=init_images,
            eval_batch=run.eval_batch_size,
            train_bytes=batch * training_bytes_per_image(config, run.grad_checkpoint),
            init_bytes=init_images * inference_bytes_per_image(config),
            eval_bytes=run.eval_batch_size * inference_bytes_per_image(config),
            state_bytes=state_copies * FLOAT_BYTES * parameters,
            available=available,
            device=str(device),
        )

    @property
    def epoch_steps_end(self) -> int:
        """The step at which --n_epochs ends the run."""
        return self.n_epochs * self.steps_per_epoch

    @property
    def end_step(self) -> int:
        return self.epoch_steps_end if self.max_steps is None else min(self.max_steps, self.epoch_steps_end)

    def largest(self) -> tuple:
        """(bytes, what, advice) of the pass that needs the most memory."""
        smaller = "a smaller --image_size or fewer --hidden_channels"
        passes = [
            (
                self.state_bytes + self.train_bytes,
                f"a training batch of {self.batch} (about {format_bytes(self.train_bytes / max(1, self.batch))} "
                f"an image)",
                f"a smaller --batch_size, --grad_checkpoint, or {smaller}",
            ),
            (self.state_bytes + self.eval_bytes, f"an evaluation batch of {self.eval_batch}", smaller),
        ]
        if self.init_images:
            init = f"ActNorm's initialisation on {self.init_images} images at once"
            passes.append((self.state_bytes + self.init_bytes, init, smaller))
        return max(passes)

    def describe(self) -> str:
        """The one line printed when training starts."""
        steps = self.end_step - self.start_step
        if self.max_steps is not None and self.max_steps < self.epoch_steps_end:
            ends = f"--max_steps {self.max_steps} ends it before epoch {self.n_epochs}"
        else:
            ends = f"{self.n_epochs} epoch(s)"
        memory = (
            f"about {format_bytes(self.train_bytes)} of activations per batch of {self.batch} "
            f"(+ {format_bytes(self.state_bytes)} weights and optimizer state"
        )
        if self.init_images:
            memory += f"; ActNorm's initialisation {format_bytes(self.init_bytes)}"
        memory += f"; evaluation {format_bytes(self.eval_bytes)})"
        free = f"{format_bytes(self.available)} free" if self.available is not None else "free memory unknown"
        return (
            f"cost: {self.parameters:,} parameters, {self.images_per_epoch} images = "
            f"{self.steps_per_epoch} step(s) per epoch, {steps} step(s) to go ({ends}), {memory}, "
            f"{free} on {self.device}"
        )

    def epochs_end_first(self) -> Optional[str]:
        """The note when --n_epochs ends the run before --max_steps is reached, else None."""
        if self.max_steps is None or self.max_steps <= self.epoch_steps_end:
            return None
        return (
            f"note: {self.n_epochs} epoch(s) of {self.steps_per_epoch} step(s) end the run at step "
            f"{self.epoch_steps_end}, before --max_steps {self.max_steps} (raise --n_epochs to train longer)"
        )

    def fits(self) -> bool:
        """Whether the largest pass fits in the free memory (True where that is unknown)."""
        return self.available is None or self.largest()[0] <= self.available

    def check_memory(self) -> None:
        """GlowflowError (one line) when the largest pass is estimated to need more memory than
        the device has free."""
        if self.fits():
            return
        needed, what, advice = self.largest()
        raise GlowflowError(
            f"this run would need about {format_bytes(needed)} for {what}, more than the "
            f"{format_bytes(self.available)} free on {self.device}: use {advice}"
        )
