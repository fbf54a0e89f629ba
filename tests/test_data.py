import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fersearch import data as D
from fersearch.errors import FersearchError
from tests.conftest import REAL_FERPLUS


def test_reads_layout_and_applies_protocols(synthetic_dir):
    raw = D.load_raw(synthetic_dir)
    assert raw.images.shape == (400, 48, 48) and raw.images.dtype == np.uint8
    assert raw.votes.shape == (400, 10)
    seed10 = D.apply_protocol(raw, "seed10")
    assert len(seed10.classes) == 10 and len(seed10.test) == 80  # every image kept
    assert np.array_equal(seed10.test.labels, raw.subset("test")[1].argmax(1))
    fp8 = D.apply_protocol(raw, "ferplus8")
    assert len(fp8.classes) == 8 and fp8.test.votes.shape[1] == 8
    assert len(fp8.test) < 80  # ambiguous and non-face images dropped from test
    kept_votes = fp8.test.votes
    assert np.all(kept_votes.max(1) > 0.5 * kept_votes.sum(1))  # strict majority remains
    assert np.all((kept_votes == 0) | (kept_votes > 1))  # single votes zeroed


def test_cache_is_reused_and_invalidated(synthetic_copy, tmp_path):
    cache = tmp_path / "cache"
    first = D.load_raw(synthetic_copy, cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = D.load_raw(synthetic_copy, cache)
    assert files[0].stat().st_mtime_ns == stamp and np.array_equal(first.images, again.images)
    # Change one image: the fingerprint changes and the cache is rebuilt with the new pixels.
    png = synthetic_copy / "FER2013Valid" / sorted(os.listdir(synthetic_copy / "FER2013Valid"))[0]
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(png)
    changed = D.load_raw(synthetic_copy, cache)
    assert changed.fingerprint != first.fingerprint
    index = list(changed.names).index(f"FER2013Valid/{png.name}")
    assert changed.images[index].max() == 0


def test_the_data_fingerprint_is_its_content_not_its_folder_or_file_times(synthetic_copy, tmp_path):
    """The same images copied to another folder (new mtimes) are the same data: stored known
    points and warm starts match them. A changed vote is other data."""
    first = D.load_raw(synthetic_copy, tmp_path / "cache")
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_copy, copy)  # copytree keeps mtimes: touch every file as a plain copy would not
    for png in copy.rglob("*.png"):
        os.utime(png, ns=(png.stat().st_mtime_ns + 10**9,) * 2)
    moved = D.load_raw(copy, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # decoded once for each folder
    assert moved.fingerprint == first.fingerprint and moved.source != first.source
    assert D.load_raw(copy, tmp_path / "cache").fingerprint == first.fingerprint  # from its cache
    _rewrite_first_row(copy / "FER2013Train" / "label.csv", lambda r: r[:2] + [str(int(r[2]) + 1)] + r[3:])
    assert D.load_raw(copy, tmp_path / "cache").fingerprint != first.fingerprint


def _rewrite_first_row(label_csv, mutate):
    rows = list(csv.reader(open(label_csv)))
    rows[0] = mutate(rows[0])
    with open(label_csv, "w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize(
    "corrupt, fragment",
    [
        (lambda d: (d / "FER2013Test" / "label.csv").unlink(), "missing FER2013Test/label.csv"),
        (lambda d: next((d / "FER2013Train").glob("*.png")).unlink(), "is listed in label.csv but missing"),
        (lambda d: next((d / "FER2013Train").glob("*.png")).write_bytes(b"not a png"), "cannot be decoded"),
        (lambda d: Image.new("L", (64, 64)).save(next((d / "FER2013Valid").glob("*.png"))), "is 64x64, expected 48x48"),
        (lambda d: _rewrite_first_row(d / "FER2013Train" / "label.csv", lambda r: r[:-1]), "line 1: expected an image name"),
        (lambda d: _rewrite_first_row(d / "FER2013Train" / "label.csv", lambda r: r[:2] + ["x"] + r[3:]), "vote count 'x'"),
        (lambda d: _rewrite_first_row(d / "FER2013Train" / "label.csv", lambda r: r[:2] + ["0"] * 10), "all 10 vote counts are zero"),
    ],
)
def test_bad_data_gets_a_clear_error(synthetic_copy, tmp_path, corrupt, fragment):
    corrupt(synthetic_copy)
    with pytest.raises(FersearchError, match=fragment):
        D.load_raw(synthetic_copy, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npz"))  # nothing cached from a failed read


def _write_kaggle(raw, folder):
    """fer2013.csv + fer2013new.csv as Kaggle and Microsoft publish them (with one dropped row)."""
    usage = {0: "Training", 1: "PublicTest", 2: "PrivateTest"}
    folder.mkdir()
    with open(folder / "fer2013.csv", "w", newline="") as f1, open(folder / "fer2013new.csv", "w", newline="") as f2:
        w1, w2 = csv.writer(f1), csv.writer(f2)
        w1.writerow(["emotion", "pixels", "Usage"])
        w2.writerow(["Usage", "Image name", *D.CLASSES])
        w1.writerow([0, " ".join(["7"] * 2304), "Training"])  # a row FERPlus dropped
        w2.writerow(["Training", "", *([0] * 10)])
        for img, votes, split, name in zip(raw.images, raw.votes, raw.split, raw.names, strict=False):
            w1.writerow([0, " ".join(map(str, img.ravel())), usage[int(split)]])
            w2.writerow([usage[int(split)], name.split("/")[1], *votes])


def test_kaggle_csv_is_read_and_prepared(synthetic_dir, tmp_path):
    raw = D.load_raw(synthetic_dir)
    _write_kaggle(raw, tmp_path / "kaggle")
    direct = D.load_raw(tmp_path / "kaggle", tmp_path / "cache")
    assert np.array_equal(direct.images, raw.images) and np.array_equal(direct.votes, raw.votes)
    D.prepare_from_kaggle(tmp_path / "kaggle" / "fer2013.csv", tmp_path / "kaggle" / "fer2013new.csv", tmp_path / "out")
    prepared = D.load_raw(tmp_path / "out", tmp_path / "cache")
    assert np.array_equal(prepared.images, raw.images) and list(prepared.names) == list(raw.names)
    with pytest.raises(FersearchError, match="not empty"):
        D.prepare_from_kaggle(tmp_path / "kaggle" / "fer2013.csv", tmp_path / "kaggle" / "fer2013new.csv", tmp_path / "out")


@pytest.mark.parametrize("mode", ["majority", "probability", "crossentropy", "multi_target", "pld"])
def test_training_targets_are_distributions(mode):
    votes = np.array([[4, 0, 0, 1, 3, 2, 0, 0], [6, 0, 1, 1, 0, 0, 0, 2], [0, 10, 0, 0, 0, 0, 0, 0]], np.float32)
    t = D.training_targets(votes, mode)
    assert np.allclose(t.sum(1), 1) and np.all(t >= 0)
    assert np.all(t.argmax(1) == votes.argmax(1))
    if mode == "majority":
        assert set(np.unique(t)) == {0.0, 1.0}
    if mode == "crossentropy":  # 4+3 of 10 reach 75%? no: 4,3,2 needed; capped at three classes
        assert np.allclose(t[0], np.array([4, 0, 0, 0, 3, 2, 0, 0]) / 9)


# A small fixture for the ferplus8 rules (FERPlus paper): one row per rule, the same rows in each
# split. Columns: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF.
FERPLUS8_ROWS = [
    # votes                         kept in train, kept in valid/test, label, votes after the rules
    ([6, 3, 1, 0, 0, 0, 0, 0, 0, 0], True, True, 0, [6, 3, 0, 0, 0, 0, 0, 0]),  # a single vote is an outlier: zeroed
    ([4, 3, 3, 0, 0, 0, 0, 0, 0, 0], True, False, 0, [4, 3, 3, 0, 0, 0, 0, 0]),  # no majority: training only
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], False, False, None, None),  # nothing left after zeroing single votes
    ([2, 0, 0, 0, 0, 0, 0, 0, 8, 0], False, False, None, None),  # "unknown" wins: not a face expression
    ([3, 0, 0, 0, 0, 0, 0, 0, 0, 7], False, False, None, None),  # "not a face" wins
    ([0, 0, 0, 0, 0, 0, 0, 7, 0, 3], True, True, 7, [0, 0, 0, 0, 0, 0, 0, 7]),  # contempt; NF votes dropped
    ([0, 2, 0, 0, 0, 0, 0, 0, 0, 0], True, True, 1, [0, 2, 0, 0, 0, 0, 0, 0]),  # two votes, all agree
]


def test_ferplus8_rules_on_a_fixture():
    """apply_protocol itself (not a copy of its rules) on rows that each exercise one rule."""
    rows = np.array([r[0] for r in FERPLUS8_ROWS] * 3, np.int16)
    split = np.repeat(np.arange(3, dtype=np.int8), len(FERPLUS8_ROWS))
    raw = D.RawData(np.zeros((len(rows), 48, 48), np.uint8), rows, split, np.array([f"{i}.png" for i in range(len(rows))]), "fixture", "")
    data = D.apply_protocol(raw, "ferplus8")
    for name, column in (("train", 1), ("valid", 2), ("test", 2)):
        part = getattr(data, name)
        kept = [r for r in FERPLUS8_ROWS if r[column]]
        assert list(part.labels) == [r[3] for r in kept], name
        assert np.array_equal(part.votes, np.array([r[4] for r in kept], np.float32)), name
    seed10 = D.apply_protocol(raw, "seed10")  # the seed's protocol keeps every image, all ten classes
    assert len(seed10.test) == len(FERPLUS8_ROWS) and list(seed10.test.labels) == [int(np.argmax(r[0])) for r in FERPLUS8_ROWS]


def test_real_ferplus_protocol_sizes():
    if not (REAL_FERPLUS / "FER2013Test" / "label.csv").is_file():
        pytest.skip("real FERPlus not available")
    # The test split's votes through apply_protocol (images are not needed to count them).
    votes = np.array([v for _, _, v in D.parse_label_csv(REAL_FERPLUS / "FER2013Test" / "label.csv")], np.int16)
    split = np.concatenate([np.zeros(1, np.int8), np.ones(1, np.int8), np.full(len(votes), 2, np.int8)])
    votes = np.concatenate([[[0, 2] + [0] * 8], [[0, 2] + [0] * 8], votes]).astype(np.int16)  # one train, one valid row
    raw = D.RawData(np.zeros((len(votes), 48, 48), np.uint8), votes, split, np.arange(len(votes)).astype(str), "real", "")
    test = D.apply_protocol(raw, "ferplus8").test
    assert len(test) == 3137  # the FERPlus paper's ferplus8 test set
    assert np.array_equal(np.bincount(test.labels), [1083, 892, 394, 382, 269, 16, 86, 15])


def test_real_subset_loads(real_subset):
    data = D.load_dataset(real_subset, "seed10")
    assert (len(data.train), len(data.valid), len(data.test)) == (600, 200, 200)


def test_a_synthetic_folder_of_other_sizes_is_written_again(tmp_path):
    """`--data synthetic` keeps a folder at the current sizes and replaces one an older version
    wrote with other sizes (renamed into place: no half-written folder, no leftovers)."""
    from fersearch.synthetic import ensure_synthetic, synthetic_is_current

    out, small, larger = tmp_path / "syn", {"train": 12, "valid": 4, "test": 4}, {"train": 20, "valid": 4, "test": 4}
    ensure_synthetic(out, small)
    label = out / "FER2013Train" / "label.csv"
    before = label.stat().st_mtime_ns
    assert synthetic_is_current(out, small) and not synthetic_is_current(out, larger)
    ensure_synthetic(out, small)
    assert label.stat().st_mtime_ns == before  # current: untouched
    ensure_synthetic(out, larger)
    assert synthetic_is_current(out, larger) and sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def test_a_synthetic_folder_an_earlier_generator_wrote_is_written_again(tmp_path):
    """The same sizes, other faces: a folder without the current generator's marker (one an
    earlier version wrote, or one whose marker names another generator) is replaced by this
    generator's faces."""
    import json

    from fersearch import synthetic as S
    from fersearch.data import write_layout

    out, sizes = tmp_path / "syn", {"train": 12, "valid": 4, "test": 4}
    images, votes, split = S.generate(sizes)
    write_layout(out, 255 - images, votes, split)  # the right sizes, but not these faces, no marker
    assert not S.synthetic_is_current(out, sizes)
    S.ensure_synthetic(out, sizes)
    assert S.synthetic_is_current(out, sizes) and D.load_raw(out).images.tolist() == images.tolist()
    marker = out / S.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "generator": S.GENERATOR - 1}))
    assert not S.synthetic_is_current(out, sizes)
    S.ensure_synthetic(out, sizes)
    assert S.synthetic_is_current(out, sizes) and sorted(p.name for p in tmp_path.iterdir()) == ["syn"]
