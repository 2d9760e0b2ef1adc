"""Where and how the computation runs: device choice, the torchrun process group, bf16 autocast,
torch.compile, and the switch to the plain (reference) computation.

* :func:`resolve_device` -- ``--device auto`` picks cuda, then mps, then cpu;
* :class:`Distributed` -- this process's rank in a torchrun job (rank 0 of 1 without torchrun);
* :func:`eager` -- runs a model through the plain layer-by-layer computation inside a block (the
  reference the fast path of glowflow/fused.py is tested against);
* :func:`compile_model` -- ``torch.compile`` with the checks it needs, for ``--compile``;
* :func:`autocast_context` -- bf16 autocast for ``--amp bf16``: on the fast path the coupling
  networks run in bf16 while the flow's own activations, every log-determinant and every prior
  stay float32;
* :func:`resolve_precision` -- ``--ood_precision auto``: bf16 where the device computes it natively.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from glowflow.config import AMP_CHOICES, OOD_PRECISIONS
from glowflow.errors import GlowflowError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, then mps, then cpu; otherwise the named device (checked)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GlowflowError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GlowflowError("--device cuda was asked for, but no CUDA GPU is available")
    return device


class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, device: torch.device):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _glow_of(model: nn.Module) -> nn.Module:
    """The Glow inside a DistributedDataParallel / torch.compile wrapper (or the model itself)."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            model = getattr(model, attr)
    return model


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` (a Glow, or a DDP/compiled wrapper of one) through the plain layer-by-layer
    computation inside the block; the previous setting is restored on exit.

        with glowflow.runtime.eager(model):
            reference = model.log_prob(x)
    """
    glow = _glow_of(model)
    previous = glow.fast
    glow.fast = False
    try:
        yield model
    finally:
        glow.fast = previous


def _cpp_compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_model(model: nn.Module, mode: Optional[str] = None, dynamic: bool = False) -> nn.Module:
    """``torch.compile(model)`` for the training loop's ``--compile``.

    ``model`` is the module the training step calls (the Glow, or its DistributedDataParallel
    wrapper); call this after the data-dependent ActNorm initialisation, because the compiled
    graph assumes initialised ActNorms. The first step compiles, which takes minutes; on a CPU it
    is no faster than the fast path afterwards (benchmarks/README.md), so it is meant for CUDA.
    Raises GlowflowError when compiling cannot work: ActNorm not yet initialised, or no C++
    compiler for the CPU backend.
    """
    glow = _glow_of(model)
    if hasattr(glow, "is_initialized") and not glow.is_initialized():
        raise GlowflowError("compile_model: initialise the model (ActNorm data-dependent init) before compiling it")
    device = next(glow.parameters()).device
    if device.type == "cpu" and _cpp_compiler() is None:
        raise GlowflowError(
            "--compile on CPU needs a C++ compiler (g++ or clang++; set CXX), and none was found; "
            "run without --compile (the fast path is already the default)"
        )
    if not hasattr(torch, "compile"):
        raise GlowflowError(f"--compile needs torch.compile (PyTorch >= 2.0); this is PyTorch {torch.__version__}")
    return torch.compile(model, mode=mode, dynamic=dynamic)


def autocast_context(device: Union[str, torch.device], amp: Optional[str] = "none"):
    """The context manager to run the training/evaluation forward pass under, for ``--amp``.

    ``amp`` 'none' (or None): a no-op context; 'auto': 'bf16' where :func:`native_bf16`, else
    'none'. 'bf16': ``torch.autocast(device_type, torch.bfloat16)`` on CUDA (needs a GPU with bf16
    support) or CPU. Keep ``loss.backward()`` and the optimizer step outside the context. bf16
    needs no gradient scaler. On the fast path the convolutions of the coupling networks run in
    bf16; the flow's activations, the 1x1 convolutions, every log-determinant and every prior stay
    float32; bits/dim then differs from float32 by more than the fast path's 1e-5 contract
    (measured in benchmarks/README.md).
    """
    amp = "none" if amp is None else str(amp).lower()
    if amp not in AMP_CHOICES:
        raise GlowflowError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "none"
    device_type = torch.device(device).type
    if amp == "none":
        return contextlib.nullcontext()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise GlowflowError("--amp bf16 on cuda was asked for, but no CUDA GPU is available")
        if not torch.cuda.is_bf16_supported():
            raise GlowflowError("--amp bf16: this GPU does not support bfloat16 (needs compute capability 8.0+)")
    elif device_type != "cpu":
        raise GlowflowError(f"--amp bf16 is supported on cuda and cpu, not {device_type}")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def native_bf16(device: Union[str, torch.device]) -> bool:
    """Whether ``device`` runs bf16 convolutions natively, where bf16 autocast is faster than
    float32: a CUDA GPU with bf16 support, or a CPU on which oneDNN runs bf16 (AVX-512 BF16, AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a PyTorch without the probe: float32
        return False


def resolve_precision(precision: str, device: Union[str, torch.device]) -> str:
    """``--ood_precision`` on ``device``: 'float32' or 'bf16' as given, 'auto' -> 'bf16' where
    :func:`native_bf16`, else 'float32'."""
    if precision not in OOD_PRECISIONS:
        raise GlowflowError(f"ood_precision must be one of {', '.join(OOD_PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "float32"
    if precision == "bf16" and torch.device(device).type not in ("cpu", "cuda"):
        raise GlowflowError(f"--ood_precision bf16 runs on cpu and cuda, not {torch.device(device).type}")
    return precision
