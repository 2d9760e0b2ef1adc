"""sample.py and Glow.sample beyond the command line: manipulation's class means are batch-size
independent; the sampling check counts and redraws failed samples without touching clean draws;
attribute manipulation is with-minus-without, on single- and multi-label data; the temperature
sheet labels its rows."""

import numpy as np
import pytest
import torch
from PIL import Image

from glowflow.checkpoint import save_checkpoint
from glowflow.cli import main
from glowflow.data import load_dataset
from glowflow.errors import GlowflowError
from glowflow.pixels import preprocess, save_grid
from glowflow.sample import (
    attribute_direction,
    attribute_rows,
    manipulate,
    manipulate_attribute,
    save_labelled_rows,
)
from tests.helpers import randomised_model, write_smooth_npz


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


# ----------------------------------------------------------------------------- checked sampling


def _plain_draw(model, n, temperature, seed):
    """The samples of a plain decode of fresh latents at ``seed``, and the generator state after it."""
    torch.manual_seed(seed)
    top = model._sample_top(n, None, temperature)
    x = model.decode([None] * (len(model.levels) - 1) + [top], temperature=temperature)
    return x, torch.get_rng_state()


@pytest.mark.parametrize("fast", [True, False])
def test_checked_sample_is_a_plain_draw_when_every_sample_passes(fast):
    model = randomised_model((1, 8, 8), 2, dict(flow_coupling="affine", learn_top=True))
    model.fast = fast
    expected, state = _plain_draw(model, 6, 0.7, seed=3)
    torch.manual_seed(3)
    x = model.sample(6, temperature=0.7)
    assert torch.equal(x, expected)
    assert torch.equal(torch.get_rng_state(), state)  # no random number used after the draw
    report = model.last_sample_report
    assert report.clean and report.redrawn == 0 and report.nonfinite == 0 and report.failed == [0, 0]


def _poison_first_top(model, rows):
    """Make the first top latent drawn non-finite in ``rows`` (later draws are left alone)."""
    original = model._sample_top
    calls = []

    def poisoned(n, y, temperature):
        top = original(n, y, temperature)
        if not calls:
            top[rows] = float("nan")
        calls.append(n)
        return top

    model._sample_top = poisoned
    return calls


def test_non_finite_samples_are_counted_and_redrawn():
    model = randomised_model((1, 8, 8), 2, dict(flow_coupling="affine"))
    clean, _ = _plain_draw(model, 6, 1.0, seed=0)
    calls = _poison_first_top(model, [1, 4])
    torch.manual_seed(0)
    x, report = model.sample_with_report(6, temperature=1.0)
    assert calls == [6, 2]  # the two failed samples drawn again, from the top
    assert report.failed == [0, 2] and report.failed_nonfinite == [0, 2]  # they failed at the top level
    assert report.redrawn == 2 and report.redraws == 2 and report.rounds == 1
    assert report.left == 0 and report.nonfinite == 0 and torch.isfinite(x).all()
    keep = [0, 2, 3, 5]
    assert torch.equal(x[keep], clean[keep])  # the others are the plain draw's
    assert "2 redrawn" in report.describe() and "2 not finite" in report.describe()


def test_without_redraw_the_failures_are_returned_and_counted():
    model = randomised_model((1, 8, 8), 2, dict(flow_coupling="affine"))
    _poison_first_top(model, [0])
    x, report = model.sample_with_report(3, temperature=1.0, redraw=False)
    assert report.nonfinite == 1 and report.left == 1 and report.redrawn == 0
    assert not torch.isfinite(x[0]).all() and torch.isfinite(x[1:]).all()
    assert "not redrawn" in report.describe() and "1 not finite in the result (saved black)" in report.describe()


def test_samples_past_the_bound_are_redrawn_at_most_max_rounds():
    model = randomised_model((1, 8, 8), 2, dict(flow_coupling="affine"))
    torch.manual_seed(0)
    x, report = model.sample_with_report(4, temperature=1.0, bound=1e-6, max_rounds=3)
    assert report.failed[-1] == 4 and report.failed_nonfinite == [0, 0]  # the top level's values exceed it
    assert report.rounds == 3 and report.redraws == 12 and report.left == 4 and report.nonfinite == 0
    assert x.shape == (4, 1, 8, 8)


# ----------------------------------------------------------------------------- attribute manipulation


def _hand_direction(model, images, has):
    """Mean latent of the images with the attribute minus that without, encoding one image at a time."""
    latents = [model.encode(preprocess(images[i : i + 1], model.config.n_bits))[0] for i in range(len(images))]
    mean = lambda chosen: [torch.stack([latents[i][k][0] for i in chosen]).mean(0) for k in range(len(latents[0]))]  # noqa: E731
    with_it = [i for i in range(len(images)) if has[i]]
    without = [i for i in range(len(images)) if not has[i]]
    return [a - b for a, b in zip(mean(with_it), mean(without))]


def test_attribute_direction_is_with_minus_without_for_a_group_of_classes():
    model = randomised_model((1, 8, 8), 2, dict(flow_coupling="affine"))  # unconditional
    images = torch.randint(0, 256, (17, 1, 8, 8), generator=torch.Generator().manual_seed(1)).double() / 255
    labels = torch.tensor([0, 1, 2, 3, 4] * 3 + [1, 0])
    dataset = _Labelled(images, labels)
    direction, n_with, n_without = attribute_direction(model, dataset, (1, 3), batch_size=5)
    assert (n_with, n_without) == (7, 10)
    expected = _hand_direction(model, images, [int(c) in (1, 3) for c in labels])
    for d, e in zip(direction, expected):
        assert d.shape == e.shape and e.abs().max() > 1e-3
        torch.testing.assert_close(d, e, rtol=1e-9, atol=1e-9)


def test_scale_zero_reconstructs_the_input_and_the_others_move():
    model = randomised_model((1, 8, 8), 2, dict(flow_coupling="affine", learn_top=True, y_condition=True))
    images = torch.randint(0, 256, (12, 1, 8, 8), generator=torch.Generator().manual_seed(2)).double() / 255
    dataset = _Labelled(images, torch.arange(12) % 3)
    direction, _, _ = attribute_direction(model, dataset, (2,))
    x = preprocess(images[:3], 8)
    rows = attribute_rows(model, x, direction, (-1.0, 0.0, 1.5))
    assert rows.shape == (9, 1, 8, 8)
    torch.testing.assert_close(rows[1::3], x, rtol=0, atol=1e-8)
    assert (rows[0::3] - x).abs().max() > 1e-3 and (rows[2::3] - x).abs().max() > 1e-3


def test_attribute_manipulation_on_multi_label_data(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)
    hot = (rng.random((30, 4)) < 0.4).astype(np.uint8)
    hot[0, 2], hot[1, 2] = 1, 0  # both groups are present
    np.savez(tmp_path / "multi.npz", images=images, labels=hot)
    train = load_dataset(str(tmp_path / "multi.npz"), "all")  # every image, as the hand computation
    assert train.info.multilabel
    model = randomised_model((1, 8, 8), 2, dict(flow_coupling="affine")).float()
    direction, n_with, n_without = attribute_direction(model, train, (2,))
    assert n_with == int(hot[:, 2].sum()) and n_with + n_without == 30
    pixels = torch.as_tensor(images[:, None]).float() / 255
    expected = _hand_direction(model, pixels, hot[:, 2] == 1)
    # float32, encoded in batches against one at a time: other kernels, other rounding (by CPU too).
    # Each latent is within eps * size * depth of exact (eps = 2**-23, size the latents' largest
    # magnitude, depth K * L steps plus log2(D) for the sums); means keep that, a difference of two
    # means doubles it, and two computations double it again. Measured: at most 1/60 of this.
    with torch.no_grad():
        size = max(z.abs().max().item() for z in model.encode(preprocess(pixels, 8))[0])
    depth = model.config.K * model.config.L + 6  # D = 64
    tolerance = 4 * 2.0**-23 * size * depth
    for d, e in zip(direction, expected):
        torch.testing.assert_close(d, e, rtol=0, atol=tolerance)
    path = manipulate_attribute(model, train, train, str(tmp_path / "out"), (2,), scales=(-1, 0, 1, 2), n_images=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape[:2] == (3 * 10 + 2, 4 * 10 + 2) and grid.std() > 0  # 3 rows of 4 images of 8 + 2 padding
    with pytest.raises(GlowflowError, match="attribute 4 is outside 0..3"):
        attribute_direction(model, train, (4,))


def test_an_attribute_every_image_has_is_a_one_line_error():
    model = randomised_model((1, 8, 8), 2, dict(flow_coupling="affine"))
    dataset = _Labelled(torch.rand(4, 1, 8, 8).double(), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(GlowflowError, match="no images without attribute 0,1"):
        attribute_direction(model, dataset, (0, 1))


def test_sample_command_prints_the_check_and_manipulates_an_attribute(tmp_path, capsys):
    data = write_smooth_npz(tmp_path / "smooth.npz", n=48, size=16)
    run = tmp_path / "run"
    train = ["--train", "--dataset", data, "--output_dir", str(run), "--no_wandb", "--batch_size", "16"]
    tiny = ["--n_epochs", "1", "--max_steps", "2", "--hidden_channels", "8", "--K", "2", "--L", "2"]
    assert main([*train, *tiny, "--sample_and_save_freq", "0", "--warmup", "1"]) == 0
    capsys.readouterr()
    sample = ["--sample", "--checkpoint", str(run / "last.pt"), "--output_dir", str(run / "s"), "--n_samples", "4"]
    assert main([*sample, "--manipulate_attribute", "1,2", "--manipulate_scales", "-1", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert (
        "samples (T=0.7): 4 samples at temperature 0.7: all finite and within 100 at every level, none redrawn" in out
    )
    assert "attribute 1,2: mean latent of" in out
    grid = np.asarray(Image.open(run / "s" / "manipulation_attribute_1_2.png"))
    rows = min(6, len(load_dataset(data, "test")))  # up to 6 test images (the file's held-out tenth: 5)
    assert grid.shape[:2] == (rows * 18 + 2, 3 * 18 + 2)  # a row per image, 3 scales, 16 pixels + 2 padding
    assert main([*sample, "--manipulate_attribute", "3"]) == 2  # the data has classes 0..2
    assert "attribute 3 is outside 0..2" in capsys.readouterr().err

    # --compare_with: 2 rows of 10 samples per model and temperature, each model's first row labelled
    assert main([*sample, "--compare_with", str(run / "Glow_smooth.pt"), "--temperature", "0.5", "1"]) == 0
    out = capsys.readouterr().out
    assert "samples (last.pt (1 ep., 3.46 bpd), T=0.5): 20 samples" in out  # the file's epochs and test bits/dim
    assert "samples (Glow_smooth.pt (1 ep., 3.46 bpd), T=1): 20 samples" in out
    sheet = np.asarray(Image.open(run / "s" / "samples_compared.png").convert("RGB"))
    assert sheet.shape[0] == 2 * 2 * 2 * 18 + 2 and sheet.shape[1] > 10 * 18 + 2
    other = tmp_path / "other.pt"
    save_checkpoint(str(other), randomised_model((1, 8, 8), 2, {}).float())
    assert main([*sample, "--compare_with", str(other)]) == 2
    assert (
        "--compare_with: the models see different images (last.pt (1 ep., 3.46 bpd): 1x16x16 at 8 bits, other.pt: 1x8x8"
        in (capsys.readouterr().err)
    )
    assert main([*sample, "--compare_with", str(tmp_path / "missing.pt")]) == 2
    assert "--compare_with: checkpoint not found" in capsys.readouterr().err


def test_the_temperature_sheet_labels_each_row_beside_the_plain_grid(tmp_path):
    generator = torch.Generator().manual_seed(0)
    rows = [torch.rand(5, 1, 16, 16, generator=generator) - 0.5 for _ in range(3)]
    labels = ["T=0.5", "T=0.7", "T=1"]
    sheet = np.asarray(Image.open(save_labelled_rows(rows, labels, 8, str(tmp_path / "sheet.png"))).convert("RGB"))
    plain = np.asarray(Image.open(save_grid(torch.cat(rows), 8, str(tmp_path / "plain.png"), nrow=5)).convert("RGB"))
    margin = sheet.shape[1] - plain.shape[1]
    assert sheet.shape[0] == plain.shape[0] == 3 * 18 + 2 and margin > 0
    assert np.array_equal(sheet[:, margin:], plain)  # the pictures themselves, untouched
    bands = [sheet[2 + 18 * i : 18 * (i + 1), :margin] for i in range(3)]  # beside each row of images
    for band in bands:
        assert (band < 128).any() and (band > 128).any()  # dark text on white
    assert not np.array_equal(bands[0], bands[1]) and not np.array_equal(bands[1], bands[2])  # each its own label
