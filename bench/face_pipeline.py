"""Faces in made-up photos: does the photo-to-label pipeline find FERPlus's faces and label them
as the model labels the 48x48 faces themselves?

    python bench/face_pipeline.py BUNDLE [BUNDLE...] --data ../shared/data/ferplus [--faces 300] [--seed 0]

The photos are made from FERPlus test faces (ferplus8), seeded: each face scaled up 2-6x,
rotated up to +-20 degrees, pasted on a 640x480 background with other content (gradients,
shapes, lines, noise), one to three per photo; a quarter of them with a band over the mouth or
the eyes. For each detector it reports: faces found (recall, unoccluded and covered apart),
false detections, and pipeline fidelity: how often the label of a found, unoccluded face
(detected, cropped, levelled and framed as `fersearch predict` does) equals the model's label
of the same face fed directly as its 48x48 crop (both with the model's own test-time
augmentation, as `predict` reads a face). It also tries a few crop framings around
FER2013's (YuNet's eyes on the test faces), and times the live handler's work per 640x480 frame
(detection, alignment, classification, drawing). A ceiling line gives the fidelity of the
faces cut out exactly where they were pasted: what the scaling and turning alone cost; a
sweep of YuNet's confidence threshold and of the views it scans (faces.VIEWS) gives recall
against false detections and time. Beside fidelity, a floor and the accuracy: how often the
direct label itself survives a 1-pixel shift or a 5% zoom of the face (a detector's crop differs
from FER2013's own by at least that), and the accuracy of the direct and the pipeline's labels
against FERPlus's labels of the same faces (whether relabelling costs accuracy).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTH, HEIGHT = 640, 480
OCCLUSIONS = ("mouth", "eyes")
BANDS = {"mouth": (0.66, 0.86), "eyes": (0.28, 0.46)}  # rows of the 48x48 face a band covers


@dataclass
class Truth:
    index: int  # the face's index in the faces array
    center: tuple[float, float]
    size: float  # the pasted face's side in pixels
    angle: float  # degrees, counter-clockwise
    occluded: str | None


@dataclass
class Photo:
    image: np.ndarray  # grayscale uint8, HEIGHT x WIDTH
    truths: list[Truth]


def _background(rng: np.random.Generator) -> np.ndarray:
    import cv2

    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / max(WIDTH, HEIGHT)
    image = 60 + 120 * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = image.astype(np.uint8)
    for _ in range(int(rng.integers(4, 10))):  # other content: shapes and lines
        colour = int(rng.integers(0, 256))
        kind = rng.integers(3)
        x, y = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        if kind == 0:
            cv2.rectangle(image, (x, y), (x + int(rng.integers(20, 160)), y + int(rng.integers(20, 160))), colour, -1)
        elif kind == 1:
            cv2.circle(image, (x, y), int(rng.integers(10, 80)), colour, -1)
        else:
            cv2.line(image, (x, y), (int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))), colour, int(rng.integers(1, 8)))
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def sampled_test_faces(data: Path, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` FERPlus test faces (ferplus8) drawn with `seed`, in the data's order, and their labels."""
    from fersearch.data import apply_protocol, load_raw

    test = apply_protocol(load_raw(data), "ferplus8").test
    pick = np.sort(np.random.default_rng(seed).permutation(len(test))[:count])
    return test.images[pick], test.labels[pick]


def make_photos(faces: np.ndarray, seed: int = 0, occluded_share: float = 0.25) -> list[Photo]:
    """Photos holding every face of `faces` (n, 48, 48) once, one to three per photo."""
    import cv2

    rng = np.random.default_rng(seed)
    photos, i = [], 0
    while i < len(faces):
        image = _background(rng)
        truths: list[Truth] = []
        for _ in range(int(rng.integers(1, 4))):
            if i >= len(faces):
                break
            size = 48 * rng.uniform(2, 6)
            reach = size * 0.75  # the rotated square's half-diagonal, about
            for _attempt in range(30):
                cx, cy = rng.uniform(reach, WIDTH - reach), rng.uniform(reach, HEIGHT - reach)
                if all(math.hypot(cx - t.center[0], cy - t.center[1]) > 0.75 * (size + t.size) for t in truths):
                    break
            else:
                break
            face = faces[i].copy()
            occluded = OCCLUSIONS[int(rng.integers(2))] if rng.random() < occluded_share else None
            if occluded:
                top, bottom = BANDS[occluded]
                face[round(48 * top) : round(48 * bottom)] = int(rng.choice([20, 235]))
            angle = rng.uniform(-20, 20)
            scale = size / 48
            matrix = cv2.getRotationMatrix2D((24, 24), angle, scale)
            matrix[:, 2] += (cx - 24, cy - 24)
            pasted = cv2.warpAffine(face, matrix, (WIDTH, HEIGHT), flags=cv2.INTER_CUBIC)
            mask = cv2.warpAffine(np.full((48, 48), 255, np.uint8), matrix, (WIDTH, HEIGHT), flags=cv2.INTER_NEAREST)
            image = np.where(mask > 0, pasted, image)
            truths.append(Truth(i, (cx, cy), size, angle, occluded))
            i += 1
        if truths:
            photos.append(Photo(image, truths))
    return photos


def match(found, truths: list[Truth]) -> tuple[dict[int, object], int]:
    """Detections matched to truths (centre within 0.35 of the face's size, box side within
    0.4-1.6 of it), nearest first; and the count of detections that matched none."""
    pairs = []
    for j, face in enumerate(found):
        x, y, w, h = face.box
        for k, truth in enumerate(truths):
            distance = math.hypot(x + w / 2 - truth.center[0], y + h / 2 - truth.center[1])
            if distance < 0.35 * truth.size and 0.4 * truth.size <= max(w, h) <= 1.6 * truth.size:
                pairs.append((distance, j, k))
    matched, used = {}, set()
    for _, j, k in sorted(pairs):
        if j not in used and k not in matched:
            matched[k] = found[j]
            used.add(j)
    return matched, len(found) - len(used)


@dataclass
class Outcome:
    found: dict[str, int]  # "clear" / "covered" -> faces found
    total: dict[str, int]
    false: int
    crops: list[tuple[int, np.ndarray]]  # (face index, 48x48 crop) of found unoccluded faces
    frame_ms: list[float]


def run_detector(photos: list[Photo], finder, framing=None, crop: bool = True, views=None) -> Outcome:
    from fersearch.faces import FRAMING, PHOTO_VIEWS, face_crop

    found, total, false, crops, times = {"clear": 0, "covered": 0}, {"clear": 0, "covered": 0}, 0, [], []
    for photo in photos:
        start = time.perf_counter()
        faces = finder.find(photo.image, views=views or PHOTO_VIEWS)
        times.append(1000 * (time.perf_counter() - start))
        matched, extra = match(faces, photo.truths)
        false += extra
        for k, truth in enumerate(photo.truths):
            kind = "covered" if truth.occluded else "clear"
            total[kind] += 1
            if k in matched:
                found[kind] += 1
                if crop and not truth.occluded:
                    face = finder.level(photo.image, matched[k])
                    crops.append((truth.index, face_crop(photo.image, face, framing or FRAMING)))
    return Outcome(found, total, false, crops, times)


def oracle_crops(photos: list[Photo], resample=None) -> list[tuple[int, np.ndarray]]:
    """Every unoccluded face cut out where it was pasted (its true centre, size and angle), as
    the pipeline's one resize makes it 48x48 (or with the PIL filter `resample`): what a perfect
    detector and framing would give. Its fidelity is the ceiling the pasting (scaling up,
    turning, resampling) leaves."""
    from fersearch.bundle import RESIZE_FILTER, face_pixels
    from fersearch.faces import levelled_view

    crops = []
    for photo in photos:
        for truth in photo.truths:
            if not truth.occluded:
                square, _ = levelled_view(photo.image, truth.center, -truth.angle, max(2, round(truth.size)))
                crops.append((truth.index, face_pixels(square, resample or RESIZE_FILTER)))
    return crops


def levelled_faces(faces: np.ndarray, finder) -> tuple[list, list, np.ndarray]:
    """Each face scaled up 4x and back, as it is and levelled by its own eyes (found by
    `finder`) as the pipeline levels a face it finds, with no photo: what the resampling and the
    levelling alone change. FER2013's faces are not levelled: their own tilt is part of the
    direct 48x48 crop. Also each face's own tilt (degrees)."""
    import cv2

    from fersearch.bundle import face_pixels
    from fersearch.faces import levelled_view

    plain, crops, rolls, big, pad = [], [], [], 4 * 48, 48
    for i, face in enumerate(faces):
        up = cv2.copyMakeBorder(cv2.resize(face, (big, big), interpolation=cv2.INTER_CUBIC), pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        found = [f for f in finder.find(up, views=("plain",)) if f.eyes is not None]
        if found:
            plain.append((i, face_pixels(up[pad:-pad, pad:-pad])))
            square, _ = levelled_view(up, (pad + big / 2, pad + big / 2), found[0].roll, big)
            crops.append((i, face_pixels(square)))
            rolls.append(found[0].roll)
    return plain, crops, np.array(rolls)


def labels_of(bundle, images: np.ndarray) -> np.ndarray:
    """The model's labels of 48x48 faces, read as `predict` reads a face (predict.classify: with
    the model's own test-time augmentation)."""
    from fersearch.predict import classify

    return classify(bundle, images).argmax(1)


def fidelity(bundle, faces: np.ndarray, crops: list[tuple[int, np.ndarray]]) -> float:
    """Share of found faces whose label through the pipeline equals the direct 48x48 label."""
    if not crops:
        return float("nan")
    direct = labels_of(bundle, faces[[i for i, _ in crops]])
    return float(np.mean(labels_of(bundle, np.stack([c for _, c in crops])) == direct))


def nudged(faces: np.ndarray, shift: float = 0.0, zoom: float = 1.0) -> np.ndarray:
    """Each 48x48 face moved `shift` pixels to the right and zoomed by `zoom` about its centre
    (bicubic, edges replicated; a whole-pixel shift moves the pixels unchanged): the smallest
    re-framings a detector's crop differs from FER2013's by."""
    import cv2

    matrix = cv2.getRotationMatrix2D((23.5, 23.5), 0, zoom)
    matrix[0, 2] += shift
    return np.stack([cv2.warpAffine(f, matrix, (48, 48), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE) for f in faces])


def stability(bundle, faces: np.ndarray, crops: list[tuple[int, np.ndarray]], labels: np.ndarray) -> dict[str, float]:
    """On the faces of `crops`: how often the direct label survives a 1-pixel shift and a 5% zoom
    of the face itself (the floor under any detector's fidelity), and the accuracy of the direct
    and the pipeline's labels against the data's labels (what the pipeline's relabelling costs)."""
    index = [i for i, _ in crops]
    direct = labels_of(bundle, faces[index])
    return {
        "shift": float(np.mean(labels_of(bundle, nudged(faces[index], shift=1.0)) == direct)),
        "zoom": float(np.mean(labels_of(bundle, nudged(faces[index], zoom=1.05)) == direct)),
        "direct": float(np.mean(direct == labels[index])),
        "piped": float(np.mean(labels_of(bundle, np.stack([c for _, c in crops])) == labels[index])),
    }


def live_ms(bundle_path: Path, photos: list[Photo], detector: str, repeats: int = 3) -> float:
    """Median time of the live handler's work on a 640x480 frame: detection (at the live tab's
    scan size), alignment, classification, drawing."""
    import cv2

    from fersearch.app import LIVE_DETECT_SIDE
    from fersearch.predict import Predictor

    predictor = Predictor(bundle_path, detector=detector)
    frames = [cv2.cvtColor(p.image, cv2.COLOR_GRAY2BGR) for p in photos[:40]]
    times = []
    for _ in range(repeats):
        for frame in frames:
            start = time.perf_counter()
            result = predictor.predict(frame, LIVE_DETECT_SIDE, whole_image=False)
            predictor.annotate(frame, result)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", type=Path, nargs="+", metavar="BUNDLE",
                        help="exported bundles (fersearch export) or train --out folders: the first is the model of every "
                             "table; more add rows to a table of fidelity by model (the same photos and detections)")
    parser.add_argument("--data", type=Path, required=True, help="FERPlus folder (its ferplus8 test faces are used)")
    parser.add_argument("--faces", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)  # OpenCV's DNN and resizes use every core otherwise
    from fersearch.bundle import load_bundle
    from fersearch.faces import DETECTORS, FRAMING, PHOTO_VIEWS, YUNET_SCORE, FaceFinder, Framing

    faces, labels = sampled_test_faces(args.data, args.faces, args.seed)
    photos = make_photos(faces, args.seed)
    bundles = [load_bundle(path) for path in args.bundles]
    bundle, first = bundles[0], args.bundles[0]
    print(f"{len(photos)} photos of {WIDTH}x{HEIGHT} holding {len(faces)} FERPlus test faces (ferplus8), seed {args.seed}; "
          f"model {first} ({bundle.cfg.model}); {args.threads} thread(s)")
    print()
    print("| detector | clear faces found | covered faces found | false detections | fidelity (clear faces found) | detection ms / photo (median) | live handler ms / 640x480 frame (median) |")
    print("|---|---|---|---|---|---|---|")
    outcomes = {}
    for detector in DETECTORS:
        outcome = outcomes[detector] = run_detector(photos, FaceFinder(detector))
        agree = fidelity(bundle, faces, outcome.crops)
        clear, covered = outcome.found["clear"] / outcome.total["clear"], outcome.found["covered"] / max(outcome.total["covered"], 1)
        print(f"| {detector} | {clear:.1%} ({outcome.found['clear']}/{outcome.total['clear']}) | "
              f"{covered:.1%} ({outcome.found['covered']}/{outcome.total['covered']}) | {outcome.false} | {agree:.1%} | "
              f"{statistics.median(outcome.frame_ms):.1f} | {live_ms(first, photos, detector):.1f} |")
    plain, levelled, rolls = levelled_faces(faces, FaceFinder("yunet"))
    oracle = oracle_crops(photos)
    print()
    print("Fidelity by model, on the same photos and detections (clear faces found); the ceiling cuts each face out "
          "where it was pasted; 'no photo' scales each face up 4x and back, then also levels it by its eyes; the "
          "floor: the direct label of the faces YuNet found against the same face shifted 1 pixel or zoomed 5%; "
          "accuracy against the FERPlus labels of those faces, direct and through YuNet")
    print()
    print(f"| model | {' | '.join(DETECTORS)} | ceiling | no photo | no photo, levelled | floor: 1-px shift | floor: 5% zoom | accuracy direct | accuracy YuNet |")
    print(f"|---|{'---|' * len(DETECTORS)}---|---|---|---|---|---|---|")
    for path, each in zip(args.bundles, bundles, strict=True):
        row = [fidelity(each, faces, outcomes[d].crops) for d in DETECTORS]
        row += [fidelity(each, faces, crops) for crops in (oracle, plain, levelled)]
        row += stability(each, faces, outcomes["yunet"].crops, labels).values()
        print(f"| {path} | {' | '.join(f'{v:.1%}' for v in row)} |")
    print()
    print(f"YuNet's confidence threshold and the views it scans (faces.YUNET_SCORE {YUNET_SCORE:g} and "
          f"faces.PHOTO_VIEWS {'+'.join(PHOTO_VIEWS)} are the defaults)")
    print()
    print("| threshold | views | clear faces found | covered faces found | false detections | detection ms / photo (median) |")
    print("|---|---|---|---|---|---|")
    for score in (0.3, 0.4, 0.5):
        finder = FaceFinder("yunet", score=score)
        for views in (("plain",), ("plain", "clahe"), ("plain", "large"), ("plain", "clahe", "large")):
            outcome = run_detector(photos, finder, crop=False, views=views)
            print(f"| {score:g} | {'+'.join(views)} | {outcome.found['clear'] / outcome.total['clear']:.1%} | "
                  f"{outcome.found['covered'] / max(outcome.total['covered'], 1):.1%} | {outcome.false} | "
                  f"{statistics.median(outcome.frame_ms):.1f} |")
    print()
    from PIL import Image

    ceilings = ", ".join(f"{name} {fidelity(bundle, faces, oracle_crops(photos, getattr(Image.Resampling, name.upper()))):.1%}"
                         for name in ("bilinear", "bicubic", "lanczos"))
    print(f"Ceiling: every unoccluded face cut out where it was pasted (true centre, size and angle): "
          f"fidelity {fidelity(bundle, faces, oracle):.1%} (resize filters: {ceilings})")
    print(f"No photo: the {len(levelled)} faces whose eyes YuNet finds, scaled up 4x and back: fidelity "
          f"{fidelity(bundle, faces, plain):.1%}; levelled by their eyes on the way: {fidelity(bundle, faces, levelled):.1%} "
          f"(their own tilt: sd {rolls.std():.1f} degrees, {np.mean(np.abs(rolls) > 5):.0%} beyond 5)")
    print()
    print("YuNet crop framings (side and centre offset below the eyes, in eye distances): fidelity on the clear faces found")
    print()
    print("| side | down | fidelity |")
    print("|---|---|---|")
    finder = FaceFinder("yunet")
    for side, down in ((2.5, 0.35), (FRAMING.side, FRAMING.down), (3.0, 0.35), (FRAMING.side, 0.25), (FRAMING.side, 0.45)):
        outcome = run_detector(photos, finder, Framing(side, down))
        print(f"| {side:g} | {down:g} | {fidelity(bundle, faces, outcome.crops):.1%} |")


if __name__ == "__main__":
    main()
