"""`fersearch evaluate`: score a bundle on FERPlus (either layout) or on `CLASSNAME/*.png` folders.

Class folders are matched to the bundle's classes by name (case-insensitive, with the common
FER2013 spellings such as `happy` and `angry`); folders the bundle has no class for are
reported with what the model predicted for them, never silently dropped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fersearch.bundle import Bundle, face_pixels
from fersearch.data import SPLITS, apply_protocol, detect_layout, load_raw
from fersearch.engine import evaluate, predict_logits
from fersearch.errors import FersearchError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ALIASES = {
    "happy": "happiness",
    "sad": "sadness",
    "angry": "anger",
    "surprised": "surprise",
    "disgusted": "disgust",
    "fearful": "fear",
    "scared": "fear",
    "contemptuous": "contempt",
    "nf": "NF",
}


def _canonical(name: str, classes: tuple[str, ...]) -> str | None:
    lowered = {c.lower(): c for c in classes}
    key = name.strip().lower()
    key = ALIASES.get(key, key).lower()
    return lowered.get(key)


def load_image_48(path: Path) -> np.ndarray:
    """Any image file -> 48x48 uint8 grayscale (resized if needed), or a clear error."""
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise FersearchError(f"image {path} cannot be read ({exc})") from None
    return face_pixels(gray)


class PhotoFaces:
    """`evaluate --detect`: each photo's best face (found, levelled and framed as `predict`
    does); a photo with no face found is scored on the whole image and counted."""

    def __init__(self, detector: str) -> None:
        from fersearch.faces import FaceFinder

        self.finder = FaceFinder(detector)
        self.no_face: list[str] = []

    def __call__(self, path: Path) -> np.ndarray:
        from fersearch.bundle import gray_of
        from fersearch.faces import face_crop
        from fersearch.predict import read_image

        bgr = read_image(path)
        gray = gray_of(bgr)
        found = self.finder.find(bgr)
        if not found:
            self.no_face.append(path.name)
            return face_pixels(gray)
        return face_crop(gray, self.finder.level(gray, found[0]))


def read_class_folders(root: Path) -> dict[str, list[Path]]:
    folders = {
        d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    folders = {name: files for name, files in folders.items() if files}
    if not folders:
        raise FersearchError(
            f"{root} is neither a FERPlus folder nor a folder of CLASSNAME/ subfolders with images"
        )
    return folders


@dataclass
class EvalSet:
    """Images and labels to score, read once and reused for every TTA pass."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    unmatched: dict[str, np.ndarray]  # class folders the bundle has no class for: their images
    no_face: tuple[str, ...] = ()  # --detect: photos where no face was found (scored whole)


def load_eval_set(
    bundle: Bundle,
    data: str | Path,
    split: str = "test",
    protocol: str | None = None,
    cache_dir: str | Path | None = None,
    detector: str | None = None,
) -> EvalSet:
    """A FERPlus split under a protocol, or `CLASSNAME/*` folders matched to the bundle (with
    `detector`: folders of photos, each photo's face found and cropped as `predict` does)."""
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise FersearchError(f"data folder {root} does not exist")
    if split not in SPLITS:
        raise FersearchError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    protocol = protocol or bundle.protocol
    try:
        detect_layout(root)
    except FersearchError:
        return _class_folder_set(bundle, root, PhotoFaces(detector) if detector else load_image_48)
    if detector:
        raise FersearchError(f"{root} is a FERPlus folder of 48x48 faces: --detect is for folders of photos (CLASSNAME/*)")
    ds = apply_protocol(load_raw(root, cache_dir), protocol)
    part = ds.split(split)
    return EvalSet(part.images, part.labels, ds.classes, f"{root} [{split}, {protocol}]", {})


def score(bundle: Bundle, data: EvalSet, tta: str | None = None) -> dict[str, Any]:
    """Metrics of the bundle's model on an EvalSet with test-time augmentation `tta` (None: the
    model's own, its config's `tta`: the classifier export scored and predict uses)."""
    tta = bundle.cfg.tta if tta is None else tta
    class_map = [bundle.classes.index(c) if c in bundle.classes else -1 for c in data.classes]
    metrics = evaluate(
        bundle.model,
        torch.as_tensor(data.images),
        data.labels,
        data.classes,
        bundle.normalize,
        tta=tta,
        class_map=None if list(data.classes) == list(bundle.classes) else class_map,
    )
    metrics["source"] = data.source
    metrics["tta"] = tta
    metrics["unmatched"] = {}
    for name, batch in data.unmatched.items():
        logits = predict_logits(bundle.model, torch.as_tensor(batch), bundle.normalize, tta=tta)
        predicted = Counter(bundle.classes[i] for i in logits.argmax(1).tolist())
        metrics["unmatched"][name] = {"n": len(batch), "predicted": dict(predicted.most_common())}
    return metrics


def evaluate_bundle(
    bundle: Bundle,
    data: str | Path,
    split: str = "test",
    protocol: str | None = None,
    tta: str | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of the bundle's model on a split (FERPlus) or on class folders (tta None: the
    model's own)."""
    return score(bundle, load_eval_set(bundle, data, split, protocol, cache_dir), tta)


def _class_folder_set(bundle: Bundle, root: Path, load=load_image_48) -> EvalSet:
    folders = read_class_folders(root)
    matched = {name: c for name in folders if (c := _canonical(name, bundle.classes)) is not None}
    classes = tuple(c for c in bundle.classes if c in matched.values())
    images, labels = [], []
    for name, canonical in matched.items():
        for file in folders[name]:
            images.append(load(file))
            labels.append(classes.index(canonical))
    if not images:
        raise FersearchError(
            f"no folder in {root} matches the bundle's classes ({', '.join(bundle.classes)}); "
            f"found {', '.join(folders)}"
        )
    unmatched = {
        name: np.stack([load(f) for f in files]) for name, files in folders.items() if name not in matched
    }
    what = f"class folders, faces found by {load.finder.name}" if isinstance(load, PhotoFaces) else "class folders"
    no_face = tuple(load.no_face) if isinstance(load, PhotoFaces) else ()
    return EvalSet(np.stack(images), np.asarray(labels), classes, f"{root} [{what}]", unmatched, no_face)


EVALUATION_FILES = ("metrics.json", "confusion_matrix.png", "confusion_matrix.csv")  # what `evaluate --out` writes


def write_evaluation(out: Path, runs: list[tuple[str, dict[str, Any]]]) -> None:
    """`evaluate --out`: every pass's metrics (keyed by their TTA) as JSON, and the first pass's
    (the model's own TTA) confusion matrix as CSV and PNG, each file written atomically into the checked folder."""
    import json

    import pandas as pd

    from fersearch.outputs import atomic_write, make_out_dir
    from fersearch.plots import plot_confusion

    make_out_dir(out)
    first = runs[0][1]
    classes = first["classes"]
    matrix = np.asarray(first["confusion_matrix"])
    table = pd.DataFrame(matrix, index=pd.Index(classes, name="true/predicted"), columns=classes)
    atomic_write(out / "confusion_matrix.csv", lambda p: table.to_csv(p))
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(dict(runs), indent=2)))
    atomic_write(out / "confusion_matrix.png", lambda p: plot_confusion(matrix, classes, p, first["source"]))
