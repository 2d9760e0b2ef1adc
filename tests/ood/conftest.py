"""Fixtures of the outlier-detection tests: one torch thread for each module (the models are tiny:
one thread is fastest, and the machine is shared), and ``trained``, a tiny Glow trained on smooth
8x8 images with its data (a module of its own may define another ``trained``: pytest's nearer
fixture wins, as in test_ood.py)."""

import pytest
import torch

from tests.ood.test_ood import noise_images, smooth_images, train_glow


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    g = torch.Generator().manual_seed(0)
    data = dict(train=smooth_images(1024, g), test=smooth_images(600, g), noise=noise_images(200, g))
    return train_glow(data["train"]), data
