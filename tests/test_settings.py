"""One source of truth for settings: the config classes make the CLI's options."""

import dataclasses
import subprocess
import sys
import time

import pytest

from tftransfer import DistillConfig, TrainConfig, TransferError
from tftransfer.cli import build_parser, main


def _options(command):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return {action.dest: action for action in subparsers.choices[command]._actions}


@pytest.mark.parametrize("command,config_class",
                         [("train", TrainConfig), ("distill", DistillConfig)])
def test_every_setting_is_an_option_with_the_same_default(command, config_class):
    options = _options(command)
    for field in dataclasses.fields(config_class):
        if not field.metadata.get("cli"):
            assert field.name not in options
            continue
        assert field.name in options, f"{command} has no option for {field.name}"
        if field.default is not dataclasses.MISSING:
            assert options[field.name].default == field.default, field.name
        assert options[field.name].help, field.name


def test_parsed_options_make_the_config_python_would(scenes_dir):
    from tftransfer.settings import from_arguments

    args = build_parser().parse_args(
        ["train", scenes_dir, "--backbone", "VGG16", "--weights", "none",
         "--image-size", "32", "--no-cache", "--class-weight", "auto", "-o", "out",
         "--fine-tune-epochs", "2", "--validation-split", "0.3", "--dropout", "0.1"])
    config = from_arguments(TrainConfig, args)
    assert config == TrainConfig(scenes_dir, backbone="vgg16", weights=None,
                                 image_size=32, cache=False, class_weight="auto",
                                 output="out", fine_tune_epochs=2,
                                 validation_split=0.3, dropout=0.1)
    args = build_parser().parse_args(["distill", scenes_dir, "--teacher", scenes_dir,
                                      "--validation-split", "0.5", "--student",
                                      "vgg16", "--dropout", "0.3"])
    assert args.validation_split == 0.5 and args.dropout == 0.3  # once missing


def test_bad_settings_fail_at_once_and_write_nothing(scenes_dir, tmp_path, capsys):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="at most 20"):
        TrainConfig(scenes_dir, backbone="vgg16", fine_tune_layers=9999)
    with pytest.raises(TransferError, match="No teacher model"):
        DistillConfig(scenes_dir, str(tmp_path / "no-teacher"))
    for bad in (dict(epochs=-1), dict(batch_size=0), dict(learning_rate=0),
                dict(validation_split=1.5), dict(dropout=1.0), dict(image_size=8),
                dict(alpha=0.5), dict(epochs=0), dict(serving_max_pixels=0)):
        with pytest.raises(ValueError):
            TrainConfig(scenes_dir, backbone="vgg16", **bad)
    # Under a second on a quiet machine (see the issue-13 note); the bound here
    # only proves that nothing slow (a scan, a weights download) ran.
    assert time.perf_counter() - start < 10.0

    output = tmp_path / "out"
    for args in (["--fine-tune-layers", "9999"], ["--backbone", "nonet"],
                 ["--epochs", "-2"], ["--serving-max-pixels", "0"]):
        assert main(["train", scenes_dir, "--backbone", "vgg16", *args,
                     "--output", str(output)]) == 2
        error = capsys.readouterr().err
        assert "error:" in error and "Traceback" not in error
    assert main(["distill", scenes_dir, "--teacher", str(tmp_path / "nothing"),
                 "--output", str(output)]) == 2
    assert "No teacher model" in capsys.readouterr().err
    assert not output.exists()


def test_missing_weights_fail_before_the_scan(scenes_dir, tmp_path, monkeypatch):
    import tftransfer.fusion
    import tftransfer.run
    from tftransfer import WeightsUnavailableError, train_run

    scanned = []
    monkeypatch.setattr(tftransfer.run, "scan_image_folder",
                        lambda *args, **kwargs: scanned.append(args))

    def offline(*args, **kwargs):
        raise WeightsUnavailableError("no network")

    monkeypatch.setattr(tftransfer.fusion, "load_backbone", offline)
    with pytest.raises(WeightsUnavailableError):
        train_run(TrainConfig(scenes_dir, output=str(tmp_path / "run"),
                              backbone="vgg16", verbose=0))
    assert not scanned and not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="no such file"):
        TrainConfig(scenes_dir, backbone="vgg16", weights=str(tmp_path / "x.h5"))


def test_a_bug_shows_its_traceback_and_says_so(monkeypatch, capsys):
    from tftransfer import cli

    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "backbones", broken)
    assert main(["backbones"]) == 1
    error = capsys.readouterr().err
    assert "Traceback" in error and "KeyError" in error and "this is a bug" in error


def test_importing_tftransfer_leaves_the_warning_filters_alone():
    # TensorFlow and its dependencies add filters of their own: count from there.
    code = ("import warnings, tensorflow, keras, tensorflow_hub, numpy; "
            "before = list(warnings.filters); import tftransfer; "
            "import tftransfer.cli, tftransfer.run, tftransfer.distill_run; "
            "assert warnings.filters == before, warnings.filters[:3]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
