"""The deployable detector (glowflow.OutlierDetector) and ``glowflow --score``: fit / score /
predict and their signs, the threshold's true-positive rate on unseen inliers, save / load
without pickle, the CSV and picture sheet, and one-line errors for bad image sets."""

import csv
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import glowflow
import glowflow.checkpoint
import glowflow.data
from glowflow import GlowflowError, ood
from glowflow.cli import main
from glowflow.ood.detector import threshold_at_tpr
from glowflow.ood.reference import load_reference, save_reference
from tests.helpers import randomised_model, write_noise_npz, write_smooth_npz
from tests.ood.test_ood import train_glow


def test_threshold_at_tpr_by_hand():
    scores = np.arange(1.0, 21.0)  # 20 inliers: 95% = 19 kept, so the threshold is the 19th smallest
    assert threshold_at_tpr(scores, 0.95) == 19.0
    assert threshold_at_tpr(scores, 0.5) == 10.0
    assert threshold_at_tpr(scores, 1.0) == 20.0
    assert threshold_at_tpr(scores, 0.01) == 1.0
    # a NaN score is the most outlying: 19 finite scores 1..19 and one NaN -> still 19
    assert threshold_at_tpr(np.r_[np.arange(1.0, 20.0), np.nan], 0.95) == 19.0
    with pytest.raises(GlowflowError, match="true-positive rate"):
        threshold_at_tpr(scores, 0.0)
    with pytest.raises(GlowflowError, match="at least one"):
        threshold_at_tpr([], 0.9)


def test_fit_score_predict_and_their_signs(trained):
    model, data = trained
    detector = glowflow.OutlierDetector(model, fit_images=None)
    assert detector.fit(data["train"]) is detector
    # a fifth held back for the threshold, the rest for the reference
    assert detector.n_threshold_ == 205 and detector.reference_.n_train == 819
    assert set(detector.thresholds_) == set(detector.score_names()) and detector.score == "combined"
    # unlabelled images: one Gaussian of the top latent, part of the density of states
    assert detector.reference_.latent.classes.tolist() == [-1]
    assert detector.reference_.dos_features[-1] == "top_gaussian"

    outlying = detector.outlier_scores(data["noise"])
    np.testing.assert_array_equal(detector.score_samples(data["noise"]), -outlying)
    np.testing.assert_allclose(detector.decision_function(data["noise"]), detector.threshold_ - outlying)
    assert detector.offset_ == -detector.threshold_
    pred_noise, pred_test = detector.predict(data["noise"]), detector.predict(data["test"])
    assert set(np.unique(pred_noise)) <= {-1, 1} and pred_noise.dtype.kind == "i"
    np.testing.assert_array_equal(detector.is_outlier(data["noise"]), pred_noise == -1)
    assert (pred_noise == -1).mean() > 0.95  # noise is flagged
    assert 0.85 < (pred_test == 1).mean() <= 1.0  # unseen inliers are kept, about 95% of them
    # decision_function < 0 exactly where predict says outlier
    np.testing.assert_array_equal(detector.decision_function(data["test"]) < 0, pred_test == -1)

    # the same images as a Dataset or a DataLoader (same batches): the same scores
    as_dataset = TensorDataset(data["noise"], torch.zeros(len(data["noise"])))
    np.testing.assert_array_equal(detector.outlier_scores(as_dataset), outlying)
    np.testing.assert_array_equal(detector.outlier_scores(DataLoader(as_dataset, batch_size=256)), outlying)

    # every score is available; switching the decision score needs no refit
    every = ood.outlier_scores(detector.statistics(data["noise"]), detector.reference_)
    assert list(every) == list(detector.score_names())
    detector.set_params(score="nll")
    np.testing.assert_array_equal(detector.outlier_scores(data["noise"]), every["nll"])
    with pytest.raises(GlowflowError, match="unknown detector score 'bogus'"):
        detector.set_params(score="bogus")


def test_fit_uses_a_seeded_subset_and_given_threshold_images(trained):
    model, data = trained
    # given threshold images: the budget splits as without them, 80% reference, 20% threshold
    detector = glowflow.OutlierDetector(model, fit_images=500)
    detector.fit(data["train"], threshold_images=data["test"][:300])
    assert detector.reference_.n_train == 400 and detector.n_threshold_ == 100
    everything = glowflow.OutlierDetector(model, fit_images=None)
    everything.fit(data["train"][:500], threshold_images=data["test"][:300])
    assert everything.reference_.n_train == 500 and everything.n_threshold_ == 300
    # at least 95% of the threshold images themselves are kept (ceil(0.95 * 300) = 285)
    kept = (everything.labels_ == 0).sum()
    assert kept >= 285 and kept <= 290
    again = glowflow.OutlierDetector(model, fit_images=500).fit(data["train"], threshold_images=data["test"][:300])
    assert again.threshold_ == detector.threshold_  # seeded: the same subset and the same threshold
    other = glowflow.OutlierDetector(model, fit_images=500, seed=3)
    other.fit(data["train"], threshold_images=data["test"][:300])
    assert other.threshold_ != detector.threshold_


def test_unfitted_and_bad_settings_are_one_line_errors(trained):
    model, data = trained
    with pytest.raises(GlowflowError, match="not fitted"):
        glowflow.OutlierDetector(model).predict(data["noise"])
    with pytest.raises(GlowflowError, match="unknown detector score 'likelihood_ratio'"):
        glowflow.OutlierDetector(model, score="likelihood_ratio")
    with pytest.raises(GlowflowError, match="true-positive rate"):
        glowflow.OutlierDetector(model, tpr=1.5)
    with pytest.raises(GlowflowError, match="fit_images"):
        glowflow.OutlierDetector(model, fit_images=0)
    with pytest.raises(GlowflowError, match="shape"):
        glowflow.OutlierDetector(model).fit(torch.rand(10, 8, 8))


def test_the_detector_is_an_estimator(trained):
    """get_params/set_params (score and tpr keep the fit, a fit setting unfits it), labels from y,
    PyOD's decision_scores_ and labels_ of the held-back images, fit_predict."""
    model, data = trained
    detector = glowflow.OutlierDetector(model, fit_images=300)
    params = detector.get_params()
    assert list(params) == list(ood.detector.PARAMETERS) and params["score"] == "combined"
    assert glowflow.OutlierDetector(**params).get_params() == params
    with pytest.raises(GlowflowError, match="not fitted") as caught:
        _ = detector.threshold_
    assert isinstance(caught.value, AttributeError) and not hasattr(detector, "labels_")
    labels = torch.arange(len(data["train"])) % 2
    predicted = detector.fit_predict(data["train"], labels)
    assert detector.reference_.latent.classes.tolist() == [0, 1]
    assert predicted.shape == (len(data["train"]),) and set(np.unique(predicted)) <= {-1, 1}
    assert detector.n_threshold_ == 60 and detector.decision_scores_.shape == (60,)
    np.testing.assert_array_equal(detector.decision_scores_, detector.threshold_scores_["combined"])
    np.testing.assert_array_equal(detector.labels_, (detector.decision_scores_ > detector.threshold_).astype(int))
    reference = detector.reference_
    assert detector.set_params(score="nll", tpr=0.5) is detector and detector.reference_ is reference
    assert detector.threshold_ == ood.detector.threshold_at_tpr(detector.threshold_scores_["nll"], 0.5)
    assert detector.labels_.mean() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(GlowflowError, match="true-positive rate"):
        detector.set_params(tpr=2.0)
    with pytest.raises(GlowflowError, match="unknown OutlierDetector parameter 'bogus'"):
        detector.set_params(bogus=1)
    assert detector.tpr == 0.5 and detector.reference_ is reference  # a refused change changes nothing
    detector.set_params(batch_size=64, progress=False)
    assert detector.reference_ is reference
    detector.set_params(seed=1)
    assert not hasattr(detector, "reference_")
    with pytest.raises(GlowflowError, match="not fitted"):
        detector.predict(data["noise"])
    with pytest.raises(GlowflowError, match="2 labels for 1024 images"):
        detector.fit(data["train"], labels[:2])
    with pytest.raises(GlowflowError, match="integer class labels"):
        detector.fit(data["train"], labels.float())


def test_threshold_keeps_its_true_positive_rate_on_unseen_inliers():
    """The threshold is set on 2000 held-back inliers; on 20000 fresh inliers from the same
    distribution the share kept must be the target within sampling error (3 sigma of the
    binomial spread of both sets: about 0.016 at 95%)."""
    model = randomised_model((1, 8, 8), 2, dict(flow_permutation="invconv", flow_coupling="affine"))
    rng = np.random.default_rng(0)

    def stats(n):
        level = rng.normal([1.0, 2.0], [0.1, 0.3], (n, 2)) + rng.normal(0, 0.05, (n, 1))
        turned = level.sum(1)[:, None] + rng.normal([0.1, 0.2], [0.05, 0.1], (n, 2))  # vflip, rot90
        return {"bpd": level.sum(1), "level_bpd": level, "codec_bpd": rng.normal(4.0, 0.2, n), "transform_bpd": turned}

    fresh = stats(20000)
    for tpr in (0.95, 0.8):
        detector = glowflow.OutlierDetector(model, tpr=tpr).fit_statistics(stats(8000), stats(2000))
        sigma = np.sqrt(tpr * (1 - tpr) * (1 / 2000 + 1 / 20000))
        for name in ("dos_orientation", "dos", "orientation", "nll", "typicality"):
            detector.set_params(score=name)
            kept = np.mean(ood.outlier_scores(fresh, detector.reference_)[name] <= detector.threshold_)
            assert abs(kept - tpr) < 3 * sigma, (tpr, name, kept)
        # and moving the rate moves the thresholds, without refitting
        assert detector.set_params(tpr=0.5).threshold_ < detector.set_params(tpr=0.99).threshold_


def test_saved_detector_reloads_to_identical_scores_without_pickle(trained, tmp_path):
    model, data = trained
    labels = torch.arange(len(data["train"])) % 3  # class labels: one top-latent Gaussian per class
    labelled = TensorDataset(data["train"], labels)
    detector = glowflow.OutlierDetector(model, score="complexity", tpr=0.9, fit_images=600).fit(labelled)
    assert detector.reference_.latent.classes.tolist() == [0, 1, 2]
    assert "top_gaussian" in detector.reference_.dos_features
    path = str(tmp_path / "detector.npz")
    detector.save(path)
    with np.load(path, allow_pickle=False) as f:  # plain arrays only
        assert all(f[k].dtype != object for k in f.files)
    loaded = glowflow.OutlierDetector.load(path, model)
    assert (loaded.score, loaded.tpr, loaded.fit_images) == ("complexity", 0.9, 600)
    assert loaded.thresholds_ == detector.thresholds_
    for name in ("noise", "test"):
        a = ood.outlier_scores(detector.statistics(data[name]), detector.reference_)
        b = ood.outlier_scores(loaded.statistics(data[name]), loaded.reference_)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        np.testing.assert_array_equal(loaded.predict(data[name]), detector.predict(data[name]))
    # a saved detector is also a readable reference
    assert load_reference(path).n_train == detector.reference_.n_train

    changed = train_glow(data["train"], steps=2, seed=4)
    with pytest.raises(GlowflowError, match="fitted for another model"):
        glowflow.OutlierDetector.load(path, changed)
    save_reference(str(tmp_path / "ref.npz"), detector.reference_)
    with pytest.raises(GlowflowError, match="not a glowflow-ood-detector-v1 file"):
        glowflow.OutlierDetector.load(str(tmp_path / "ref.npz"), model)
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(GlowflowError, match="cannot read outlier detector"):
        glowflow.OutlierDetector.load(str(tmp_path / "bad.npz"), model)
    with pytest.raises(GlowflowError, match="no outlier detector"):
        glowflow.OutlierDetector.load(str(tmp_path / "missing.npz"), model)


# ----------------------------------------------------------------------------- glowflow --score


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("score")
    smooth = write_smooth_npz(folder / "smooth.npz", n=160, size=16)
    flags = ["--n_epochs", "2", "--batch_size", "16", "--hidden_channels", "8", "--K", "2", "--L", "2"]
    flags += ["--no_wandb", "--sample_and_save_freq", "0", "--warmup", "1", "--lr", "1e-3"]
    assert main(["--train", "--dataset", smooth, "--output_dir", str(folder / "run"), *flags]) == 0
    return str(folder / "run" / "Glow_smooth.pt"), folder


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_score_an_npz_and_a_folder(checkpoint, tmp_path, capsys):
    ckpt, folder = checkpoint
    noise = write_noise_npz(tmp_path / "noise.npz", n=40, size=16)
    out = tmp_path / "out"
    assert main(["--score", noise, "--checkpoint", ckpt, "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    cache = ckpt.replace(".pt", ".ood_detector_smooth_8bit.npz")
    assert os.path.exists(cache) and f"wrote {cache}" in printed
    rows = _rows(out / "scores_noise.csv")
    assert len(rows) == 40 and [r["image"] for r in rows] == [str(i) for i in range(40)]
    assert list(rows[0]) == [
        "index",
        "image",
        "bits_per_dim",
        "nll",
        "complexity",
        "typicality",
        "level_1_bpd",
        "level_2_bpd",
        "hierarchy_ratio",
        "top_gaussian",
        "dos",
        "orientation",
        "dos_orientation",
        "classifier",
        "combined",
        "outlier",
        "decision",
        "unreadable",
    ]
    flagged = sum(int(r["outlier"]) for r in rows)
    assert flagged >= 36  # noise against smooth gradients
    assert all((float(r["decision"]) < 0) == (r["outlier"] == "1") for r in rows)
    assert f"scored 40 images of {noise} with combined: {flagged} flagged" in printed
    with Image.open(out / "scores_noise_sheet.png") as im:
        assert im.format == "PNG" and im.size[0] > 600

    # a folder of PNGs (two class sub-folders): one row per file, named by its path; the cached
    # detector is reused and a saved detector given with --detector gives the same numbers
    images = folder / "pngs"
    rng = np.random.default_rng(0)
    for k in range(6):
        (images / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(images / f"c{k % 2}" / f"{k}.png")
    out2 = tmp_path / "out2"
    assert main(["--score", str(images), "--checkpoint", ckpt, "--output_dir", str(out2)]) == 0
    assert "reusing the training statistics" in capsys.readouterr().out
    rows = _rows(out2 / "scores_pngs.csv")
    assert len(rows) == 6 and all(r["image"].endswith(".png") and os.path.exists(r["image"]) for r in rows)
    assert (out2 / "scores_pngs_sheet.png").exists()
    out3 = tmp_path / "out3"
    assert main(["--score", str(images), "--checkpoint", ckpt, "--detector", cache, "--output_dir", str(out3)]) == 0
    assert (out3 / "scores_pngs.csv").read_text() == (out2 / "scores_pngs.csv").read_text()


def test_a_valid_cached_detector_spares_reading_the_training_set(checkpoint, tmp_path, monkeypatch):
    ckpt, _ = checkpoint
    noise = write_noise_npz(tmp_path / "noise.npz", n=20, size=16)
    assert main(["--score", noise, "--checkpoint", ckpt, "--output_dir", str(tmp_path / "first")]) == 0  # cached
    load_dataset = glowflow.data.load_dataset

    def no_training_split(name, split, *args, **kwargs):
        assert split != "train", "the training set was read although the cached detector is valid"
        return load_dataset(name, split, *args, **kwargs)

    monkeypatch.setattr(glowflow.data, "load_dataset", no_training_split)
    assert main(["--score", noise, "--checkpoint", ckpt, "--output_dir", str(tmp_path / "again")]) == 0
    out = tmp_path / "ood"
    assert main(["--outlier_detection", "--checkpoint", ckpt, "--out_dataset", noise, "--output_dir", str(out)]) == 0
    assert (out / "ood_smooth_vs_noise.json").exists()


def _bad_sets(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    np.savez(tmp_path / "none.npz", images=np.zeros((0, 16, 16), np.uint8))
    with zipfile.ZipFile(tmp_path / "wrong.npz", "w") as z:
        z.writestr("labels.npy", b"")
    return [
        (empty, "no images in"),
        (broken, "no readable image in " + str(broken)),
        (broken, "cannot read image " + str(broken / "a.png")),
        (tmp_path / "garbage.npz", "cannot read"),
        (tmp_path / "none.npz", "empty"),
        (tmp_path / "wrong.npz", "has no 'images' array"),
        (tmp_path / "missing.npz", "does not exist"),
        (tmp_path / "file.txt", "--score: cannot read image " + str(tmp_path / "file.txt")),
    ]


def test_score_bad_image_sets_are_one_line_errors(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    (tmp_path / "file.txt").write_text("x")
    for path, message in _bad_sets(tmp_path):
        out = tmp_path / f"out_{path.name}"
        code = main(["--score", str(path), "--checkpoint", ckpt, "--output_dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2, (path, err)
        last = err.rstrip("\n").replace("\r", "\n").split("\n")[-1]  # progress bars (\r) may come before it
        assert last.startswith("glowflow: error: ") and message in last and err.count("glowflow:") == 1, (path, err)
        assert not out.exists()
    assert main(["--score", str(tmp_path / "none.npz")]) == 2
    assert "--score needs --checkpoint" in capsys.readouterr().err


def test_a_checkpoints_detector_sets_its_threshold_on_the_validation_split(checkpoint, tmp_path, monkeypatch):
    # the tiny run: 130 training / 14 validation / 16 test images of smooth.npz (a fixed partition)
    ckpt, _ = checkpoint
    run = glowflow.checkpoint.Checkpoint.read(ckpt)
    assert run.validation_split(run.dataset) == (14, 0)
    assert run.validation_split("another") is None
    fitted = []
    fit = glowflow.OutlierDetector._fit  # what fit and the commands' cache (detector_for) call

    def record(self, images, y=None, threshold_images=None, key=""):
        fitted.append((len(images.dataset), len(threshold_images.dataset)))
        return fit(self, images, y, threshold_images, key)

    monkeypatch.setattr(glowflow.OutlierDetector, "_fit", record)
    copy = tmp_path / "model.pt"
    copy.write_bytes(open(ckpt, "rb").read())
    noise = write_noise_npz(tmp_path / "noise.npz", n=20, size=16)
    out = tmp_path / "ood"
    assert (
        main(["--outlier_detection", "--checkpoint", str(copy), "--out_dataset", noise, "--output_dir", str(out)]) == 0
    )
    assert fitted == [(130, 14)]  # reference on the training part, threshold on the validation split
    with open(out / "ood_smooth_vs_noise.json") as f:
        reference = json.load(f)["reference"]
    assert reference["n_train"] == 130 and reference["n_threshold"] == 14
