"""The priors' fits in training (glowflow/training/prior_fitting.py): at an epoch's end the trained
weights and the averaged ones are each fitted to their own latents of the fixed fitting images; a
stop between epoch ends saves a fitted best checkpoint and puts the earlier fit back for last.pt;
``--prior_fit none`` trains the paper's model."""

import pytest
import torch

from glowflow.checkpoint import Checkpoint
from glowflow.cli import build_parser, main, model_config_from_args, run_config_from_args
from glowflow.config import RunConfig
from glowflow.training import Trainer
from tests.helpers import write_smooth_npz

ARCH = ["--hidden_channels", "8", "--K", "2", "--L", "2", "--no_wandb", "--sample_and_save_freq", "0"]
TINY = ["--batch_size", "16", "--warmup", "1", "--prior_fit_images", "40", *ARCH]


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    return write_smooth_npz(tmp_path_factory.mktemp("data") / "smooth.npz")


def _gaussians(weights):
    return {k: v for k, v in weights.items() if "gaussian" in k}


def _refitted(trainer, checkpoint, key):
    """The stored weights ``key`` of ``checkpoint``, fitted again on the run's fitting images."""
    stored = Checkpoint.read(checkpoint)
    model = stored.build_model()
    model.load_state_dict(stored.payload[key])
    trainer.prior_fitting.refit([model])
    return model.state_dict()


def test_each_model_is_fitted_to_its_own_latents_at_an_epochs_end(smooth, tmp_path):
    argv = ["--train", "--dataset", smooth, "--n_epochs", "1", "--ema", "0.5", *TINY]
    run = tmp_path / "run"
    assert main([*argv, "--output_dir", str(run)]) == 0
    trainer = Trainer(
        run_config_from_args(build_parser().parse_args([*argv, "--output_dir", str(tmp_path / "again")])),
        model_config_from_args(build_parser().parse_args(argv), RunConfig(dataset=smooth)),
    )
    try:
        stored = torch.load(run / "last.pt", weights_only=True)
        for key in ("model", "raw_model"):  # the averaged weights, the trained ones
            fitted = _gaussians(stored[key])
            assert fitted and all(int(v) == 1 for k, v in fitted.items() if k.endswith("fitted"))
            again = _refitted(trainer, str(run / "last.pt"), key)
            for name, value in fitted.items():
                assert torch.allclose(value, again[name], rtol=1e-5, atol=1e-6), (key, name)
        # the two fits differ: each follows its own weights
        assert not torch.equal(stored["model"]["top_gaussian.shift"], stored["raw_model"]["top_gaussian.shift"])
    finally:
        trainer.close()


def test_a_stop_between_epoch_ends_saves_a_fitted_best_and_an_unchanged_last(smooth, tmp_path):
    run = tmp_path / "stopped"
    assert (
        main(["--train", "--dataset", smooth, "--n_epochs", "1", "--max_steps", "2", *TINY, "--output_dir", str(run)])
        == 0
    )
    best = _gaussians(torch.load(run / "Glow_smooth.pt", weights_only=True)["model"])
    last = _gaussians(torch.load(run / "last.pt", weights_only=True)["model"])
    assert all(int(v) == 1 for k, v in best.items() if k.endswith("fitted"))
    assert all(int(v) == 0 for k, v in last.items() if k.endswith("fitted"))  # no epoch has ended yet


def test_prior_fit_none_trains_the_papers_model(smooth, tmp_path):
    run = tmp_path / "paper"
    assert (
        main(
            ["--train", "--dataset", smooth, "--n_epochs", "1", *TINY, "--prior_fit", "none", "--output_dir", str(run)]
        )
        == 0
    )
    stored = torch.load(run / "last.pt", weights_only=True)
    assert stored["model_config"]["prior_fit"] == "none" and not _gaussians(stored["model"])
