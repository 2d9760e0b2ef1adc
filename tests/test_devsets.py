"""Derived and synthetic datasets for outlier-detection development (glowflow/devsets.py)."""
import numpy as np
import pytest
import torch

from glowflow.data import dataset_info, load_dataset
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
    labels = np.load(path)["labels"]
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
