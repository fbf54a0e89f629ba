"""FERPlus data: reading both source layouts, the decoded-image cache, protocols and targets.

Sources:
- Microsoft's folder layout: `FER2013Train|Valid|Test/label.csv` + 48x48 PNGs.
- Kaggle's `fer2013.csv` (emotion, pixels, Usage) beside `fer2013new.csv` (FERPlus votes).

Every image is decoded once into an uncompressed `.npz` in a cache folder (the data folder may be
read-only); later runs load it in well under a second, and it is rebuilt when a label file or
any image changes (size or mtime). Training reads only these in-memory arrays.

Protocols (see shared ANCHORS): `ferplus8` zeroes outlier votes (<= 1), keeps 8 emotions and
drops val/test images without a strict emotion majority; `seed10` keeps all 10 columns, labels
by argmax of the raw votes and keeps every image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fersearch.config import IMAGE_SIZE
from fersearch.errors import FersearchError
from fersearch.outputs import atomic_write, staged_dir

log = logging.getLogger(__name__)

CLASSES = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
)
EMOTIONS = CLASSES[:8]
SPLITS = ("train", "valid", "test")
SPLIT_DIRS = {"train": "FER2013Train", "valid": "FER2013Valid", "test": "FER2013Test"}
KAGGLE_USAGE = {"Training": "train", "PublicTest": "valid", "PrivateTest": "test"}
CACHE_VERSION = 2  # 2: the cache holds the content fingerprint beside the source's stat key
PROTOCOL_CLASSES = {"ferplus8": EMOTIONS, "seed10": CLASSES}


@dataclass
class RawData:
    """Every image of a source, decoded: uint8 (n, 48, 48), int16 votes (n, 10), split ids."""

    images: np.ndarray
    votes: np.ndarray
    split: np.ndarray
    names: np.ndarray
    source: str
    fingerprint: str

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self._in(split)
        return self.images[mask], self.votes[mask]

    def count(self, split: str) -> int:
        """How many images the split has (without copying them, as subset does)."""
        return int(self._in(split).sum())

    def _in(self, split: str) -> np.ndarray:
        return self.split == SPLITS.index(split)


@dataclass
class Split:
    """One split under a protocol: images, per-class vote weights and evaluation labels."""

    images: np.ndarray  # uint8 (n, 48, 48)
    votes: np.ndarray  # float32 (n, n_classes), protocol-processed vote counts
    labels: np.ndarray  # int64 (n,), the protocol's ground-truth class

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FerData:
    """A dataset ready for training: three splits under one protocol."""

    protocol: str
    classes: tuple[str, ...]
    train: Split
    valid: Split
    test: Split
    source: str
    fingerprint: str

    @property
    def mean(self) -> float:
        return float(self.train.images.mean() / 255.0)

    @property
    def std(self) -> float:
        return float(self.train.images.std() / 255.0)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise FersearchError(f"unknown split {name!r} (choose from {', '.join(SPLITS)})")
        return getattr(self, name)

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {len(self.split(s))}" for s in SPLITS)
        return f"{self.source} [{self.protocol}, {len(self.classes)} classes: {sizes}]"


# --------------------------------------------------------------------------- reading sources


def parse_label_csv(path: Path) -> Iterator[tuple[int, str, list[int]]]:
    """Yield (line number, image name, 10 vote counts) from a Microsoft `label.csv`."""
    rows = 0
    with open(path, newline="") as handle:
        for lineno, row in enumerate(csv.reader(handle), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if rows == 0 and _is_header(row):
                continue  # Microsoft's files have none, but a header row is a common addition
            if len(row) != 2 + len(CLASSES):
                raise FersearchError(
                    f"{path} line {lineno}: expected an image name, a box and "
                    f"{len(CLASSES)} vote counts, got {len(row)} fields"
                )
            rows += 1
            yield lineno, row[0].strip(), _parse_votes(row[2:], f"{path} line {lineno}")
    if rows == 0:
        raise FersearchError(f"{path} lists no images (it is empty or holds only a header row)")


def _is_header(row: list[str]) -> bool:
    """A first row whose vote cells are class names or words, not counts."""
    votes = [cell.strip() for cell in row[2:]]
    return bool(votes) and not any(cell.isdigit() for cell in votes)


def _parse_votes(cells: list[str], where: str) -> list[int]:
    votes = []
    for cell in cells:
        text = cell.strip()
        if not text.isdigit():
            raise FersearchError(f"{where}: vote count {text!r} is not a non-negative integer")
        votes.append(int(text))
    if sum(votes) == 0:
        raise FersearchError(f"{where}: all {len(CLASSES)} vote counts are zero")
    return votes


def decode_png(path: Path) -> np.ndarray:
    """A 48x48 grayscale image as uint8, or a clear error naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            size = image.size
            array = np.asarray(image.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise FersearchError(f"image {path} is listed in label.csv but missing") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FersearchError(f"image {path} cannot be decoded ({exc})") from None
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        raise FersearchError(
            f"image {path} is {size[0]}x{size[1]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    return array


def detect_layout(root: Path) -> str:
    """`folders` (Microsoft) or `kaggle` (fer2013.csv + fer2013new.csv), else a clear error."""
    if not root.is_dir():
        raise FersearchError(f"data folder {root} does not exist")
    if (root / "fer2013.csv").is_file() and (root / "fer2013new.csv").is_file():
        return "kaggle"
    missing = [f"{d}/label.csv" for d in SPLIT_DIRS.values() if not (root / d / "label.csv").is_file()]
    if missing:
        raise FersearchError(
            f"{root} is not a FERPlus folder: missing {', '.join(missing)} "
            "(expected Microsoft's layout, or fer2013.csv + fer2013new.csv)"
        )
    return "folders"


def _source_key(root: Path, layout: str) -> str:
    """Cheap change detector for the decoded-image cache: label bytes plus every image's name,
    size and mtime (a copied folder gets a new key, and is decoded again once)."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{layout}:{root.resolve()}".encode())
    if layout == "kaggle":
        for name in ("fer2013.csv", "fer2013new.csv"):
            stat = (root / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:20]
    for split_dir in SPLIT_DIRS.values():
        folder = root / split_dir
        digest.update((folder / "label.csv").read_bytes())
        entries = sorted(
            (e.name, e.stat().st_size, e.stat().st_mtime_ns)
            for e in os.scandir(folder)
            if e.name.lower().endswith(".png")
        )
        digest.update(repr(entries).encode())
    return digest.hexdigest()[:20]


def content_fingerprint(images: np.ndarray, votes: np.ndarray, split: np.ndarray, names: np.ndarray) -> str:
    """The data's identity: a hash of what training sees (pixels, votes, splits, names), not of
    where the files are or when they were copied, so a study's stored results (known points,
    warm start) match the same data in another folder or on another machine. About 0.2 s for
    FERPlus, computed once when the source is decoded."""
    digest = hashlib.sha256(b"fersearch-data-v1")
    for array in (images, votes, split):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update("\n".join(map(str, names)).encode())
    return digest.hexdigest()[:20]


def _read_folders(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    names, votes, splits, paths = [], [], [], []
    for split_id, split in enumerate(SPLITS):
        folder = root / SPLIT_DIRS[split]
        for _, name, row in parse_label_csv(folder / "label.csv"):
            names.append(f"{SPLIT_DIRS[split]}/{name}")
            votes.append(row)
            splits.append(split_id)
            paths.append(folder / name)
    if not paths:
        raise FersearchError(f"{root}: label.csv files list no images")
    log.info("decoding %d PNGs from %s (once; cached afterwards)", len(paths), root)
    # PNG inflate releases the GIL, so a couple of threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        images = np.stack(list(pool.map(decode_png, paths, chunksize=256)))
    return images, np.asarray(votes, np.int16), np.asarray(splits, np.int8), np.asarray(names)


def _read_kaggle(
    fer_path: Path, new_path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Join Kaggle's fer2013.csv with FERPlus's fer2013new.csv row by row."""
    with open(fer_path, newline="") as f1, open(new_path, newline="") as f2:
        fer_rows, new_rows = csv.reader(f1), csv.reader(f2)
        fer_header, new_header = next(fer_rows, []), next(new_rows, [])
        if "pixels" not in fer_header or "Usage" not in fer_header:
            raise FersearchError(f"{fer_path}: expected columns emotion,pixels,Usage")
        if len(new_header) != 2 + len(CLASSES):
            raise FersearchError(f"{new_path}: expected Usage, Image name and 10 vote columns")
        pixel_col, usage_col = fer_header.index("pixels"), fer_header.index("Usage")
        names, votes, splits, images = [], [], [], []
        # The two files describe the same images row by row, and both carry Usage: a row missing
        # from either would shift every later label onto the wrong face, so they must agree.
        for lineno, (fer_row, new_row) in enumerate(zip_longest(fer_rows, new_rows), start=2):
            if fer_row is None or new_row is None:
                longer, shorter = (new_path, fer_path) if fer_row is None else (fer_path, new_path)
                raise FersearchError(
                    f"{longer} has more rows than {shorter}: line {lineno} has no partner "
                    "(the two files must list the same images in the same order)"
                )
            if len(new_row) != 2 + len(CLASSES):
                raise FersearchError(f"{new_path} line {lineno}: expected 12 fields, got {len(new_row)}")
            usage, name = new_row[0].strip(), new_row[1].strip()
            fer_usage = fer_row[usage_col].strip() if len(fer_row) > usage_col else ""
            if usage != fer_usage:
                raise FersearchError(
                    f"line {lineno}: Usage {fer_usage!r} in {fer_path} but {usage!r} in {new_path} "
                    "(the two files must list the same images in the same order)"
                )
            if not name:
                continue  # one of the FER2013 images FERPlus dropped
            if usage not in KAGGLE_USAGE:
                raise FersearchError(f"{new_path} line {lineno}: unknown Usage {usage!r}")
            try:
                pixels = np.array(fer_row[pixel_col].split(), dtype=np.int64)
            except (ValueError, IndexError):
                raise FersearchError(f"{fer_path} line {lineno}: pixels are not integers") from None
            if pixels.size != IMAGE_SIZE * IMAGE_SIZE or pixels.min() < 0 or pixels.max() > 255:
                raise FersearchError(
                    f"{fer_path} line {lineno}: expected {IMAGE_SIZE * IMAGE_SIZE} pixel values "
                    f"in 0..255, got {pixels.size}"
                )
            votes.append(_parse_votes(new_row[2:], f"{new_path} line {lineno}"))
            images.append(pixels.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE))
            names.append(f"{SPLIT_DIRS[KAGGLE_USAGE[usage]]}/{name}")
            splits.append(SPLITS.index(KAGGLE_USAGE[usage]))
    if not images:
        raise FersearchError(f"{new_path}: no labelled images")
    return np.stack(images), np.asarray(votes, np.int16), np.asarray(splits, np.int8), np.asarray(names)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FERSEARCH_CACHE", Path.home() / ".cache" / "fersearch"))


def load_raw(root: str | Path, cache_dir: str | Path | None = None) -> RawData:
    """Decode a FERPlus source once and cache it; reuse the cache while the source is unchanged."""
    root = Path(root).expanduser().resolve()
    layout = detect_layout(root)
    source_key = _source_key(root, layout)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    cache_file = cache_dir / f"ferplus-{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                if "source_key" in z.files and str(z["source_key"]) == source_key:
                    log.info("using decoded-image cache %s", cache_file)
                    return RawData(
                        z["images"], z["votes"], z["split"], z["names"], str(root), str(z["fingerprint"])
                    )
            log.info("source changed since %s was written; rebuilding it", cache_file)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            # Empty (EOFError), cut short (BadZipFile) or garbage: rebuilt and replaced below.
            log.warning("ignoring unreadable cache %s (%s); rebuilding it", cache_file, exc)
    if layout == "kaggle":
        images, votes, split, names = _read_kaggle(root / "fer2013.csv", root / "fer2013new.csv")
    else:
        images, votes, split, names = _read_folders(root)
    raw = RawData(images, votes, split, names, str(root), content_fingerprint(images, votes, split, names))
    _write_cache(cache_file, raw, source_key)
    return raw


def check_same_data(raw: RawData, recorded: str | None, what: str, allow: bool, flag: str) -> None:
    """`raw` must be the data `what` (a search) was recorded with: a changed or other dataset is
    refused in one line naming both fingerprints, unless `flag` allows it (then a warning).
    Nothing recorded (a search from before fingerprints were saved): nothing to compare."""
    if not recorded or recorded == raw.fingerprint:
        return
    message = (
        f"{what} ran on data with fingerprint {recorded}, but {raw.source} now has fingerprint "
        f"{raw.fingerprint} (changed or other data)"
    )
    if not allow:
        raise FersearchError(f"{message}; pass {flag} to go on with it anyway")
    log.warning("%s; going on (%s)", message, flag)


def _write_cache(cache_file: Path, raw: RawData, source_key: str) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a truncated cache."""
    arrays = {"images": raw.images, "votes": raw.votes, "split": raw.split, "names": raw.names}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, lambda p: np.savez(
            p, fingerprint=np.array(raw.fingerprint), source_key=np.array(source_key), **arrays
        ))
    except OSError as exc:
        log.warning("could not write the image cache %s (%s); continuing without it", cache_file, exc)


# --------------------------------------------------------------------------- protocols


def apply_protocol(raw: RawData, protocol: str) -> FerData:
    """Select classes, images and labels of each split as the protocol defines them."""
    if protocol not in PROTOCOL_CLASSES:
        raise FersearchError(
            f"unknown protocol {protocol!r} (choose from {', '.join(PROTOCOL_CLASSES)})"
        )
    classes = PROTOCOL_CLASSES[protocol]
    splits = {}
    for name in SPLITS:
        images, raw_votes = raw.subset(name)
        votes = raw_votes.astype(np.float32)
        if protocol == "ferplus8":
            votes[votes <= 1] = 0.0  # single votes are outliers (FERPlus paper)
            top = votes.argmax(axis=1)
            keep = (top < len(EMOTIONS)) & (votes[:, : len(EMOTIONS)].sum(axis=1) > 0)
            if name != "train":
                keep &= votes.max(axis=1) > 0.5 * votes.sum(axis=1)
            votes = votes[:, : len(EMOTIONS)]
        else:
            keep = np.ones(len(votes), dtype=bool)
        labels = votes.argmax(axis=1).astype(np.int64)
        splits[name] = Split(np.ascontiguousarray(images[keep]), votes[keep], labels[keep])
        if len(splits[name]) == 0:
            raise FersearchError(f"{raw.source}: split {name} has no images under {protocol}")
    return FerData(protocol, classes, **splits, source=raw.source, fingerprint=raw.fingerprint)


def load_dataset(root: str | Path, protocol: str, cache_dir: str | Path | None = None) -> FerData:
    return apply_protocol(load_raw(root, cache_dir), protocol)


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of a fixed subset of about `size` images whose class shares follow `labels`
    (each present class keeps at least one image), sorted; every index when `size` covers all.
    A search judges its trials between epochs on it: the same images for every trial."""
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = max(1, round(size * len(members) / len(labels)))
        chosen.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(chosen))


def training_targets(votes: np.ndarray, label_mode: str) -> np.ndarray:
    """Per-image target distribution (rows sum to 1) for a label mode (FERPlus paper's modes).

    majority: one-hot of the top vote. probability and pld: the normalised vote distribution
    (pld draws a one-hot from it per minibatch, in the engine). crossentropy: the top votes
    that cover 75% of the total, at most three, renormalised. multi_target: every class with at
    least 30% of the votes, equally weighted (the loss rewards the most probable of them).
    """
    total = votes.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    if label_mode == "majority":
        out = np.zeros_like(votes)
        out[np.arange(len(votes)), votes.argmax(axis=1)] = 1.0
        return out
    if label_mode in ("probability", "pld"):
        return votes / total
    if label_mode == "crossentropy":
        order = np.argsort(-votes, axis=1, kind="stable")
        ranked = np.take_along_axis(votes, order, axis=1)
        covered = np.cumsum(ranked, axis=1) - ranked  # votes covered before each rank
        keep_ranked = (covered < 0.75 * total) & (np.arange(votes.shape[1]) < 3) & (ranked > 0)
        keep = np.zeros_like(keep_ranked)
        np.put_along_axis(keep, order, keep_ranked, axis=1)
        trimmed = votes * keep
        return trimmed / trimmed.sum(axis=1, keepdims=True)
    if label_mode == "multi_target":
        accepted = (votes >= 0.3 * total).astype(np.float32)
        accepted[accepted.sum(axis=1) == 0, :] = 0.0
        accepted[np.arange(len(votes)), votes.argmax(axis=1)] = 1.0
        return accepted / accepted.sum(axis=1, keepdims=True)
    raise FersearchError(f"unknown label_mode {label_mode!r}")


# --------------------------------------------------------------------------- writing the layout


def write_layout(
    out: Path,
    images: np.ndarray,
    votes: np.ndarray,
    split: np.ndarray,
    names: np.ndarray | None = None,
) -> None:
    """Write arrays as Microsoft's layout, building in a temp folder renamed into place."""
    with staged_dir(out) as staging:
        for split_id, split_name in enumerate(SPLITS):
            folder = staging / SPLIT_DIRS[split_name]
            folder.mkdir()
            rows = io.StringIO()
            writer = csv.writer(rows, lineterminator="\n")
            for i in np.flatnonzero(split == split_id):
                name = Path(str(names[i])).name if names is not None else f"fer{i:07d}.png"
                Image.fromarray(images[i]).save(folder / name)
                writer.writerow([name, f"(0, 0, {IMAGE_SIZE}, {IMAGE_SIZE})", *map(int, votes[i])])
            (folder / "label.csv").write_text(rows.getvalue())


def prepare_from_kaggle(fer2013: Path, ferplus: Path, out: Path) -> RawData:
    """`fersearch prepare`: Kaggle's fer2013.csv + fer2013new.csv -> Microsoft's folder layout."""
    for path in (fer2013, ferplus):
        if not Path(path).is_file():
            raise FersearchError(f"{path} does not exist")
    images, votes, split, names = _read_kaggle(Path(fer2013), Path(ferplus))
    write_layout(Path(out), images, votes, split, names)
    return RawData(images, votes, split, names, str(out), content_fingerprint(images, votes, split, names))
