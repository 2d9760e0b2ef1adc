"""The command line end to end on a tiny dataset, through the real entry point."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import glowflow
from glowflow.cli import main
from tests.helpers import TINY_CLI_RUN, checkpoint_weights

TINY = TINY_CLI_RUN


def test_train_resume_sample_end_to_end(tiny, tmp_path, capsys):
    full = tmp_path / "full"
    assert main(["--train", "--dataset", tiny["in"], "--output_dir", str(full), *TINY]) == 0
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "test" in out
    for name in ("last.pt", "Glow_smooth.pt", "metrics.csv", "samples_epoch001.png", "samples_epoch002.png"):
        assert (full / name).exists(), name
    rows = (full / "metrics.csv").read_text().strip().splitlines()
    assert rows[0] == "epoch,step,train_bpd,val_bpd,test_bpd,raw_val_bpd,lr,images_per_s,seconds" and len(rows) == 3
    with Image.open(full / "training_curves.png") as picture:  # the curves of both epochs, a valid PNG
        picture.verify()
        assert picture.format == "PNG" and picture.size == (640, 400)
    payload = torch.load(full / "last.pt", weights_only=True)
    assert payload["step"] == 8 and payload["epoch"] == 2 and payload["model_config"]["K"] == 2

    # stopped mid-epoch by --max_steps, then resumed: the same weights, bit for bit
    part = tmp_path / "part"
    assert main(["--train", "--dataset", tiny["in"], "--output_dir", str(part), "--max_steps", "4", *TINY]) == 0
    assert torch.load(part / "last.pt", weights_only=True)["step"] == 4
    assert main(["--train", "--dataset", tiny["in"], "--output_dir", str(part), "--resume", *TINY]) == 0
    a, b = checkpoint_weights(full / "last.pt"), checkpoint_weights(part / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # sampling needs only the checkpoint: no architecture flag repeated
    samples = tmp_path / "samples"
    assert (
        main(
            [
                "--sample",
                "--checkpoint",
                str(full / "Glow_smooth.pt"),
                "--output_dir",
                str(samples),
                "--temperature",
                "0",
                "0.7",
                "1.0",
                "--n_samples",
                "9",
                "--reconstruct",
                "--interpolate",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for name in (
        "samples_T0.png",
        "samples_T0.7.png",
        "samples_T1.png",
        "samples_temperatures.png",
        "reconstructions.png",
        "interpolations.png",
    ):
        assert (samples / name).exists(), name
        assert f"saved {samples / name}" in out
    error = float(out.split("max |x - decode(encode(x))| = ")[1].split()[0])
    assert error < 1e-4

    # outlier detection from the checkpoint alone, against a file set and a built-in set
    ood = tmp_path / "ood"
    argv = [
        "--outlier_detection",
        "--checkpoint",
        str(full / "Glow_smooth.pt"),
        "--out_dataset",
        tiny["noise"],
        "constant",
        "--output_dir",
        str(ood),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "wrote" in out
    report = json.loads((ood / "ood_smooth_vs_noise.json").read_text())
    for score in ("nll", "complexity", "typicality", "dos", "hierarchy_ratio", "level_1_bpd", "level_2_bpd"):
        assert set(report["scores"][score]) == {"auroc", "aupr_in", "aupr_out", "fpr95"}, score
    assert report["scores"]["nll"]["auroc"] > 0.9  # noise is far from smooth gradients, even after 2 epochs
    for name in ("ood_smooth_vs_noise_histograms.png", "ood_smooth_vs_noise_roc.png", "ood_smooth_vs_constant.json"):
        assert (ood / name).exists(), name
    summary = json.loads((ood / "ood_smooth_summary.json").read_text())  # two outlier sets: one summary
    assert set(summary["auroc"]) == {tiny["noise"], "constant"}
    assert (
        summary["auroc"]["constant"]["dos"]
        == json.loads((ood / "ood_smooth_vs_constant.json").read_text())["scores"]["dos"]["auroc"]
    )
    assert "(in) against each outlier set" in out
    assert main(argv) == 0  # the training statistics are cached beside the checkpoint and reused
    assert "reusing the training statistics" in capsys.readouterr().out


def test_class_conditional_sampling_and_manipulation(tiny, tmp_path, capsys):
    run = tmp_path / "cond"
    assert (
        main(
            [
                "--train",
                "--dataset",
                tiny["in"],
                "--output_dir",
                str(run),
                "--y_condition",
                "--y_weight",
                "0.5",
                "--n_epochs",
                "1",
                *TINY[2:],
            ]
        )
        == 0
    )
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["model_config"]["y_condition"] and payload["model_config"]["num_classes"] == 3
    assert (
        main(
            [
                "--sample",
                "--checkpoint",
                str(run / "last.pt"),
                "--output_dir",
                str(run / "s"),
                "--n_samples",
                "4",
                "--manipulate",
                "0",
                "1",
            ]
        )
        == 0
    )
    assert (run / "s" / "samples_by_class_T0.7.png").exists()
    assert (run / "s" / "manipulation_0_to_1.png").exists()
    assert (
        main(
            [
                "--sample",
                "--checkpoint",
                str(run / "last.pt"),
                "--output_dir",
                str(run / "s"),
                "--n_samples",
                "4",
                "--class",
                "2",
            ]
        )
        == 0
    )
    assert (run / "s" / "samples_T0.7_class2.png").exists()


def _error_of(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset", "no_such_dataset"], "unknown dataset"),
        (["--L", "5"], "not divisible by 2**L"),
        (["--image_size", "18"], "not divisible"),
        (["--K", "0"], "K (steps of flow per level) must be at least 1"),
        (["--L", "0"], "L (number of levels) must be at least 1"),
        (["--n_bits", "0"], "n_bits must be between 1 and 8"),
        (["--n_bits", "9"], "n_bits must be between 1 and 8"),
        (["--batch_size", "0"], "batch_size must be at least 1"),
        (["--batch_size", str(2**21)], "batch_size must be at most"),
        (["--lr", "nan"], "lr must be a positive finite number"),
        (["--lr", "inf"], "lr must be a positive finite number"),
        (["--lr", "0"], "lr must be a positive finite number"),
        (["--lr", "-0.1"], "lr must be a positive finite number"),
        (["--decay", "-1"], "decay must be a non-negative finite number"),
        (["--decay", "nan"], "decay must be a non-negative finite number"),
        (["--seed", "-1"], "seed must be non-negative"),
        (["--seed", str(2**32)], "seed must be at most 4294967295"),
        (["--seed", str(2**64)], "seed must be at most 4294967295"),
        (["--y_weight", "nan"], "y_weight must be a non-negative finite number"),
        (["--y_weight", "inf"], "y_weight must be a non-negative finite number"),
        (["--y_weight", "-1"], "y_weight must be a non-negative finite number"),
        (["--temperature", "nan"], "temperatures must be non-negative finite numbers"),
        (["--temperature", "0.7", "inf"], "temperatures must be non-negative finite numbers"),
        (["--temperature", "-1"], "temperatures must be non-negative finite numbers"),
        (["--n_interpolation_steps", "0"], "n_interpolation_steps must be at least 1"),
        (["--max_eval_images", "0"], "max_eval_images must be at least 1"),
        (["--max_grad_clip", "-1"], "max_grad_clip must be a non-negative finite number"),
        (["--max_grad_clip", "nan"], "max_grad_clip must be a non-negative finite number"),
        (["--max_grad_norm", "-1"], "max_grad_norm must be a non-negative finite number"),
        (["--max_grad_norm", "nan"], "max_grad_norm must be a non-negative finite number"),
        (["--actnorm_scale", "nan"], "actnorm_scale must be a positive finite number"),
        (["--actnorm_scale", "inf"], "actnorm_scale must be a positive finite number"),
        (["--actnorm_scale", "0"], "actnorm_scale must be a positive finite number"),
        (["--warmup", "-1"], "warmup must be non-negative"),
        (["--n_epochs", "-1"], "n_epochs must be non-negative"),
        (["--n_epochs", str(10**7)], "n_epochs must be at most"),
        (["--num_workers", "-1"], "num_workers must be non-negative"),
        (["--num_workers", "100000"], "num_workers must be at most"),
        (["--num_classes", "0"], "num_classes must be at least 1"),
        (["--image_size", "0"], "image_size must be at least 1"),
        (["--image_size", "-16"], "image_size must be at least 1"),
        (["--image_size", "100000"], "image_size must be at most"),
        (["--K", "100000000"], "K (steps of flow per level) must be at most"),
        (["--hidden_channels", "10000000"], "more than the limit"),
    ],
)
def test_bad_training_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    argv = ["--train", "--dataset", tiny["in"], "--output_dir", str(out), *TINY, *flags]  # the bad flag last wins
    code, err = _error_of(argv, capsys)
    assert code == 2
    assert err.startswith("glowflow: error:") and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sample", "--n_interpolation_steps", "0", "--interpolate"], "n_interpolation_steps must be at least 1"),
        (["--sample", "--temperature", "nan"], "temperatures must be non-negative finite numbers"),
        (["--outlier_detection", "--max_eval_images", "0"], "max_eval_images must be at least 1"),
        (["--outlier_detection", "--seed", "-5"], "seed must be non-negative"),
    ],
)
def test_bad_sampling_and_outlier_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    code, err = _error_of([*flags, "--checkpoint", str(tmp_path / "any.pt"), "--output_dir", str(out)], capsys)
    assert code == 2
    assert err.startswith("glowflow: error:") and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """The last.pt of a one-step run on tiny["in"]."""
    run = tmp_path_factory.mktemp("one_step")
    assert main(["--train", "--dataset", tiny["in"], "--output_dir", str(run), "--max_steps", "1", *TINY]) == 0
    return str(run / "last.pt")


def _sample_and_ood(checkpoint, tiny, output_dir):
    return [
        ["--sample", "--checkpoint", checkpoint, "--n_samples", "4", "--output_dir", str(output_dir)],
        [
            "--outlier_detection",
            "--checkpoint",
            checkpoint,
            "--out_dataset",
            tiny["noise"],
            "--output_dir",
            str(output_dir),
        ],
    ]


def test_sample_and_outlier_detection_into_a_file_are_refused_first(tiny, checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for output_dir in (blocker, blocker / "sub"):
        for argv in _sample_and_ood(checkpoint, tiny, output_dir):
            code, err = _error_of(argv, capsys)
            assert code == 2 and len(err.splitlines()) == 1, err
            assert f"cannot write to output directory {output_dir}: {blocker} is not a folder" in err, err
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_sample_and_outlier_detection_into_a_read_only_folder_are_refused(tiny, checkpoint, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for argv in _sample_and_ood(checkpoint, tiny, locked / "out"):
            code, err = _error_of(argv, capsys)
            assert code == 2 and len(err.splitlines()) == 1 and "cannot write to output directory" in err, err
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_an_unreadable_image_read_by_a_loader_worker_is_one_line(tiny, checkpoint, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(20):
        Image.new("L", (16, 16), color=10 * i).save(folder / f"img_{i:03d}.png")
    (folder / "img_999.png").write_bytes(b"not a png at all")
    argv = [
        "--outlier_detection",
        "--checkpoint",
        checkpoint,
        "--dataset",
        str(folder),
        "--out_dataset",
        tiny["noise"],
        "--num_workers",
        "1",
        "--output_dir",
        str(tmp_path / "ood"),
    ]
    code, err = _error_of(argv, capsys)
    assert code == 2, err
    last = err.replace("\r", "\n").splitlines()[-1]  # after the progress bar
    assert last.startswith("glowflow: error: cannot read image") and "img_999.png" in last, err
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_importing_the_command_line_does_not_import_torch():
    code = (
        "import sys, glowflow.cli, glowflow\n"
        "assert 'torch' not in sys.modules, 'glowflow.cli imported torch'\n"
        "assert glowflow.__version__ and glowflow.GlowflowError and glowflow.RunConfig\n"
        "assert 'torch' not in sys.modules, 'the light names imported torch'\n"
        "from glowflow import Glow, GlowConfig, load_checkpoint, preprocess, dequantize, postprocess, bits_per_dim\n"
        "assert 'torch' in sys.modules and glowflow.Glow is Glow and callable(load_checkpoint)\n"
        "assert set(glowflow.__all__) <= set(dir(glowflow))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _wait_until_torch_loads(proc, limit=300.0):
    """Wait until the process ``proc`` has mapped libtorch (it is importing torch), or has ended."""
    maps = f"/proc/{proc.pid}/maps"
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with open(maps) as f:
                if "libtorch" in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.005)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see torch loading")
@pytest.mark.parametrize("after", [0.0, 0.2])
def test_ctrl_c_while_torch_loads_is_one_line(tiny, tmp_path, after):
    run = tmp_path / "early"
    proc = subprocess.Popen(
        [sys.executable, "-m", "glowflow", "--train", "--dataset", tiny["in"], "--output_dir", str(run), *TINY],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_until_torch_loads(proc)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in err, err[-2000:]
    if proc.returncode == 0:  # on a loaded machine the signal can land after the work is done
        assert "done:" in out, out[-2000:]
        return
    assert proc.returncode in (130, 2) and "interrupted" in err, err[-2000:]


def test_ctrl_c_while_the_command_line_loads_is_one_line(tmp_path):
    """SIGINT delivered by the process to itself while ``glowflow.cli`` is being imported."""
    code = (
        "import os, signal, sys\n"
        "sys.argv = ['glowflow', '--help']\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'glowflow.config':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "import runpy\n"
        "runpy.run_module('glowflow', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr == "glowflow: interrupted\n" and proc.stdout == ""


def test_unwritable_output_dir(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = _error_of(["--train", "--dataset", tiny["in"], "--output_dir", str(blocker / "sub"), *TINY], capsys)
    assert code == 2 and "cannot write to output directory" in err and len(err.splitlines()) == 1


def test_bad_checkpoints(tiny, tmp_path, capsys):
    code, err = _error_of(["--sample", "--checkpoint", str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and "checkpoint not found" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x04garbage")
    code, err = _error_of(["--sample", "--checkpoint", str(corrupt)], capsys)
    assert code == 2 and "not a readable glowflow checkpoint" in err and len(err.splitlines()) == 1
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    code, err = _error_of(["--sample", "--checkpoint", str(foreign)], capsys)
    assert code == 2 and "not a glowflow checkpoint" in err
    code, err = _error_of(["--sample"], capsys)
    assert code == 2 and "--checkpoint" in err


def test_checkpoint_for_another_image_shape(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--train", "--dataset", tiny["in"], "--output_dir", str(run), "--max_steps", "1", *TINY]) == 0
    capsys.readouterr()
    code, err = _error_of(
        [
            "--outlier_detection",
            "--checkpoint",
            str(run / "last.pt"),
            "--dataset",
            tiny["big"],
            "--out_dataset",
            tiny["noise"],
            "--output_dir",
            str(run),
        ],
        capsys,
    )
    assert code == 2 and "1x16x16" in err and "1x32x32" in err, err


# ----------------------------------------------------------------------------- choosing the command


def test_no_command_is_an_error_that_lists_the_commands(capsys):
    code, err = _error_of([], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    for command in ("--train", "--sample", "--outlier_detection", "--score", "--export"):
        assert command in err, err
    code, err = _error_of(["--dataset", "mnist", "--K", "4"], capsys)  # flags, but no command
    assert code == 2 and "no command given" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"glowflow {glowflow.__version__}"


@pytest.mark.parametrize(
    "flags, picture",
    [
        (["--reconstruct"], "reconstructions.png"),
        (["--interpolate", "--n_interpolation_steps", "3"], "interpolations.png"),
        (["--manipulate_attribute", "1", "--manipulate_scales", "0", "1"], "manipulation_attribute_1.png"),
    ],
)
def test_a_sampling_sub_mode_alone_implies_sample(checkpoint, tmp_path, capsys, flags, picture):
    out = tmp_path / "out"
    assert main(["--checkpoint", checkpoint, "--n_samples", "4", "--output_dir", str(out), *flags]) == 0
    assert (out / "samples_T0.7.png").exists() and (out / picture).exists(), sorted(os.listdir(out))
    capsys.readouterr()


def test_a_sub_mode_alone_needs_a_checkpoint_like_sample(capsys, tmp_path):
    code, err = _error_of(["--reconstruct", "--output_dir", str(tmp_path / "o")], capsys)
    assert code == 2 and "--sample needs --checkpoint" in err, err
