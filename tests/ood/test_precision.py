"""--ood_precision: the detector's model passes in float32 or under bf16 autocast ("auto": bf16
where the device computes it natively), checked names, and bf16 statistics within bf16's precision
of the float32 ones."""

import numpy as np
import pytest

from glowflow import GlowflowError
from glowflow.config import OOD_PRECISIONS, RunConfig
from glowflow.ood import OutlierDetector, compute_statistics
from glowflow.ood.command import command_settings
from glowflow.runtime import native_bf16, resolve_precision

BF16_EPS = 2.0**-7
"""bfloat16's machine epsilon (8 significant bits)."""


def test_precision_names_resolve_and_bad_ones_are_refused():
    assert OOD_PRECISIONS == ("auto", "float32", "bf16")
    assert resolve_precision("float32", "cpu") == "float32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "float32")
    assert native_bf16("meta") is False
    with pytest.raises(GlowflowError, match="ood_precision must be one of"):
        resolve_precision("half", "cpu")
    with pytest.raises(GlowflowError, match="ood_precision bf16 runs on cpu and cuda, not mps"):
        resolve_precision("bf16", "mps")
    assert resolve_precision("auto", "mps") == "float32"
    with pytest.raises(GlowflowError, match="ood_precision"):
        RunConfig(ood_precision="half").validate()


def test_bf16_statistics_stay_within_bf16_precision_of_float32(trained):
    """bf16 autocast runs the coupling networks in bf16 (the statistics change: it did run) while
    log-determinants and priors stay float32: each image's bits/dim moves by at most bf16's
    epsilon times the size of the terms it sums (|log prior| + |logdet|, in bits/dim)."""
    model, data = trained
    loader = [(data["test"][:200], None)]
    exact = compute_statistics(model, loader, codec=None, progress=False, transforms=("vflip",))
    half = compute_statistics(model, loader, codec=None, progress=False, transforms=("vflip",), precision="bf16")
    dims = np.prod(model.config.image_shape) * np.log(2.0)
    size = (np.abs(exact["logdet"]) + np.abs(exact["bpd"] * dims + exact["logdet"])) / dims
    assert not np.array_equal(exact["bpd"], half["bpd"])
    assert np.all(np.abs(half["bpd"] - exact["bpd"]) <= BF16_EPS * size)
    assert np.all(np.abs(half["transform_bpd"] - exact["transform_bpd"])[:, 0] <= 2 * BF16_EPS * size)


def test_precision_reaches_the_detector_of_both_commands_and_keeps_the_fit(trained):
    model, data = trained
    default = command_settings(RunConfig(checkpoint="/runs/a.pt"), "smooth", 8, "cpu", "/o").detector(model)
    assert default.precision == "auto" and default.settings.precision == "auto"
    exact = RunConfig(checkpoint="/runs/a.pt", ood_precision="float32")
    assert command_settings(exact, "smooth", 8, "cpu", "/o").detector(model).settings.precision == "float32"
    with pytest.raises(GlowflowError, match="ood_precision must be one of"):
        OutlierDetector(model, precision="half")
    detector = OutlierDetector(model, precision="float32", fit_images=300).fit(data["train"][:300])
    before = detector.score_samples(data["test"][:50])
    detector.set_params(precision="bf16")
    assert detector.threshold_ is not None  # still fitted: no refit for a change of precision
    after = detector.score_samples(data["test"][:50])
    assert np.isfinite(after).all() and not np.array_equal(before, after)
    assert np.corrcoef(before, after)[0, 1] > 0.99
