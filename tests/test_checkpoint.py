"""Damaged and crafted checkpoints: every one is a one-line error (exit 2) naming the problem, for
--sample, --outlier_detection and --train --resume alike, and nothing is built or written first."""

import copy
import errno
import math
import os
import struct
import zipfile

import pytest
import torch

import glowflow
from glowflow.checkpoint import Checkpoint
from glowflow.cli import main
from glowflow.errors import GlowflowError
from tests.helpers import write_noise_npz, write_smooth_npz

TINY = ["--batch_size", "16", "--hidden_channels", "8", "--K", "2", "--L", "2", "--no_wandb", "--warmup", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real checkpoint of a tiny run (with training state), its payload, and the data."""
    folder = tmp_path_factory.mktemp("ckpt")
    data = write_smooth_npz(folder / "smooth.npz")
    noise = write_noise_npz(folder / "noise.npz")
    run = folder / "run"
    argv = ["--train", "--dataset", data, "--output_dir", str(run), "--max_steps", "2", "--n_epochs", "1", *TINY]
    assert main(argv) == 0
    path = run / "last.pt"
    return {"path": path, "payload": torch.load(path, weights_only=True), "data": data, "noise": noise}


def _commands(checkpoint, trained, out):
    return {
        "sample": ["--sample", "--checkpoint", str(checkpoint), "--output_dir", str(out), "--n_samples", "4"],
        "ood": [
            "--outlier_detection",
            "--checkpoint",
            str(checkpoint),
            "--out_dataset",
            trained["noise"],
            "--output_dir",
            str(out),
        ],
        "resume": ["--train", "--resume", str(checkpoint), "--output_dir", str(out), "--n_epochs", "2", "--no_wandb"],
    }


def _refused(argv, capsys, fragment, out):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("glowflow: error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and fragment in err, err
    assert not out.exists(), "a refused command left its output folder"


def _crafted(trained, tmp_path, change):
    payload = copy.deepcopy(trained["payload"])
    change(payload)
    path = tmp_path / "crafted.pt"
    torch.save(payload, path)
    return path


def _set(*keys_and_value):
    """A change that sets payload[k1][k2]... = value."""
    *keys, value = keys_and_value

    def change(payload):
        target = payload
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


# (name, change of the payload, a fragment of the message); refused by every command
MALFORMED = [
    ("K float", _set("model_config", "K", 2.5), "K must be an integer, got 2.5"),
    ("K bool", _set("model_config", "K", True), "K must be an integer, got True"),
    ("K huge", _set("model_config", "K", 10**8), "K (steps of flow per level) must be at most"),
    ("L huge", _set("model_config", "L", 10**9), "L (number of levels) must be at most"),
    ("hidden huge", _set("model_config", "hidden_channels", 10**7), "more than the limit"),
    ("image_shape text", _set("model_config", "image_shape", ["x", 16, 16]), "image_shape must be a list of 3"),
    ("image_shape huge", _set("model_config", "image_shape", [1, 2**16, 2**16]), "dimensions, more than"),
    ("n_bits text", _set("model_config", "n_bits", "eight"), "n_bits must be an integer"),
    ("permutation", _set("model_config", "flow_permutation", "abc"), "flow_permutation must be one of"),
    ("LU int", _set("model_config", "LU_decomposed", 1), "LU_decomposed must be true or false"),
    ("actnorm nan", _set("model_config", "actnorm_scale", math.nan), "actnorm_scale must be a positive finite"),
    ("unknown key", _set("model_config", "depth", 3), "unknown model configuration keys"),
    ("model_config text", _set("model_config", "abc"), "no usable model configuration"),
    ("model text", _set("model", "abc"), "no model weights"),
    ("model not tensors", _set("model", {"levels.0.0.actnorm.bias": 1.0}), "not a tensor"),
    ("weights nan", _set("model", "levels.0.0.actnorm.bias", torch.full((1, 4, 1, 1), math.nan)), "non-finite"),
    ("weights shape", _set("model", "levels.0.0.actnorm.bias", torch.zeros(3)), "weights do not match"),
    ("singular 1x1", _set("model", "levels.0.0.permute.weight", torch.zeros(4, 4)), "singular 1x1 convolution"),
    ("run_config text", _set("run_config", "abc"), "run_config must be a dict"),
    ("dataset number", _set("run_config", "dataset", 5), "dataset must be a string"),
    ("image_size text", _set("run_config", "image_size", "big"), "image_size must be an integer or none"),
    ("version text", _set("version", "2"), "version must be a positive integer"),
    ("newer version", _set("version", 99), "newer glowflow"),
    ("format", _set("format", torch.zeros(1)), "not a glowflow checkpoint"),
]


@pytest.mark.parametrize("command", ["sample", "ood", "resume"])
@pytest.mark.parametrize("name, change, fragment", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_checkpoint_is_refused_by_every_command(trained, tmp_path, capsys, command, name, change, fragment):
    path = _crafted(trained, tmp_path, change)
    out = tmp_path / "out"
    _refused(_commands(path, trained, out)[command], capsys, fragment, out)


def _set_group(key, value):
    def change(payload):
        payload["optimizer"]["param_groups"][0][key] = value

    return change


def _first_state(key, value):
    def change(payload):
        first = next(iter(payload["optimizer"]["state"]))
        payload["optimizer"]["state"][first][key] = value

    return change


# training state: only resuming reads it
MALFORMED_TRAINING_STATE = [
    ("epoch text", _set("epoch", "3"), "epoch must be an integer"),
    ("step negative", _set("step", -1), "step must be an integer from 0"),
    ("best nan", _set("best_val_bpd", math.nan), "best_val_bpd must be a number"),
    ("old best nan", _set("best_test_bpd", math.nan), "best_test_bpd must be a number"),
    ("test at best nan", _set("test_bpd_at_best", math.nan), "test_bpd_at_best must be a number"),
    ("optimizer text", _set("optimizer", "abc"), "optimizer must be a dict"),
    ("lr text", _set_group("lr", "fast"), "parameter group field 'lr'"),
    ("betas", _set_group("betas", (0.9,)), "parameter group field 'betas'"),
    ("params", _set_group("params", ["a"]), "'params' must be a list of parameter numbers"),
    ("state text", _first_state("exp_avg", "x"), "is not a tensor or a number"),
    ("scheduler attribute", _set("scheduler", "optimizer", 1), "scheduler has unexpected fields"),
    ("scheduler epoch", _set("scheduler", "last_epoch", 1.5), "field last_epoch"),
    ("rng float", _set("rng", "torch", torch.zeros(5056)), "rng state 'torch'"),
    ("rng short", _set("rng", "torch", torch.zeros(3, dtype=torch.uint8)), "rng state 'torch'"),
    ("run lr", _set("run_config", "lr", -1.0), "lr must be a positive finite number"),
    ("run seed", _set("run_config", "seed", 2**40), "seed must be at most"),
]


@pytest.mark.parametrize(
    "name, change, fragment", MALFORMED_TRAINING_STATE, ids=[m[0] for m in MALFORMED_TRAINING_STATE]
)
def test_malformed_training_state_is_refused_on_resume(trained, tmp_path, capsys, name, change, fragment):
    path = _crafted(trained, tmp_path, change)
    out = tmp_path / "out"
    _refused(_commands(path, trained, out)["resume"], capsys, fragment, out)


def test_optimizer_state_of_other_shapes_is_refused_on_resume(trained, tmp_path, capsys):
    path = _crafted(trained, tmp_path, _first_state("exp_avg", torch.zeros(7, 7)))
    code = main(_commands(path, trained, tmp_path / "out")["resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "optimizer state exp_avg of parameter" in err, err
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_a_text_file_named_pt_is_refused(trained, tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_text("these are my notes, not a model\n")
    for argv in _commands(path, trained, tmp_path / "out").values():
        _refused(argv, capsys, "not a readable glowflow checkpoint", tmp_path / "out")
    with pytest.raises(GlowflowError, match="not a readable glowflow checkpoint"):
        glowflow.load_checkpoint(str(path))


def _tensor_data_offset(path):
    """(offset in the file, length) of the largest stored tensor's bytes."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def test_a_flipped_bit_inside_a_tensor_is_refused_as_corrupt(trained, tmp_path, capsys):
    data = bytearray(trained["path"].read_bytes())
    offset, length = _tensor_data_offset(trained["path"])
    data[offset + length // 2] ^= 0x10
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    for argv in _commands(path, trained, tmp_path / "out").values():
        _refused(argv, capsys, f"{path} is corrupt", tmp_path / "out")
    with pytest.raises(GlowflowError, match="does not match its checksum"):
        glowflow.load_checkpoint(str(path))


def test_the_real_checkpoint_passes_every_check(trained):
    checkpoint = Checkpoint.read(str(trained["path"]))
    assert checkpoint.has_training_state
    assert checkpoint.step == 2 and checkpoint.epoch == 0
    model = checkpoint.build_model()
    assert sum(t.numel() for t in model.state_dict().values()) == checkpoint.model_config.num_weights()


def test_crafted_checkpoint_never_runs_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "glowflow-checkpoint", "version": 2, "model": Payload()}, path)
    with pytest.raises(GlowflowError, match="not a readable glowflow checkpoint"):
        Checkpoint.read(str(path))


def test_a_full_disk_while_training_is_one_line_and_leaves_no_half_written_checkpoint(
    trained, tmp_path, monkeypatch, capsys
):
    """torch.save meets a full disk (the real torch.save, onto a file with 100 bytes of room: torch
    raises its RuntimeError around the OSError): the run stops with one line, exit 2, and no
    checkpoint or temporary file is left half-written."""
    real_save = torch.save

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.room = handle, 100

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    monkeypatch.setattr(torch, "save", lambda obj, handle, *a, **k: real_save(obj, FullDisk(handle), *a, **k))
    run = tmp_path / "run"
    code = main(["--train", "--dataset", trained["data"], "--output_dir", str(run), "--max_steps", "2", *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("glowflow: error: cannot write"), err
    assert err[-1].endswith(".pt: No space left on device") and not any("Traceback" in line for line in err), err
    # a run that wrote no checkpoint removes the folder it made (glowflow.runfolder); if anything
    # is left there, it is no checkpoint and no temporary file
    left = os.listdir(run) if run.exists() else []
    assert not [name for name in left if name.endswith(".pt") or name.startswith(".tmp-")], left


def test_the_schema_is_what_the_trainer_writes(trained, tmp_path):
    """Every key of a training checkpoint is declared by CheckpointContents, and a key it does
    not declare is refused on save (the trainer's save goes through it)."""
    import dataclasses

    from glowflow.checkpoint import save_checkpoint
    from glowflow.checkpoint_schema import CheckpointContents

    declared = {f.name for f in dataclasses.fields(CheckpointContents)} | {"format", "version"}
    assert set(trained["payload"]) <= declared
    model = Checkpoint.read(str(trained["path"])).load_model()
    with pytest.raises(TypeError):
        save_checkpoint(str(tmp_path / "x.pt"), model, epochs=1)
    assert not (tmp_path / "x.pt").exists()
