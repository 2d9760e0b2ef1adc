"""Weights that cannot be inverted are refused on reading, from a model folder and from a checkpoint
file alike, in one line naming the tensor: a shuffle or reverse order that is not a permutation (out
of range, repeated, an inverse that does not match), a singular plain 1x1 convolution, an LU one
whose fixed parts are not what they are made as or whose diagonal is zero; the shipped model and the
legacy checkpoints pass."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from glowflow import Glow
from glowflow.checkpoint import Checkpoint, save_checkpoint
from glowflow.cli import main
from glowflow.errors import GlowflowError
from glowflow.invertible import flow_problem
from glowflow.layers import FlowStep
from tests.helpers import architecture_combinations, combo_id, randomised_model
from tests.legacy.make_legacy import HERE, KINDS

STEP = "levels.0.1.permute"  # a flow step's permutation layer, as glowflow/layers.py names its tensors


def _combo(permutation, lu=False):
    return dict(
        flow_permutation=permutation, flow_coupling="affine", LU_decomposed=lu, learn_top=False, y_condition=False
    )


def _set(name, value):
    def change(weights):
        weights[f"{STEP}.{name}"] = value(weights[f"{STEP}.{name}"])

    return change


def _duplicate_row(w):
    w = w.clone()
    w[1] = w[0]
    return w


# (architecture, change of the state dict, a fragment of the message)
BROKEN = [
    ("shuffle", _set("indices", lambda t: t + 100), f"{STEP}.indices is not a permutation of the channels 0..15"),
    ("shuffle", _set("indices", torch.zeros_like), f"{STEP}.indices is not a permutation"),
    ("reverse", _set("indices", lambda t: -t - 1), f"{STEP}.indices is not a permutation"),
    ("shuffle", _set("inverse_indices", lambda t: t.flip(0)), f"{STEP}.inverse_indices is not the inverse"),
    ("invconv", _set("weight", torch.zeros_like), f"{STEP}.weight is a singular 1x1 convolution"),
    ("invconv", _set("weight", _duplicate_row), f"{STEP}.weight is a singular 1x1 convolution"),
    ("lu", _set("sign_s", lambda t: t * 0), f"{STEP}.sign_s holds values other than +1 and -1"),
    ("lu", _set("log_s", lambda t: t - 200), f"{STEP}.log_s gives a zero or infinite diagonal"),
    ("lu", _set("p", torch.zeros_like), f"{STEP}.p is not a permutation matrix"),
    ("lu", _set("lower_mask", torch.ones_like), f"{STEP}.lower_mask is not the strictly lower triangle"),
    ("lu", _set("eye", lambda t: 2 * t), f"{STEP}.eye is not the identity"),
]
IDS = [f"{b[0]}-{b[2].split(' ')[0].split('.')[-1]}-{i}" for i, b in enumerate(BROKEN)]


def _model(kind):
    combo = _combo("invconv", lu=True) if kind == "lu" else _combo(kind)
    return randomised_model((4, 8, 8), L=1, combo=combo, K=2).float()


@pytest.mark.parametrize("kind, change, fragment", BROKEN, ids=IDS)
def test_a_folder_whose_flow_cannot_be_inverted_is_one_line_exit_2(tmp_path, capsys, kind, change, fragment):
    folder = _model(kind).save_pretrained(str(tmp_path / "m"))
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    change(weights)
    save_file(weights, path)
    with pytest.raises(GlowflowError) as raised:
        Glow.from_pretrained(folder)
    assert fragment in str(raised.value) and len(str(raised.value).splitlines()) == 1, raised.value
    out = tmp_path / "out"
    code = main(["--sample", "--checkpoint", folder, "--n_samples", "2", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("glowflow: error:") and len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize("kind, change, fragment", BROKEN, ids=IDS)
def test_a_checkpoint_whose_flow_cannot_be_inverted_is_refused(tmp_path, kind, change, fragment):
    model = _model(kind)
    path = tmp_path / "crafted.pt"
    save_checkpoint(str(path), model)
    payload = torch.load(path, weights_only=True)
    change(payload["model"])
    torch.save(payload, path)
    with pytest.raises(GlowflowError) as raised:
        Checkpoint.read(str(path))
    assert fragment in str(raised.value) and len(str(raised.value).splitlines()) == 1, raised.value
    payload["raw_model"] = payload["model"]  # the trained weights of a run with --ema are checked too
    save_checkpoint(str(path), model, raw_model=payload["model"])
    with pytest.raises(GlowflowError, match="unusable raw"):
        Checkpoint.read(str(path))


@pytest.mark.parametrize("combo", list(architecture_combinations()), ids=combo_id)
def test_every_architecture_has_its_permutation_layers_checked(combo):
    """The check finds every flow step's permutation layer by its tensors' names: renaming them in
    glowflow/layers.py must fail here, not silently skip the check."""
    model = randomised_model((2, 8, 8), L=2, combo=combo).float()
    weights = model.state_dict()
    assert flow_problem(weights) is None
    steps = [name for name, module in model.named_modules() if isinstance(module, FlowStep)]
    assert len(steps) == 2 * 2
    part = {"invconv": "log_s" if combo["LU_decomposed"] else "weight"}.get(combo["flow_permutation"], "indices")
    for step in steps:
        broken = dict(weights)
        broken[f"{step}.permute.{part}"] = torch.zeros_like(weights[f"{step}.permute.{part}"]) + (
            -1000 if part == "log_s" else 0
        )
        assert flow_problem(broken) is not None, step


def test_an_ill_conditioned_but_invertible_convolution_passes():
    weight = torch.diag(torch.tensor([1.0, 1e-3, 1e3]))  # condition number 1e6 < 1 / float32 epsilon
    assert flow_problem({"levels.0.0.permute.weight": weight}) is None
    assert "singular" in flow_problem({"levels.0.0.permute.weight": torch.diag(torch.tensor([1.0, 1e-4, 1e4]))})
    assert flow_problem({"levels.0.0.permute.weight": torch.diag(torch.tensor([1.0, 1e-4, 1e4])).double()}) is None


@pytest.mark.parametrize("path", ["pretrained:fashionmnist"] + [os.path.join(HERE, f"{k}.pt") for k in sorted(KINDS)])
def test_the_shipped_model_and_the_legacy_checkpoints_pass(path):
    assert flow_problem(Checkpoint.read(path).payload["model"]) is None


def test_half_precision_weights_are_judged_in_the_float32_they_are_read_as():
    weight = torch.diag(torch.tensor([1.0, 1e-2, 1e2]))  # condition number 1e4 > 1 / float16 epsilon
    assert flow_problem({"levels.0.0.permute.weight": weight.half()}) is None
    assert flow_problem({"levels.0.0.permute.weight": weight.bfloat16()}) is None
