from pathlib import Path

import pytest
import yaml

from fersearch.cli import main
from fersearch.config import resolve_config
from fersearch.errors import FersearchError
from fersearch.space import SPACES_DIR, load_space


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_space_matches_its_model(path):
    space = load_space(path, path.stem)
    baseline = space.baseline()
    # The first trial is the seed's configuration: the model's defaults.
    defaults = resolve_config(space.model).to_params()
    assert all(defaults[k] == v for k, v in baseline.items())
    assert {"lr", "optimizer", "batch_size", "label_mode", "flip"} <= set(space.searched())


def _write(tmp_path, doc) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "doc, fragment",
    [
        ({"model": "cnn", "params": {"learning_rate": {"uniform": [0.1, 1]}}}, "params.learning_rate is not a hyperparameter"),
        ({"model": "cnn", "params": {"lr": {"gaussian": [0.1, 1]}}}, "params.lr: expected exactly one of"),
        ({"model": "cnn", "params": {"lr": {"uniform": [0.1, 0.01]}}}, "params.lr: uniform range [0.1, 0.01] is empty or inverted"),
        ({"model": "cnn", "params": {"lr": {"loguniform": [0, 0.1]}}}, "loguniform needs low > 0"),
        ({"model": "cnn", "params": {"batch_size": {"int": [16, 16]}}}, "params.batch_size: int range [16, 16] is empty"),
        ({"model": "cnn", "params": {"optimizer": {"choice": []}}}, "params.optimizer: choice needs a non-empty list"),
        ({"model": "cnn", "params": {"optimizer": {"choice": ["sgd", "lion"]}}}, "unknown optimizer 'lion'"),
        ({"model": "cnn", "params": {"momentum": {"uniform": [0.5, 0.9], "when": {"optimiser": "sgd"}}}}, "when names unknown key 'optimiser'"),
        ({"model": "vgg", "params": {"lr": 0.1}}, "unknown model 'vgg'"),
        ({"model": "cnn", "params": {"lr": {"uniform": [0.05, 0.1]}}}, "baseline value lr=0.01 lies outside"),
        ({"model": "cnn", "params": {}}, "params must be a non-empty mapping"),
        ({"model": "cnn", "parameters": {}}, "unknown top-level key 'parameters'"),
        ("model: cnn\nparams: {lr: [", "is not valid YAML"),
    ],
)
def test_malformed_space_names_file_and_key(tmp_path, doc, fragment):
    path = _write(tmp_path, doc)
    with pytest.raises(FersearchError) as info:
        load_space(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_malformed_space_via_cli_exits_2(tmp_path, capsys):
    path = _write(tmp_path, {"model": "cnn", "params": {"lr": {"uniform": [1, 0]}}})
    code = main(["search", "--model", "cnn", "--space", str(path), "--trials", "1", "--mlruns", str(tmp_path / "m"), "--data", "synthetic"])
    assert code == 2
    err = capsys.readouterr().err
    assert "params.lr" in err and len(err.strip().splitlines()) == 1
