"""The detector's label classifier (glowflow/ood/classifier.py): when it is trained, that it is
seeded and learns, the tied class Gaussians of its features against a float64 brute force, the
``classifier`` and ``combined`` scores recomputed by hand, the fallback without labels, and its
weights through a detector file (round trip; damaged entries refused in one line)."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import glowflow
from glowflow import GlowflowError, ood
from glowflow.ood.class_gaussians import fit_latent_gaussians, latent_arrays, latent_from_arrays, top_gaussian_nll
from glowflow.ood.classifier import CLASSIFIER_WEIGHT, labels_for_classifier, train_classifier
from glowflow.ood.statistics import NO_LABEL
from tests.ood.test_ood import smooth_images


def bright_labels(images):
    """A learnable class: 1 where the image is brighter than mid-grey on average."""
    return (images.mean((1, 2, 3)) > 0.5).long()


def test_labels_for_classifier_needs_two_labelled_classes():
    assert labels_for_classifier(None) is None
    assert labels_for_classifier(np.array([0, 0, 1, NO_LABEL])) is None  # an unlabelled image
    assert labels_for_classifier(np.array([3, 3, 3])) is None  # one class
    assert labels_for_classifier(np.array([0, 1, 1])) is None  # class 0 has one image
    np.testing.assert_array_equal(labels_for_classifier(np.array([0, 1, 1, 0])), [0, 1, 1, 0])


def test_the_classifier_is_seeded_leaves_the_global_state_and_learns():
    g = torch.Generator().manual_seed(1)
    images = smooth_images(600, g)
    labels = bright_labels(images).numpy() * 5 + 2  # classes 2 and 7: outputs map back to them
    pixels = (images * 255).round().to(torch.uint8).numpy()
    state = torch.get_rng_state()
    first = train_classifier(pixels[:400], labels[:400], seed=3, epochs=6)
    assert torch.equal(torch.get_rng_state(), state)
    again = train_classifier(pixels[:400], labels[:400], seed=3, epochs=6)
    for (name, a), b in zip(first.net.state_dict().items(), again.net.state_dict().values()):
        assert torch.equal(a, b), name
    np.testing.assert_array_equal(first.classes, [2, 7])
    with torch.no_grad():
        predicted = first.classes[first.net(images[400:]).argmax(1).numpy()]
    assert (predicted == labels[400:]).mean() > 0.8  # chance: about 0.5
    with pytest.raises(GlowflowError, match="at least 2 classes"):
        train_classifier(pixels[:10], np.zeros(10, dtype=np.int64))


def test_tied_class_gaussians_are_the_pooled_covariance_and_score_the_nearest_class():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0, 0.0], [3.0, 1.0, -2.0], [-2.0, 4.0, 1.0]])
    labels = np.repeat([4, 5, 9], 200)
    mixing = rng.normal(size=(3, 3))
    features = means[np.searchsorted([4, 5, 9], labels)] + rng.normal(size=(600, 3)) @ mixing
    fitted = fit_latent_gaussians(features, labels, shrinkage=0.0, tied=True)
    np.testing.assert_array_equal(fitted.classes, [4, 5, 9])
    class_means = np.stack([features[labels == c].mean(0) for c in (4, 5, 9)])
    centred = features - class_means[np.searchsorted([4, 5, 9], labels)]
    pooled = centred.T @ centred / len(features)
    assert fitted.precision_cholesky.shape == (1, 3, 3)  # one factor, shared by the classes, stored once
    for chol in fitted.precision_cholesky.astype(np.float64):
        precision = chol @ chol.T
        np.testing.assert_allclose(precision @ pooled, np.eye(3), atol=1e-4)  # float32 storage
    # the score: -max_c log N(f; mean_c, pooled) / F, brute force in float64
    from scipy.stats import multivariate_normal

    queries = rng.normal(size=(50, 3)) * 3
    brute = -np.max([multivariate_normal(m, pooled).logpdf(queries) for m in class_means], axis=0) / 3
    np.testing.assert_allclose(top_gaussian_nll(fitted, queries), brute, rtol=1e-4, atol=1e-4)
    # stored and read back as plain arrays; a factor count that is neither 1 nor the class count is refused
    arrays = latent_arrays(fitted, "classifier_latent")
    back = latent_from_arrays(arrays, "d.npz", "classifier_latent")
    np.testing.assert_array_equal(top_gaussian_nll(back, queries), top_gaussian_nll(fitted, queries))
    two = dict(arrays, classifier_latent_precision_cholesky=np.concatenate([fitted.precision_cholesky] * 2))
    with pytest.raises(GlowflowError, match="holds 2 factors, not 1"):
        latent_from_arrays(two, "d.npz", "classifier_latent")


def test_with_labels_the_detector_trains_a_classifier_and_combines_it(trained, tmp_path):
    model, data = trained
    labelled = TensorDataset(data["train"], bright_labels(data["train"]))
    detector = glowflow.OutlierDetector(model, fit_images=None).fit(labelled)
    reference = detector.reference_
    assert reference.classifier is not None and detector.score == "combined"
    assert detector.score_names()[-2:] == ("classifier", "combined")
    held = detector.threshold_scores_
    # combined = standardised dos_orientation + CLASSIFIER_WEIGHT * standardised classifier,
    # both standardised on the held-back images themselves
    z = [(held[n] - held[n].mean()) / held[n].std() for n in ("dos_orientation", "classifier")]
    np.testing.assert_allclose(held["combined"], z[0] + CLASSIFIER_WEIGHT * z[1], rtol=1e-9, atol=1e-9)
    # the classifier score is the class Gaussians' NLL of the classifier's features
    stats = detector.statistics(data["noise"][:30])
    features = reference.classifier.net.features(data["noise"][:30]).detach().numpy()
    np.testing.assert_allclose(stats["classifier_features"], features, rtol=1e-5, atol=1e-6)
    scores = detector.outlier_scores(data["noise"][:30])
    direct = ood.outlier_scores(stats, reference)
    np.testing.assert_array_equal(scores, direct["combined"])
    np.testing.assert_allclose(
        direct["classifier"], top_gaussian_nll(reference.classifier_gaussians, features), rtol=1e-5
    )
    # the saved detector scores the same images the same way (weights stored as plain arrays)
    path = str(tmp_path / "detector.npz")
    detector.save(path)
    loaded = glowflow.OutlierDetector.load(path, model)
    np.testing.assert_array_equal(loaded.outlier_scores(data["noise"][:30]), scores)
    for (name, a), b in zip(
        reference.classifier.net.state_dict().items(), loaded.reference_.classifier.net.state_dict().values()
    ):
        assert torch.equal(a, b), name
    # noise is still far from smooth images
    assert np.median(detector.outlier_scores(data["noise"])) > np.median(detector.outlier_scores(data["test"]))
    # statistics without the classifier's features cannot be scored against this reference
    plain = {k: v for k, v in stats.items() if k != "classifier_features"}
    with pytest.raises(GlowflowError, match="label classifier"):
        ood.outlier_scores(plain, reference)


def test_without_labels_combined_is_dos_orientation(trained):
    model, data = trained
    detector = glowflow.OutlierDetector(model, fit_images=400).fit(data["train"])
    assert detector.reference_.classifier is None and "classifier" not in detector.score_names()
    np.testing.assert_array_equal(detector.threshold_scores_["combined"], detector.threshold_scores_["dos_orientation"])
    with pytest.raises(GlowflowError, match="no 'classifier' score"):
        detector.set_params(score="classifier")
    assert detector.score == "combined"  # the refused change is undone
    # labelled with a single class: no classifier either
    one_class = TensorDataset(data["train"][:400], torch.zeros(400, dtype=torch.long))
    assert glowflow.OutlierDetector(model, fit_images=400).fit(one_class).reference_.classifier is None


def test_a_damaged_classifier_in_a_detector_file_is_refused_in_one_line(trained, tmp_path):
    model, data = trained
    labelled = TensorDataset(data["train"][:500], bright_labels(data["train"][:500]))
    path = str(tmp_path / "detector.npz")
    glowflow.OutlierDetector(model, fit_images=None).fit(labelled).save(path)
    with np.load(path) as stored:
        arrays = dict(stored)
    broken = dict(arrays)
    weight = broken["classifier_param_conv1.weight"].copy()
    weight[0, 0, 0, 0] = math.nan
    broken["classifier_param_conv1.weight"] = weight
    np.savez(str(tmp_path / "nan.npz"), **broken)
    with pytest.raises(GlowflowError, match="classifier_param_conv1.weight holds 1 value"):
        glowflow.OutlierDetector.load(str(tmp_path / "nan.npz"), model)
    missing = {k: v for k, v in arrays.items() if not k.startswith("classifier_gaussian_")}
    np.savez(str(tmp_path / "missing.npz"), **missing)
    with pytest.raises(GlowflowError, match="without its class Gaussians"):
        glowflow.OutlierDetector.load(str(tmp_path / "missing.npz"), model)
    shape = dict(arrays, **{"classifier_param_head.weight": np.zeros((3, 128), np.float32)})
    np.savez(str(tmp_path / "shape.npz"), **shape)
    with pytest.raises(GlowflowError, match="classifier_param_head.weight has shape"):
        glowflow.OutlierDetector.load(str(tmp_path / "shape.npz"), model)
