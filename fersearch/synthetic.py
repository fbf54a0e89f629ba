"""A procedural stand-in for FERPlus: 48x48 grayscale cartoon faces with 10 taggers' votes.

Each face has a head ellipse, eyes, brows, nose and mouth whose geometry is set by the emotion
at a random intensity, on a random identity (head shape, feature spacing, skin tone), pose
(rotation, shift, scale), lighting gradient, blur-free pixel noise. Ten simulated taggers vote
for the true emotion more often the stronger the expression, otherwise for a confusable emotion,
sometimes unknown or NF; a few images are not faces at all. Class frequencies follow FERPlus's
training set. Everything is vectorised over a batch and deterministic by seed, and the result is
written in Microsoft's layout so that it goes through the same reader as the real data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from fersearch.config import IMAGE_SIZE
from fersearch.data import CLASSES, SPLIT_DIRS, SPLITS, write_layout

log = logging.getLogger(__name__)

# FERPlus training-set majority counts of the 8 emotions (shared data README).
FERPLUS_TRAIN_COUNTS = np.array([10295, 7526, 3557, 3530, 2463, 191, 655, 168], dtype=np.float64)
# 6,000 training faces: an epoch is about the faces FERPlus's quarter-epoch rung has seen
# (7,100), which is where `make search` puts the synthetic set's first rung (Makefile).
DEFAULT_SIZES = {"train": 6000, "valid": 1000, "test": 1000}
# Pixels per face unit. It was 22 x U(0.75, 1): a face half the frame's area with 2-3 px eyes,
# framed looser than FER2013's crops; after one 6,000-image epoch, 1 of 12 random configurations
# of the default cnn space passed 0.50 validation (the majority class scores 0.43), and 4 of the
# same 12 at this framing.
FACE_SCALE = 28.0
# Bumped whenever the images or votes that one seed gives change: a folder written by an earlier
# generator is written again (its marker file says which one wrote it).
GENERATOR = 2
MARKER = "synthetic.json"
NONFACE_RATE = 0.005

# Per emotion: brow height, brow tilt (inner end down > 0), eye openness, mouth curvature
# (corners up > 0), mouth opening, mouth width, mouth asymmetry, nose wrinkle.
#                     brow_y  tilt  eye   curve  open  width  asym  wrinkle
EXPRESSIONS = np.array(
    [
        [0.00, 0.00, 1.00, 0.00, 0.00, 1.00, 0.00, 0.0],  # neutral
        [0.02, 0.00, 0.70, 1.00, 0.25, 1.25, 0.00, 0.0],  # happiness
        [-0.10, -0.10, 1.60, 0.00, 1.00, 0.70, 0.00, 0.0],  # surprise
        [-0.02, -0.45, 0.80, -0.80, 0.00, 0.90, 0.00, 0.0],  # sadness
        [0.06, 0.60, 0.80, -0.35, 0.05, 0.85, 0.00, 0.2],  # anger
        [0.04, 0.30, 0.65, -0.50, 0.20, 0.95, 0.45, 1.0],  # disgust
        [-0.08, -0.35, 1.50, -0.30, 0.60, 1.20, 0.00, 0.0],  # fear
        [0.00, 0.10, 0.90, 0.15, 0.00, 0.95, 0.90, 0.0],  # contempt
    ]
)
# Which emotion a tagger picks when the expression does not convince them.
CONFUSIONS = np.array(
    [
        [0.00, 0.15, 0.10, 0.35, 0.20, 0.05, 0.05, 0.10],
        [0.60, 0.00, 0.20, 0.02, 0.02, 0.02, 0.04, 0.10],
        [0.30, 0.15, 0.00, 0.03, 0.02, 0.02, 0.48, 0.00],
        [0.65, 0.00, 0.02, 0.00, 0.10, 0.08, 0.10, 0.05],
        [0.35, 0.00, 0.03, 0.15, 0.00, 0.35, 0.05, 0.07],
        [0.15, 0.00, 0.02, 0.10, 0.60, 0.00, 0.05, 0.08],
        [0.15, 0.00, 0.45, 0.25, 0.05, 0.05, 0.00, 0.05],
        [0.55, 0.15, 0.00, 0.05, 0.15, 0.10, 0.00, 0.00],
    ]
)
UNKNOWN_RATE, NF_RATE = 0.05, 0.005


def _soft(distance: np.ndarray, width: float | np.ndarray) -> np.ndarray:
    """Anti-aliased coverage: 1 inside `width`, 0 a pixel beyond it."""
    return np.clip(width - distance + 0.5, 0.0, 1.0)


def _blend(img: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> np.ndarray:
    return img * (1 - alpha) + alpha * value


def render_faces(emotion: np.ndarray, intensity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one face per entry; returns uint8 (n, 48, 48)."""
    n = len(emotion)
    col = lambda a: a[:, None, None]  # noqa: E731 - broadcast a per-face value over the grid
    expr = EXPRESSIONS[0] + intensity[:, None] * (EXPRESSIONS[emotion] - EXPRESSIONS[0])
    brow_y, tilt, eye_open, curve, mouth_open, mouth_w, asym, wrinkle = expr.T
    flip = rng.choice([-1.0, 1.0], n)  # asymmetric expressions go either way
    # Pose: the pixel grid mapped into face coordinates (face spans about [-1, 1]), framed as
    # FER2013's crops are: the face fills the frame, eyes about 10 px either side of the centre
    # and a third of the way down, the mouth 15 px wide near the bottom.
    scale = rng.uniform(0.9, 1.1, n) * FACE_SCALE
    angle = np.deg2rad(rng.normal(0, 8, n))
    cx, cy = rng.normal(24, 1.8, n), rng.normal(23.5, 1.8, n)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    dx, dy = xs[None] - col(cx), ys[None] - col(cy)
    cos, sin = col(np.cos(angle)), col(np.sin(angle))
    u = (cos * dx + sin * dy) / col(scale)
    v = (-sin * dx + cos * dy) / col(scale)
    px = 1.0 / col(scale)  # one pixel in face units
    # Background with a lighting gradient, then the head.
    light = rng.uniform(-0.25, 0.25, (n, 2))
    img = col(rng.uniform(0.1, 0.6, n)) + (col(light[:, 0]) * xs + col(light[:, 1]) * ys) / IMAGE_SIZE
    head_rx, head_ry = col(rng.uniform(0.72, 0.88, n)), col(rng.uniform(0.95, 1.1, n))
    skin = col(rng.uniform(0.45, 0.85, n))
    head = np.sqrt((u / head_rx) ** 2 + (v / head_ry) ** 2)
    img = _blend(img, _soft((head - 1) / px, 0), skin)
    shade = skin * col(rng.uniform(0.25, 0.45, n))
    # Eyes: dark ellipses whose height is the openness.
    eye_x, eye_y = col(rng.uniform(0.30, 0.40, n)), col(rng.uniform(-0.28, -0.18, n))
    eye_w = col(rng.uniform(0.10, 0.14, n))
    eye_h = eye_w * col(0.55 * eye_open)
    for side in (-1, 1):
        d = np.sqrt(((u - side * eye_x) / eye_w) ** 2 + ((v - eye_y) / eye_h) ** 2)
        img = _blend(img, _soft((d - 1) * eye_h / px, 0), shade)
    # Brows: thick segments above the eyes, raised and tilted by the emotion.
    brow_base = eye_y - col(rng.uniform(0.17, 0.22, n)) + col(brow_y) * 1.2
    for side in (-1, 1):
        t = (u - side * eye_x) / (eye_w * 1.3)  # -1..1 across the brow
        inner = -side * t  # +1 at the inner end
        brow_v = brow_base + col(tilt) * 0.09 * inner
        d = np.abs(v - brow_v) / px
        inside = np.abs(t) <= 1
        img = _blend(img, _soft(d, 0.9) * inside, shade)
    # Nose, with wrinkle lines for disgust.
    nose = (np.abs(u) / px < 0.6) & (v > -0.12) & (v < 0.18)
    img = _blend(img, 0.6 * nose, shade * 1.4)
    for side in (-1, 1):
        wr = _soft(np.abs(v + 0.05) / px, 0.5) * (np.abs(u - side * 0.14) < 0.06) * col(np.clip(wrinkle, 0, 1))
        img = _blend(img, wr, shade)
    # Mouth: a curve y = y0 - curve * x^2 (+ asymmetric tilt), opened into an ellipse.
    mouth_y = col(rng.uniform(0.40, 0.50, n))
    half_w = col(rng.uniform(0.22, 0.30, n) * mouth_w)
    tx = u / half_w
    lip_v = mouth_y - col(curve) * 0.16 * tx**2 - col(asym * flip) * 0.08 * (tx + 1) * (tx > 0)
    on_mouth = np.abs(tx) <= 1
    img = _blend(img, _soft(np.abs(v - lip_v) / px, 0.9) * on_mouth, shade)
    open_h = col(mouth_open) * 0.14 + 1e-3
    d = np.sqrt(tx**2 + ((v - lip_v) / open_h) ** 2)
    img = _blend(img, _soft((d - 1) * open_h / px, 0) * (col(mouth_open) > 0.05), shade * 0.5)
    img = img + rng.normal(0, 0.04, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _nonfaces(n: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random textures: the 'NF' images."""
    coarse = rng.uniform(0, 1, (n, 6, 6))
    img = np.kron(coarse, np.ones((8, 8))) + rng.normal(0, 0.05, (n, IMAGE_SIZE, IMAGE_SIZE))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def simulate_votes(emotion: np.ndarray, intensity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ten taggers per image; they agree more on strong expressions."""
    n = len(emotion)
    agree = 0.3 + 0.65 * intensity
    probs = np.zeros((n, len(CLASSES)))
    probs[:, :8] = (1 - agree - UNKNOWN_RATE - NF_RATE)[:, None] * CONFUSIONS[emotion]
    probs[np.arange(n), emotion] += agree
    probs[:, 8], probs[:, 9] = UNKNOWN_RATE, NF_RATE
    probs = np.clip(probs, 0, None)
    probs /= probs.sum(1, keepdims=True)
    return np.stack([rng.multinomial(10, p) for p in probs]).astype(np.int16)


def generate(sizes: dict[str, int] | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images uint8 (n, 48, 48), votes (n, 10) and split ids, deterministic by seed."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    rng = np.random.default_rng(seed)
    total = sum(sizes[s] for s in SPLITS)
    emotion = rng.choice(8, total, p=FERPLUS_TRAIN_COUNTS / FERPLUS_TRAIN_COUNTS.sum())
    intensity = rng.beta(2.0, 1.4, total)
    intensity[emotion == 0] = 1.0
    images = np.concatenate(
        [render_faces(emotion[i : i + 1000], intensity[i : i + 1000], rng) for i in range(0, total, 1000)]
    )
    votes = simulate_votes(emotion, intensity, rng)
    nonface = rng.random(total) < NONFACE_RATE
    images[nonface] = _nonfaces(int(nonface.sum()), rng)
    votes[nonface] = 0
    votes[nonface, 9] = 8
    votes[nonface, 8] = 2
    split = np.repeat(np.arange(len(SPLITS), dtype=np.int8), [sizes[s] for s in SPLITS])
    return images, votes, split


def _marker(sizes: dict[str, int] | None, seed: int) -> dict:
    """What the marker file of a folder written at these sizes (defaults filled in) and seed holds."""
    wanted = {**DEFAULT_SIZES, **(sizes or {})}
    return {"generator": GENERATOR, "seed": seed, "sizes": {split: wanted[split] for split in SPLITS}}


def synthetic_is_current(out: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> bool:
    """Whether `out` holds the synthetic dataset this generator writes at these sizes and seed
    (its marker says so, and the label files have the sizes' rows)."""
    expected = _marker(sizes, seed)
    labels = {split: Path(out) / folder / "label.csv" for split, folder in SPLIT_DIRS.items()}
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == expected and all(f.is_file() for f in labels.values()) and all(
        sum(1 for line in labels[split].read_text().splitlines() if line.strip()) == expected["sizes"][split]
        for split in SPLITS
    )


def ensure_synthetic(out: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write the synthetic dataset in Microsoft's layout unless it is already there at these
    sizes and seed, from this generator. A folder written earlier with other sizes or by an
    earlier generator is replaced: the new one is written beside it and renamed into place."""
    out = Path(out).resolve()
    if synthetic_is_current(out, sizes, seed):
        return out
    log.info("generating the synthetic FERPlus stand-in in %s (seed %d)", out, seed)
    images, votes, split = generate(sizes, seed)
    fresh = out.with_name(f"{out.name}.new-{os.getpid()}")
    write_layout(fresh, images, votes, split)
    (fresh / MARKER).write_text(json.dumps(_marker(sizes, seed)) + "\n")
    if not out.exists():
        fresh.rename(out)
        return out
    stale = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(stale)
    fresh.rename(out)
    shutil.rmtree(stale, ignore_errors=True)
    return out
