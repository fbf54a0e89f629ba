"""Export from a real smoke search, reload without fersearch, evaluate and predict."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fersearch.bundle import BUNDLE_FILES, load_bundle
from fersearch.cli import main
from fersearch.errors import FersearchError
from fersearch.evaluate import evaluate_bundle
from fersearch.export import export_best


@pytest.fixture(scope="module")
def bundle_dir(smoke_search, tmp_path_factory):
    outcome, mlruns, _ = smoke_search
    out = tmp_path_factory.mktemp("export") / "cnn"
    assert main(["export", "--model", "cnn", "--search", "smoke", "--mlruns", str(mlruns), "--out", str(out)]) == 0
    return out


def test_export_writes_a_complete_bundle_and_registers_it(bundle_dir, smoke_search):
    outcome, mlruns, _ = smoke_search
    for name in BUNDLE_FILES + ("confusion_matrix.png",):
        assert (bundle_dir / name).is_file(), name
    source = json.loads((bundle_dir / "source.json").read_text())
    assert source["mlflow_run_id"] == outcome.best["run_id"] and source["registered"] == "fersearch-cnn v1"
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    assert set(metrics["by_protocol"]) == {"ferplus8", "seed10"}
    assert metrics["by_protocol"]["ferplus8"]["val"]["accuracy"] == pytest.approx(outcome.best["val"]["accuracy"])
    from mlflow.tracking import MlflowClient

    from fersearch.tracking import tracking_uri

    version = MlflowClient(tracking_uri(mlruns)).get_model_version("fersearch-cnn", "1")
    assert float(version.tags["test_ferplus8_accuracy"]) == pytest.approx(metrics["by_protocol"]["ferplus8"]["test"]["accuracy"], abs=1e-4)
    # Exporting into a non-empty folder is refused, nothing overwritten.
    with pytest.raises(FersearchError, match="not empty"):
        export_best("cnn", bundle_dir, mlruns, search="smoke", register=False)


def test_torchscript_runs_without_fersearch_and_matches(bundle_dir, tmp_path):
    pixels = torch.randint(0, 256, (5, 1, 48, 48), dtype=torch.uint8)
    torch.save(pixels, tmp_path / "pixels.pt")
    code = (
        "import sys, torch; m = torch.jit.load(sys.argv[1]); x = torch.load(sys.argv[2]).float(); "
        "torch.save(m(x), sys.argv[3]); assert 'fersearch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(bundle_dir / "model.torchscript.pt"), str(tmp_path / "pixels.pt"),
                    str(tmp_path / "logits.pt")], check=True, cwd=tmp_path)
    scripted = torch.load(tmp_path / "logits.pt")
    bundle = load_bundle(bundle_dir)
    with torch.no_grad():
        live = bundle.model(bundle.normalize(pixels[:, 0]))
    assert torch.allclose(scripted, live, atol=1e-4)


def test_mismatched_or_unsafe_bundles_are_refused(bundle_dir, tmp_path):
    with pytest.raises(FersearchError, match="holds a cnn model, not resnet18"):
        load_bundle(bundle_dir, model="resnet18")
    with pytest.raises(FersearchError, match="trained under protocol ferplus8, not seed10"):
        load_bundle(bundle_dir, protocol="seed10")
    with pytest.raises(FersearchError, match="predicts 8 classes, expected 10"):
        load_bundle(bundle_dir, classes=tuple("abcdefghij"))
    with pytest.raises(FersearchError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    torch.save({"evil": np.dtype("float64")}, bad / "model.pt")  # needs unpickling arbitrary objects
    with pytest.raises(FersearchError, match="is not a plain state dict"):
        load_bundle(bad)
    torch.save({"head.9.weight": torch.zeros(3, 3)}, bad / "model.pt")
    with pytest.raises(FersearchError, match="does not fit its config"):
        load_bundle(bad)


def test_evaluate_on_ferplus_layout_and_class_folders(bundle_dir, synthetic_dir, tmp_path, capsys):
    bundle = load_bundle(bundle_dir)
    plain = evaluate_bundle(bundle, synthetic_dir, "test", tta="none")
    tencrop = evaluate_bundle(bundle, synthetic_dir, "test", tta="tencrop")
    assert plain["n"] == tencrop["n"] > 0
    # Both against the model's own predictions: plain, and torchvision's ten_crop of the face
    # enlarged by 1/8 (softmax averaged over the ten views).
    import torch.nn.functional as F
    from torchvision.transforms.v2 import functional as TF

    from fersearch.data import load_dataset

    test = load_dataset(synthetic_dir, bundle.protocol).test
    x = bundle.normalize(torch.as_tensor(test.images))
    views = TF.ten_crop(F.interpolate(x, size=54, mode="bilinear", align_corners=False), [48, 48])
    with torch.no_grad():
        one = bundle.model(x).argmax(1).numpy()
        ten = torch.stack([bundle.model(v).softmax(1) for v in views]).mean(0).argmax(1).numpy()
    assert plain["accuracy"] == pytest.approx(float((one == test.labels).mean()))
    assert tencrop["accuracy"] == pytest.approx(float((ten == test.labels).mean()))
    seed10 = evaluate_bundle(bundle, synthetic_dir, "test", protocol="seed10")
    assert seed10["n"] == 80 and len(seed10["classes"]) == 10
    # CLASSNAME/*.png folders, FER2013 spellings, plus a class the bundle lacks.
    rng = np.random.default_rng(0)
    for name in ("happy", "Neutral", "confused"):
        (tmp_path / "folders" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "folders" / name / f"{i}.png")
    result = evaluate_bundle(bundle, tmp_path / "folders")
    assert result["n"] == 6 and result["classes"] == ["neutral", "happiness"]
    assert result["unmatched"]["confused"]["n"] == 3
    out = tmp_path / "eval"
    assert main(["evaluate", str(bundle_dir), "--data", str(tmp_path / "folders"), "--tta", "flip", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "folder 'confused' (3 images) has no class in the bundle" in printed and "tta=flip" in printed
    assert (out / "confusion_matrix.csv").read_text().startswith("true/predicted,neutral,happiness")


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_evaluate_scores_the_models_own_classifier_first_and_reproduces_the_exported_test_figure(
    bundle_dir, synthetic_dir, tmp_path, capsys, tta
):
    """Without --tta, evaluate's first pass (its printed first line, per-class table and the
    confusion matrix of --out) is the model with its config's TTA: the classifier export scored
    and predict uses. The bundle as exported gives export's own test figure; the same weights
    with the other TTA in their config give that TTA's figure, and the plain net comes second."""
    import yaml

    exported = json.loads((bundle_dir / "metrics.json").read_text())["by_protocol"]["ferplus8"]["test"]["accuracy"]
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    doc = yaml.safe_load((copy / "config.yaml").read_text())
    doc["model"]["tta"] = tta
    (copy / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "eval"
    assert main(["evaluate", str(copy), "--data", str(synthetic_dir), "--split", "test", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    passes = json.loads((out / "metrics.json").read_text())
    assert list(passes) == list(dict.fromkeys([tta, "none"]))
    bundle = load_bundle(copy)
    for name, metrics in passes.items():
        assert metrics["accuracy"] == pytest.approx(evaluate_bundle(bundle, synthetic_dir, "test", tta=name)["accuracy"])
    assert evaluate_bundle(bundle, synthetic_dir, "test")["tta"] == tta  # the Python default is the model's own too
    first = printed.splitlines()[1]
    assert first.strip().startswith(("plain" if tta == "none" else "tta=flip") + " (model):")
    assert f"accuracy {passes[tta]['accuracy']:.4f}" in first
    as_exported = evaluate_bundle(load_bundle(bundle_dir), synthetic_dir, "test")
    assert as_exported["accuracy"] == pytest.approx(exported, abs=1e-6)
    classes = passes[tta]["classes"]
    matrix = np.loadtxt(out / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, len(classes) + 1))
    assert np.array_equal(matrix, np.asarray(passes[tta]["confusion_matrix"]))


def test_evaluate_on_a_real_subset(bundle_dir, real_subset):
    result = evaluate_bundle(load_bundle(bundle_dir), real_subset, "test")
    assert 150 < result["n"] <= 200 and set(result["per_class"]) == {
        "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"}


def _astronaut_face():
    from skimage import data

    return data.astronaut()[20:230, 120:330]  # Eileen Collins' face, a real photo shipped with scikit-image


@pytest.mark.parametrize("colour", [False, True])
def test_one_image_gives_the_same_scores_through_evaluate_predict_and_torchscript(bundle_dir, tmp_path, colour):
    """Inference pre-processing is one function: a photo with no face (classified whole) scores
    the same through evaluate's reader, predict and the TorchScript file on those pixels."""
    from fersearch.bundle import face_pixels
    from fersearch.engine import predict_logits
    from fersearch.evaluate import load_image_48
    from fersearch.predict import Predictor

    rng = np.random.default_rng(4)
    shape = (90, 70, 3) if colour else (90, 70)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / "x.png")
    bundle = load_bundle(bundle_dir)
    pixels = load_image_48(tmp_path / "x.png")
    plain = predict_logits(bundle.model, torch.as_tensor(pixels[None]), bundle.normalize).softmax(1)[0]
    # predict reads a face with the model's own test-time augmentation (evaluate --tta gives it).
    via_evaluate = predict_logits(bundle.model, torch.as_tensor(pixels[None]), bundle.normalize, tta=bundle.cfg.tta).softmax(1)[0]
    result = Predictor(bundle).predict(tmp_path / "x.png")
    assert result["whole_image"]
    via_predict = torch.tensor([result["faces"][0]["probabilities"][c] for c in bundle.classes])
    scripted = torch.jit.load(str(bundle_dir / "model.torchscript.pt"))
    via_script = scripted(torch.as_tensor(pixels, dtype=torch.float32)[None, None]).softmax(1)[0]
    torch.testing.assert_close(via_predict, via_evaluate, atol=1e-4, rtol=0)  # predict rounds to 4 places
    torch.testing.assert_close(via_script, plain, atol=1e-5, rtol=1e-4)  # the TorchScript file is the plain network
    assert np.array_equal(face_pixels(pixels), pixels)  # 48x48 stays as it is


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_predict_reads_a_face_with_the_models_own_test_time_augmentation(bundle_dir, tmp_path, tta):
    """The label a user gets is the classifier the search ranked and scored: the model with its
    config's TTA (softmax averaged over the face and its mirror for flip), not the plain net."""
    import dataclasses

    from fersearch.engine import predict_logits
    from fersearch.evaluate import load_image_48
    from fersearch.predict import Predictor

    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (60, 50), dtype=np.uint8)).save(tmp_path / "x.png")  # not mirror-symmetric
    loaded = load_bundle(bundle_dir)
    bundle = dataclasses.replace(loaded, cfg=dataclasses.replace(loaded.cfg, tta=tta))
    pixels = torch.as_tensor(load_image_48(tmp_path / "x.png")[None])
    got = Predictor(bundle).predict(tmp_path / "x.png")["faces"][0]["probabilities"]
    got = torch.tensor([got[c] for c in bundle.classes])
    plain = predict_logits(bundle.model, pixels, bundle.normalize).softmax(1)[0]
    mirrored = predict_logits(bundle.model, pixels.flip(-1), bundle.normalize).softmax(1)[0]
    want = plain if tta == "none" else (plain + mirrored) / 2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # predict rounds to 4 places
    assert (plain - mirrored).abs().max() > 1e-3  # the two views differ, so the check tells them apart


def test_predict_on_real_and_synthetic_photos(bundle_dir, tmp_path, capsys):
    import cv2

    from fersearch.predict import Predictor

    predictor = Predictor(bundle_dir)
    from skimage import data

    cv2.imwrite(str(tmp_path / "astronaut.jpg"), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    real = predictor.predict(tmp_path / "astronaut.jpg")
    assert not real["whole_image"] and len(real["faces"]) >= 1
    assert sum(real["faces"][0]["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    # A made-up grayscale photo: two faces pasted on noise at different sizes.
    canvas = np.random.default_rng(1).integers(60, 200, (420, 640), dtype=np.uint8)
    face = cv2.cvtColor(_astronaut_face(), cv2.COLOR_RGB2GRAY)
    canvas[20:230, 20:230] = face
    canvas[200:340, 400:540] = cv2.resize(face, (140, 140))
    cv2.imwrite(str(tmp_path / "two.png"), canvas)
    assert len(predictor.predict(tmp_path / "two.png")["faces"]) == 2
    cv2.imwrite(str(tmp_path / "noise.png"), np.random.default_rng(2).integers(0, 255, (50, 80), dtype=np.uint8))
    assert predictor.predict(tmp_path / "noise.png")["whole_image"]
    # CLI: an unreadable file is reported and the other images are still processed.
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    code = main(["predict", str(bundle_dir), str(tmp_path / "broken.jpg"), str(tmp_path / "two.png"),
                 "--out", str(tmp_path / "annotated"), "--json"])
    captured = capsys.readouterr()
    assert code == 2 and "broken.jpg is not an image" in captured.err
    results = json.loads(captured.out)
    assert len(results) == 1 and len(results[0]["faces"]) == 2
    assert (tmp_path / "annotated" / "two.annotated.png").is_file()
    assert main(["predict", str(tmp_path / "no-bundle"), str(tmp_path / "two.png")]) == 2


def test_a_bundle_whose_torchscript_would_not_reproduce_its_model_is_not_written(tmp_path):
    """The traced file is checked against the model on images unlike the trace's example: a
    model whose computation depends on its input (tracing keeps one branch) is refused, and
    no bundle folder is left behind; tracing's deprecation notice is not shown."""
    import warnings

    from fersearch.bundle import write_bundle
    from fersearch.config import resolve_config
    from fersearch.errors import FersearchError

    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3)).repeat(1, 8) if float(x.std()) < 0.01 else -x.mean((2, 3)).repeat(1, 8)

    classes = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]
    with pytest.raises(FersearchError, match="does not reproduce it"):
        write_bundle(tmp_path / "b", resolve_config("cnn", {}), Branchy(), classes, 0.0, 1.0, {}, {})
    assert not (tmp_path / "b").exists()
    from fersearch.models import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        write_bundle(tmp_path / "ok", resolve_config("cnn", {}), build_model(resolve_config("cnn", {}), 8), classes, 100.0, 50.0, {}, {})
    assert (tmp_path / "ok" / "model.torchscript.pt").is_file()
