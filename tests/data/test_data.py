"""glowflow.data: every dataset from its real on-disk format, the user's own data, clear errors.

Each named dataset is tested on a tiny copy written here in that dataset's real format (IDX,
CIFAR pickles, SVHN .mat, medmnist .npz, the Tiny-ImageNet / Places365 / DTD / ImageNet trees),
under a temporary data root, loaded through load_dataset exactly as a user's run loads it.
The real Fashion-MNIST comes from Debian's dataset-fashion-mnist (scripts/setup.sh installs it).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import http.server
import os
import pickle
import socket
import struct
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from glowflow.cli import main
from glowflow.data import (
    DATASET_NAMES,
    DatasetInfo,
    ImageTensorDataset,
    dataset_info,
    load_dataset,
    make_loader,
    match_shape,
    readers,
    specs,
)
from glowflow.errors import GlowflowError

DEBIAN_FASHION = "/usr/share/datasets/fashion-mnist"


# ------------------------------------------------------------------------------------------
# helpers


def seed_transform(size, crop=None):
    """GenerativeZoo's preprocessing of one PIL image: (CenterCrop,) Resize, ToTensor."""
    steps = ([transforms.CenterCrop(crop)] if crop else []) + [transforms.Resize(size), transforms.ToTensor()]
    return transforms.Compose(steps)


def all_items(ds):
    images, labels = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(images), torch.stack(labels)


def check_images(images, shape):
    assert images.dtype == torch.float32
    assert tuple(images.shape[1:]) == shape
    assert images.min() >= 0 and images.max() <= 1
    # ToTensor of uint8 pixels: every value is k/255 exactly
    pixels = images * 255
    assert torch.equal(pixels.round() / 255, images)


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 | array.ndim
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def solid(size, colour, mode="RGB"):
    return Image.new(mode, size, colour)


def colour_of(label):
    """A distinct solid colour per class, so each image shows which label it must carry."""
    return (30 + 70 * label, 200 - 60 * label, 90 + 50 * (label % 2))


def assert_colours_match_labels(images, labels):
    for image, label in zip(images, labels):
        expected = torch.tensor(colour_of(int(label)), dtype=torch.float32) / 255
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.03), (label, image.mean(dim=(1, 2)))


@pytest.fixture
def offline(monkeypatch):
    """The network unreachable, whatever the machine: every connection and name look-up fails."""

    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable (test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True)
def no_user_medmnist(monkeypatch, tmp_path_factory):
    """Keep a real ~/.medmnist of the machine out of the tests."""
    monkeypatch.setattr(specs, "MEDMNIST_HOME", str(tmp_path_factory.mktemp("medmnist-home")))


# ------------------------------------------------------------------------------------------
# names, infos


def test_names_and_infos():
    assert len(DATASET_NAMES) == 13
    expected = {
        "mnist": ((1, 32, 32), 10),
        "fashionmnist": ((1, 32, 32), 10),
        "cifar10": ((3, 32, 32), 10),
        "cifar100": ((3, 32, 32), 100),
        "svhn": ((3, 32, 32), 10),
        "chestmnist": ((1, 32, 32), 14),
        "octmnist": ((1, 32, 32), 4),
        "tissuemnist": ((1, 32, 32), 8),
        "pneumoniamnist": ((1, 32, 32), 2),
        "tinyimagenet": ((3, 64, 64), 200),
        "places365": ((3, 128, 128), 365),
        "dtd": ((3, 128, 128), 47),
        "imagenet": ((3, 128, 128), 1000),
    }
    assert set(expected) == set(DATASET_NAMES)
    for name, (shape, classes) in expected.items():
        info = dataset_info(name, data_root="/nonexistent")
        assert info == DatasetInfo(name, shape, classes, name == "chestmnist")
    assert dataset_info("cifar10", image_size=64).image_shape == (3, 64, 64)


# ------------------------------------------------------------------------------------------
# the 13 datasets in their real formats


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_idx_datasets(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", 12), ("t10k", 7)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = images, labels
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset(name, split, data_root=str(tmp_path), download=False)
        images, labels = all_items(ds)
        raw_images, raw_labels = arrays[prefix]
        assert len(ds) == len(raw_images)
        check_images(images, (1, 32, 32))
        assert labels.dtype == torch.int64 and labels.tolist() == raw_labels.tolist()
        # GenerativeZoo's preprocessing: torchvision Resize(32) of the 28x28 PIL image, then ToTensor
        expected = torch.stack([seed_transform(32)(Image.fromarray(a, mode="L")) for a in raw_images])
        assert torch.equal(images, expected)
        assert ds.info == dataset_info(name)
    # --image_size: the native 28 keeps the pixels as they are; 64 upsamples
    native = load_dataset(name, "train", data_root=str(tmp_path), image_size=28, download=False)
    assert torch.equal((all_items(native)[0] * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(arrays["train"][0]))
    assert native[0][0].shape == (1, 28, 28)
    assert load_dataset(name, "train", data_root=str(tmp_path), image_size=64, download=False)[0][0].shape == (
        1,
        64,
        64,
    )


def cifar_files(root, folder, n_classes, label_key):
    """CIFAR's python pickles: dicts of 'data' (N, 3072) uint8 rows (R, G, B planes) and labels."""
    rng = np.random.default_rng(1)
    base = root / folder
    base.mkdir()
    batches = {}

    def dump(name, n, start):
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(start + i * 7) % n_classes for i in range(n)]
        entry = {"data": images, label_key: labels, "filenames": [f"img{i}.png" for i in range(n)]}
        if label_key == "fine_labels":
            entry["coarse_labels"] = [label // 5 for label in labels]
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
        batches[name] = images.reshape(n, 3, 32, 32), labels

    return dump, batches


def test_cifar10(tmp_path):
    dump, batches = cifar_files(tmp_path, "cifar-10-batches-py", 10, "labels")
    for i in range(1, 6):
        dump(f"data_batch_{i}", 2, i)
    dump("test_batch", 3, 0)
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 2}, f)
    train = load_dataset("cifar10", "train", data_root=str(tmp_path), download=False)
    images, labels = all_items(train)
    assert len(train) == 10
    check_images(images, (3, 32, 32))
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(images, torch.from_numpy(expected).float() / 255)
    assert labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test = load_dataset("cifar10", "test", data_root=str(tmp_path), download=False)
    assert len(test) == 3 and all_items(test)[1].tolist() == batches["test_batch"][1]
    assert test.info.num_classes == 10


def test_cifar100(tmp_path):
    dump, batches = cifar_files(tmp_path, "cifar-100-python", 100, "fine_labels")
    dump("train", 15, 90)
    dump("test", 4, 3)
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []}, f)
    train = load_dataset("cifar100", "train", data_root=str(tmp_path), download=False)
    images, labels = all_items(train)
    assert len(train) == 15 and train.info.num_classes == 100
    check_images(images, (3, 32, 32))
    assert torch.equal(images, torch.from_numpy(batches["train"][0]).float() / 255)
    assert labels.tolist() == batches["train"][1] and max(labels.tolist()) > 90
    assert len(load_dataset("cifar100", "test", data_root=str(tmp_path), download=False)) == 4


class RunsCode:
    """A pickled object whose unpickling calls ``function(*args)``: what a crafted CIFAR file holds."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def crafted_payloads(marker):
    """Objects that, if unpickled, create ``marker``: through os.system, and through exec."""
    return {
        "os.system": RunsCode(os.system, f"touch '{marker}'"),
        "exec": RunsCode(exec, f"open({str(marker)!r}, 'w').close()"),
    }


@pytest.fixture
def no_plain_unpickling(monkeypatch):
    """Any call of pickle.load or pickle.loads (torchvision's way to read CIFAR) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("pickle.load called: CIFAR files must go through the restricted unpickler")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def cifar10_tree(root, crafted=None, payload=None):
    """A small real-format CIFAR-10 folder; ``crafted`` names a file that holds ``payload`` instead."""
    dump, _ = cifar_files(root, "cifar-10-batches-py", 10, "labels")
    for i in range(1, 6):
        dump(f"data_batch_{i}", 2, i)
    dump("test_batch", 3, 0)
    with open(root / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 2}, f)
    if crafted is not None:
        with open(root / "cifar-10-batches-py" / crafted, "wb") as f:
            pickle.dump({"data": payload, "labels": [0, 1]}, f)


@pytest.mark.parametrize("how", ["os.system", "exec"])
@pytest.mark.parametrize("crafted,split", [("data_batch_1", "train"), ("test_batch", "test"), ("batches.meta", "test")])
def test_crafted_cifar_pickle_is_refused_and_never_run(tmp_path, how, crafted, split, no_plain_unpickling):
    marker = tmp_path / "ran"
    cifar10_tree(tmp_path, crafted, crafted_payloads(marker)[how])
    with pytest.raises(GlowflowError) as err:
        load_dataset("cifar10", split, data_root=str(tmp_path), download=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "cifar-10-batches-py" / crafted) in message
    assert "not loaded" in message and ("posix.system" in message or "builtins.exec" in message), message
    assert not marker.exists()
    # the untouched split still loads
    other = "test" if split == "train" and crafted != "batches.meta" else None
    if other:
        assert len(load_dataset("cifar10", other, data_root=str(tmp_path), download=False)) == 3


def test_crafted_cifar_files_would_run_code_if_unpickled(tmp_path):
    """The payloads of the test above are live: a plain pickle.load runs them (so it can fail)."""
    for how, payload in crafted_payloads(tmp_path / "ran").items():
        (tmp_path / "ran").unlink(missing_ok=True)
        pickle.loads(pickle.dumps(payload))
        assert (tmp_path / "ran").exists(), how


def test_crafted_cifar100_and_the_command_line_exit_2(tmp_path, capsys, no_plain_unpickling):
    marker = tmp_path / "ran"
    dump, _ = cifar_files(tmp_path, "cifar-100-python", 100, "fine_labels")
    dump("test", 4, 3)
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": crafted_payloads(marker)["os.system"], "fine_labels": [0]}, f)
    with pytest.raises(GlowflowError, match="not loaded"):
        load_dataset("cifar100", "train", data_root=str(tmp_path), download=False)
    assert len(load_dataset("cifar100", "test", data_root=str(tmp_path), download=False)) == 4

    cifar10_tree(tmp_path, "data_batch_1", crafted_payloads(marker)["os.system"])
    argv = ["--dataset", "cifar10", "--data_root", str(tmp_path), "--output_dir", str(tmp_path / "run")]
    tiny = ["--n_epochs", "1", "--batch_size", "2", "--hidden_channels", "4", "--K", "1", "--L", "1", "--no_wandb"]
    assert main(["--train", *argv, *tiny]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glowflow: error: ") and err.count("\n") == 1, err
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in err and "Traceback" not in err
    assert not marker.exists()


def test_corrupt_cifar_files_are_one_line_errors_naming_the_file(tmp_path, no_plain_unpickling):
    cifar10_tree(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    cases = [
        (b"\x80\x04garbage", "cannot read .* as a CIFAR pickle"),
        (pickle.dumps([1, 2, 3]), "is not a CIFAR batch"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}), "uint8 array"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "2 integer labels"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": ["a", "b"]}), "2 integer labels"),
    ]
    for content, pattern in cases:
        batch.write_bytes(content)
        with pytest.raises(GlowflowError, match=pattern) as err:
            load_dataset("cifar10", "test", data_root=str(tmp_path), download=False)
        assert str(batch) in str(err.value) and "\n" not in str(err.value)


def test_cifar_reads_python2_latin1_pickles_and_every_protocol(tmp_path, no_plain_unpickling):
    """The real files are Python 2 pickles (protocol 2, str keys, array bytes as latin1 str);
    files written by Python 3 at protocols 0-5, with bytes keys or numpy integer labels, read too."""
    images = np.random.default_rng(2).integers(0, 256, (3, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    cifar10_tree(tmp_path)
    entries = [
        {"data": images, "labels": [1, 2, 3]},
        {b"data": images, b"labels": [1, 2, 3]},
        {"data": images, "labels": list(np.array([1, 2, 3]))},
        {"data": images, "labels": np.array([1, 2, 3])},
    ]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for entry in entries:
            (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=protocol))
            test = load_dataset("cifar10", "test", data_root=str(tmp_path), download=False)
            got, labels = all_items(test)
            assert torch.equal(got, torch.from_numpy(images.reshape(3, 3, 32, 32)).float() / 255)
            assert labels.tolist() == [1, 2, 3]
    # Python 2's cPickle.dump(batch, f, 2) of a one-image batch, as the real files were written
    # (keys and the array's bytes are Python 2 str, read as latin1)
    py2 = (
        b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
        b"K\x00\x85U\x01b\x87Rq\x04(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06"
        b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T\x00\x0c\x00\x00"
        + bytes(range(256)) * 12
        + b"tbU\x06labelsq\x07]q\x08K\x07au."
    )
    (folder / "test_batch").write_bytes(py2)
    got, labels = all_items(load_dataset("cifar10", "test", data_root=str(tmp_path), download=False))
    assert torch.equal(got[0], torch.arange(256).repeat(12).reshape(3, 32, 32).float() / 255)
    assert labels.tolist() == [7]


def test_svhn(tmp_path):
    import scipy.io

    rng = np.random.default_rng(2)
    written = {}
    for split, n in (("train", 11), ("test", 12)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # SVHN's .mat: X is (H, W, C, N)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # digits 1..10, 10 meaning 0
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = x, y
    for split, (x, y) in written.items():
        ds = load_dataset("svhn", split, data_root=str(tmp_path), download=False)
        images, labels = all_items(ds)
        assert len(ds) == x.shape[-1]
        check_images(images, (3, 32, 32))
        assert torch.equal(images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()).float() / 255)
        assert labels.tolist() == [int(v) % 10 for v in y[:, 0]]
        assert 0 in labels.tolist() and 10 not in labels.tolist()


@pytest.mark.parametrize(
    "flag,classes", [("chestmnist", 14), ("octmnist", 4), ("tissuemnist", 8), ("pneumoniamnist", 2)]
)
def test_medmnist(tmp_path, flag, classes):
    """medmnist's 28-pixel .npz: <flag>.npz with {train,val,test}_{images,labels}."""
    rng = np.random.default_rng(3)
    arrays = {}
    for split, n in (("train", 6), ("val", 4), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        if flag == "chestmnist":
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 14), dtype=np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8).reshape(n, 1)
    np.savez_compressed(tmp_path / f"{flag}.npz", **arrays)
    for split in ("train", "test"):  # "test" is medmnist's labelled test split, not val
        ds = load_dataset(flag, split, data_root=str(tmp_path), download=False)
        images, labels = all_items(ds)
        assert len(ds) == len(arrays[f"{split}_images"])
        check_images(images, (1, 32, 32))
        expected = torch.stack([seed_transform(32)(Image.fromarray(a)) for a in arrays[f"{split}_images"]])
        assert torch.equal(images, expected)
        if flag == "chestmnist":
            assert labels.dtype == torch.float32 and labels.shape == (len(ds), 14)
            assert torch.equal(labels, torch.from_numpy(arrays[f"{split}_labels"]).float())
            assert ds.info.multilabel
        else:
            assert labels.dtype == torch.int64 and labels.shape == (len(ds),)
            assert labels.tolist() == arrays[f"{split}_labels"][:, 0].tolist()
        assert ds.info.num_classes == classes


def tiny_imagenet_tree(root):
    """tiny-imagenet-200/{wnids.txt, train/<wnid>/{images/*.JPEG, <wnid>_boxes.txt}, val/...}."""
    base = root / "tiny-imagenet-200"
    wnids = ["n09193705", "n01443537", "n04067472"]  # wnids.txt is not sorted; labels follow sorted order
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        label = sorted(wnids).index(wnid)
        (base / "train" / wnid / "images").mkdir(parents=True)
        for k in range(2):
            solid((64, 64), colour_of(label)).save(base / "train" / wnid / "images" / f"{wnid}_{k}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    val_labels = [2, 0, 1, 1, 0]
    lines = []
    for i, label in enumerate(val_labels):
        solid((64, 64), colour_of(label)).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{sorted(wnids)[label]}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return val_labels


def test_tinyimagenet(tmp_path):
    val_labels = tiny_imagenet_tree(tmp_path)
    train = load_dataset("tinyimagenet", "train", data_root=str(tmp_path), download=False)
    images, labels = all_items(train)
    assert len(train) == 6
    check_images(images, (3, 64, 64))
    assert sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert_colours_match_labels(images, labels)
    val = load_dataset("tinyimagenet", "test", data_root=str(tmp_path), download=False)
    images, labels = all_items(val)
    assert labels.tolist() == val_labels  # from val_annotations.txt, not all 0 as in GenerativeZoo's script
    assert_colours_match_labels(images, labels)
    assert val.info.num_classes == 200
    assert load_dataset("tinyimagenet", "test", data_root=str(tmp_path), image_size=32, download=False)[0][0].shape == (
        3,
        32,
        32,
    )


def test_places365(tmp_path):
    """torchvision's small-image layout: category and file lists, data_256_standard/, val_256/."""
    categories = ["/a/airfield", "/b/beach", "/c/canyon"]
    (tmp_path / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(categories)))
    train_lines, val_lines = [], []
    for i, label in enumerate([0, 1, 2, 2, 1]):
        name = f"{categories[label]}/{i:08d}.jpg"
        path = tmp_path / "data_256_standard" / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        solid((256, 256), colour_of(label)).save(path)
        train_lines.append(f"{name} {label}")
    (tmp_path / "val_256").mkdir()
    for i, label in enumerate([2, 0, 1]):
        name = f"Places365_val_{i + 1:08d}.jpg"
        solid((256, 256), colour_of(label)).save(tmp_path / "val_256" / name)
        val_lines.append(f"{name} {label}")
    (tmp_path / "places365_train_standard.txt").write_text("\n".join(train_lines) + "\n")
    (tmp_path / "places365_val.txt").write_text("\n".join(val_lines) + "\n")
    for split, expected in (("train", [0, 1, 2, 2, 1]), ("test", [2, 0, 1])):
        ds = load_dataset("places365", split, data_root=str(tmp_path), download=False)
        images, labels = all_items(ds)
        check_images(images, (3, 128, 128))
        assert labels.tolist() == expected
        assert_colours_match_labels(images, labels)
        assert ds.info.num_classes == 365


def test_dtd(tmp_path):
    """torchvision's layout: dtd/dtd/images/<class>/*.jpg and labels/{train,val,test}1.txt.

    The images are wider than tall with differently coloured side strips: the centre square
    crop must remove the strips entirely before the resize to 128x128."""
    base = tmp_path / "dtd" / "dtd"
    classes = ["banded", "dotted", "zigzagged"]
    splits = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(classes):
        (base / "images" / cls).mkdir(parents=True)
        for k, split in enumerate(["train", "train", "val", "test"]):
            image = solid((200, 150), (0, 0, 255))
            image.paste(solid((150, 150), colour_of(label)), (25, 0))
            image.save(base / "images" / cls / f"{cls}_{k:04d}.jpg", quality=95)
            splits[split].append(f"{cls}/{cls}_{k:04d}.jpg")
    (base / "labels").mkdir()
    for split, lines in splits.items():
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    train = load_dataset("dtd", "train", data_root=str(tmp_path), download=False)
    images, labels = all_items(train)
    assert len(train) == 6
    check_images(images, (3, 128, 128))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert_colours_match_labels(images, labels)
    reference = seed_transform((128, 128), crop=150)(Image.open(base / "images" / "banded" / "banded_0000.jpg"))
    assert torch.equal(images[0], reference)
    test = load_dataset("dtd", "test", data_root=str(tmp_path), download=False)
    assert all_items(test)[1].tolist() == [0, 1, 2] and test.info.num_classes == 47


def test_imagenet(tmp_path):
    """torchvision's ImageNet layout, imagenet/{train,val}/<wnid>/*.JPEG, read as an ImageFolder."""
    wnids = ["n01440764", "n01443537"]
    for split, per_class in (("train", 3), ("val", 2)):
        for label, wnid in enumerate(wnids):
            folder = tmp_path / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for k in range(per_class):
                solid((300, 240), colour_of(label)).save(folder / f"{wnid}_{k}.JPEG")
    for split, n in (("train", 6), ("test", 4)):
        ds = load_dataset("imagenet", split, data_root=str(tmp_path), download=False)
        images, labels = all_items(ds)
        assert len(ds) == n
        check_images(images, (3, 128, 128))
        assert labels.tolist() == [0] * (n // 2) + [1] * (n // 2)
        assert_colours_match_labels(images, labels)
        assert ds.info.num_classes == 1000


# ------------------------------------------------------------------------------------------
# the real Fashion-MNIST of Debian's dataset-fashion-mnist


def test_real_fashion_mnist_from_debian_package(tmp_path):
    if not os.path.exists(os.path.join(DEBIAN_FASHION, "train-images-idx3-ubyte.gz")):
        if os.environ.get("CI"):
            pytest.fail("Debian's dataset-fashion-mnist is missing: scripts/setup.sh must install it in CI")
        pytest.skip("apt-get install dataset-fashion-mnist to run this test")
    empty_root = str(tmp_path / "data")  # nothing there: the system copy must be found
    train = load_dataset("fashionmnist", "train", data_root=empty_root, download=False)
    test = load_dataset("fashionmnist", "test", data_root=empty_root, download=False)
    assert (len(train), len(test)) == (60000, 10000)
    for ds, per_class in ((train, 6000), (test, 1000)):
        loader = make_loader(ds, batch_size=10000, shuffle=False)
        images, labels = map(torch.cat, zip(*loader))
        check_images(images, (1, 32, 32))
        assert images.max() == 1 and images.min() == 0
        assert labels.dtype == torch.int64
        assert torch.bincount(labels).tolist() == [per_class] * 10
    assert not os.path.exists(empty_root)  # read in place: nothing written under data_root
    # the same pixels as GenerativeZoo's pipeline on the raw 28x28 images
    with gzip.open(os.path.join(DEBIAN_FASHION, "t10k-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    for i in range(0, 10000, 997):
        assert torch.equal(test[i][0], seed_transform(32)(Image.fromarray(raw[i], mode="L")))


# ------------------------------------------------------------------------------------------
# no files, no network; the library download path


def test_offline_error_names_every_place(tmp_path, monkeypatch, offline):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    monkeypatch.setattr(specs, "SYSTEM_LOCATIONS", {"fashionmnist": (str(system),)})
    root = str(tmp_path / "data")
    previous = socket.getdefaulttimeout()
    with pytest.raises(GlowflowError) as err:
        load_dataset("fashionmnist", "train", data_root=root)
    message = str(err.value)
    assert "\n" not in message
    assert f"{root} (no FashionMNIST/raw/train-images-idx3-ubyte)" in message
    assert f"{system} (no train-images-idx3-ubyte.gz)" in message
    assert f"download into {root} (failed:" in message and "unreachable" in message
    assert "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in message
    assert socket.getdefaulttimeout() == previous

    for name, expected in (
        ("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        ("svhn", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat"),
        ("octmnist", "https://zenodo.org/records/10519652/files/octmnist.npz"),
        ("tinyimagenet", readers.TINY_IMAGENET_URL),
        ("dtd", "dtd-r1.0.1.tar.gz"),
    ):
        with pytest.raises(GlowflowError) as err:
            load_dataset(name, "train", data_root=root)
        message = str(err.value)
        assert f"Looked in: {root} (no " in message and "download into" in message and expected in message, message
    with pytest.raises(GlowflowError, match=r"octmnist \(test split\) not found.*medmnist-home.*no octmnist.npz"):
        load_dataset("octmnist", "test", data_root=root)
    with pytest.raises(GlowflowError, match=r"imagenet/val.*no automatic download.*image-net.org"):
        load_dataset("imagenet", "test", data_root=root)
    with pytest.raises(GlowflowError, match=r"no download \(download=False\)"):
        load_dataset("places365", "train", data_root=root, download=False)


@pytest.fixture
def http_server(tmp_path):
    """A static file server on the loopback address (the only network a test may use)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_tinyimagenet_download_checks_its_checksum(tmp_path, monkeypatch, http_server):
    """The official zip comes through torchvision's download utilities, md5 checked."""
    from torchvision.datasets.utils import calculate_md5

    served, url = http_server
    source = tmp_path / "source"
    val_labels = tiny_imagenet_tree(source)
    archive = served / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((source / "tiny-imagenet-200").rglob("*")):
            z.write(path, path.relative_to(source))
    monkeypatch.setattr(readers, "TINY_IMAGENET_URL", f"{url}/tiny-imagenet-200.zip")

    monkeypatch.setattr(readers, "TINY_IMAGENET_MD5", "0" * 32)  # a corrupted download is refused
    root = tmp_path / "data"
    with pytest.raises(GlowflowError, match=r"tinyimagenet \(val split\) not found.*download into .*failed"):
        load_dataset("tinyimagenet", "test", data_root=str(root))
    assert not (root / "tiny-imagenet-200").exists()

    monkeypatch.setattr(readers, "TINY_IMAGENET_MD5", calculate_md5(str(archive)))
    val = load_dataset("tinyimagenet", "test", data_root=str(root))
    assert all_items(val)[1].tolist() == val_labels
    assert (root / "tiny-imagenet-200" / "wnids.txt").is_file()


def test_cifar_download_checks_its_checksum_and_reads_without_torchvision(
    tmp_path, monkeypatch, http_server, no_plain_unpickling
):
    """The official archive comes through torchvision's download utilities, md5 checked, into
    data_root; its pickles are then read by the restricted unpickler."""
    from torchvision.datasets.utils import calculate_md5

    served, url = http_server
    source = tmp_path / "source"
    source.mkdir()
    cifar10_tree(source)
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    fmt = readers.CIFAR_FORMATS["CIFAR10"]
    root = tmp_path / "data"
    monkeypatch.setitem(
        readers.CIFAR_FORMATS, "CIFAR10", dataclasses.replace(fmt, url=f"{url}/{archive.name}", md5="0" * 32)
    )
    with pytest.raises(GlowflowError, match=r"cifar10 \(test split\) not found.*download into .*failed"):
        load_dataset("cifar10", "test", data_root=str(root))
    assert not (root / "cifar-10-batches-py").exists()

    monkeypatch.setitem(
        readers.CIFAR_FORMATS,
        "CIFAR10",
        dataclasses.replace(fmt, url=f"{url}/{archive.name}", md5=calculate_md5(str(archive))),
    )
    test = load_dataset("cifar10", "test", data_root=str(root))
    assert len(test) == 3 and (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert len(load_dataset("cifar10", "train", data_root=str(root), download=False)) == 10


# ------------------------------------------------------------------------------------------
# the user's own data


def test_custom_class_folders_with_splits(tmp_path):
    rng = np.random.default_rng(4)
    written = {}
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "pets" / split / cls).mkdir(parents=True)
            for k in range(2 if split == "train" else 1):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "pets" / split / cls / f"{k}.png")
                written.setdefault(split, []).append(pixels)
    path = str(tmp_path / "pets")
    assert dataset_info(path) == DatasetInfo(path, (3, 16, 16), 2, False)
    train = load_dataset(path, "train")
    images, labels = all_items(train)
    check_images(images, (3, 16, 16))
    assert labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(images, torch.from_numpy(np.stack(written["train"])).permute(0, 3, 1, 2).float() / 255)
    test = load_dataset(path, "test", image_size=8)
    assert len(test) == 2 and all_items(test)[1].tolist() == [0, 1] and test[0][0].shape == (3, 8, 8)


def test_custom_flat_grey_folder(tmp_path):
    for k in range(3):
        Image.fromarray(np.full((20, 24), 40 * k, dtype=np.uint8), mode="L").save(tmp_path / f"{k}.png")
    info = dataset_info(str(tmp_path))
    assert info.image_shape == (1, 20, 20) and info.num_classes == 1  # shorter side, centre crop
    ds = load_dataset(str(tmp_path), "all", image_size=16)
    images, labels = all_items(ds)
    check_images(images, (1, 16, 16))
    assert labels.tolist() == [0, 0, 0]
    assert [round(float(v) * 255) for v in images.mean(dim=(1, 2, 3))] == [0, 40, 80]


def test_custom_npz(tmp_path):
    rng = np.random.default_rng(5)
    grey = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", images=grey, labels=np.array([3, 1, 0, 3, 2]))
    ds = load_dataset(str(tmp_path / "grey.npz"), "all")
    images, labels = all_items(ds)
    assert ds.info == DatasetInfo(str(tmp_path / "grey.npz"), (1, 28, 28), 4, False)
    assert torch.equal(images[:, 0], torch.from_numpy(grey).float() / 255)
    assert labels.tolist() == [3, 1, 0, 3, 2] and labels.dtype == torch.int64
    resized = load_dataset(str(tmp_path / "grey.npz"), "all", image_size=32, divisor=8)
    expected = torch.stack([seed_transform(32)(Image.fromarray(a)) for a in grey])
    assert torch.equal(all_items(resized)[0], expected)

    rgb = rng.integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "rgb.npz", images=rgb)  # no labels: all 0
    ds = load_dataset(str(tmp_path / "rgb.npz"), "all")
    images, labels = all_items(ds)
    assert torch.equal(images, torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255)
    assert labels.tolist() == [0] * 4 and ds.info.num_classes == 1

    wide = rng.integers(0, 256, (2, 20, 24), dtype=np.uint8)  # not square: the centre 20x20 is kept
    np.savez(tmp_path / "wide.npz", images=wide)
    assert torch.equal(
        all_items(load_dataset(str(tmp_path / "wide.npz"), "all"))[0][:, 0],
        torch.from_numpy(wide[:, :, 2:22]).float() / 255,
    )

    hot = rng.integers(0, 2, (4, 5))
    np.savez(tmp_path / "multi.npz", images=rgb, labels=hot)
    ds = load_dataset(str(tmp_path / "multi.npz"), "all")
    assert ds.info.multilabel and ds.info.num_classes == 5
    assert ds[1][1].dtype == torch.float32 and ds[1][1].tolist() == hot[1].tolist()


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    """16-bit grey (PNG's I;16, TIFF's 32-bit I) -> round(v * 255 / 65535), then as 8-bit grey."""
    gradient = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(gradient).save(tmp_path / "a_gradient.png")
    assert Image.open(tmp_path / "a_gradient.png").mode == "I;16"
    eight_bit = (np.arange(32 * 32) % 256).astype(np.uint16).reshape(32, 32)
    Image.fromarray(eight_bit * 257).save(tmp_path / "b_eight_bit_as_16.png")  # 8-bit k stored as 257 k
    wide = gradient.astype(np.int32)
    wide[0, :2] = [-5, 70000]  # beyond 16 bits: clipped
    Image.fromarray(wide).save(tmp_path / "c_int32.tif")
    assert Image.open(tmp_path / "c_int32.tif").mode == "I"
    ds = load_dataset(str(tmp_path), "all")
    assert ds.info.image_shape == (1, 32, 32)
    images, _ = all_items(ds)
    check_images(images, (1, 32, 32))
    pixels = (images[:, 0] * 255).round().to(torch.int64).numpy()
    expected = np.round(gradient.astype(np.float64) * 255 / 65535).astype(np.int64)
    assert np.array_equal(pixels[0], expected)
    assert pixels[0].min() == 0 and pixels[0].max() == 255 and len(np.unique(pixels[0])) == 256
    assert np.array_equal(pixels[1], eight_bit)
    assert pixels[2, 0, 0] == 0 and pixels[2, 0, 1] == 255 and np.array_equal(pixels[2, 1:], expected[1:])
    # an RGB dataset reads a 16-bit grey image as the same grey in all three channels
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "0_rgb.png")
    rgb = all_items(load_dataset(str(tmp_path), "all"))[0]
    assert rgb.shape[1] == 3 and torch.equal(rgb[1], images[0].expand(3, -1, -1))


def test_symbolic_link_loops_list_each_image_once(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(4):
        Image.fromarray(np.full((8, 8), 60 * k, np.uint8)).save(flat / f"{k}.png")
    os.symlink(".", flat / "loop")  # a link to itself: no class, nothing listed twice
    listed = readers.list_images(str(flat))
    assert [os.path.basename(p) for p in listed] == ["0.png", "1.png", "2.png", "3.png"], listed
    ds = load_dataset(str(flat), "all")
    assert len(ds) == 4 and ds.info.num_classes == 1
    means = [round(float(ds[i][0].mean()) * 255) for i in range(len(ds))]
    assert means == [0, 60, 120, 180] and all(int(ds[i][1]) == 0 for i in range(4))

    pets = tmp_path / "pets"
    for label, cls in enumerate(("cat", "dog")):
        (pets / cls / "more").mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 100 * label, np.uint8)).save(pets / cls / "a.png")
        Image.fromarray(np.full((8, 8), 100 * label + 10, np.uint8)).save(pets / cls / "more" / "b.png")
    os.symlink(".", pets / "loop")  # a link to the top folder: no class
    os.symlink("..", pets / "cat" / "up")  # a link above the class folder: a loop, not followed
    os.symlink("..", pets / "dog" / "more" / "up")  # a link back to the class folder
    os.symlink(str(pets / "dog" / "more"), pets / "dog" / "same")  # the same folder twice: listed once
    ds = load_dataset(str(pets), "all")
    assert ds.info.num_classes == 2 and len(ds) == 4
    assert [int(ds[i][1]) for i in range(4)] == [0, 0, 1, 1]
    assert [round(float(ds[i][0].mean()) * 255) for i in range(4)] == [0, 10, 100, 110]


def bomb_png(path, width, height):
    """A PNG whose header declares ``width`` x ``height`` grey pixels, in a few hundred bytes:
    the first rows are real zlib data, the rest left out (PIL refuses such a size at open)."""
    import zlib

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_decompression_bombs_are_one_line_errors_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    folder = tmp_path / "images"
    folder.mkdir()
    bomb = bomb_png(folder / "a_bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 1000
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "b_fine.png")
    with pytest.raises(GlowflowError) as err:
        load_dataset(str(folder), "all")
    message = str(err.value)
    assert f"refused image {bomb}" in message and "pixels" in message and "\n" not in message

    bomb.rename(folder / "c_bomb.png")  # not the first image: refused when it is read
    ds = load_dataset(str(folder), "all")
    assert ds[0][0].shape == (1, 8, 8)
    with pytest.raises(GlowflowError, match=f"refused image {folder / 'c_bomb.png'}"):
        ds[1]

    # PIL only warns between its limit and twice its limit: refused all the same
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    warned = folder / "d_warned.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(warned)  # 1600 pixels
    (folder / "c_bomb.png").unlink()
    ds = load_dataset(str(folder), "all")
    with pytest.raises(GlowflowError, match=f"refused image {warned}: .*1600 pixels"):
        ds[1]


def test_errors_are_clear(tmp_path):
    cases = []
    cases.append((str(tmp_path / "missing" / "images"), "does not exist"))
    cases.append(("cifar11", "unknown dataset 'cifar11': use one of mnist, fashionmnist, cifar10"))
    (tmp_path / "empty").mkdir()
    cases.append((str(tmp_path / "empty"), "no images in"))
    np.savez(tmp_path / "noimages.npz", pixels=np.zeros((2, 8, 8), np.uint8))
    cases.append((str(tmp_path / "noimages.npz"), "has no 'images' array (it has: pixels)"))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    cases.append((str(tmp_path / "corrupt.npz"), "cannot read"))
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8), np.float32))
    cases.append((str(tmp_path / "float.npz"), "images must be uint8"))
    (tmp_path / "badimage").mkdir()
    (tmp_path / "badimage" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cases.append((str(tmp_path / "badimage"), "cannot read image"))
    for path, expected in cases:
        with pytest.raises(GlowflowError) as err:
            load_dataset(path, "train", data_root=str(tmp_path / "data"))
        assert expected in str(err.value) and "\n" not in str(err.value), (path, str(err.value))

    # a corrupt image met while reading, after a good first one
    (tmp_path / "later").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "later" / "a.png")
    (tmp_path / "later" / "b.png").write_bytes(b"not an image")
    later = load_dataset(str(tmp_path / "later"), "all")
    assert later[0][0].shape == (1, 8, 8)
    with pytest.raises(GlowflowError, match=r"cannot read image .*b\.png"):
        later[1]

    # a corrupt file where a dataset's layout expects it: named, not downloaded over
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00\x00\x08")
    with pytest.raises(GlowflowError, match=r"mnist: the files in .*data could not be read"):
        load_dataset("mnist", "train", data_root=str(tmp_path / "data"))

    with pytest.raises(GlowflowError, match="split must be one of train, test"):
        load_dataset("mnist", "validation")
    with pytest.raises(GlowflowError, match="image_size must be a positive integer"):
        dataset_info("mnist", image_size=0)


def test_size_not_divisible_is_refused_before_any_work(tmp_path):
    root = tmp_path / "never-created"
    with pytest.raises(GlowflowError, match=r"image size 36 is not divisible by 2\*\*L = 8"):
        load_dataset("mnist", "train", data_root=str(root), image_size=36, divisor=8)
    with pytest.raises(GlowflowError, match=r"image size 32 is not divisible by 2\*\*L = 64"):
        load_dataset("cifar10", "train", data_root=str(root), divisor=64)
    assert not root.exists()
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    with pytest.raises(GlowflowError, match="image size 20 is not divisible"):
        load_dataset(str(tmp_path), "train", divisor=8)


# ------------------------------------------------------------------------------------------
# outlier sets of another shape; loaders


def tensor_dataset(images, name):
    images = torch.as_tensor(images)
    return ImageTensorDataset(images, torch.arange(len(images)), DatasetInfo(name, tuple(images.shape[1:]), 10))


def test_match_shape_rgb_to_grey_and_back(capsys):
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    cifar = tensor_dataset(rgb, "cifar10")
    assert match_shape(cifar, (3, 32, 32)) is cifar
    assert capsys.readouterr().out == ""
    with pytest.raises(GlowflowError, match="square"):
        match_shape(cifar, (3, 32, 16))

    grey = match_shape(cifar, (1, 32, 32))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "cifar10" in out and "RGB to luminance" in out
    assert grey.info.image_shape == (1, 32, 32) and len(grey) == 3
    for i in range(3):
        image, label = grey[i]
        expected = transforms.ToTensor()(Image.fromarray(rgb[i].transpose(1, 2, 0)).convert("L"))
        assert torch.equal(image, expected) and label == i

    mnist = tensor_dataset(rng.integers(0, 256, (2, 1, 28, 28), dtype=np.uint8), "mnist")
    colour = match_shape(mnist, (3, 32, 32))
    assert "grey replicated to RGB" in capsys.readouterr().out
    image, _ = colour[1]
    expected = seed_transform(32)(Image.fromarray(mnist.images[1, 0].numpy(), mode="L"))
    assert image.shape == (3, 32, 32) and all(torch.equal(image[c], expected[0]) for c in range(3))
    batch = next(iter(make_loader(colour, batch_size=2, shuffle=False)))[0]
    assert batch.shape == (2, 3, 32, 32)


def test_make_loader_is_seeded():
    ds = tensor_dataset(np.zeros((50, 1, 4, 4), np.uint8), "zeros")

    def order(seed):
        return torch.cat([y for _, y in make_loader(ds, batch_size=8, shuffle=True, seed=seed)]).tolist()

    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == list(range(50))
    assert make_loader(ds, 8, shuffle=False).pin_memory is False
    assert make_loader(ds, 8, shuffle=False, device="cuda").pin_memory is True
    assert len(make_loader(ds, 8, shuffle=True, drop_last=True)) == 6
    sampler = torch.utils.data.SequentialSampler(range(10))
    assert [y.tolist() for _, y in make_loader(ds, 5, shuffle=True, sampler=sampler)] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9],
    ]
    workers = make_loader(ds, 25, shuffle=False, num_workers=2)
    assert torch.cat([y for _, y in workers]).tolist() == list(range(50))


@pytest.mark.parametrize("multilabel", [False, True])
def test_batched_gather_gives_the_per_image_batches(multilabel, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 4, 4), generator=generator, dtype=torch.uint8)
    labels = (torch.rand(40, 5, generator=generator) < 0.5).float() if multilabel else torch.arange(40) % 7
    ds = ImageTensorDataset(images, labels, DatasetInfo("t", (3, 4, 4), 5 if multilabel else 7, multilabel))
    indices = [5, 0, 39, 5, 17]
    batched = ds.__getitems__(indices)
    assert len(batched) == len(indices)
    for (image, label), i in zip(batched, indices):
        expected_image, expected_label = ds[i]
        assert torch.equal(image, expected_image) and torch.equal(label, expected_label)
        assert image.dtype == torch.float32 and label.dtype == expected_label.dtype

    class PerImage(torch.utils.data.Dataset):  # no __getitems__: the DataLoader asks image by image
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]

    sampler = torch.randperm(40, generator=generator).tolist()
    expected = list(make_loader(PerImage(), 16, shuffle=False, sampler=sampler))

    def per_image_access(self, i):
        raise AssertionError("the loader should gather whole batches")

    monkeypatch.setattr(ImageTensorDataset, "__getitem__", per_image_access)
    got = list(make_loader(ds, 16, shuffle=False, sampler=sampler))
    assert len(got) == len(expected) == 3
    for (x, y), (x_ref, y_ref) in zip(got, expected):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
