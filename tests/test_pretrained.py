"""Model folders (config.json + model.safetensors + README.md): save_pretrained / from_pretrained
round trips for every architecture, --export from a training checkpoint, the folder taken by every
--checkpoint, damaged or crafted folders refused in one line, and no torch.load on the way."""

import errno
import json
import os
import shlex
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import glowflow
from glowflow import Glow, GlowConfig
from glowflow.checkpoint import Checkpoint
from glowflow.cli import build_parser, main, model_config_from_args, run_config_from_args
from glowflow.config import TRAINING_COMMAND_FIELDS, training_command
from glowflow.errors import GlowflowError
from tests.helpers import (
    architecture_combinations,
    combo_id,
    labels_for,
    randomised_model,
    write_noise_npz,
    write_smooth_npz,
)

TINY = ["--batch_size", "16", "--hidden_channels", "8", "--K", "2", "--L", "2", "--no_wandb", "--warmup", "1"]


def _same_log_prob(a, b, x, y=None):
    with torch.no_grad():
        return torch.equal(a.log_prob(x, y), b.log_prob(x, y))


# ----------------------------------------------------------------------------- the API round trip


@pytest.mark.parametrize("combo", list(architecture_combinations()), ids=combo_id)
def test_round_trip_gives_identical_log_prob(combo, tmp_path):
    model = randomised_model((2, 8, 8), L=2, combo=combo)
    folder = model.save_pretrained(str(tmp_path / "model"))
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    torch.manual_seed(12345)  # a fresh model would draw other shuffle orders: the stored ones must win
    loaded = Glow.from_pretrained(folder)
    assert loaded.config == model.config and not loaded.training and loaded.is_initialized()
    assert next(loaded.parameters()).dtype == torch.float64  # saved in float64, loaded in float64
    x = torch.rand(5, 2, 8, 8, dtype=torch.float64) - 0.5
    assert _same_log_prob(model, loaded, x, labels_for(model, 5))
    stored, own = loaded.state_dict(), model.state_dict()
    assert stored.keys() == own.keys() and all(torch.equal(stored[k], own[k]) for k in own)


def test_class_conditional_round_trip(tmp_path):
    combo = dict(flow_permutation="shuffle", flow_coupling="affine", LU_decomposed=False, learn_top=True)
    model = randomised_model((1, 8, 8), L=2, combo={**combo, "y_condition": True}).float()
    glowflow.save_pretrained(model, str(tmp_path / "m"), dataset="smooth")
    loaded = glowflow.from_pretrained(str(tmp_path / "m"))
    x = torch.rand(6, 1, 8, 8) - 0.5
    assert loaded.config.y_condition and loaded.config.num_classes == 3
    assert _same_log_prob(model, loaded, x, torch.arange(6) % 3)  # given the class
    assert _same_log_prob(model, loaded, x)  # the mixture over classes
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dataset"] == "smooth"


def test_every_buffer_is_in_the_safetensors_file(tmp_path):
    combo = dict(flow_permutation="invconv", flow_coupling="affine", LU_decomposed=True)
    model = randomised_model((1, 8, 8), L=1, combo={**combo, "learn_top": False, "y_condition": False})
    model.save_pretrained(str(tmp_path / "m"))
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(stored) == set(model.state_dict())
    assert any(name.endswith("actnorm.initialized") for name in stored)
    assert any(name.endswith("permute.lower_mask") for name in stored)


def test_loading_a_folder_never_calls_torch_load(tmp_path, monkeypatch, capsys):
    model = randomised_model((1, 8, 8), L=2, combo=next(architecture_combinations())).float()
    folder = model.save_pretrained(str(tmp_path / "m"), dataset="constant")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    x = torch.rand(3, 1, 8, 8) - 0.5
    assert _same_log_prob(model, Glow.from_pretrained(folder), x)
    assert _same_log_prob(model, glowflow.load_checkpoint(folder), x)
    out = tmp_path / "samples"
    assert main(["--sample", "--checkpoint", folder, "--n_samples", "4", "--output_dir", str(out)]) == 0
    assert (out / "samples_T0.7.png").exists()
    capsys.readouterr()


def test_a_file_where_the_folder_goes_is_refused(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(GlowflowError, match="is a file"):
        Glow(GlowConfig(image_shape=(1, 8, 8), K=1, L=1, hidden_channels=4)).save_pretrained(str(tmp_path / "taken"))


# ----------------------------------------------------------------------------- --export, and the folder everywhere


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run with --ema (so averaged and raw weights differ), exported to a folder."""
    root = tmp_path_factory.mktemp("export")
    data = write_smooth_npz(root / "smooth.npz")
    noise = write_noise_npz(root / "noise.npz")
    run = root / "run"
    argv = ["--train", "--dataset", data, "--output_dir", str(run), "--n_epochs", "2", "--ema", "0.9", *TINY]
    argv += ["--sample_and_save_freq", "0", "--lr", "0.002"]
    assert main(argv) == 0
    folder = root / "exported"
    assert main(["--export", str(folder), "--checkpoint", str(run / "Glow_smooth.pt")]) == 0
    return {"data": data, "noise": noise, "run": run, "folder": folder}


def test_export_writes_the_averaged_weights_and_a_model_card(trained, capsys):
    folder, payload = trained["folder"], torch.load(trained["run"] / "Glow_smooth.pt", weights_only=True)
    stored = load_file(str(folder / "model.safetensors"))
    assert stored.keys() == payload["model"].keys()
    assert all(torch.equal(stored[k], payload["model"][k]) for k in stored)  # the EMA weights
    assert any(not torch.equal(stored[k], payload["raw_model"][k]) for k in stored)
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "glowflow-pretrained" and config["dataset"] == trained["data"]
    assert config["K"] == 2 and config["image_shape"] == [1, 16, 16] and config["n_bits"] == 8
    card = (folder / "README.md").read_text()
    assert f"--dataset {trained['data']}" in card and "--ema 0.9" in card and "--lr 0.002" in card
    assert f"best validation bits/dim: {payload['best_val_bpd']:.4f}" in card
    assert f"test bits/dim at the best validation: {payload['test_bpd_at_best']:.4f}" in card
    assert os.path.getsize(folder / "model.safetensors") < os.path.getsize(trained["run"] / "Glow_smooth.pt")


def test_the_card_command_trains_the_same_configuration(trained):
    """The training command in the card parses back into the stored flags and architecture."""
    checkpoint = Checkpoint.read(str(trained["run"] / "Glow_smooth.pt"))
    words = shlex.split(training_command(checkpoint.run_config, checkpoint.model_config))
    assert words[:2] == ["glowflow", "--train"]
    args = build_parser().parse_args(words[1:])
    run = run_config_from_args(args)
    for name in TRAINING_COMMAND_FIELDS:
        assert getattr(run, name) == checkpoint.run_config[name], name
    assert model_config_from_args(args, run) == checkpoint.model_config


def test_an_exported_folder_works_wherever_a_checkpoint_does(trained, tmp_path, capsys):
    folder, checkpoint = str(trained["folder"]), str(trained["run"] / "Glow_smooth.pt")
    x = torch.rand(4, 1, 16, 16) - 0.5
    assert _same_log_prob(glowflow.load_checkpoint(checkpoint), glowflow.load_checkpoint(folder), x)

    out = tmp_path / "sample"
    argv = ["--sample", "--checkpoint", folder, "--n_samples", "4", "--reconstruct", "--output_dir", str(out)]
    assert main(argv) == 0
    assert (out / "samples_T0.7.png").exists() and (out / "reconstructions.png").exists()

    ood = tmp_path / "ood"
    argv = ["--outlier_detection", "--checkpoint", folder, "--out_dataset", trained["noise"]]
    argv += ["--background_checkpoint", folder, "--fit_images", "40", "--output_dir", str(ood)]
    assert main(argv) == 0
    report = json.loads((ood / "ood_smooth_vs_noise.json").read_text())
    assert "likelihood_ratio" in report["scores"] and report["in_dataset"] == trained["data"]
    cache = os.path.join(folder, "ood_detector_smooth_8bit.npz")  # inside the folder: it travels with it
    assert report["reference"]["cache"] == cache and os.path.isfile(cache)
    assert not [name for name in os.listdir(trained["folder"].parent) if "ood_detector" in name]

    scored = tmp_path / "scored"
    argv = ["--score", trained["noise"], "--checkpoint", folder, "--fit_images", "40", "--output_dir", str(scored)]
    assert main(argv) == 0
    assert f"reusing the training statistics (the fitted outlier detector) cached in {cache}" in capsys.readouterr().out
    assert (scored / "scores_noise.csv").exists()


def test_a_folder_that_cannot_be_written_still_scores_with_a_one_line_note(trained, tmp_path, monkeypatch, capsys):
    """As in an installed package: the detector is fitted and used, and one line says it was not cached."""
    folder = tmp_path / "installed"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (folder / name).write_bytes((trained["folder"] / name).read_bytes())
    mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # the folder only (root may write anywhere: no chmod)
        if dir is not None and os.path.realpath(dir) == os.path.realpath(folder):
            raise OSError(errno.EROFS, "Read-only file system")
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    scored = tmp_path / "scored"
    argv = ["--score", trained["noise"], "--checkpoint", str(folder), "--fit_images", "40"]
    assert main([*argv, "--output_dir", str(scored)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "not cached" in line]
    cache = folder / "ood_detector_smooth_8bit.npz"
    assert notes == [f"note: the outlier detector was not cached (cannot write {cache}: Read-only file system)"]
    assert "Traceback" not in captured.err and not cache.exists()
    assert "scored 64 images" in captured.out and (scored / "scores_noise.csv").exists()


def test_a_folder_cannot_be_resumed(trained, tmp_path, capsys):
    out = tmp_path / "resumed"
    code = main(["--train", "--resume", str(trained["folder"]), "--output_dir", str(out), "--no_wandb"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot be resumed" in err, err
    assert "model folder" in err and not out.exists()


# ----------------------------------------------------------------------------- damaged and crafted folders


def _with_weights(change):
    def alter(folder):
        path = str(folder / "model.safetensors")
        weights = load_file(path)
        change(weights)
        save_file(weights, path)

    return alter


def _with_config(change):
    def alter(folder):
        path = folder / "config.json"
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))

    return alter


def _first_float(weights):
    return next(k for k, v in weights.items() if v.is_floating_point())


def _write(name, text):
    return lambda folder: (folder / name).write_bytes(text)


def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])


def _corrupt_header(folder):
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:20] = b"#" * 12  # inside the JSON header
    (folder / "model.safetensors").write_bytes(bytes(data))


BAD_FOLDERS = [
    ("missing tensor", _with_weights(lambda w: w.pop(sorted(w)[0])), "does not match config.json (missing"),
    ("extra tensor", _with_weights(lambda w: w.update(extra=torch.zeros(2))), "(unexpected extra)"),
    (
        "wrong shape",
        _with_weights(lambda w: w.update({_first_float(w): torch.zeros(3, 3)})),
        "has shape (3, 3), the model needs",
    ),
    (
        "non-finite weight",
        _with_weights(lambda w: w[_first_float(w)].view(-1).__setitem__(0, float("nan"))),
        "holds non-finite values",
    ),
    (
        "integer weight",
        _with_weights(lambda w: w.update({_first_float(w): w[_first_float(w)].long()})),
        "holds I64 values, the model floating-point ones",
    ),
    ("truncated safetensors", _truncate, "is not a readable safetensors file"),
    ("garbage safetensors", _write("model.safetensors", b"\x00" * 7), "is not a readable safetensors file"),
    ("corrupt header", _corrupt_header, "is not a readable safetensors file"),
    ("no weights", lambda f: os.remove(f / "model.safetensors"), "has no model.safetensors"),
    ("no config", lambda f: os.remove(f / "config.json"), "has no config.json"),
    ("unknown field", _with_config(lambda c: c.update(depth=3)), "unknown field(s) 'depth'"),
    ("K zero", _with_config(lambda c: c.update(K=0)), "K (steps of flow per level) must be at least 1"),
    ("n_bits", _with_config(lambda c: c.update(n_bits=9)), "n_bits must be between 1 and 8"),
    ("K text", _with_config(lambda c: c.update(K="8")), "K must be"),
    ("size bound", _with_config(lambda c: c.update(hidden_channels=10**7)), "more than the limit"),
    ("image size", _with_config(lambda c: c.update(image_size=-1)), "image_size must be null or an integer"),
    ("dataset", _with_config(lambda c: c.update(dataset=5)), "dataset must be a name or a path"),
    ("format", _with_config(lambda c: c.update(format="other")), "is not a glowflow model configuration"),
    ("newer", _with_config(lambda c: c.update(format_version=99)), "written by a newer glowflow"),
    ("bad json", _write("config.json", b'{"K": 2,'), "config.json is not valid JSON (line 1"),
    ("nan in json", _write("config.json", b'{"format": "glowflow-pretrained", "K": NaN}'), "holds NaN"),
    ("not an object", _write("config.json", b"[1, 2]"), "must hold a JSON object"),
    ("not utf-8", _write("config.json", b"\xff\xfe\x00"), "config.json cannot be read"),
]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    model = randomised_model((1, 8, 8), L=2, combo=next(architecture_combinations())).float()
    return model.save_pretrained(str(tmp_path_factory.mktemp("good") / "m"), dataset="constant")


@pytest.mark.parametrize("name, alter, fragment", BAD_FOLDERS, ids=[b[0] for b in BAD_FOLDERS])
def test_a_bad_folder_is_one_line_exit_2(small_folder, tmp_path, capsys, name, alter, fragment):
    folder = tmp_path / "m"
    folder.mkdir()
    for part in os.listdir(small_folder):
        (folder / part).write_bytes(open(os.path.join(small_folder, part), "rb").read())
    alter(folder)
    with pytest.raises(GlowflowError) as raised:
        Glow.from_pretrained(str(folder))
    assert fragment in str(raised.value) and len(str(raised.value).splitlines()) == 1
    out = tmp_path / "out"
    code = main(["--sample", "--checkpoint", str(folder), "--n_samples", "4", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("glowflow: error:") and len(err.splitlines()) == 1 and fragment in err, err
    assert "Traceback" not in err and not out.exists()


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    code = main(["--export", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "none.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "checkpoint not found" in err and not (tmp_path / "out").exists()
    code = main(["--export", str(tmp_path / "out")])
    assert code == 2 and "--export needs --checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype, name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_a_half_precision_folder_loads_in_float32_with_a_note(tmp_path, capsys, dtype, name):
    model = randomised_model((1, 8, 8), L=2, combo=next(architecture_combinations())).float()
    folder = model.save_pretrained(str(tmp_path / "m"))
    path = os.path.join(folder, "model.safetensors")
    halved = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(halved, path)
    loaded = Glow.from_pretrained(folder)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"holds {name} weights: read as float32" in err[0], err
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    reference = Glow(model.config)  # the half-precision weights, widened
    reference.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in halved.items()})
    x = torch.rand(4, 1, 8, 8) - 0.5
    with torch.no_grad():
        log_prob = loaded.log_prob(x)
        assert torch.isfinite(log_prob).all() and torch.equal(log_prob, reference.eval().log_prob(x))
    assert {p.dtype for p in glowflow.load_checkpoint(folder).parameters()} == {torch.float32}
    out = tmp_path / "samples"
    assert main(["--sample", "--checkpoint", folder, "--n_samples", "4", "--output_dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert "read as float32" in err and "Traceback" not in err and (out / "samples_T0.7.png").exists()


# ----------------------------------------------------------------------------- exporting a folder again


def _provenance(card):
    """The card's training command and bits/dim lines (those of the list the date ends)."""
    lines = card.split("\n- Written:")[0].splitlines()
    return [line for line in lines if line.startswith("- Training command:") or "bits/dim" in line]


def test_export_of_a_folder_keeps_its_cards_provenance(trained, tmp_path, capsys):
    source = tmp_path / "copy"
    source.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (source / name).write_bytes((trained["folder"] / name).read_bytes())
    before = _provenance((source / "README.md").read_text())
    assert len(before) == 3 and "--ema 0.9" in before[0]  # the command, best validation and its test bits/dim
    again = tmp_path / "again"
    assert main(["--export", str(source), "--checkpoint", str(source)]) == 0  # onto itself
    assert main(["--export", str(again), "--checkpoint", str(source)]) == 0  # to a new folder
    for folder in (source, again):
        assert _provenance((folder / "README.md").read_text()) == before
        assert json.loads((folder / "config.json").read_text())["dataset"] == trained["data"]
        stored, original = (
            load_file(str(folder / "model.safetensors")),
            load_file(str(trained["folder"] / "model.safetensors")),
        )
        assert stored.keys() == original.keys() and all(torch.equal(stored[k], original[k]) for k in stored)
    capsys.readouterr()


def test_export_of_the_shipped_model_keeps_its_training_command_and_bits_per_dim(tmp_path, capsys):
    from glowflow.pretrained import shipped_folder

    shipped = _provenance(open(os.path.join(shipped_folder("fashionmnist"), "README.md")).read())
    assert any("Training command: `glowflow --train" in line for line in shipped) and len(shipped) >= 2
    out = tmp_path / "mine"
    assert main(["--export", str(out), "--checkpoint", "pretrained:fashionmnist"]) == 0
    assert _provenance((out / "README.md").read_text()) == shipped
    capsys.readouterr()


# ----------------------------------------------------------------------------- never into the package


def test_export_into_the_package_is_refused(trained, tmp_path, capsys):
    from glowflow.pretrained import models_root, shipped_folder

    shipped = shipped_folder("fashionmnist")
    before = {name: open(os.path.join(shipped, name), "rb").read() for name in os.listdir(shipped)}
    link = tmp_path / "link"
    os.symlink(shipped, link)
    for target in (shipped, os.path.join(models_root(), "new"), models_root(), str(link)):
        code = main(["--export", target, "--checkpoint", str(trained["folder"])])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "inside glowflow's own pretrained_models folder" in err and "Traceback" not in err, err
    assert not os.path.exists(os.path.join(models_root(), "new"))
    with pytest.raises(GlowflowError, match="inside glowflow's own pretrained_models folder"):
        Glow.from_pretrained("fashionmnist").save_pretrained(shipped)
    assert {name: open(os.path.join(shipped, name), "rb").read() for name in os.listdir(shipped)} == before


def test_make_pretrained_alone_writes_into_the_package(tmp_path, monkeypatch):
    from glowflow import pretrained

    monkeypatch.setattr(pretrained, "models_root", lambda: str(tmp_path / "pretrained_models"))
    model = Glow(GlowConfig(image_shape=(1, 8, 8), K=1, L=1, hidden_channels=4))
    target = str(tmp_path / "pretrained_models" / "new")
    with pytest.raises(GlowflowError, match="inside glowflow's own pretrained_models folder"):
        model.save_pretrained(target)
    with pretrained.writing_shipped_models():  # what scripts/make_pretrained.py does
        model.save_pretrained(target)
    assert sorted(os.listdir(target)) == ["README.md", "config.json", "model.safetensors"]
    with pytest.raises(GlowflowError, match="inside glowflow's own pretrained_models folder"):
        model.save_pretrained(target)  # refused again after the block


# ----------------------------------------------------------------------------- a full disk, killed writers


def _card_write_fills_the_disk(monkeypatch):
    """The card (the second of the three files) meets a full disk: the weights are written by then."""
    from glowflow import pretrained
    from glowflow.files import atomic_write

    real = pretrained.atomic_write_text

    def write(handle):
        handle.write(b"half a card")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def card_fails(path, text):
        return atomic_write(path, write) if path.endswith("README.md") else real(path, text)

    monkeypatch.setattr(pretrained, "atomic_write_text", card_fails)


def _contents(folder):
    return {name: (folder / name).read_bytes() for name in os.listdir(folder)}


def test_a_disk_full_export_leaves_nothing_behind(trained, small_folder, tmp_path, monkeypatch, capsys):
    _card_write_fills_the_disk(monkeypatch)
    checkpoint = str(trained["run"] / "Glow_smooth.pt")
    new = tmp_path / "new" / "model"
    code = main(["--export", str(new), "--checkpoint", checkpoint])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert os.listdir(tmp_path) == []  # neither the folder nor its parent
    existing = tmp_path / "existing"  # another model's folder, with a file of its own
    existing.mkdir()
    for name in os.listdir(small_folder):
        (existing / name).write_bytes(open(os.path.join(small_folder, name), "rb").read())
    (existing / "notes.txt").write_text("mine")
    before = _contents(existing)
    assert main(["--export", str(existing), "--checkpoint", checkpoint]) == 2
    assert _contents(existing) == before  # the weights written before the card failed were put back
    capsys.readouterr()


def test_reading_a_folder_removes_temporary_files_of_killed_writers(small_folder, tmp_path, capsys):
    import subprocess
    import sys

    from glowflow.files import temporary_name

    folder = tmp_path / "m"
    folder.mkdir()
    for name in os.listdir(small_folder):
        (folder / name).write_bytes(open(os.path.join(small_folder, name), "rb").read())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = temporary_name("x").rpartition("@")[2]
    dead, alive = f".tmp-model.safetensors-ab12~{gone.pid}@{host}", f".tmp-README.md-cd34~{os.getpid()}@{host}"
    for name in (dead, alive):
        (folder / name).write_bytes(b"half a file")
    Glow.from_pretrained(str(folder))
    assert not (folder / dead).exists() and (folder / alive).exists()
    assert "removed 1 temporary file(s)" in capsys.readouterr().err
