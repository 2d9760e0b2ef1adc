"""The paper's training recipe and clean model selection: the validation split chooses the best
checkpoint (the test split never does), data without a test split gets disjoint train/validation/
test parts, Polyak averaging (--ema), augmentation (--augment), --grad_checkpoint and --preset."""

import math

import numpy as np
import pytest
import torch

from glowflow.checkpoint import Checkpoint
from glowflow.cli import apply_preset, build_parser, main, model_config_from_args, run_config_from_args
from glowflow.config import PRESETS, RunConfig
from glowflow.data import load_dataset, split_validation
from glowflow.data.partition import held_out_test
from glowflow.errors import GlowflowError
from glowflow.model import Glow
from glowflow.pixels import shift_and_flip
from glowflow.training import Trainer, augment_draws, evaluate_bpd, resumed_config
from tests.helpers import write_smooth_npz

ARCH = ["--hidden_channels", "8", "--K", "2", "--L", "2", "--no_wandb", "--sample_and_save_freq", "0"]
TINY = ["--batch_size", "16", "--warmup", "1", *ARCH]


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    return write_smooth_npz(tmp_path_factory.mktemp("data") / "smooth.npz")


@pytest.fixture(scope="module")
def smooth_rgb(tmp_path_factory):
    return write_smooth_npz(tmp_path_factory.mktemp("data") / "rgb.npz", n=64, channels=3)


def _payload(path):
    return torch.load(path, weights_only=True)


def _pixels(dataset):
    return {tuple(torch.round(dataset[i][0] * 255).to(torch.uint8).flatten().tolist()) for i in range(len(dataset))}


# ----------------------------------------------------------------------------- which split chooses


def test_the_validation_split_chooses_the_best_checkpoint_and_the_test_split_never_does(
    smooth, tmp_path, capsys, monkeypatch
):
    # validation and test disagree on purpose: the best checkpoint must follow validation
    scripted = {"val": [3.0, 2.0, 2.5], "test": [1.0, 3.0, 0.5]}
    calls = []

    def evaluate_split(self, model, loader, split):
        calls.append((self.step, split, len(loader.dataset)))
        return scripted[split][self.epoch]

    trained_on = []
    real_train_step = Trainer.train_step

    def train_step(self, images, labels):
        trained_on.extend(tuple(torch.round(x * 255).to(torch.uint8).flatten().tolist()) for x in images)
        return real_train_step(self, images, labels)

    monkeypatch.setattr(Trainer, "evaluate_split", evaluate_split)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    run = tmp_path / "run"
    assert main(["--train", "--dataset", smooth, "--output_dir", str(run), "--n_epochs", "3", *TINY]) == 0
    out = capsys.readouterr().out

    best = _payload(run / "Glow_smooth.pt")
    assert best["epoch"] == 2 and best["best_val_bpd"] == 2.0 and best["test_bpd_at_best"] == 3.0
    assert "done: best validation bits/dim 2.0000 chose the checkpoint (test 3.0000)" in out
    assert "val 2.0000 bpd (best)" in out and "test 0.5000 bpd" in out
    assert Checkpoint.read(str(run / "Glow_smooth.pt")).best_test_bpd == 3.0
    # every epoch evaluates validation (9 images) then test (10 images), after its training steps
    assert calls == [(4, "val", 9), (4, "test", 10), (8, "val", 9), (8, "test", 10), (12, "val", 9), (12, "test", 10)]
    # no test or validation image was ever trained on
    test = _pixels(load_dataset(smooth, "test"))
    _, val, _ = split_validation(load_dataset(smooth, "train"), 9, 0)
    assert trained_on and not (set(trained_on) & test) and not (set(trained_on) & _pixels(val))
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    assert header.split(",")[2:6] == ["train_bpd", "val_bpd", "test_bpd", "raw_val_bpd"]
    assert [r.split(",")[3:6] for r in rows] == [["3.0", "1.0", ""], ["2.0", "3.0", ""], ["2.5", "0.5", ""]]


def test_without_a_validation_split_the_last_epoch_is_kept(smooth, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(["--train", "--dataset", smooth, "--output_dir", str(run), "--n_epochs", "2", "--val_size", "0", *TINY])
        == 0
    )
    out, err = capsys.readouterr()
    assert "note: no validation split (--val_size 0): the best checkpoint is the last epoch's" in err
    assert "done: no validation split: the checkpoint is the last epoch's" in out
    best, last = _payload(run / "Glow_smooth.pt"), _payload(run / "last.pt")
    assert best["epoch"] == 2 and math.isinf(best["best_val_bpd"]) and last["run_config"]["val_size"] == 0
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_the_validation_split_is_recorded_and_seeded(smooth, tmp_path):
    run = tmp_path / "run"
    assert main(["--train", "--dataset", smooth, "--output_dir", str(run), "--max_steps", "1", *TINY]) == 0
    stored = _payload(run / "last.pt")["run_config"]
    assert stored["val_size"] == 9 and stored["seed"] == 0  # round(10% of the 86 training images)
    train = load_dataset(smooth, "train")
    a, b, c = split_validation(train, 9, 0), split_validation(train, 9, 0), split_validation(train, 9, 1)
    assert a[2] == b[2] and a[2] != c[2] and len(a[2]) == 9 and len(a[0]) == 77
    assert not (_pixels(a[0]) & _pixels(a[1]))
    # a checkpoint written before the validation split trained on the whole training split
    assert resumed_config({"dataset": smooth}, RunConfig(resume="x/last.pt")).val_size == 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--val_size", "86"], "val_size 86 must be smaller than the training split"),
        (["--val_size", "-1"], "val_size must be non-negative"),
        (["--ema", "1"], "ema must be in [0, 1)"),
        (["--ema", "-0.5"], "ema must be in [0, 1)"),
        (["--ema", "nan"], "ema must be in [0, 1)"),
    ],
)
def test_bad_recipe_flags_are_one_line(smooth, tmp_path, capsys, flags, message):
    run = tmp_path / "run"
    assert main(["--train", "--dataset", smooth, "--output_dir", str(run), *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


# ----------------------------------------------------------------------------- data without a test split


def _numbered_npz(path, n):
    """n images whose first pixel is their number: every image distinct and identifiable."""
    images = np.zeros((n, 8, 8), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n)
    np.savez(path, images=images)
    return str(path)


def test_data_without_a_test_split_gets_disjoint_train_validation_and_test(tmp_path):
    train_idx, test_idx = held_out_test(200, "x")
    assert len(test_idx) == 20 and len(train_idx) == 180 and not set(train_idx) & set(test_idx)
    assert sorted(train_idx + test_idx) == list(range(200)) and held_out_test(200, "x") == (train_idx, test_idx)

    path = _numbered_npz(tmp_path / "numbered.npz", 200)
    train, test = load_dataset(path, "train"), load_dataset(path, "test")
    assert train.held_out_from == 200 and test.held_out_from == 200
    first = lambda ds: [int(round(float(ds[i][0][0, 0, 0]) * 255)) for i in range(len(ds))]  # noqa: E731
    assert first(train) == train_idx and first(test) == test_idx
    rest, val, val_idx = split_validation(train, 18, seed=3)
    numbers = [set(first(ds)) for ds in (rest, val, test)]
    assert [len(s) for s in numbers] == [162, 18, 20] and set.union(*numbers) == set(range(200))
    assert not (numbers[0] & numbers[1] or numbers[0] & numbers[2] or numbers[1] & numbers[2])

    # a flat folder of images is partitioned the same way
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    for k in range(30):
        Image.fromarray(np.full((8, 8), k, dtype=np.uint8), mode="L").save(folder / f"{k:02d}.png")
    f_train, f_test = load_dataset(str(folder), "train"), load_dataset(str(folder), "test")
    assert (len(f_train), len(f_test)) == (27, 3) and not set(first(f_train)) & set(first(f_test))
    assert sorted(first(f_train) + first(f_test)) == list(range(30))

    assert first(load_dataset(path, "all")) == list(range(200))  # every image, unpartitioned
    with pytest.raises(GlowflowError, match="only for your own folders"):
        load_dataset("cifar10", "all")

    # data with its own splits keeps them
    np.savez(
        tmp_path / "split.npz", train_images=np.zeros((5, 8, 8), np.uint8), test_images=np.ones((3, 8, 8), np.uint8)
    )
    assert len(load_dataset(str(tmp_path / "split.npz"), "train")) == 5
    assert load_dataset(str(tmp_path / "split.npz"), "test").held_out_from is None


def test_training_notes_the_partition(tmp_path, capsys):
    path = _numbered_npz(tmp_path / "numbered.npz", 200)
    assert main(["--train", "--dataset", path, "--output_dir", str(tmp_path / "run"), "--max_steps", "1", *TINY]) == 0
    out, err = capsys.readouterr()
    assert (
        "note: numbered has no test split of its own: its 200 images are split 162 train / 18 validation / 20 test"
        in err
    )
    assert "(162 train / 18 val / 20 test" in out


# ----------------------------------------------------------------------------- Polyak averaging


def test_ema_weights_are_what_evaluation_and_the_checkpoint_use(smooth, tmp_path, capsys):
    decay = 0.5
    # the paper's priors: fitted ones are refitted to each model's own latents (the test below)
    base = ["--train", "--dataset", smooth, "--n_epochs", "1", *TINY, "--prior_fit", "none"]
    # the raw weights after ActNorm's initialisation (step 0), after step 1 and after step 2
    trainer = Trainer(
        run_config_from_args(build_parser().parse_args([*base, "--output_dir", str(tmp_path / "w0")])),
        model_config_from_args(build_parser().parse_args([*base]), RunConfig(dataset=smooth)),
    )
    w0 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    for steps in (1, 2):
        assert main([*base, "--output_dir", str(tmp_path / f"w{steps}"), "--max_steps", str(steps)]) == 0
    w1, w2 = (_payload(tmp_path / f"w{s}" / "last.pt")["model"] for s in (1, 2))

    ema_run = tmp_path / "ema"
    assert main([*base, "--output_dir", str(ema_run), "--max_steps", "2", "--ema", str(decay)]) == 0
    out = capsys.readouterr().out
    best, last = _payload(ema_run / "Glow_smooth.pt"), _payload(ema_run / "last.pt")

    names = {
        name for name, _ in Glow.from_config(Checkpoint.read(str(ema_run / "last.pt")).model_config).named_parameters()
    }
    expected, size = {}, {}
    for key in w2:
        if key in names:
            e = w0[key]
            for step, w in enumerate((w1, w2)):
                d = min(decay, (1 + step) / (10 + step))  # the warm-up: 0.1, then 2/11
                e = d * e + (1 - d) * w[key]
            expected[key] = e
            size[key] = torch.stack([w0[key].abs(), w1[key].abs(), w2[key].abs()]).amax(0)
        else:
            expected[key] = w2[key]  # buffers are copied
    for payload in (best, last):
        assert all(torch.equal(payload["raw_model"][k], w2[k]) for k in w2)  # training is unchanged by EMA
        # float32, machine-independent: the average and this hand computation each round twice per
        # step (d e, then + (1 - d) w; a fused lerp or FMA kernel rounds otherwise, by CPU), each
        # rounding within eps = 2**-23 of the weights' size, not the result's (which may cancel to
        # about 0): 2 steps x 2 roundings x 2 computations = 8 eps of the largest weight seen, twice
        # that for margin (measured under every kernel choice PyTorch offers: 1 eps). A decay off
        # by 0.01 moves the average by several times this.
        for key in expected:
            deviation = (payload["model"][key] - expected[key]).abs()
            tolerance = 16 * 2.0**-23 * size[key] if key in size else torch.zeros_like(deviation)
            assert (deviation <= tolerance).all(), (key, deviation.max().item())
    assert any(not torch.equal(best["model"][k], w2[k]) for k in names)

    # the reported validation bits/dim are the averaged model's; the raw weights' are logged beside them
    row = dict(zip(*[line.split(",") for line in (ema_run / "metrics.csv").read_text().splitlines()]))
    _, val, _ = split_validation(load_dataset(smooth, "train"), 9, 0)
    loader = torch.utils.data.DataLoader(val, batch_size=256)
    averaged = Checkpoint.read(str(ema_run / "Glow_smooth.pt")).load_model()
    raw = Checkpoint.read(str(ema_run / "Glow_smooth.pt")).build_model()
    assert float(row["val_bpd"]) == pytest.approx(evaluate_bpd(averaged, loader, torch.device("cpu")), abs=2e-6)
    assert float(row["raw_val_bpd"]) == pytest.approx(evaluate_bpd(raw, loader, torch.device("cpu")), abs=2e-6)
    assert float(row["val_bpd"]) != float(row["raw_val_bpd"])
    assert f"val without EMA {float(row['raw_val_bpd']):.4f} bpd" in out


def test_resume_is_bit_exact_with_ema_and_augment(smooth_rgb, tmp_path):
    flags = ["--n_epochs", "2", "--ema", "0.9", "--augment", *TINY]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["--train", "--dataset", smooth_rgb, "--output_dir", str(full), *flags]) == 0
    assert main(["--train", "--dataset", smooth_rgb, "--output_dir", str(part), "--max_steps", "3", *flags]) == 0
    assert main(["--train", "--dataset", smooth_rgb, "--output_dir", str(part), "--resume", *flags]) == 0
    for name in ("last.pt", "Glow_rgb.pt"):
        a, b = _payload(full / name), _payload(part / name)
        for key in ("model", "raw_model"):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), (name, key)
        assert a["best_val_bpd"] == b["best_val_bpd"] and a["step"] == b["step"]
    assert _payload(part / "last.pt")["step"] == 6
    # and augmentation changed the training: the same run without it ends elsewhere
    plain = tmp_path / "plain"
    assert main(["--train", "--dataset", smooth_rgb, "--output_dir", str(plain), *flags[: -len(TINY) - 1], *TINY]) == 0
    a, b = _payload(full / "last.pt")["raw_model"], _payload(plain / "last.pt")["raw_model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- augmentation


def test_augment_shifts_stay_on_the_grid_and_are_seeded():
    shape = (64, 3, 32, 32)
    shifts, flips = augment_draws(shape, seed=5, step=7, rank=0, world_size=1)
    again = augment_draws(shape, seed=5, step=7, rank=0, world_size=1)
    assert torch.equal(shifts, again[0]) and torch.equal(flips, again[1])
    other = augment_draws(shape, seed=5, step=8, rank=0, world_size=1)
    assert not torch.equal(shifts, other[0])
    assert shifts.abs().max() == 3 and set(shifts.flatten().tolist()) == set(range(-3, 4))  # 10% of 32
    assert 0 < flips.sum() < 64
    assert not augment_draws((64, 1, 32, 32), 5, 7, 0, 1)[1].any()  # grey images are never flipped
    shares = [augment_draws((32, 3, 32, 32), 5, 7, r, 2) for r in (0, 1)]  # two processes: their shares
    assert torch.equal(shares[1][0], shifts[1::2]) and torch.equal(shares[0][1], flips[0::2])
    assert augment_draws((4, 1, 16, 16), 0, 0, 0, 1)[0].abs().max() <= 1

    images = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0)).float() / 255
    moved = shift_and_flip(images, shifts, flips)
    assert torch.equal(torch.round(moved * 255) / 255, moved)  # on the 8-bit grid, exactly
    for n in range(8):  # by hand: shift with the edge repeated (numpy's edge padding), then flip
        dy, dx = shifts[n].tolist()
        padded = np.pad(images[n].numpy(), ((0, 0), (3, 3), (3, 3)), mode="edge")
        expected = padded[:, 3 - dy : 3 - dy + 32, 3 - dx : 3 - dx + 32]
        if flips[n]:
            expected = expected[:, :, ::-1]
        np.testing.assert_array_equal(moved[n].numpy(), expected)


# ----------------------------------------------------------------------------- gradient checkpointing and presets


def test_grad_checkpoint_flag_reaches_the_trained_model(smooth, tmp_path):
    argv = ["--train", "--dataset", smooth, "--output_dir", str(tmp_path / "run"), "--grad_checkpoint", *TINY]
    args = build_parser().parse_args(argv)
    run = run_config_from_args(args)
    trainer = Trainer(run, model_config_from_args(args, run))
    try:
        assert run.grad_checkpoint and trainer.model.grad_checkpoint
    finally:
        trainer.close()


def test_preset_sets_the_papers_cifar10_configuration_and_explicit_flags_win():
    argv = ["--train", "--preset", "cifar10", "--no_wandb"]
    args = apply_preset(build_parser().parse_args(argv), argv)
    run = run_config_from_args(args)
    model = model_config_from_args(args, run)
    assert (model.K, model.L, model.hidden_channels, model.flow_coupling, model.learn_top) == (
        32,
        3,
        512,
        "affine",
        True,
    )
    assert model.image_shape == (3, 32, 32)
    assert (run.dataset, run.batch_size, run.lr, run.warmup, run.ema, run.augment) == (
        "cifar10",
        64,
        1e-3,
        10,
        0.999,
        True,
    )
    assert run.preset == "cifar10" and set(PRESETS["cifar10"]) <= set(vars(args))

    argv = [
        "--train",
        "--preset",
        "cifar10",
        "--K",
        "4",
        "--lr",
        "0.01",
        "--ema",
        "0",
        "--warmup",
        "1",
        "--dataset",
        "svhn",
    ]
    args = apply_preset(build_parser().parse_args(argv), argv)
    run = run_config_from_args(args)
    assert (args.K, run.lr, run.ema, run.warmup, run.dataset) == (4, 0.01, 0.0, 1, "svhn")
    assert (args.L, args.hidden_channels, run.batch_size, run.augment) == (3, 512, 64, True)

    args = apply_preset(build_parser().parse_args(["--train"]), ["--train"])  # no preset: the defaults
    assert (args.K, args.lr, args.ema, args.augment) == (8, 0.0002, 0.0, False)


def test_old_checkpoints_still_read_their_best_test_bpd():
    old = Checkpoint.read("tests/legacy/uncond_default.pt")
    assert old.best_test_bpd == pytest.approx(5.021682411432266) and math.isinf(old.best_val_bpd)
    assert old.averaged_weights is None
