"""Bad input, round two (issue 24): one test per numbered case, named after it.

Every refusal is one `fersearch: error:` line with exit code 2 (argparse's own refusals too),
made before Ray starts or anything is written; nothing can hang on a bad option.
"""

import json
import time

import pytest
import yaml

from fersearch.cli import main
from fersearch.errors import FersearchError
from fersearch.record import STATE_VERSION


def _one_error(capsys, fragment: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fersearch: error: ") and len(err.splitlines()) == 1, err
    assert fragment in err, err
    return err


def _refused_by_argparse(capsys, argv, fragment: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    _one_error(capsys, fragment)


def _space(tmp_path, params, points=None, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": "cnn", "params": params, "points": points or {}}, sort_keys=False))
    return path


def _search(synthetic_dir, tmp_path, *extra):
    return ["search", "--data", str(synthetic_dir), "--mlruns", str(tmp_path / "m"), "--trials", "2",
            "--max-epochs", "1", "--name", "x", *extra]


# 1 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("params", "key", "fragment"), [
    ({"channels": {"choice": ["0,16", "2000,16"]}}, "channels", "widths between 1 and 1024"),
    ({"channels": {"choice": ["6,16", "0,16"]}}, "channels", "'0,16'"),  # mixed with a valid one
    ({"fc": {"choice": ["0", "9999"]}}, "fc", "fc at most 4 widths in 1..8192"),
    ({"convs_per_stage": {"choice": ["7"]}}, "convs_per_stage", "1 to 3 convolutions"),
    ({"lr": {"uniform": [0.01, 50.0]}}, "lr", "50.0"),  # the top of a range
])
def test_case01_a_space_value_no_trial_can_use_is_refused_before_ray(synthetic_dir, tmp_path, capsys, no_ray,
                                                                      params, key, fragment):
    space = _space(tmp_path, params)
    assert main(_search(synthetic_dir, tmp_path, "--space", str(space))) == 2
    err = _one_error(capsys, f"{space}: params.{key}: ")
    assert fragment in err
    assert not (tmp_path / "m" / "ray" / "x").exists()


def test_case01_a_trial_with_an_invalid_combination_fails_once_not_retried(ray_runtime, synthetic_dir, tmp_path):
    """Four 5x5 stages fit 48x48 with same padding, not with valid (3x3 ones fit either way):
    each value can pass, so the space is accepted; a trial that draws the bad combination fails
    at once, with its reason, and is never restarted."""
    from mlflow.tracking import MlflowClient

    from fersearch.search import SearchSettings, run_search
    from fersearch.tracking import ERROR_TAG, RETRIES_TAG, STATUS_TAG, tracking_uri

    space = _space(tmp_path, {"channels": "6,8,10,12", "kernel_size": {"choice": [3, 5]},
                              "padding": {"choice": ["valid", "same"]}, "lr": {"loguniform": [0.001, 0.01]}})
    settings = SearchSettings(model="cnn", data_dir=synthetic_dir, name="combo", mlruns=tmp_path / "m", trials=4,
                              max_epochs=1, cpus_per_trial=1, space_path=space, seed=3)
    lines: list[str] = []
    out = run_search(settings, emit=lines.append)
    client = MlflowClient(tracking_uri(tmp_path / "m"))
    experiment = client.get_experiment_by_name("cnn")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    invalid = [r for r in runs if (r.data.params["kernel_size"], r.data.params["padding"]) == ("5", "valid")]
    assert len(invalid) == 1 and len(runs) == 4  # seed 3 draws the bad combination once
    for run in invalid:
        assert run.data.tags[STATUS_TAG] == "failed" and "shrink a 48x48 input to nothing" in run.data.tags[ERROR_TAG]
        assert RETRIES_TAG not in run.data.tags  # never restarted
    assert all(r.data.tags[STATUS_TAG] != "failed" for r in runs if r not in invalid)
    assert out.counts["failed"] == 1
    assert any("failed after 0 epoch(s) (" in line and "shrink" in line for line in lines)


# 2, 3 -----------------------------------------------------------------------------------------


def test_case02_gpus_or_cpus_the_cluster_lacks_are_refused_not_waited_for(ray_runtime, synthetic_dir, tmp_path, capsys):
    start = time.monotonic()
    assert main(_search(synthetic_dir, tmp_path, "--gpus-per-trial", "1")) == 2
    _one_error(capsys, "--gpus-per-trial 1 asks for more GPUs than the Ray cluster has (0): no trial could start")
    assert main(_search(synthetic_dir, tmp_path, "--cpus-per-trial", "64")) == 2
    _one_error(capsys, "--cpus-per-trial 64 asks for more CPUs than the Ray cluster has")
    assert time.monotonic() - start < 60 and not (tmp_path / "m" / "ray" / "x").exists()
    _refused_by_argparse(capsys, _search(synthetic_dir, tmp_path, "--gpus-per-trial", "nan"),
                         "argument --gpus-per-trial: 'nan' is not a finite number")


def test_case03_an_address_with_nothing_listening_is_one_line(synthetic_dir, tmp_path, capsys):
    start = time.monotonic()
    assert main(_search(synthetic_dir, tmp_path, "--address", "127.0.0.1:1")) == 2
    _one_error(capsys, "no Ray cluster at 127.0.0.1:1")
    assert time.monotonic() - start < 30
    assert main(_search(synthetic_dir, tmp_path, "--address", "nonsense")) == 2
    _one_error(capsys, "--address 'nonsense' is not host:port")


# 4 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [b"", b"\x80\x04\x95garbage", b"not a pickle at all"])
def test_case04_a_damaged_tuner_state_is_one_line_on_resume(tmp_path, capsys, no_ray, damage):
    experiment = tmp_path / "m" / "ray" / "s1"
    experiment.mkdir(parents=True)
    (experiment / "fersearch_search.json").write_text(json.dumps(
        {"model": "cnn", "trials": 2, "max_epochs": 1, "data_dir": str(tmp_path), "parent_run_id": "x", "state_version": STATE_VERSION}))
    (experiment / "tuner.pkl").write_bytes(damage)
    assert main(["search", "--resume", "s1", "--mlruns", str(tmp_path / "m")]) == 2
    _one_error(capsys, "tuner.pkl is damaged; the search cannot be resumed")


# 5-9, 11: numeric and path options --------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_case05_cpus_per_trial_that_is_not_finite_is_refused(synthetic_dir, tmp_path, capsys, value):
    _refused_by_argparse(capsys, _search(synthetic_dir, tmp_path, "--cpus-per-trial", value),
                         "argument --cpus-per-trial: ")


def test_case06_a_space_file_that_is_not_utf8_is_one_line(synthetic_dir, tmp_path, capsys, no_ray):
    space = tmp_path / "latin1.yaml"
    space.write_bytes("model: cnn\nparams:\n  lr: 0.01  # \xe9t\xe9\n".encode("latin-1"))
    assert main(_search(synthetic_dir, tmp_path, "--space", str(space))) == 2
    _one_error(capsys, f"{space} is not UTF-8 text")


@pytest.mark.parametrize("command", ["train", "synthetic", "prepare"])
def test_case07_an_over_long_out_name_is_one_line(synthetic_dir, tmp_path, capsys, command):
    out = str(tmp_path / ("x" * 300))
    argv = {"train": ["train", "--data", str(synthetic_dir), "--out", out],
            "synthetic": ["synthetic", "--out", out],
            "prepare": ["prepare", "--fer2013", "a.csv", "--ferplus", "b.csv", "--out", out]}[command]
    _refused_by_argparse(capsys, argv, "argument --out: is too long")
    # The check every command shares, reached by other paths (a bundle's own folder), too.
    from fersearch.outputs import check_out_dir

    with pytest.raises(FersearchError, match="File name too long"):
        check_out_dir(tmp_path / ("y" * 300))


@pytest.mark.parametrize("threads", ["99999999999999999999", "100000"])
def test_case08_a_huge_threads_value_is_refused(synthetic_dir, tmp_path, capsys, threads):
    _refused_by_argparse(capsys, ["train", "--data", str(synthetic_dir), "--out", str(tmp_path / "o"), "--threads", threads],
                         "argument --threads: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--data", "synthetic", "--out", ""],
    ["synthetic", "--out", " "],
    ["export", "--out", ""],
    ["report", "--out", ""],
    ["evaluate", "b1", "--data", "d", "--out", ""],
    ["predict", "b1", "face.png", "--out", ""],
    ["search", "--mlruns", ""],
    ["search", "--data", ""],
    ["evaluate", "", "--data", "d"],
])
def test_case09_an_empty_path_is_refused_by_every_command(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    _refused_by_argparse(capsys, argv, "is empty: give a path")
    assert not list(tmp_path.iterdir())  # nothing written into the current folder
    from fersearch.outputs import check_out_dir

    with pytest.raises(FersearchError, match="--out is empty"):
        check_out_dir("")


def test_case10_a_when_value_the_key_never_takes_is_refused(synthetic_dir, tmp_path, capsys, no_ray):
    bad_case = _space(tmp_path, {"optimizer": {"choice": ["sgd", "adam"]},
                                 "momentum": {"uniform": [0.5, 0.99], "when": {"optimizer": "SGD"}}})
    assert main(_search(synthetic_dir, tmp_path, "--space", str(bad_case))) == 2
    _one_error(capsys, "params.momentum: when optimizer: 'SGD' is never a value of optimizer (it takes 'sgd', 'adam')")
    fixed = _space(tmp_path, {"optimizer": "adam", "momentum": {"uniform": [0.5, 0.99], "when": {"optimizer": "sgd"}}},
                   name="fixed.yaml")
    assert main(_search(synthetic_dir, tmp_path, "--space", str(fixed))) == 2
    _one_error(capsys, "'sgd' is never a value of optimizer (it takes 'adam')")
    later = _space(tmp_path, {"momentum": {"uniform": [0.5, 0.99], "when": {"optimizer": "sgd"}},
                              "optimizer": {"choice": ["sgd", "adam"]}}, name="later.yaml")
    assert main(_search(synthetic_dir, tmp_path, "--space", str(later))) == 2
    _one_error(capsys, "optimizer is drawn after momentum; list it first")


@pytest.mark.parametrize("budget", ["nan", "inf", "1e400h", "", " ", "-5m", "400d"])
def test_case11_a_time_budget_that_is_not_a_finite_positive_duration_is_refused(synthetic_dir, tmp_path, capsys,
                                                                                 no_ray, budget):
    assert main(_search(synthetic_dir, tmp_path, f"--time-budget={budget}")) == 2
    _one_error(capsys, "--time-budget")
    assert not (tmp_path / "m" / "ray" / "x").exists()


# 12 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "fragment"), [
    ("nosuchdb://host/db", "cannot open the Optuna storage nosuchdb://host/db"),
    ("not a url", "cannot open the Optuna storage not a url"),
])
def test_case12_a_bad_optuna_storage_is_refused_before_ray(synthetic_dir, tmp_path, capsys, no_ray, url, fragment):
    assert main(_search(synthetic_dir, tmp_path, "--optuna-storage", url)) == 2
    _one_error(capsys, fragment)


def test_numeric_options_have_upper_bounds(synthetic_dir, tmp_path, capsys):
    """Beyond the sweep: every numeric option of search refuses NaN, infinity and huge values."""
    for option in ("--trials", "--max-epochs", "--reduction-factor", "--quasi-random", "--seed"):
        _refused_by_argparse(capsys, _search(synthetic_dir, tmp_path, option, "1" + "0" * 30), f"argument {option}: ")
    for option in ("--grace-period",):
        for value in ("nan", "inf"):
            assert main(_search(synthetic_dir, tmp_path, option, value)) == 2
            _one_error(capsys, "--grace-period must be a positive number of epochs")


# 14, 15: what predict is given --------------------------------------------------------------------

from tests.test_bad_input import _photo, trained  # noqa: E402,F401 - a bundle fixture, shared


def test_case14_special_files_are_named_and_never_opened(trained, tmp_path, capfd):  # noqa: F811
    import os

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    loop = tmp_path / "loop.png"
    loop.symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(loop)
    assert main(["predict", str(trained), str(fifo)]) == 2
    err = capfd.readouterr().err.strip()
    assert err == f"fersearch: error: image {fifo} is not a regular file (a FIFO, device or socket), not an image file"
    assert main(["predict", str(trained), str(loop)]) == 2
    assert capfd.readouterr().err.strip() == f"fersearch: error: image {loop} is a loop of symbolic links, not an image file"


def test_case14_a_truncated_png_is_one_line_without_the_decoders_noise(trained, tmp_path, capfd):  # noqa: F811
    whole = _photo(tmp_path / "whole.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    assert main(["predict", str(trained), str(cut)]) == 2
    captured = capfd.readouterr()  # the file descriptors themselves: what libpng writes, too
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"fersearch: error: image {cut} is damaged or truncated (")
    assert "libpng" not in captured.out + captured.err


def test_predict_and_the_app_share_one_image_rule_and_honour_exif_orientation(trained, tmp_path, capfd):  # noqa: F811
    """A phone's portrait photo is stored sideways with an EXIF orientation tag: predict and the
    app both turn it upright before finding faces (the face is found, in upright pixels), and
    both refuse what the app refuses (an animated GIF here) with the same reason."""
    import json

    from PIL import Image

    from fersearch.app import decode_upload
    from fersearch.predict import read_image

    upright = Image.open(_photo(tmp_path / "upright.png")).convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera stored it
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera held on its side: a viewer turns the stored pixels back upright
    sideways.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    assert read_image(tmp_path / "phone.jpg").shape[:2] == (upright.height, upright.width)
    assert decode_upload(tmp_path / "phone.jpg").shape[:2] == (upright.height, upright.width)
    assert main(["predict", str(trained), str(tmp_path / "phone.jpg"), "--json"]) == 0
    (result,) = json.loads(capfd.readouterr().out)
    assert result["size"] == [upright.width, upright.height] and not result["whole_image"]
    frames = [Image.new("L", (20, 20), v) for v in (0, 255)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert main(["predict", str(trained), str(tmp_path / "a.gif")]) == 2
    assert capfd.readouterr().err.strip() == f"fersearch: error: image {tmp_path / 'a.gif'} is animated (2 frames): use a single frame as PNG or JPEG"
    with pytest.raises(FersearchError, match=r"^a.gif is animated \(2 frames\)"):
        decode_upload(tmp_path / "a.gif")


def test_case15_a_newline_in_an_image_name_stays_on_one_line(trained, tmp_path, capfd):  # noqa: F811
    photo = _photo(tmp_path / "a\nb.png")
    out = tmp_path / "out"
    assert main(["predict", str(trained), str(photo), "--out", str(out)]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[0].startswith(repr(str(photo)) + ": ")  # quoted, with the newline escaped
    assert [p.name for p in out.iterdir()] == ["a_b.annotated.png"]


# Borderline cases, decided: a key given twice is refused ----------------------------------------


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--set", "lr=0.1", "--set", "lr=0.2"], "lr is given twice ('0.1' and '0.2')"),
    (["--set", "epochs=3", "--epochs", "2"], "epochs is given twice (--set epochs=3 and --epochs 2)"),
])
def test_a_key_given_twice_is_refused_not_silently_overridden(synthetic_dir, tmp_path, capsys, extra, fragment):
    assert main(["train", "--data", str(synthetic_dir), "--out", str(tmp_path / "o"), *extra]) == 2
    _one_error(capsys, fragment)
    assert not (tmp_path / "o").exists()
