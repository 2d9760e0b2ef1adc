"""GlowConfig and RunConfig refuse every value that cannot work, by type and by range, with a
message naming the field; the model-size estimate is exact; dataset slugs stay short."""

import math

import pytest

from glowflow import Glow
from glowflow.config import (
    MAX_PARAMETERS,
    SLUG_LENGTH,
    GlowConfig,
    RunConfig,
    dataset_slug,
)
from glowflow.errors import GlowflowError
from tests.helpers import architecture_combinations, combo_id


@pytest.mark.parametrize("combo", list(architecture_combinations()), ids=combo_id)
def test_num_weights_is_the_size_of_the_state_dict(combo):
    for shape, L in (((1, 16, 16), 2), ((3, 8, 8), 3)):
        config = GlowConfig(image_shape=shape, L=L, K=2, hidden_channels=5, num_classes=3, **combo)
        assert config.num_weights() == sum(t.numel() for t in Glow(config).state_dict().values())


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(K=2.5), "K must be an integer, got 2.5"),
        (dict(K=True), "K must be an integer, got True"),
        (dict(K=10**8), "K (steps of flow per level) must be at most"),
        (dict(L=10**9), "L (number of levels) must be at most"),
        (dict(hidden_channels=10**7), "more than the limit"),
        (dict(image_shape=("x", 16, 16)), "image_shape must be a list of 3 integers"),
        (dict(image_shape=(1, 16)), "image_shape must be a list of 3 integers"),
        (dict(image_shape=(1, 2**13, 2**13)), "more than the limit"),
        (dict(n_bits="eight"), "n_bits must be an integer"),
        (dict(flow_coupling=3), "flow_coupling must be a string"),
        (dict(learn_top="yes"), "learn_top must be true or false"),
        (dict(actnorm_scale=math.inf), "actnorm_scale must be a positive finite number"),
        (dict(coupling_scale_min=1.0), "coupling_scale_min must be in [0, 1)"),
        (dict(coupling_scale_min=-0.1), "coupling_scale_min must be in [0, 1)"),
        (dict(actnorm_scale=math.nan), "actnorm_scale must be a positive finite number"),
        (dict(num_classes=0), "num_classes must be at least 1"),
    ],
)
def test_glow_config_refuses(fields, message):
    with pytest.raises(GlowflowError) as caught:
        GlowConfig(**fields)
    assert message in str(caught.value)


def test_the_size_limit_sits_between_real_models_and_absurd_ones():
    big = GlowConfig(image_shape=(3, 256, 256), hidden_channels=512, K=32, L=6)  # the paper's CelebA-HQ model
    assert big.num_weights() < MAX_PARAMETERS
    with pytest.raises(GlowflowError, match="hidden_channels=16384"):
        GlowConfig(image_shape=(3, 256, 256), hidden_channels=16384, K=32, L=6)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(lr=math.nan), "lr must be a positive finite number"),
        (dict(lr=0.0), "lr must be a positive finite number"),
        (dict(decay=-1.0), "decay must be a non-negative finite number"),
        (dict(seed=2**32), "seed must be at most"),
        (dict(seed=-1), "seed must be non-negative"),
        (dict(temperature=()), "temperature needs at least one value"),
        (dict(out_dataset=()), "out_dataset needs at least one dataset"),
        (dict(out_dataset="mnist"), "out_dataset must be a list of strings"),
        (dict(manipulate=(0, -1)), "manipulate needs two class numbers"),
        (dict(manipulate_attribute=(5, -7)), "manipulate_attribute needs class or finding numbers"),
        (dict(manipulate_attribute=()), "manipulate_attribute needs class or finding numbers"),
        (dict(manipulate_scales=(0.0, math.inf)), "manipulate_scales must be finite numbers"),
        (dict(batch_size=True), "batch_size must be an integer"),
        (dict(no_wandb=1), "no_wandb must be true or false"),
        (dict(dataset=""), "dataset must not be empty"),
    ],
)
def test_run_config_refuses(fields, message):
    with pytest.raises(GlowflowError) as caught:
        RunConfig(**fields).validate()
    assert message in str(caught.value)


def test_run_config_from_a_stored_dict():
    stored = RunConfig(dataset="cifar10", temperature=(0.5, 1.0)).to_dict()
    stored["n_bits"] = 5  # a version-1 key: ignored
    assert RunConfig.from_dict(stored) == RunConfig(dataset="cifar10", temperature=(0.5, 1.0))
    with pytest.raises(GlowflowError, match="lr must be a number"):
        RunConfig.from_dict({**stored, "lr": "fast"})
    with pytest.raises(GlowflowError, match="must be a dict"):
        RunConfig.from_dict(["cifar10"])


def test_dataset_slug_is_bounded_and_distinct():
    assert dataset_slug("fashionmnist:classes=0,1") == "fashionmnist_classes_0_1"
    assert dataset_slug("/data/my_set.npz") == "my_set"
    a, b = dataset_slug("/data/" + "a" * 250 + ".npz"), dataset_slug("/data/" + "a" * 249 + "b.npz")
    assert len(a) == len(b) == SLUG_LENGTH and a != b and a.startswith("a" * 60)
    assert dataset_slug("x" * SLUG_LENGTH) == "x" * SLUG_LENGTH
