"""The model shipped in the package (glowflow/pretrained_models/fashionmnist, ``pretrained:fashionmnist``,
written by scripts/make_pretrained.py): it loads offline without torch.load, reproduces the bits/dim
its expected.json records, passes the checks of any model folder, states the same numbers in its
card, and its fitted outlier detector spares --outlier_detection and --score the training set."""

import hashlib
import json
import math
import os
import re
import socket
from fnmatch import fnmatch

import pytest
import torch

import glowflow
from glowflow import Glow, GlowConfig, data
from glowflow.checkpoint import Checkpoint
from glowflow.cli import main
from glowflow.errors import GlowflowError
from glowflow.ood import OutlierDetector
from glowflow.ood.cache import detector_cache_path_for
from glowflow.ood.reference import model_fingerprint
from glowflow.pretrained import SHIPPED, PretrainedFolder, shipped_folder
from glowflow.training import evaluate_bpd
from tests.helpers import write_noise_npz

FOLDER = shipped_folder("fashionmnist")
FASHION = "/usr/share/datasets/fashion-mnist"
EXPECTED = json.loads(open(os.path.join(FOLDER, "expected.json"), encoding="utf-8").read())
DETECTOR = os.path.join(FOLDER, EXPECTED["detector"]["file"])
FILES = ["README.md", "config.json", "expected.json", "model.safetensors", EXPECTED["detector"]["file"]]


def _fingerprints():
    return {name: hashlib.sha256(open(os.path.join(FOLDER, name), "rb").read()).hexdigest() for name in FILES}


@pytest.fixture(scope="module")
def model():
    return Glow.from_pretrained("fashionmnist")


@pytest.fixture
def fashion_test_split():
    """Fashion-MNIST's test split: scripts/setup.sh installs Debian's dataset-fashion-mnist, so it
    is not skipped when missing: it fails, saying what to install."""
    if not os.path.exists(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")):
        pytest.fail("Debian's dataset-fashion-mnist is missing: scripts/setup.sh installs it (apt-get)")
    return data.load_dataset(EXPECTED["dataset"], "test", download=False)


@pytest.fixture
def no_training_split(monkeypatch, fashion_test_split):
    """glowflow.data.load_dataset refusing the training split, and giving the first 64 test images
    as the test split (so that a command's pass over it takes a moment)."""

    def load_dataset(name, split, *args, **kwargs):
        assert split != "train", "the training set was read although the shipped detector is valid"
        if name == EXPECTED["dataset"] and split == "test":
            return data.subset(fashion_test_split, range(64))
        return real(name, split, *args, **kwargs)

    real = data.load_dataset
    monkeypatch.setattr(data, "load_dataset", load_dataset)


def test_it_loads_offline_without_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load or the network was used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(socket, "socket", refuse)
    loaded = [
        Glow.from_pretrained("fashionmnist"),  # the bare name: no local folder of that name here
        glowflow.from_pretrained("pretrained:fashionmnist"),
        glowflow.load_checkpoint("pretrained:fashionmnist"),
        Checkpoint.read("pretrained:fashionmnist").load_model(),
    ]
    for m in loaded:  # the fingerprint the shipped detector's cache key holds
        assert model_fingerprint(m) == EXPECTED["model_sha256"] and not m.training
        assert m.config.image_shape == (1, 32, 32) and m.config.n_bits == 8


def test_bits_per_dim_on_the_fixed_test_slice_reproduces_expected_json(model, fashion_test_split):
    how = EXPECTED["test_slice"]
    assert how["split"] == "test" and how["device"] == "cpu" and how["dataset"] == EXPECTED["dataset"]
    images = data.subset(fashion_test_split, range(how["first"]))
    loader = data.make_loader(images, batch_size=how["batch_size"], shuffle=False)
    bpd = evaluate_bpd(model, loader, torch.device("cpu"), how["dequantization_seed"], desc="test slice")
    # Machine-independent tolerance: the stored mean comes from float32 log-densities of one CPU, and
    # another CPU's kernels round them differently. Each image's bits/dim is within about
    # eps * size * depth of the exact value: eps = 2**-23 (float32); size the magnitude of its two
    # terms in bits/dim, the prior's (about the result) and the log-det's (measured below on a few
    # of the images); depth the roundings in sequence, K * L flow steps plus log2(D) levels of
    # pairwise sums over the D dimensions. A mean over images is no less precise than one image, and
    # the comparison is of two such results (2x). Measured under every kernel choice PyTorch offers
    # on one machine: at most 1.6e-7 off, against about 7e-5 here (a retrained or changed model is
    # off by 1e-2 or more).
    with torch.no_grad():
        x = torch.stack([images[i][0] for i in range(16)])
        _, logdet = model.encode(glowflow.preprocess(x, 8))
    config, dims = model.config, math.prod(model.config.image_shape)
    depth = config.K * config.L + math.ceil(math.log2(dims))
    size = how["mean_bpd"] + logdet.abs().max().item() / (dims * math.log(2))
    tolerance = 2 * 2.0**-23 * size * depth
    assert abs(bpd - how["mean_bpd"]) < tolerance, (bpd, how["mean_bpd"], tolerance)


def test_the_shipped_files_pass_the_checks_of_any_model_folder(model):
    assert sorted(os.listdir(FOLDER)) == sorted(FILES)  # nothing else (no temporary file, no stray cache)
    assert SHIPPED["fashionmnist"] == "pretrained_models/fashionmnist"
    folder = PretrainedFolder.open("pretrained:fashionmnist")
    assert folder.dataset == EXPECTED["dataset"] and folder.image_size is None
    with torch.device("meta"):
        expected = Glow.from_config(folder.config).state_dict()
    weights = folder.read_weights(expected)  # names, shapes, kinds and finiteness checked
    assert weights.keys() == model.state_dict().keys()
    # the detector: where the commands look for it, readable, and for this very model
    assert detector_cache_path_for("pretrained:fashionmnist", EXPECTED["dataset"], 8) == DETECTOR
    detector = OutlierDetector.load(DETECTOR, model)  # refused for another model (the fingerprint)
    wanted = EXPECTED["detector"]
    assert (detector.score, detector.tpr, detector.fit_images) == (wanted["score"], wanted["tpr"], wanted["fit_images"])
    assert detector.threshold_ == pytest.approx(wanted["threshold"], abs=1e-12)
    assert detector.n_threshold_ == wanted["threshold_images"]
    # a non-editable install has every file: pyproject.toml's package data covers them
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), encoding="utf-8").read()
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    patterns = re.findall(r'"([^"]+)"', re.search(r"^glowflow = \[(.*)\]$", section, re.M).group(1))
    for name in FILES:
        assert any(fnmatch(f"{SHIPPED['fashionmnist']}/{name}", p) for p in patterns), name


def test_the_model_card_states_the_numbers_of_expected_json():
    card = open(os.path.join(FOLDER, "README.md"), encoding="utf-8").read()
    command = EXPECTED["checkpoint"]["training_command"]
    assert command.startswith("glowflow --train --dataset fashionmnist") and f"`{command}`" in card
    test_line = f"- test bits/dim (all {EXPECTED['test_images']} test images): {EXPECTED['test_bpd']:.4f}"
    assert test_line in card.splitlines()
    if EXPECTED["validation_bpd"] is not None:
        assert f"validation images): {EXPECTED['validation_bpd']:.4f}" in card
    else:
        assert "validation bits/dim" not in card
    assert f"mean bits/dim {EXPECTED['test_slice']['mean_bpd']:.6f} on the first 256" in card
    assert f"threshold {EXPECTED['detector']['threshold']:.4f}" in card
    assert f"- Written: {EXPECTED['written']}" in card and re.fullmatch(r"\d{4}-\d\d-\d\d", EXPECTED["written"])
    assert EXPECTED["test_slice"]["mean_bpd"] == pytest.approx(EXPECTED["test_bpd"], abs=0.2)  # a slice of it


def test_score_and_outlier_detection_reuse_the_shipped_detector(no_training_split, tmp_path, capsys):
    before = _fingerprints()
    noise = write_noise_npz(tmp_path / "noise.npz", n=24, size=32)
    reused = f"reusing the training statistics (the fitted outlier detector) cached in {DETECTOR}"
    argv = ["--score", noise, "--checkpoint", "pretrained:fashionmnist", "--output_dir", str(tmp_path / "scored")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert reused in out and "scored 24 images" in out and (tmp_path / "scored" / "scores_noise.csv").exists()

    ood = tmp_path / "ood"
    argv = ["--outlier_detection", "--checkpoint", "pretrained:fashionmnist", "--out_dataset", noise]
    assert main([*argv, "--output_dir", str(ood)]) == 0
    assert reused in capsys.readouterr().out
    report = json.loads((ood / "ood_fashionmnist_vs_noise.json").read_text())
    assert report["reference"]["reused_cache"] is True and report["reference"]["cache"] == DETECTOR
    assert report["detector"]["threshold"] == pytest.approx(EXPECTED["detector"]["threshold"], abs=1e-12)
    assert report["scores"]["nll"]["auroc"] == 1.0 and report["n_in"] == 64
    assert _fingerprints() == before  # nothing in the package was written


def test_a_fit_with_other_settings_keeps_the_shipped_detector(monkeypatch, fashion_test_split, tmp_path, capsys):
    """--fit_images 40 is another cache key: the detector is fitted (on a small stand-in for the
    training split here), used, and not cached over the shipped one."""
    before = _fingerprints()
    real = data.load_dataset
    small = data.subset(fashion_test_split, range(9000, 9100))
    monkeypatch.setattr(
        data, "load_dataset", lambda name, split, *a, **k: small if split == "train" else real(name, split, *a, **k)
    )
    noise = write_noise_npz(tmp_path / "noise.npz", n=8, size=32)
    argv = ["--score", noise, "--checkpoint", "pretrained:fashionmnist", "--fit_images", "40"]
    assert main([*argv, "--output_dir", str(tmp_path / "scored")]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "not cached" in line]
    assert notes == [
        f"note: the outlier detector was not cached: {DETECTOR} ships with glowflow and is kept "
        f"(it was fitted with other settings)"
    ]
    assert "scored 8 images" in captured.out and _fingerprints() == before


def test_an_unknown_name_is_one_line_listing_the_shipped_ones(tmp_path, capsys):
    with pytest.raises(GlowflowError, match=r"no pretrained model named 'nosuch' ships .*; available: fashionmnist$"):
        Glow.from_pretrained("pretrained:nosuch")
    out = tmp_path / "o"
    code = main(["--sample", "--checkpoint", "pretrained:nosuch", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.endswith("available: fashionmnist"), err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(GlowflowError, match="model folder not found: nosuch"):
        Glow.from_pretrained("nosuch")  # a bare name that does not ship is a path


def test_a_local_folder_of_the_same_name_wins(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Glow(GlowConfig(image_shape=(1, 8, 8), K=1, L=1, hidden_channels=4))
    local.initialize(torch.rand(4, 1, 8, 8) - 0.5)
    local.save_pretrained("fashionmnist")
    assert Glow.from_pretrained("fashionmnist").config == local.config
    shipped = Glow.from_pretrained("pretrained:fashionmnist")  # the prefix always means the shipped one
    assert model_fingerprint(shipped) == EXPECTED["model_sha256"]
