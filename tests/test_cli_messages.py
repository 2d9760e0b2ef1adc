"""The command line's messages to a newcomer: names and paths checked before torch loads (with the
nearest name suggested), a misspelt flag's suggestion, --help's defaults said once, the hint that
resizes images a model's levels cannot halve, and no empty output folder left by a failed command."""

import os
import re
import subprocess
import sys

import pytest
from PIL import Image

import glowflow.cli as cli
from glowflow.cli import build_parser, main
from glowflow.data import load_dataset
from glowflow.errors import GlowflowError
from glowflow.names import DATASET_NAMES, SHIPPED
from glowflow.outputs import no_empty_folder_left
from glowflow.preflight import did_you_mean, nearest_paths

# (flags, what the one-line error must say): each refused before torch loads
REFUSED = [
    (["--train", "--dataset", "fashionmnsit"], "unknown dataset 'fashionmnsit' (did you mean fashionmnist?)"),
    (["--train", "--dataset", "MNIST"], "unknown dataset 'MNIST' (did you mean mnist?)"),
    (["--train", "--dataset", "fashionmnsit:classes=0,1"], "(did you mean fashionmnist?)"),
    (["--train", "--dataset", "vflip:cifar1O"], "unknown dataset 'cifar1O' (did you mean cifar10"),
    (["--train", "--dataset", "no/such/folder"], "dataset path no/such/folder does not exist"),
    (["--train", "--dataset", "missing.npz"], "dataset path missing.npz does not exist"),
    (
        ["--outlier_detection", "--checkpoint", "pretrained:fashionmnist", "--out_dataset", "digits", "nosie"],
        "--out_dataset: unknown dataset 'nosie' (did you mean noise?)",
    ),
    (["--sample", "--checkpoint", "pretrained:fashionmnst"], "no pretrained model named 'fashionmnst'"),
    (["--sample", "--checkpoint", "fashionmnist"], "checkpoint not found: fashionmnist (did you mean pretrained:"),
    (["--sample", "--checkpoint", "pretrain:fashionmnist"], "(did you mean pretrained:fashionmnist?)"),
    (["--sample", "--checkpoint", "runs/last.pt"], "--checkpoint: checkpoint not found: runs/last.pt"),
    (
        ["--outlier_detection", "--checkpoint", "pretrained:fashionmnist", "--background_checkpoint", "bg.pt"],
        "--background_checkpoint: checkpoint not found: bg.pt",
    ),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_a_bad_name_or_path_is_refused_before_torch_loads(tmp_path, flags, message):
    code = (
        "import sys\n"
        "from glowflow.cli import main\n"
        f"code = main({flags!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported before the error'\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err.startswith("glowflow: error:") and len(err.splitlines()) == 1 and message in err, err
    assert os.listdir(tmp_path) == []  # no output folder


def test_every_name_and_existing_path_passes_the_check(tmp_path, monkeypatch, capsys):
    """The check refuses nothing that loads: known, derived and synthetic names, existing paths,
    pretrained:NAME for every shipped model (the command then fails later, for its own reasons)."""
    from glowflow.preflight import check_checkpoint, check_dataset

    folder = tmp_path / "my images"
    folder.mkdir()
    for name in (*DATASET_NAMES, "digits", "noise", "mnist:classes=1,2", "hflip:vflip:cifar10", str(folder)):
        check_dataset(name, "--dataset")
    monkeypatch.chdir(tmp_path)
    check_dataset("my images", "--dataset")  # a folder in the working directory, no separator
    (tmp_path / "last.pt").write_bytes(b"")
    for path in ("last.pt", str(tmp_path / "last.pt"), str(folder), *(f"pretrained:{n}" for n in SHIPPED)):
        check_checkpoint(path, "--checkpoint")


def test_a_near_existing_path_is_suggested(tmp_path, monkeypatch):
    (tmp_path / "outputs" / "Glow_mnist").mkdir(parents=True)
    (tmp_path / "outputs" / "Glow_mnist" / "last.pt").write_bytes(b"")
    assert nearest_paths(str(tmp_path / "outputs" / "Glow_mnsit" / "last.pt")) == [
        str(tmp_path / "outputs" / "Glow_mnist" / "last.pt")
    ]
    assert nearest_paths(str(tmp_path / "outputs" / "Glow_mnist" / "lats.pt")) == [
        str(tmp_path / "outputs" / "Glow_mnist" / "last.pt")
    ]
    assert nearest_paths(str(tmp_path / "outputs" / "Glow_mnsit" / "best.pt")) == []  # no such file there either
    monkeypatch.chdir(tmp_path)
    code, err = _error_of(["--sample", "--checkpoint", "outputs/Glow_mnist/lst.pt"])
    assert code == 2 and "(did you mean outputs/Glow_mnist/last.pt?)" in err, err


def _error_of(argv):
    from contextlib import redirect_stderr
    from io import StringIO

    stream = StringIO()
    with redirect_stderr(stream):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    return code, stream.getvalue().strip()


def test_did_you_mean():
    assert did_you_mean("fashionmnsit", DATASET_NAMES) == " (did you mean fashionmnist?)"
    assert did_you_mean("Cifar10", DATASET_NAMES) == " (did you mean cifar10?)"
    assert did_you_mean("xyzzy", DATASET_NAMES) == ""


@pytest.mark.parametrize(
    "flags, suggestion",
    [
        (["--train", "--epochs", "3"], "--n_epochs"),
        (["--sampel", "--checkpoint", "x.pt"], "--sample"),
        (["--train", "--hiden_channels=8"], "--hidden_channels"),
        (["--sample", "--temprature", "0.5"], "--temperature"),
    ],
)
def test_a_misspelt_flag_gets_the_nearest_flags_in_one_line(flags, suggestion):
    code, err = _error_of(flags)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("glowflow: error: unrecognized arguments: ") and f"did you mean {suggestion}" in err, err


def test_an_unknown_word_that_is_no_flag_gets_no_suggestion():
    code, err = _error_of(["--train", "cifar10"])
    assert code == 2 and len(err.splitlines()) == 1 and "unrecognized arguments: cifar10" in err
    assert "did you mean" not in err


def _help_entries():
    """{flag: its help text, on one line} from --help's output."""
    entries, flag = {}, None
    for line in build_parser().format_help().splitlines():
        match = re.match(r"^  (--?\w+)", line)
        if match:
            flag = match.group(1)
            entries[flag] = line
        elif line.startswith("   ") and flag:
            entries[flag] += " " + line
        else:
            flag = None
    return {flag: re.sub(r"\s+", " ", text) for flag, text in entries.items()}


def test_help_says_each_default_at_most_once():
    entries = _help_entries()
    assert len(entries) > 50
    for text in entries.values():
        assert text.lower().count("default") <= 1, text
        assert "(default: None)" not in text and "(default: False)" not in text, text
    assert "(default: 128)" in entries["--batch_size"]
    assert "(default: combined)" in entries["--detector_score"]
    assert "(default: 0.7)" in entries["--temperature"]
    assert "(default: fashionmnist)" in entries["--out_dataset"]
    assert "default outputs/Glow_<dataset>" in entries["--output_dir"]


def _write_28_pixel_folder(folder, n=12):
    folder.mkdir()
    for i in range(n):
        Image.new("L", (28, 28), color=20 * i).save(folder / f"img_{i:02d}.png")
    return str(folder)


def test_a_folder_of_28_pixel_images_names_the_image_size_that_fits(tmp_path):
    folder = _write_28_pixel_folder(tmp_path / "pictures")
    out = tmp_path / "never"
    code, err = _error_of(["--train", "--dataset", folder, "--L", "3", "--output_dir", str(out), "--no_wandb"])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "image size 28 is not divisible by 2**L = 8" in err and "pass --image_size 32" in err, err
    assert "use --L 2 or less" in err, err
    assert not out.exists()
    with pytest.raises(GlowflowError, match="pass --image_size 32 to resize"):
        load_dataset(folder, "train", divisor=8)
    # the fix it names works: the images are resized to 32, which 2**3 divides
    args = build_parser().parse_args(["--train", "--dataset", folder, "--L", "3", "--image_size", "32"])
    assert cli.model_config_from_args(args, cli.run_config_from_args(args)).image_shape == (1, 32, 32)


def test_an_odd_size_names_only_the_image_size():
    from glowflow.data.resolve import check_divisible

    with pytest.raises(GlowflowError) as refused:
        check_divisible("odd", 27, 2)
    assert "pass --image_size 28 to resize" in str(refused.value) and "use --L" not in str(refused.value)
    check_divisible("fits", 32, 5)


# ----------------------------------------------------------------------------- no empty folder left


def test_a_failed_command_leaves_no_folder_it_made(tmp_path):
    made = tmp_path / "a" / "b" / "c"
    with pytest.raises(GlowflowError):
        with no_empty_folder_left(str(made)):
            made.mkdir(parents=True)
            raise GlowflowError("failed before writing")
    assert os.listdir(tmp_path) == []

    root = tmp_path / "outputs"
    (root / "kept_empty").mkdir(parents=True)  # there before: kept even though empty
    with pytest.raises(KeyboardInterrupt):
        with no_empty_folder_left(str(root)):
            (root / "Glow_x").mkdir()
            (root / "Glow_y").mkdir()
            (root / "Glow_y" / "written.txt").write_text("work")  # not empty: kept
            raise KeyboardInterrupt
    assert sorted(os.listdir(root)) == ["Glow_y", "kept_empty"]


def test_a_command_that_succeeds_keeps_its_folders(tmp_path):
    made = tmp_path / "out"
    with no_empty_folder_left(str(made)):
        made.mkdir()
    assert made.is_dir()


@pytest.mark.parametrize("command", ["--sample", "--outlier_detection", "--score"])
def test_main_removes_the_empty_folder_of_a_failed_command(tmp_path, monkeypatch, command):
    def fails_after_making_its_folder(args):
        os.makedirs(os.path.join(args.output_dir or "outputs", "Glow_x"))
        raise GlowflowError("failed before writing anything")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_run", fails_after_making_its_folder)
    flags = [command, "data.npz"] if command == "--score" else [command]
    assert _error_of([*flags, "--checkpoint", "x.pt"])[0] == 2
    assert _error_of([*flags, "--checkpoint", "x.pt", "--output_dir", "a/b"])[0] == 2
    assert os.listdir(tmp_path) == []


def test_class_on_an_unconditional_model_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for flags, message in (
        (["--class", "3"], "--class needs a class-conditional model (trained with --y_condition)"),
        (["--manipulate", "0", "1"], "--manipulate needs a class-conditional model"),
    ):
        code, err = _error_of(["--sample", "--checkpoint", "pretrained:fashionmnist", *flags])
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        assert os.listdir(tmp_path) == []


def test_a_class_outside_the_models_classes_is_refused_before_any_work():
    from glowflow.config import GlowConfig, RunConfig
    from glowflow.sample import check_class_flags

    conditional = GlowConfig(image_shape=(1, 8, 8), L=2, y_condition=True, num_classes=3)
    check_class_flags(conditional, RunConfig(sample_class=2, manipulate=(0, 2)))
    with pytest.raises(GlowflowError, match=r"--class: class 3 is outside 0..2"):
        check_class_flags(conditional, RunConfig(sample_class=3))
    with pytest.raises(GlowflowError, match=r"--manipulate: class 5 is outside 0..2"):
        check_class_flags(conditional, RunConfig(manipulate=(0, 5)))


def test_sampling_a_pretrained_model_writes_into_its_own_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--sample", "--checkpoint", "pretrained:fashionmnist", "--n_samples", "2", "--temperature", "0.5", "1"]
    assert main([*argv, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "writing into outputs/pretrained_fashionmnist" in out, out
    assert os.listdir(tmp_path / "outputs") == ["pretrained_fashionmnist"]  # not Glow_fashionmnist, training's
    written = sorted(os.listdir(tmp_path / "outputs" / "pretrained_fashionmnist"))
    assert written == ["samples_T0.5.png", "samples_T1.png", "samples_temperatures.png"]
    with Image.open(tmp_path / "outputs" / "pretrained_fashionmnist" / "samples_temperatures.png") as sheet:
        assert sheet.size[0] > 2 * 34 + 2 and sheet.size[1] == 2 * 34 + 2  # two 32-pixel rows, a label margin
