"""sample.py beyond the command line: manipulation's class means are batch-size independent."""

import numpy as np
import torch
from PIL import Image

from glowflow.sample import manipulate
from tests.helpers import randomised_model


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def test_manipulation_is_the_same_encoded_one_by_one_or_in_batches(tmp_path):
    combo = dict(
        flow_permutation="invconv", flow_coupling="affine", LU_decomposed=False, learn_top=True, y_condition=True
    )
    model = randomised_model((1, 8, 8), 2, combo).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 1, 8, 8), generator=generator).double() / 255
    labels = torch.tensor([0, 1, 2] * 7 + [0, 1])
    dataset = _Labelled(images, labels)
    grids = []
    for batch_size, folder in ((1, "one"), (5, "five"), (256, "all")):
        path = manipulate(
            model, dataset, str(tmp_path / folder), 0, 1, n_images=3, steps=4, max_per_class=6, batch_size=batch_size
        )
        grids.append(np.asarray(Image.open(path)).astype(np.int64))
    assert grids[0].shape[0] > 3 * 8 and grids[0].std() > 0  # 3 rows of 4 images, not blank
    assert np.abs(grids[0] - grids[1]).max() <= 1 and np.abs(grids[0] - grids[2]).max() <= 1
    # the class means use the first max_per_class images of each class only: more images change them
    path = manipulate(model, dataset, str(tmp_path / "more"), 0, 1, n_images=3, steps=4, max_per_class=8)
    assert np.abs(np.asarray(Image.open(path)).astype(np.int64) - grids[0]).max() > 1
