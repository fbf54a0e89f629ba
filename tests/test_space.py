from pathlib import Path

import pytest
import yaml

from fersearch.cli import main
from fersearch.config import RECIPES, resolve_config
from fersearch.errors import FersearchError
from fersearch.space import SPACES_DIR, load_space, space_path

# The modern baseline documented in README: the hand-set three-block CNN (one definition).
MODERN = RECIPES["cnn"]["modern"]


@pytest.mark.parametrize("path", sorted(SPACES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_space_matches_its_model(path):
    model = path.stem.split("-")[0]
    space = load_space(path, model)
    # The first known point is the seed's configuration: the model's defaults.
    assert next(iter(space.points)) == "seed"
    assert space.point("seed") == resolve_config(model).to_params()
    assert {"lr", "batch_size"} <= set(space.searched())


@pytest.mark.parametrize("name", ["default", "broad"])
def test_both_cnn_spaces_start_with_the_seed_then_the_modern_baseline(name):
    space = load_space(space_path("cnn", name), "cnn")
    assert list(space.points) == ["seed", "modern"]
    assert space.point("seed") == resolve_config("cnn").to_params()
    assert space.point("modern") == resolve_config("cnn", MODERN).to_params()
    assert resolve_config("cnn", MODERN).channels == (32, 64, 128)  # the recipe README documents
    # The focused space fixes the wsd schedule, so it holds neither point (both are run as bars
    # to beat, and Optuna is told of neither); the broad space holds the seed's configuration.
    inside = {p: space.searched_values(space.point(p)) is not None for p in space.points}
    assert inside == ({"seed": False, "modern": False} if name == "default" else {"seed": True, "modern": False})
    broad_only = {"activation", "batch_norm", "label_mode", "optimizer"}
    assert (broad_only <= set(space.searched())) == (name == "broad")


def test_a_point_may_name_a_recipe_and_an_unknown_one_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("model: cnn\nparams:\n  lr: {loguniform: [0.001, 0.1]}\npoints:\n  strong: modern\n  odd: modrn\n")
    with pytest.raises(FersearchError, match="points.odd: no recipe named 'modrn' for cnn \\(recipes: modern\\)"):
        load_space(path, "cnn")
    path.write_text("model: cnn\nparams:\n  lr: {loguniform: [0.001, 0.1]}\npoints:\n  strong: modern\n")
    assert load_space(path, "cnn").point("strong") == resolve_config("cnn", MODERN).to_params()


def test_space_names_and_files(tmp_path):
    assert space_path("cnn", None) == space_path("cnn", "default") == SPACES_DIR / "cnn.yaml"
    assert space_path("cnn", "broad") == SPACES_DIR / "cnn-broad.yaml"
    own = _write(tmp_path, {"model": "cnn", "params": {"lr": {"uniform": [0.01, 0.1]}}})
    assert space_path("cnn", str(own)) == own.resolve()
    with pytest.raises(FersearchError, match="neither a file nor a space of cnn \\(broad, default\\)"):
        space_path("cnn", "narrow")


def test_points_default_to_the_seed_and_baseline_is_the_older_form(tmp_path):
    plain = load_space(_write(tmp_path, {"model": "cnn", "params": {"lr": {"uniform": [0.001, 0.1]}}}))
    # Every other key at the model's default: the seed's configuration lies in this space.
    assert list(plain.points) == ["seed"] and plain.searched_values(plain.point("seed")) == {"lr": 0.01}
    older = load_space(_write(tmp_path, {"model": "cnn", "params": {"lr": {"uniform": [0.001, 0.1]}},
                                         "baseline": {"lr": 0.05}}))
    assert older.points == {"seed": {"lr": 0.05}}
    none = load_space(_write(tmp_path, {"model": "cnn", "params": {"lr": {"uniform": [0.001, 0.1]}}, "points": {}}))
    assert none.points == {}


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
        ({"model": "cnn", "params": {"lr": {"uniform": [0.05, 0.1]}}, "points": {"mine": {"lr": -1}}}, "points.mine: lr=-1"),
        ({"model": "cnn", "params": {"lr": {"uniform": [0.05, 0.1]}}, "points": ["seed"]}, "points must map names"),
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
