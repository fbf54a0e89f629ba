"""Faces in photos: the YuNet detector from its installed package (checked), eye levelling,
made-up photos of real FERPlus faces, and the commands that use them."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from fersearch.cli import main
from fersearch.errors import FersearchError
from fersearch.faces import FaceFinder, checked_yunet, face_crop, yunet_file
from tests.conftest import REAL_FERPLUS

BENCH = Path(__file__).resolve().parents[1] / "bench" / "face_pipeline.py"


def _bench():
    spec = importlib.util.spec_from_file_location("face_pipeline", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _astronaut_gray() -> np.ndarray:
    from skimage import data

    return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2GRAY)  # a real photo shipped with scikit-image


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faces") / "bundle"
    assert main(["train", "--data", str(synthetic_dir), "--out", str(out), "--epochs", "1", "--smoke", "--threads", "2"]) == 0
    return out


def test_exactly_one_opencv_package_provides_cv2():
    """opencv-python and opencv-python-headless both install cv2/ and break each other: the
    installed set (what `pip install -e .[dev]` resolved) holds the headless one only."""
    owners = sorted(
        dist.metadata["Name"] for dist in importlib.metadata.distributions()
        if any(str(f).startswith("cv2/") for f in (dist.files or []))
    )
    assert owners == ["opencv-python-headless"], owners


def test_the_yunet_file_comes_from_its_package_and_is_checked(tmp_path):
    genuine = yunet_file()
    assert genuine.name == "face_detection_yunet_2023mar.onnx" and genuine.stat().st_size == 232_589
    assert checked_yunet(genuine) == genuine
    changed = tmp_path / genuine.name
    shutil.copy(genuine, changed)
    data = bytearray(changed.read_bytes())
    data[1000] ^= 0xFF
    changed.write_bytes(bytes(data))
    with pytest.raises(FersearchError, match="is not the YuNet 2023mar file"):
        checked_yunet(changed)
    with pytest.raises(FersearchError, match=r"pip install 'no_such_package==2.0.0' \(or use --detector haar\)"):
        yunet_file("no_such_package")


def _fer_faces(count: int, start: int = 0) -> np.ndarray:
    from PIL import Image

    from fersearch.data import parse_label_csv

    rows = list(parse_label_csv(REAL_FERPLUS / "FER2013Test" / "label.csv"))[start : start + count]
    return np.stack([np.asarray(Image.open(REAL_FERPLUS / "FER2013Test" / name).convert("L")) for _, name, _ in rows])


needs_ferplus = pytest.mark.skipif(not (REAL_FERPLUS / "FER2013Test" / "label.csv").is_file(), reason="real FERPlus not available")


@needs_ferplus
@pytest.mark.parametrize("angle", [-18.0, 15.0])
def test_a_tilted_face_is_levelled_to_within_a_few_degrees(angle):
    """Real faces (FERPlus test, scaled up 4x) rotated by a known angle: the levelled eyes give
    the rotation back (against the same face upright) to within 3 degrees (median of 20), and
    the crop made from them is level: the detector finds its eyes level in it."""
    finder = FaceFinder("yunet")
    errors, crops_roll = [], []
    for face in _fer_faces(20):
        canvas = np.full((384, 384), 128, np.uint8)
        canvas[96:288, 96:288] = cv2.resize(face, (192, 192), interpolation=cv2.INTER_CUBIC)
        turn = cv2.getRotationMatrix2D((192, 192), angle, 1.0)
        tilted = cv2.warpAffine(canvas, turn, (384, 384), borderMode=cv2.BORDER_REPLICATE)
        upright, found = finder.find(canvas), finder.find(tilted)
        if not upright or not found:
            continue
        straight = finder.level(canvas, upright[0]).roll
        levelled = finder.level(tilted, found[0])
        errors.append(levelled.roll - (straight - angle))
        again = finder.find(cv2.resize(face_crop(tilted, levelled), (192, 192), interpolation=cv2.INTER_CUBIC))
        if again:
            crops_roll.append(again[0].roll - straight)
    assert len(errors) >= 18 and abs(float(np.median(errors))) < 3, errors
    assert len(crops_roll) >= 15 and abs(float(np.median(crops_roll))) < 4, crops_roll


def test_levelling_a_photo_comes_nearer_the_true_tilt_than_one_detection():
    """scikit-image's astronaut photo turned by 15 degrees: YuNet's first eyes lean towards
    upright; each levelling pass brings the estimate nearer the real tilt."""
    photo = _astronaut_gray()
    height, width = photo.shape
    tilted = cv2.warpAffine(photo, cv2.getRotationMatrix2D((width / 2, height / 2), -15.0, 1.0), (width, height),
                            borderMode=cv2.BORDER_REPLICATE)
    finder = FaceFinder("yunet")
    straight = finder.level(photo, finder.find(photo)[0]).roll
    first = finder.find(tilted)[0]
    errors = [abs(finder.level(tilted, first, passes).roll - (straight + 15.0)) for passes in (0, 1, 2)]
    assert errors[0] > errors[1] > errors[2], errors
    assert face_crop(tilted, finder.level(tilted, first)).shape == (48, 48)


def test_faces_seen_in_several_views_are_kept_once():
    """Each view of a photo (faces.VIEWS) is scanned and a face seen in several is kept once,
    its best-scoring box; an unknown view is refused in one line."""
    from fersearch.faces import VIEWS, Face, merged, overlap

    a, b, c = Face((10, 10, 100, 100), 0.6), Face((14, 12, 96, 100), 0.9), Face((300, 10, 90, 90), 0.4)
    assert overlap(a.box, a.box) == 1.0 and overlap(a.box, c.box) == 0.0 and overlap((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert merged([a, c, b]) == [b, c]
    photo = _astronaut_gray()
    finder = FaceFinder("yunet")
    plain = finder.find(photo, views=("plain",))
    every = finder.find(photo, views=tuple(VIEWS))
    assert len(plain) == len(every) >= 1
    assert all(max(overlap(f.box, g.box) for g in every) > 0.5 for f in plain)
    with pytest.raises(FersearchError, match="unknown view"):
        finder.find(photo, views=("plain", "sideways"))


@needs_ferplus
def test_made_up_photos_of_real_faces_are_found():
    """A small seeded set of the benchmark's photos (real FERPlus test faces scaled, rotated,
    pasted on busy backgrounds, some covered by a band): YuNet finds the uncovered faces and
    most covered ones, with few false detections, and more than the Haar cascade finds."""
    bench = _bench()
    faces = _fer_faces(60)
    photos = bench.make_photos(faces, seed=3)
    assert sum(len(p.truths) for p in photos) == 60 and all(p.image.shape == (480, 640) for p in photos)
    yunet = bench.run_detector(photos, FaceFinder("yunet"))
    haar = bench.run_detector(photos, FaceFinder("haar"))
    # The goal for uncovered faces (98%); covered ones: 10 of 15 on this small sample (the
    # benchmark's samples of 300 faces: 90.6% and 97.6%, README).
    assert yunet.found["clear"] >= 0.98 * yunet.total["clear"], (yunet.found, yunet.total)
    assert yunet.found["covered"] >= 0.6 * yunet.total["covered"], (yunet.found, yunet.total)
    assert yunet.false <= 2
    assert yunet.found["clear"] > haar.found["clear"] and yunet.found["covered"] > haar.found["covered"]
    assert all(crop.shape == (48, 48) for _, crop in yunet.crops)


def test_predict_and_evaluate_find_faces_with_the_chosen_detector(trained, tmp_path, capsys):
    """predict names its detector and the eyes it found; `--detector haar` is the explicit
    fallback; `evaluate --detect` scores class folders of photos by their faces, and says which
    photos had none (scored whole); --detect refuses a FERPlus folder of 48x48 faces."""
    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), _astronaut_gray())
    assert main(["predict", str(trained), str(photo), "--json"]) == 0
    (found,) = json.loads(capsys.readouterr().out)
    assert found["detector"] == "yunet" and len(found["faces"]) == 1 and len(found["faces"][0]["eyes"]) == 2
    assert main(["predict", str(trained), str(photo), "--json", "--detector", "haar"]) == 0
    (haar,) = json.loads(capsys.readouterr().out)
    assert haar["detector"] == "haar" and haar["faces"] and "eyes" not in haar["faces"][0]

    folders = tmp_path / "photos"
    for name in ("happiness", "neutral"):
        (folders / name).mkdir(parents=True)
        shutil.copy(photo, folders / name / "a.png")
    cv2.imwrite(str(folders / "neutral" / "blank.png"), np.full((120, 160), 128, np.uint8))
    assert main(["evaluate", str(trained), "--data", str(folders), "--detect"]) == 0
    printed = capsys.readouterr().out
    assert "faces found by yunet]: 3 images" in printed, printed
    assert "no face found in 1 photo(s), scored on the whole image: blank.png" in printed


def test_evaluate_detect_refuses_a_ferplus_folder(trained, synthetic_dir, capsys):
    assert main(["evaluate", str(trained), "--data", str(synthetic_dir), "--detect"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fersearch: error: ") and "--detect is for folders of photos" in err and len(err.splitlines()) == 1


def test_the_benchmarks_floor_moves_a_face_by_whole_pixels_and_zooms_about_its_centre(trained):
    """The floor under fidelity re-frames the direct 48x48 face itself: a 1-pixel shift moves
    every pixel unchanged (the left edge repeated), a 5% zoom keeps the centre where it was; the
    stability figures are shares of the faces given, and the accuracies use their labels."""
    from fersearch.bundle import load_bundle

    bench = _bench()
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (6, 48, 48), dtype=np.uint8)
    shifted = bench.nudged(faces, shift=1.0)
    assert np.array_equal(shifted[:, :, 1:], faces[:, :, :-1]) and np.array_equal(shifted[:, :, 0], faces[:, :, 0])
    assert np.array_equal(bench.nudged(faces), faces)
    dot = np.zeros((1, 48, 48), np.uint8)
    dot[0, 20:28, 20:28] = 255  # a block centred on the image's centre stays centred when zoomed
    zoomed = bench.nudged(dot, zoom=1.5)[0].astype(float)
    ys, xs = np.nonzero(zoomed > 127)
    assert abs(ys.mean() - 23.5) < 0.01 and abs(xs.mean() - 23.5) < 0.01 and len(ys) > 64
    bundle = load_bundle(trained)
    direct = bench.labels_of(bundle, faces)
    crops = [(i, faces[i]) for i in range(6)]  # crops equal to the faces: nothing relabelled
    figures = bench.stability(bundle, faces, crops, direct)
    assert figures["direct"] == figures["piped"] == 1.0 and bench.fidelity(bundle, faces, crops) == 1.0
    wrong = (direct + 1) % len(bundle.classes)
    assert bench.stability(bundle, faces, crops, wrong)["direct"] == 0.0
    assert all(0.0 <= figures[k] <= 1.0 for k in ("shift", "zoom"))


@pytest.mark.slow
@needs_ferplus
def test_through_the_pipeline_real_faces_in_photos_are_labelled_as_accurately_as_their_own_crops(tmp_path):
    """End to end on real faces: the seed CNN trained 8 epochs on FERPlus (about 72% test), then
    the benchmark's 300-face seeded photos. Through YuNet, levelling and framing, its labels of
    the clear faces found are as accurate against FERPlus's labels as its labels of the faces'
    own 48x48 crops, and agree with them on most faces. (The issue's 95% agreement is not asked
    here: a 1-pixel shift of the face alone relabels 2-7% of faces for such models; README,
    "The floor under fidelity".) A crop framed too loosely loses accuracy: the measure sees it."""
    from fersearch.bundle import load_bundle
    from fersearch.faces import FRAMING, Framing

    out = tmp_path / "seed8"
    augment = ["tta=flip", "resample=0.5", "shift=0.05", "rotation=10", "scale=0.1"]
    assert main(["train", "--data", str(REAL_FERPLUS), "--epochs", "8", "--threads", "2", "--out", str(out),
                 *[a for kv in augment for a in ("--set", kv)]]) == 0
    bench = _bench()
    faces, labels = bench.sampled_test_faces(REAL_FERPLUS, 300, 0)
    photos = bench.make_photos(faces, 0)
    finder = FaceFinder("yunet")
    found = bench.run_detector(photos, finder)
    bundle = load_bundle(out)
    figures = bench.stability(bundle, faces, found.crops, labels)
    assert len(found.crops) >= 200 and figures["direct"] >= 0.65, (len(found.crops), figures)
    # Measured: accuracy through YuNet -1.9, +0.5, -1.9 points from the direct one and fidelity
    # 77.6%, 83.6%, 86.4% for training seeds 0, 1, 2; a crop levelled the wrong way (the tilt
    # doubled) gives -7.0 points and 72.0% with seed 0.
    assert figures["piped"] >= figures["direct"] - 0.05, figures
    assert bench.fidelity(bundle, faces, found.crops) >= 0.75
    loose = bench.run_detector(photos, finder, Framing(4.0, FRAMING.down))
    assert bench.stability(bundle, faces, loose.crops, labels)["piped"] < figures["direct"] - 0.10
