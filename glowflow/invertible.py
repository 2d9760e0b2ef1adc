"""The check, on reading stored weights, that every permutation layer of the flow is invertible.

A damaged or edited file can hold weights that are finite and of the right shapes and still break
the flow: a shuffle order that is not a permutation (sampling indexes out of range, or silently
merges channels), or a singular 1x1 convolution (its log-determinant is -inf or garbage, its
inverse does not exist). :func:`flow_problem` finds these in a state dict by the names
glowflow/layers.py gives the tensors of a flow step's ``permute`` layer:

- ``Permute`` (``reverse`` / ``shuffle``): ``indices`` must be a permutation of 0..C-1 and
  ``inverse_indices`` its inverse;
- ``InvConv1x1``: the plain ``weight`` (C, C) must be invertible in the precision the model
  computes in (float64 for float64 weights, else float32: condition number below 1 / machine
  epsilon); the LU form's fixed parts must be what they are made as (``p`` a permutation matrix,
  ``sign_s`` signs of +-1, ``lower_mask`` the strictly lower triangle of ones, ``eye`` the
  identity) and its diagonal ``exp(log_s)`` nonzero and finite in that precision: then the matrix
  is invertible by construction.

It also checks the priors' fitted Gaussians (glowflow/latent_fit.py's ``LatentGaussian``, tensors
``...gaussian.shift`` and ``...gaussian.scale``): the scale must be lower triangular (or a vector)
with a positive diagonal in the model's precision, so that every log-density and draw is finite.

It is cheap (the matrices are at most a few hundred channels across) and runs on the CPU in
float64. Both readers call it: glowflow/pretrained.py for model folders, glowflow/reader.py for
checkpoint files; each turns the problem into its one-line :class:`GlowflowError`.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional

import torch

_GAUSSIAN = re.compile(r"^(.*gaussian)\.(shift|scale|fitted)$")
_PERMUTE = re.compile(r"^(.*\.permute)\.(indices|inverse_indices|weight|p|sign_s|lower_mask|eye|lower|upper|log_s)$")


def flow_problem(weights: Mapping[str, torch.Tensor]) -> Optional[str]:
    """What makes a flow step's permutation layer in ``weights`` (a state dict whose names, shapes
    and finiteness are already checked) not invertible, or a prior's fitted Gaussian not a density,
    in a few words naming the tensor; or None."""
    layers = _grouped(weights, _PERMUTE)
    gaussians = _grouped(weights, _GAUSSIAN)
    for prefix, parts in gaussians.items():
        problem = _gaussian_problem(prefix, parts)
        if problem is not None:
            return problem
    for prefix, parts in layers.items():
        if "indices" in parts:
            problem = _permutation_problem(prefix, parts)
        elif "weight" in parts:
            problem = _matrix_problem(f"{prefix}.weight", parts["weight"])
        elif "log_s" in parts:
            problem = _lu_problem(prefix, parts)
        else:
            problem = None
        if problem is not None:
            return problem
    return None


def _grouped(weights: Mapping[str, torch.Tensor], pattern: re.Pattern) -> Dict[str, Dict[str, torch.Tensor]]:
    """{layer prefix: {part: tensor}} of the tensors whose names ``pattern`` matches (its groups:
    the prefix, the part)."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, value in weights.items():
        found = pattern.match(name)
        if found is not None:
            groups.setdefault(found.group(1), {})[found.group(2)] = value
    return groups


def _permutation_problem(prefix: str, parts: Mapping[str, torch.Tensor]) -> Optional[str]:
    indices = parts["indices"]
    if indices.is_floating_point() or indices.dim() != 1:
        return f"{prefix}.indices is not a list of channel numbers"
    c = indices.numel()
    if not torch.equal(torch.sort(indices.long()).values, torch.arange(c)):
        return f"{prefix}.indices is not a permutation of the channels 0..{c - 1}"
    inverse = parts.get("inverse_indices")
    if inverse is not None and (
        inverse.is_floating_point()
        or inverse.shape != indices.shape
        or not torch.equal(inverse.long()[indices.long()], torch.arange(c))
    ):
        return f"{prefix}.inverse_indices is not the inverse of {prefix}.indices"
    return None


def _computed_in(dtype: torch.dtype) -> torch.dtype:
    """The type a model computes in with weights stored in ``dtype``: float64 stays, anything else
    (half precision, which the readers widen) is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _matrix_problem(name: str, matrix: torch.Tensor) -> Optional[str]:
    """Whether the square ``matrix`` is singular for the computations of the model it is loaded into."""
    if not matrix.is_floating_point():
        return f"{name} is not a floating-point matrix"
    dtype = _computed_in(matrix.dtype)
    values = matrix.detach().to("cpu", torch.float64)
    if values.dim() != 2 or values.shape[0] != values.shape[1]:
        return f"{name} is not a square matrix"
    if not bool(torch.isfinite(values).all()):
        return f"{name} holds non-finite values"
    singular = torch.linalg.svdvals(values)
    largest, smallest = float(singular.max()), float(singular.min())
    limit = 1.0 / torch.finfo(dtype).eps
    if not smallest > 0 or largest / smallest >= limit:
        return f"{name} is a singular 1x1 convolution (not invertible in {str(dtype).replace('torch.', '')})"
    return None


def _lu_problem(prefix: str, parts: Mapping[str, torch.Tensor]) -> Optional[str]:
    needed = ("p", "sign_s", "lower_mask", "eye", "lower", "upper", "log_s")
    absent = [part for part in needed if part not in parts]
    if absent:
        return f"{prefix} lacks {prefix}.{absent[0]}"
    log_s = parts["log_s"]
    c = log_s.numel()
    as64 = {part: parts[part].detach().to("cpu", torch.float64) for part in needed}
    p = as64["p"]
    if not (
        bool(((p == 0) | (p == 1)).all())
        and torch.equal(p.sum(0), torch.ones(c))
        and torch.equal(p.sum(1), torch.ones(c))
    ):
        return f"{prefix}.p is not a permutation matrix"
    if not bool((as64["sign_s"].abs() == 1).all()):
        return f"{prefix}.sign_s holds values other than +1 and -1 (the 1x1 convolution is singular)"
    if not torch.equal(as64["lower_mask"], torch.tril(torch.ones(c, c, dtype=torch.float64), -1)):
        return f"{prefix}.lower_mask is not the strictly lower triangle of ones"
    if not torch.equal(as64["eye"], torch.eye(c, dtype=torch.float64)):
        return f"{prefix}.eye is not the identity matrix"
    s = torch.exp(log_s.detach().to("cpu", _computed_in(log_s.dtype)))  # in the precision the layer computes in
    if not bool(torch.isfinite(s).all()) or not bool((s != 0).all()):
        return f"{prefix}.log_s gives a zero or infinite diagonal (the 1x1 convolution is singular)"
    return None  # P L (U + diag(s)): a permutation, a unit lower and an upper triangle with a nonzero diagonal


def _gaussian_problem(prefix: str, parts: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Whether a prior's fitted Gaussian has a scale that is not lower triangular (a matrix) or
    whose diagonal is not positive and finite (with its logarithm) in the model's precision."""
    if "shift" not in parts or "scale" not in parts:
        return f"{prefix} lacks its shift or scale"
    scale = parts["scale"].detach().to("cpu", _computed_in(parts["scale"].dtype))
    if scale.dim() == 2:
        if scale.shape[0] != scale.shape[1] or not torch.equal(scale, torch.tril(scale)):
            return f"{prefix}.scale is not a lower triangular matrix"
        diagonal = torch.diagonal(scale)
    else:
        diagonal = scale
    if not bool((diagonal > 0).all()) or not bool(torch.isfinite(torch.log(diagonal)).all()):
        return f"{prefix}.scale has a diagonal entry that is not positive (the prior is not a density)"
    if not bool(torch.isfinite(parts["shift"]).all()) or not bool(torch.isfinite(scale).all()):
        return f"{prefix} holds non-finite values"
    return None
