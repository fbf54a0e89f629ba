"""Bad input (issue 15): one test per numbered case, named after it, plus the further checks.

Every refusal is one `fersearch: error:` line with exit code 2, made before any work starts,
and leaves nothing half-written behind.
"""

import json
import os
import socket
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from fersearch import data as D
from fersearch.cli import main
from tests.test_data import _write_kaggle
from tests.test_export import _astronaut_face


def _one_error(capsys, fragment: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fersearch: error: ") and len(err.splitlines()) == 1, err
    assert fragment in err, err
    return err


def _train_args(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--smoke", "--threads", "2", *extra]


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """A `fersearch train` output folder: a bundle for evaluate and predict (case 13)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(_train_args(synthetic_dir, out)) == 0
    return out


def _photo(path, size=(420, 640)):
    import cv2

    canvas = np.random.default_rng(1).integers(60, 200, size, dtype=np.uint8)
    face = cv2.cvtColor(_astronaut_face(), cv2.COLOR_RGB2GRAY)
    canvas[20:230, 20:230] = face
    cv2.imwrite(str(path), canvas)
    return path


# 1 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated", "random bytes"])
def test_case01_damaged_cache_is_rebuilt(synthetic_dir, tmp_path, damage):
    cache = tmp_path / "cache"
    args = _train_args(synthetic_dir, tmp_path / "a", "--cache-dir", str(cache))
    assert main(args) == 0
    (cache_file,) = cache.glob("ferplus-*.npz")
    good = cache_file.read_bytes()
    cache_file.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "random bytes": os.urandom(5000)}[damage])
    assert main(_train_args(synthetic_dir, tmp_path / "b", "--cache-dir", str(cache))) == 0
    # The damaged file was replaced by a readable one, so later runs use it again.
    with np.load(cache_file) as z:
        assert np.array_equal(z["images"], D.load_raw(synthetic_dir, tmp_path / "other").images)


# 2 --------------------------------------------------------------------------------------------


def _kaggle(synthetic_dir, folder, drop_fer=None, drop_new=None):
    _write_kaggle(D.load_raw(synthetic_dir), folder)
    for name, drop in (("fer2013.csv", drop_fer), ("fer2013new.csv", drop_new)):
        lines = (folder / name).read_text().splitlines(keepends=True)
        if drop is not None:
            del lines[drop]
        (folder / name).write_text("".join(lines))
    return folder / "fer2013.csv", folder / "fer2013new.csv"


@pytest.mark.parametrize(
    "drop_fer, drop_new, fragment",
    [
        # the last row of one file missing: the other has a row with no partner
        (-1, None, "fer2013new.csv has more rows than"),
        (None, -1, "fer2013.csv has more rows than"),
        # a row missing mid-file: every later label would land on the wrong face
        (10, None, "Usage 'PublicTest' in"),
    ],
)
def test_case02_prepare_refuses_csvs_that_disagree(synthetic_dir, tmp_path, capsys, drop_fer, drop_new, fragment):
    fer, new = _kaggle(synthetic_dir, tmp_path / "k", drop_fer, drop_new)
    assert main(["prepare", "--fer2013", str(fer), "--ferplus", str(new), "--out", str(tmp_path / "out")]) == 2
    err = _one_error(capsys, fragment)
    assert "line " in err
    assert not (tmp_path / "out").exists()


# 3 --------------------------------------------------------------------------------------------


def _png_header_only(path, width, height):
    """A PNG whose header says width x height (its pixels are cut short: never decoded)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))))
    return path


def test_case03_huge_photo_is_refused_from_its_header_and_big_ones_are_downscaled(trained, tmp_path, capsys):
    import cv2

    from fersearch.faces import YUNET_SIDE as DETECT_SIDE
    from fersearch.predict import Predictor

    huge = _png_header_only(tmp_path / "huge.png", 10000, 10000)
    assert main(["predict", str(trained), str(huge)]) == 2
    _one_error(capsys, "10000x10000 (100 megapixels); the limit is 50 megapixels")
    # A photo larger than the detector's copy: the face is found on the small copy and its box
    # is given in the full image's pixels: x4 the box found in the original 640x420 photo.
    small = cv2.imread(str(_photo(tmp_path / "p.png")), cv2.IMREAD_GRAYSCALE)
    big = cv2.resize(small, (2560, 1680), interpolation=cv2.INTER_CUBIC)
    assert max(big.shape) > DETECT_SIDE
    predictor = Predictor(trained)
    (want,) = [face["box"] for face in predictor.predict(small)["faces"]]
    (got,) = [face["box"] for face in predictor.predict(big)["faces"]]
    assert all(abs(g - 4 * w) <= 0.25 * 4 * want[2] for g, w in zip(got, want, strict=True)), (got, want)


# 4 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_case04_ui_refuses_a_port_outside_1_to_65535(tmp_path, capsys, port):
    assert main(["ui", "--mlruns", str(tmp_path / "m"), "--port", port]) == 2
    _one_error(capsys, f"--port {port} is not a TCP port")
    assert not (tmp_path / "m").exists()


def test_case04_ui_reports_a_port_it_cannot_take_and_warns_on_a_network_host(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--mlruns", str(tmp_path / "m"), "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith("fersearch: warning: --host 0.0.0.0 makes this server reachable from the network")
    assert err[1].startswith(f"fersearch: error: cannot listen on 0.0.0.0:{port}")


# 5 and 6 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "report"])
def test_case05_a_search_name_with_a_quote_is_refused_by_export_and_report(smoke_search, tmp_path, capsys, command):
    _, mlruns, _ = smoke_search
    assert main([command, "--model", "cnn", "--search", "it's", "--mlruns", str(mlruns), "--out", str(tmp_path / "x")]) == 2
    _one_error(capsys, "search name \"it's\" is not allowed")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["../../escape", "a/b", "it's", 'say"hi"', "..", "x y", ""])
def test_case06_search_name_is_checked_before_anything_starts(tmp_path, capsys, name):
    mlruns = tmp_path / "deep" / "mlruns"
    assert main(["search", "--data", "synthetic", "--name", name, "--mlruns", str(mlruns)]) == 2
    _one_error(capsys, "is not allowed")
    assert not (tmp_path / "deep").exists() and not (tmp_path / "escape").exists()


# 7 --------------------------------------------------------------------------------------------


def test_case07_out_that_is_a_file_is_refused_by_prepare_and_export(synthetic_dir, smoke_search, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    fer, new = _kaggle(synthetic_dir, tmp_path / "k")
    assert main(["prepare", "--fer2013", str(fer), "--ferplus", str(new), "--out", str(blocker)]) == 2
    _one_error(capsys, "is a file, not a folder")
    _, mlruns, _ = smoke_search
    assert main(["export", "--model", "cnn", "--search", "smoke", "--mlruns", str(mlruns), "--out", str(blocker),
                 "--no-register"]) == 2
    _one_error(capsys, "is a file, not a folder")
    assert main(["synthetic", "--out", str(blocker), "--train", "3", "--valid", "1", "--test", "1"]) == 2
    _one_error(capsys, "is a file, not a folder")
    assert blocker.read_text() == "keep me"


# 8 --------------------------------------------------------------------------------------------


def test_case08_predict_out_keeps_every_annotated_image(trained, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _photo(tmp_path / folder / "x.png")
    assert main(["predict", str(trained), str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"),
                 "--out", str(tmp_path / "o"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    written = [r["annotated"] for r in results]
    assert len(set(written)) == 2
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x-2.annotated.png", "x.annotated.png"]


# 9 --------------------------------------------------------------------------------------------


def test_case09_outputs_follow_the_umask(synthetic_dir, trained, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(_train_args(synthetic_dir, tmp_path / "t", "--cache-dir", str(tmp_path / "cache"))) == 0
        assert main(["synthetic", "--out", str(tmp_path / "s"), "--train", "3", "--valid", "1", "--test", "1"]) == 0
        assert main(["evaluate", str(trained), "--data", str(synthetic_dir), "--out", str(tmp_path / "e")]) == 0
    finally:
        os.umask(old)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    for name in ("config.yaml", "metrics.json", "model.pt", "curves.png"):
        assert mode(tmp_path / "t" / name) == 0o644, name
    assert mode(next((tmp_path / "cache").glob("*.npz"))) == 0o644
    assert mode(tmp_path / "e" / "metrics.json") == 0o644
    assert mode(tmp_path / "s") == 0o755  # a folder built in staging and renamed into place


# 10 and 11 ------------------------------------------------------------------------------------


def test_case10_evaluate_checks_out_before_scoring(trained, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # The data folder does not exist either: the --out error comes first, before any loading.
    assert main(["evaluate", str(trained), "--data", str(tmp_path / "nowhere"), "--out", str(blocker)]) == 2
    _one_error(capsys, f"--out {blocker} is a file")


@pytest.mark.parametrize(
    "extra, fragment",
    [([], "does not exist"), (["--device", "cuda:7"], "CUDA"), (["--set", "lr=-1"], "out of range")],
)
def test_case11_failed_train_leaves_no_out_folder(synthetic_dir, tmp_path, capsys, extra, fragment):
    data = tmp_path / "nowhere" if not extra else synthetic_dir
    out = tmp_path / "new" / "run"
    assert main(_train_args(data, out, *extra)) == 2
    _one_error(capsys, fragment)
    assert not (tmp_path / "new").exists()


# 12 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "report"])
def test_case12_a_missing_store_is_named_not_created(tmp_path, capsys, monkeypatch, command):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    typo = tmp_path / "mlrnus"
    assert main([command, "--model", "cnn", "--mlruns", str(typo), "--out", str(tmp_path / "x")]) == 2
    _one_error(capsys, f"no MLflow store at {typo / 'mlflow.db'}")
    assert not typo.exists() and not (tmp_path / "x").exists()


# 13 -------------------------------------------------------------------------------------------


def test_case13_a_garbage_bundle_config_is_one_line(trained, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained, bad)
    (bad / "config.yaml").write_text("model: [unclosed\n  classes: {\n")
    assert main(["predict", str(bad), str(_photo(tmp_path / "p.png"))]) == 2
    _one_error(capsys, f"{bad / 'config.yaml'} is not valid YAML (line ")


def test_case13_a_train_output_is_a_bundle_for_evaluate_and_predict(trained, synthetic_dir, tmp_path, capsys):
    from fersearch.bundle import load_bundle

    bundle = load_bundle(trained)
    assert bundle.cfg.model == "cnn" and bundle.classes[0] == "neutral"
    saved = json.loads((trained / "metrics.json").read_text())
    assert main(["evaluate", str(trained), "--data", str(synthetic_dir)]) == 0
    printed = capsys.readouterr().out
    assert f"accuracy {saved['test']['accuracy']:.4f}" in printed  # same weights, same test score
    assert main(["predict", str(trained), str(_photo(tmp_path / "p.png")), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["faces"]) == 1


def test_case13_predict_on_a_folder_says_it_is_a_folder(trained, tmp_path, capsys):
    assert main(["predict", str(trained), str(tmp_path)]) == 2
    _one_error(capsys, f"image {tmp_path} is a folder, not an image file")


def test_case13_resume_of_an_unknown_search_prints_no_settings(tmp_path, capsys):
    assert main(["search", "--resume", "never-ran", "--mlruns", str(tmp_path / "m")]) == 2
    captured = capsys.readouterr()
    assert "trials" not in captured.out
    assert captured.err.strip() == (
        f"fersearch: error: no search named 'never-ran' to resume under {tmp_path / 'm' / 'ray'}"
    )


def test_case13_a_header_only_label_csv_says_so(synthetic_copy, tmp_path, capsys):
    label = synthetic_copy / "FER2013Valid" / "label.csv"
    label.write_text("Image name,box," + ",".join(D.CLASSES) + "\n")
    assert main(_train_args(synthetic_copy, tmp_path / "o", "--cache-dir", str(tmp_path / "c"))) == 2
    _one_error(capsys, f"{label} lists no images (it is empty or holds only a header row)")


# 14 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "evaluate", "repeat"])
@pytest.mark.parametrize("threads", ["0", "-3"])
def test_case14_threads_below_1_are_refused(tmp_path, capsys, command, threads):
    args = {
        "train": ["train", "--data", "synthetic", "--out", str(tmp_path / "o")],
        "evaluate": ["evaluate", str(tmp_path / "b"), "--data", str(tmp_path)],
        "repeat": ["repeat", "--mlruns", str(tmp_path / "m")],
    }[command]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--threads", threads])
    assert exit_info.value.code == 2
    _one_error(capsys, f"argument --threads: {threads} is below 1")


def test_case14_a_missing_cuda_is_refused_before_the_data_loads(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # The data folder does not exist: the device error must come first.
    assert main(_train_args(tmp_path / "nowhere", tmp_path / "o", "--device", "cuda")) == 2
    _one_error(capsys, "device cuda was asked for but CUDA is not available")


# Further checks beyond the fourteen -----------------------------------------------------------


# Each bad option of train and search: one line, exit 2, nothing written.
BAD_OPTIONS = [
    ("train", ["--model", "vgg"], "unknown model 'vgg'"),
    ("train", ["--protocol", "fer7"], "unknown protocol 'fer7'"),
    ("train", ["--set", "label_mode=votes"], "unknown label_mode 'votes'"),
    ("train", ["--set", "colour=red"], "unknown hyperparameter 'colour'"),
    ("train", ["--set", "lr=-1"], "lr=-1.0 is out of range"),
    ("train", ["--epochs", "0"], "epochs=0 is out of range"),
    ("search", ["--grace-period", "0"], "--grace-period must be a positive number of epochs"),
    ("search", ["--grace-period", "nan"], "--grace-period must be a positive number of epochs"),
    ("search", ["--sampler", "grid"], "unknown --sampler 'grid' (choose from tpe, random)"),
    ("search", ["--reduction-factor", "1"], "--reduction-factor must be at least 2"),
    ("search", ["--cpus-per-trial", "0"], "--cpus-per-trial must be positive"),
    ("search", ["--gpus-per-trial", "-1"], "must be 0 or more"),
    ("search", ["--resume", "a", "--name", "b"], "drop --name"),
    ("search", ["--time-budget", "soon"], "is not a duration"),
    ("search", ["--fixed", "colour=red"], "unknown hyperparameter 'colour'"),
]


@pytest.mark.parametrize(("command", "args", "fragment"), BAD_OPTIONS)
def test_bad_options_are_one_line_before_anything_starts(synthetic_dir, tmp_path, capsys, command, args, fragment):
    out = tmp_path / "out"
    where = ["--out", str(out), "--threads", "2"] if command == "train" else ["--mlruns", str(out)]
    assert main([command, "--data", str(synthetic_dir), *where, *args]) == 2
    _one_error(capsys, fragment)
    assert not out.exists()


def test_a_damaged_resume_state_is_one_line(tmp_path, capsys):
    state = tmp_path / "m" / "ray" / "s1" / "fersearch_search.json"
    state.parent.mkdir(parents=True)
    state.write_text("{not json")
    assert main(["search", "--resume", "s1", "--mlruns", str(tmp_path / "m")]) == 2
    _one_error(capsys, "is damaged")


def test_a_search_saved_by_another_version_is_one_line_on_resume(tmp_path, capsys):
    """Ray pickles the scheduler and searcher of a search; one saved before they changed shape
    (no state version: 1) is refused before anything starts, naming the way to reuse its trials."""
    state = tmp_path / "m" / "ray" / "s1" / "fersearch_search.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"model": "cnn", "trials": 4, "max_epochs": 2, "data_dir": str(tmp_path)}))
    before = state.read_text()
    assert main(["search", "--resume", "s1", "--mlruns", str(tmp_path / "m")]) == 2
    _one_error(capsys, "saved by another version of fersearch (state 1")
    assert state.read_text() == before


def test_an_unknown_option_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "o"), "--colour", "red"])
    assert exit_info.value.code == 2
    _one_error(capsys, "unrecognized arguments: --colour red")


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unwritable_mlruns_is_refused_before_any_trial(synthetic_dir, tmp_path, capsys, where):
    """Ray's results and the local MLflow store live under --mlruns (issue 13): a folder that
    cannot be written (below a file; under /proc, where even root cannot create one) is one
    line before Ray starts."""
    if where == "file":
        (tmp_path / "afile").write_text("x")
        mlruns = tmp_path / "afile" / "mlruns"
    else:
        mlruns = Path("/proc/fersearch-mlruns")
        if not Path("/proc").is_dir():
            pytest.skip("no /proc here")
    assert main(["search", "--data", str(synthetic_dir), "--mlruns", str(mlruns), "--trials", "1"]) == 2
    _one_error(capsys, f"cannot write to --mlruns {mlruns}")


def test_sync_names_a_missing_search_and_an_unreachable_server_in_one_line(tmp_path, capsys, monkeypatch):
    from tests.helpers import free_port

    mlruns = tmp_path / "m"
    assert main(["sync", "--search", "never-ran", "--mlruns", str(mlruns)]) == 2
    assert capsys.readouterr().err == f"fersearch: error: no search named 'never-ran' under {mlruns / 'ray'}\n"
    state = mlruns / "ray" / "s1" / "fersearch_search.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"model": "cnn", "trials": 2, "max_epochs": 1, "data_dir": str(tmp_path),
                                 "parent_run_id": "0123abcd"}))
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)  # sync sets bounded retries; restored after the test
    assert main(["sync", "--search", "s1", "--mlruns", str(mlruns)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fersearch: error: cannot read the search's parent run 0123abcd from {url} (")
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["report", "export"])
def test_a_tracking_server_that_is_down_is_one_line(tmp_path, capsys, monkeypatch, command):
    from tests.helpers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)  # the CLI bounds the retries; restored after the test
    assert main([command, "--search", "s1", "--out", str(tmp_path / "out"), "--mlruns", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fersearch: error: MLflow: API request to http://127.0.0.1:") and err.count("\n") == 1
