"""Every invertible layer, plain and fused, through one shared checker: reverse(forward(x)) == x,
the log-det is (N,) and equals the brute-force Jacobian's log|det| in float64, and the fused
layer computes what the plain one does."""

import pytest
import torch
from torch.autograd.functional import jacobian

from glowflow.fused import FusedFlowStep, FusionCache
from glowflow.layers import ActNorm, Coupling, FlowStep, InvConv1x1, Permute, squeeze2x, unsqueeze2x

SHAPE = (4, 3, 3)  # (C, H, W): a 36x36 Jacobian


def check_flow_layer(layer, x, atol=1e-10):
    """The shared checker: ``layer.forward(x) -> (y, logdet (N,))``, ``layer.reverse(y) == x``,
    and per sample ``logdet == log|det dy/dx|`` from the brute-force Jacobian."""
    with torch.no_grad():
        y, logdet = layer.forward(x)
        assert y.shape == x.shape and logdet.shape == (x.shape[0],)
        assert (layer.reverse(y.clone()) - x).abs().max().item() < atol
    for i in range(x.shape[0]):

        def f(v):
            return layer.forward(v.view(1, *x.shape[1:]))[0].reshape(-1)

        jac = jacobian(f, x[i].reshape(-1))
        expected = torch.linalg.slogdet(jac)[1]
        assert abs(logdet[i].item() - expected.item()) < 1e-8, (type(layer).__name__, logdet[i].item(), expected.item())
    return y, logdet


def _perturbed(module, seed=0, scale=0.2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _data(n=3, seed=1):
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.5


def _initialised(module, x):
    module.train()
    with torch.no_grad():
        module(x)  # ActNorm's data-dependent init
    return _perturbed(module).eval()


LAYERS = {
    "actnorm": lambda: ActNorm(SHAPE[0]),
    "invconv": lambda: InvConv1x1(SHAPE[0]),
    "invconv-LU": lambda: InvConv1x1(SHAPE[0], LU_decomposed=True),
    "shuffle": lambda: Permute(SHAPE[0], shuffle=True),
    "reverse": lambda: Permute(SHAPE[0], shuffle=False),
    "coupling-additive": lambda: Coupling(SHAPE[0], 8, affine=False, actnorm_scale=1.0),
    "coupling-affine": lambda: Coupling(SHAPE[0], 8, affine=True, actnorm_scale=1.0),
    "coupling-affine-scale-min": lambda: Coupling(SHAPE[0], 8, affine=True, actnorm_scale=1.0, scale_min=0.3),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_layer(name):
    torch.manual_seed(0)
    x = _data()
    layer = _initialised(LAYERS[name]().double(), x)
    check_flow_layer(layer, x)


STEPS = [
    (perm, coupling, lu)
    for perm in ("invconv", "shuffle", "reverse")
    for coupling in ("additive", "affine")
    for lu in ((False, True) if perm == "invconv" else (False,))
]


@pytest.mark.parametrize("perm,coupling,lu", STEPS)
def test_flow_step_plain_and_fused(perm, coupling, lu):
    torch.manual_seed(0)
    x = _data()
    step = _initialised(FlowStep(SHAPE[0], 8, 1.0, perm, coupling, lu).double(), x)
    y_plain, logdet_plain = check_flow_layer(step, x)
    fused = FusedFlowStep(step, FusionCache())
    y_fused, logdet_fused = check_flow_layer(fused, x)
    assert torch.allclose(y_fused, y_plain, atol=1e-12) and torch.allclose(logdet_fused, logdet_plain, atol=1e-10)


def test_bounded_coupling_scale_plain_and_fused():
    """coupling_scale_min: scale = s + (1 - s) sigmoid(raw + 2), never below s, the fused path equal."""
    torch.manual_seed(0)
    x = _data()
    step = _initialised(FlowStep(SHAPE[0], 8, 1.0, "invconv", "affine", False, coupling_scale_min=0.3).double(), x)
    with torch.no_grad():
        step.coupling.net[4].conv.bias.fill_(-30.0)  # raw far below -2: the paper's scale would be ~1e-13
        h, _ = step.permute(step.actnorm(x)[0])
        _, scale = step.coupling._shift_scale(h[:, : step.coupling.split])
    assert scale.min() >= 0.3 and scale.min() < 0.3 + 1e-9
    y_plain, logdet_plain = check_flow_layer(step, x)
    y_fused, logdet_fused = check_flow_layer(FusedFlowStep(step, FusionCache()), x)
    assert torch.allclose(y_fused, y_plain, atol=1e-12) and torch.allclose(logdet_fused, logdet_plain, atol=1e-10)


def test_fused_step_before_actnorm_init_runs_the_plain_step_and_initialises():
    torch.manual_seed(0)
    x = _data(8)
    step = FlowStep(SHAPE[0], 8, 1.0, "invconv", "affine", False).double().train()
    fused = FusedFlowStep(step, FusionCache())
    assert not fused.is_initialized()
    fused(x)
    assert fused.is_initialized() and bool(step.actnorm.initialized)


def test_squeeze_is_a_permutation_and_unsqueeze_inverts_it():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).view(2, 3, 4, 6)
    y = squeeze2x(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(torch.sort(y.flatten())[0], torch.sort(x.flatten())[0])
    assert torch.equal(unsqueeze2x(y), x)
