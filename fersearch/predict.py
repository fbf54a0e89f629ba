"""Classify faces in photos: a face detector finds them (faces.py: YuNet by default, Haar on
request), the bundle's model reads them.

    from fersearch.predict import Predictor
    result = Predictor("exports/cnn").predict("photo.jpg")
    labels = [(face["box"], face["label"], face["probabilities"]) for face in result["faces"]]

Colour or grayscale, PNG or JPEG, up to MAX_PIXELS (larger files are refused from their
header, before a byte of pixels is decoded). Faces are searched on a scaled-down copy (the
detector's range; a 10000x10000 scan took the cascade 103 s and 6.4 GB at full size), and each
face is cropped from the full-resolution grayscale image, levelled and framed from its eyes
as FER2013's faces are (faces.face_crop), resized to 48x48 and normalised as in training. The
model reads each face with the test-time augmentation of its config (`tta`: flip in the default
search space), the classifier whose validation accuracy the search ranked and whose test
accuracy it scored; the TorchScript file of an export is the plain network. When no face is
found the whole image is classified and the result says so (`whole_image: true`).
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fersearch.bundle import Bundle, gray_of, load_bundle
from fersearch.engine import predict_logits
from fersearch.errors import FersearchError, one_line
from fersearch.faces import DEFAULT_DETECTOR, PHOTO_VIEWS, Face, FaceFinder, cv2_module, face_crop

MAX_PIXELS = 50_000_000  # a 50-megapixel photo decodes to 150 MB of BGR; anything larger is refused


def shown(path: str | Path) -> str:
    """A path as printed: as it is, or quoted with escapes when it holds a newline or another
    control character (one result, one line)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def read_image(path: str | Path) -> np.ndarray:
    """A photo file as a BGR uint8 image (`decode_image`), or a clear error. Only regular files
    are opened: a FIFO would block, a device or socket is no image."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise FersearchError(f"image {shown(path)} does not exist") from None
        if exc.errno == errno.ELOOP:
            raise FersearchError(f"image {shown(path)} is a loop of symbolic links, not an image file") from None
        raise FersearchError(f"image {shown(path)} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise FersearchError(f"image {shown(path)} is a folder, not an image file")
    if not stat.S_ISREG(mode):
        raise FersearchError(f"image {shown(path)} is not a regular file (a FIFO, device or socket), not an image file")
    return decode_image(path, f"image {shown(path)}")


def decode_image(path: Path, label: str) -> np.ndarray:
    """The one image rule of predict, `evaluate --detect` and the app: a BGR uint8 image turned
    upright as its EXIF orientation says (a phone's portrait photo), or one line naming `label`.
    Refused: not an image, damaged or truncated, more than MAX_PIXELS pixels (from the header,
    before decoding), animated, CMYK, more than 8 bits per channel."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    check_pixels(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if getattr(image, "n_frames", 1) > 1:
                    raise FersearchError(f"{label} is animated ({image.n_frames} frames): use a single frame as PNG or JPEG")
                if image.mode == "CMYK":
                    raise FersearchError(f"{label} is a CMYK image: save it as RGB (sRGB) first")
                if image.mode in ("I", "I;16", "I;16B", "I;16L", "F") or "16" in image.mode:
                    raise FersearchError(f"{label} has {image.mode} pixels (more than 8 bits): save it as an 8-bit PNG or JPEG")
                image.load()
                rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except FersearchError:
        raise
    except UnidentifiedImageError:
        raise FersearchError(f"{label} is not an image (PNG, JPEG, BMP, WebP, ...)") from None
    except Image.DecompressionBombError:
        raise FersearchError(f"{label} is too large to decode (limit {MAX_PIXELS / 1e6:.0f} megapixels)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise FersearchError(f"{label} is damaged or truncated ({one_line(exc)})") from None
    return np.ascontiguousarray(rgb[..., ::-1])


def check_pixels(path: Path) -> None:
    """Refuse an image above MAX_PIXELS from its header alone (PIL reads no pixels to size it)."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                width, height = probe.size
    except Image.DecompressionBombError as exc:
        raise FersearchError(f"image {path} is too large to read ({exc})") from None
    except Exception:  # noqa: BLE001 - a format PIL lacks; OpenCV decides below
        return
    if width * height > MAX_PIXELS:
        raise FersearchError(
            f"image {path} is {width}x{height} ({width * height / 1e6:.0f} megapixels); "
            f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels: scale it down first"
        )


@torch.no_grad()
def classify(bundle: Bundle, crops: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """Softmax probabilities for 48x48 uint8 grayscale crops, with the model's own test-time
    augmentation (softmax averaged over its views): how `predict` reads a face."""
    batch = torch.as_tensor(np.stack(crops))
    model = bundle.model
    device = next(model.parameters()).device
    logits = predict_logits(model, batch.to(device), bundle.normalize, tta=bundle.cfg.tta)
    return logits.softmax(1).cpu().numpy()


class Predictor:
    def __init__(self, bundle: str | Path | Bundle, device: str = "cpu", min_face: int = 24, detector: str = DEFAULT_DETECTOR,
                 finder: FaceFinder | None = None) -> None:
        """`finder`: a face finder to share (the app's models share one: it holds a lock), else
        a new one for `detector` and `min_face`."""
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, device=device)
        self.finder = finder if finder is not None else FaceFinder(detector, min_face)

    def detect(self, image: np.ndarray, max_side: int | None = None, views: tuple[str, ...] = PHOTO_VIEWS) -> list[Face]:
        """The faces in a BGR or grayscale image (see faces.FaceFinder), best first."""
        height, width = image.shape[:2]
        if height * width > MAX_PIXELS:
            raise FersearchError(f"image is {width}x{height}; the limit is {MAX_PIXELS / 1e6:.0f} megapixels")
        return self.finder.find(image, max_side, views)

    def classify(self, crops: list[np.ndarray]) -> np.ndarray:
        """Softmax probabilities for 48x48 uint8 grayscale crops (see `classify`)."""
        return classify(self.bundle, crops)

    def predict(
        self,
        image: str | Path | np.ndarray,
        detect_side: int | None = None,
        whole_image: bool = True,
        adjust: Callable[[list, np.ndarray], np.ndarray] | None = None,
        views: tuple[str, ...] = PHOTO_VIEWS,
    ) -> dict[str, Any]:
        """The faces in a photo (a path or a BGR array) with their probabilities. No face found:
        the whole image is classified as one face (`whole_image`), or none is (a live frame).
        `adjust(boxes, probabilities)` may change the probabilities (the app smooths them
        over frames). `views`: the detector's views of the image (faces.VIEWS)."""
        bgr = read_image(image) if not isinstance(image, np.ndarray) else image
        gray = gray_of(bgr)
        found = [self.finder.level(gray, face) for face in self.detect(bgr, detect_side, views)]
        whole = not found and whole_image
        size = [int(gray.shape[1]), int(gray.shape[0])]
        if whole:
            found = [Face((0, 0, gray.shape[1], gray.shape[0]), 0.0)]
        if not found:
            return {"faces": [], "whole_image": False, "size": size, "detector": self.finder.name}
        boxes = [face.box for face in found]
        probs = self.classify([face_crop(gray, face) for face in found])
        if adjust is not None:
            probs = adjust(boxes, probs)
        faces = []
        for face, p in zip(found, probs, strict=True):
            entry = {
                "box": list(face.box),
                "label": self.bundle.classes[int(p.argmax())],
                "probabilities": {c: round(float(v), 4) for c, v in zip(self.bundle.classes, p, strict=True)},
            }
            if face.eyes is not None:
                entry["eyes"] = [[round(v, 1) for v in eye] for eye in face.eyes]
            faces.append(entry)
        return {"faces": faces, "whole_image": whole, "size": size, "detector": self.finder.name}

    def annotate(self, image: np.ndarray, result: dict[str, Any], landmarks: bool = False) -> np.ndarray:
        """A copy of the image with each face's box and top emotion drawn on it (and its eyes,
        with `landmarks`, where the detector found them)."""
        cv2 = cv2_module()
        out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
        thickness = max(1, round(max(out.shape[:2]) / 300))
        for face in result["faces"]:
            x, y, w, h = face["box"]
            label = f"{face['label']} {face['probabilities'][face['label']]:.2f}"
            cv2.rectangle(out, (x, y), (x + w, y + h), (0, 200, 0), thickness)
            scale = max(0.4, w / 250)
            (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
            top = max(y - th - 6, 0)
            cv2.rectangle(out, (x, top), (x + tw + 4, top + th + 6), (0, 200, 0), -1)
            cv2.putText(out, label, (x + 2, top + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness)
            if landmarks and "eyes" in face:
                for ex, ey in face["eyes"]:
                    cv2.circle(out, (round(ex), round(ey)), max(2, round(w / 40)), (0, 220, 255), -1)
        return out


def annotated_path(out: Path, stem: str, written: set[str]) -> Path:
    """`STEM.annotated.png`, or `STEM-2.annotated.png`... when an earlier photo of this run
    (a/x.png then b/x.png) already took the name: no annotation overwrites another."""
    stem = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in stem)  # no newline in a file name
    name, n = f"{stem}.annotated.png", 1
    while name in written:
        n += 1
        name = f"{stem}-{n}.annotated.png"
    written.add(name)
    return out / name


def write_png(path: Path, image: np.ndarray) -> None:
    """An annotated image as PNG (by its file name), or one line."""
    if not cv2_module().imwrite(str(path), image):
        raise FersearchError(f"could not write {path}")
