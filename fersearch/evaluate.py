"""`fersearch evaluate`: score a bundle on FERPlus (either layout) or on `CLASSNAME/*.png` folders.

Class folders are matched to the bundle's classes by name (case-insensitive, with the common
FER2013 spellings such as `happy` and `angry`); folders the bundle has no class for are
reported with what the model predicted for them, never silently dropped.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fersearch.bundle import Bundle
from fersearch.data import IMAGE_SIZE, SPLITS, apply_protocol, detect_layout, load_raw
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
            gray = image.convert("L")
            if gray.size != (IMAGE_SIZE, IMAGE_SIZE):
                gray = gray.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(gray, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise FersearchError(f"image {path} cannot be read ({exc})") from None


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


def evaluate_bundle(
    bundle: Bundle,
    data: str | Path,
    split: str = "test",
    protocol: str | None = None,
    tta: str = "none",
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of the bundle's model on a split (FERPlus) or on class folders."""
    root = Path(data).expanduser().resolve()
    if not root.is_dir():
        raise FersearchError(f"data folder {root} does not exist")
    if split not in SPLITS:
        raise FersearchError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    protocol = protocol or bundle.protocol
    try:
        detect_layout(root)
        is_ferplus = True
    except FersearchError:
        is_ferplus = False
    if is_ferplus:
        ds = apply_protocol(load_raw(root, cache_dir), protocol)
        part = ds.split(split)
        images, labels, classes = part.images, part.labels, ds.classes
        unmatched: dict[str, Any] = {}
        source = f"{root} [{split}, {protocol}]"
    else:
        images, labels, classes, unmatched = _class_folder_data(bundle, root, tta)
        source = f"{root} [class folders]"
    class_map = [bundle.classes.index(c) if c in bundle.classes else -1 for c in classes]
    metrics = evaluate(
        bundle.model,
        torch.as_tensor(images),
        labels,
        classes,
        bundle.normalize,
        tta=tta,
        class_map=None if list(classes) == list(bundle.classes) else class_map,
    )
    metrics["source"] = source
    metrics["tta"] = tta
    metrics["unmatched"] = unmatched
    return metrics


def _class_folder_data(bundle: Bundle, root: Path, tta: str):
    folders = read_class_folders(root)
    matched: dict[str, str] = {}
    for name in folders:
        canonical = _canonical(name, bundle.classes)
        if canonical is not None:
            matched[name] = canonical
    classes = tuple(c for c in bundle.classes if c in matched.values())
    images, labels = [], []
    for name, canonical in matched.items():
        for file in folders[name]:
            images.append(load_image_48(file))
            labels.append(classes.index(canonical))
    unmatched: dict[str, Any] = {}
    for name in folders:
        if name in matched:
            continue
        batch = np.stack([load_image_48(f) for f in folders[name]])
        logits = predict_logits(bundle.model, torch.as_tensor(batch), bundle.normalize, tta=tta)
        predicted = Counter(bundle.classes[i] for i in logits.argmax(1).tolist())
        unmatched[name] = {"n": len(batch), "predicted": dict(predicted.most_common())}
    if not images:
        raise FersearchError(
            f"no folder in {root} matches the bundle's classes ({', '.join(bundle.classes)}); "
            f"found {', '.join(folders)}"
        )
    return np.stack(images), np.asarray(labels), classes, unmatched
