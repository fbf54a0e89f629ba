"""`fersearch app`: the seed GUI as a local web app (Gradio): pick a model, classify the faces in
a photo, or classify live from the browser's camera.

- Models: the bundles under `mlruns/exports/`, the `--bundle` folders (an export or a
  `fersearch train --out` folder), and every version of the models registered in the MLflow
  store (`fersearch-cnn`, `fersearch-resnet18`; a version is loaded from its run's `best/`
  files, which `run_files` writes in the layout `load_bundle` reads). Each is loaded once, on
  first use, and kept.
- Photo tab: the upload is decoded here (not by the browser component), so every bad file gets
  a message of ours; faces are found and classified by `predict.Predictor`, the one
  pre-processing of inference.
- Live tab: the browser sends a camera frame every STREAM_EVERY seconds. Gradio keeps only the
  newest frame of a stream while the handler is busy (each upload replaces the event's data),
  so a model slower than the camera drops frames instead of queueing them. Faces are matched to
  the previous frame's by overlap and their probabilities averaged over the last SMOOTH_FRAMES
  frames, so labels do not flicker. Boxes are drawn into the returned frame with OpenCV.
- The programmatic endpoint is the photo tab's event, `/classify` (see README for a client).
"""

from __future__ import annotations

import collections
import functools
import html
import json
import logging
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fersearch.config import APP_PORT, SERVE_HOST
from fersearch.data import CLASSES, EMOTIONS
from fersearch.errors import FersearchError
from fersearch.faces import DEFAULT_DETECTOR, FaceFinder, overlap
from fersearch.predict import Predictor, decode_image
from fersearch.run_files import BEST_DIR, METRICS_FILE

log = logging.getLogger(__name__)

STREAM_EVERY = 0.2  # seconds between camera frames the browser sends (5 per second)
STREAM_TIME_LIMIT = 600  # seconds one live session may run before the browser restarts it
# Faces are searched on a copy of a camera frame at most this long: the cascade took 89 ms on a
# full 640x480 frame (most of a frame's time), and a face in front of a camera is large. At 320
# it already missed the test's face in the browser's compressed, mirrored frames.
LIVE_DETECT_SIDE = 480
LIVE_VIEWS = ("plain",)  # one scan per frame (faces.VIEWS): a photo's extra views cost a live frame too much
SMOOTH_FRAMES = 5  # a face's probabilities are averaged over this many frames
MATCH_IOU = 0.3  # a face overlapping a previous frame's face this much is the same face
MAX_UPLOAD_BYTES = 200 * 1024 * 1024  # larger uploads are refused by the server before decoding
LATENCY_WINDOW = 30  # frames the live tab's median latency and rate are taken over
NO_MODEL = (
    "No model to serve yet. Make one with `make search MODEL=cnn`, then `make export MODEL=cnn` "
    "(or pass `--bundle DIR`), and start the app again."
)
KNOWN_CLASS_SETS = (tuple(EMOTIONS), tuple(CLASSES))


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model picker."""

    key: str  # what the picker returns
    label: str  # what it shows, with the test accuracy
    kind: str  # export, bundle or registry
    location: str  # a folder, or "name/version" in the registry
    run_id: str = ""  # a registry version's run


def _test_accuracy(folder: Path) -> float | None:
    try:
        return float(json.loads((folder / METRICS_FILE).read_text())["test"]["accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _label(name: str, accuracy: float | None) -> str:
    return f"{name} (test accuracy {accuracy:.2%})" if accuracy is not None else f"{name} (test accuracy unknown)"


def find_models(mlruns: Path, bundles: list[Path] | None = None) -> list[ModelChoice]:
    """The picker's entries: exports, `--bundle` folders, then registered versions."""
    choices = []
    exports = Path(mlruns) / "exports"
    folders = sorted(p for p in exports.iterdir() if (p / "model.pt").is_file()) if exports.is_dir() else []
    for folder in folders:
        choices.append(ModelChoice(f"export:{folder}", _label(f"export {folder.name}", _test_accuracy(folder)), "export", str(folder)))
    for folder in bundles or []:
        folder = Path(folder).expanduser().resolve()
        choices.append(ModelChoice(f"bundle:{folder}", _label(f"bundle {folder}", _test_accuracy(folder)), "bundle", str(folder)))
    choices += _registered(Path(mlruns))
    return choices


def _registered(mlruns: Path) -> list[ModelChoice]:
    """Every version of fersearch's registered models, newest first; none without a store."""
    from fersearch.tracking import STORE_FILE, client_for, tracking_uri

    if not (mlruns / STORE_FILE).is_file():
        return []
    try:
        client = client_for(tracking_uri(mlruns))
        versions = client.search_model_versions("name LIKE 'fersearch-%'")
    except Exception as exc:  # noqa: BLE001 - the picker still offers the folders
        log.warning("cannot list the MLflow registry: %s", exc)
        return []
    out = []
    for v in sorted(versions, key=lambda v: (v.name, -int(v.version))):
        tags = v.tags or {}
        accuracy = next((float(tags[k]) for k in sorted(tags) if k.startswith("test_") and k.endswith("_accuracy")
                         and "balanced" not in k), None)
        out.append(ModelChoice(f"registry:{v.name}/{v.version}", _label(f"registered {v.name} v{v.version}", accuracy),
                               "registry", f"{v.name}/{v.version}", v.run_id or ""))
    return out


class Models:
    """Loads each picked model once (a Predictor) and keeps it; thread-safe."""

    def __init__(self, choices: list[ModelChoice], mlruns: Path, detector: str = DEFAULT_DETECTOR) -> None:
        # One finder for every model (a missing or changed detector file is one line before the
        # page is up); its lock serialises the photo and live tabs' detections.
        self.finder = FaceFinder(detector)
        self.choices = {c.key: c for c in choices}
        self.mlruns = Path(mlruns)
        self._loaded: dict[str, Predictor] = {}
        self._lock = threading.Lock()
        self._downloads = tempfile.TemporaryDirectory(prefix="fersearch-app-")

    def close(self) -> None:
        """Remove the folder of models downloaded from the store."""
        self._downloads.cleanup()

    def get(self, key: str | None) -> Predictor:
        if not key or key not in self.choices:
            raise FersearchError("pick a model first" if not key else f"unknown model {key!r}")
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = self._load(self.choices[key])
            return self._loaded[key]

    def _load(self, choice: ModelChoice) -> Predictor:
        folder = Path(choice.location)
        if choice.kind == "registry":
            folder = self._download(choice)
        predictor = Predictor(folder, finder=self.finder)
        classes = tuple(predictor.bundle.classes)
        if classes not in KNOWN_CLASS_SETS:
            raise FersearchError(
                f"{choice.label} predicts {len(classes)} classes ({', '.join(classes[:4])}...), "
                "not FERPlus's emotions: it is a model for another task"
            )
        log.info("loaded %s", choice.label)
        return predictor

    def _download(self, choice: ModelChoice) -> Path:
        from fersearch.tracking import client_for, tracking_uri

        target = Path(self._downloads.name) / choice.location.replace("/", "-")
        try:
            client = client_for(tracking_uri(self.mlruns))
            target.mkdir(parents=True, exist_ok=True)
            return Path(client.download_artifacts(choice.run_id, BEST_DIR, str(target)))
        except Exception as exc:  # noqa: BLE001 - any store error means the version cannot be served
            raise FersearchError(f"cannot load {choice.label} from the store ({exc})") from None


# ---------------------------------------------------------------------------- photos


def decode_upload(path: str | Path) -> np.ndarray:
    """An uploaded file as a BGR uint8 image by predict's one image rule (`decode_image`), or a
    FersearchError naming the file as the user called it."""
    return decode_image(Path(path), Path(path).name)


def probability_html(faces: list[dict[str, Any]], whole_image: bool) -> str:
    """Per-face probability bars for all classes, most likely first (plain HTML and CSS)."""
    parts = []
    if whole_image:
        parts.append('<p class="fs-note">No face found: the whole image was classified.</p>')
    for i, face in enumerate(faces, 1):
        rows = "".join(
            f'<div class="fs-row"><span class="fs-name">{html.escape(c)}</span>'
            f'<span class="fs-bar"><span style="width:{100 * p:.1f}%"></span></span>'
            f'<span class="fs-value">{100 * p:.1f}%</span></div>'
            for c, p in sorted(face["probabilities"].items(), key=lambda kv: -kv[1])
        )
        title = "whole image" if whole_image else f"face {i}"
        parts.append(f'<div class="fs-face" data-label="{html.escape(face["label"])}"><b>{title}: '
                     f'<span class="fs-label">{html.escape(face["label"])}</span></b>{rows}</div>')
    return "".join(parts)


def classify_photo(models: Models, key: str | None, path: str | None) -> tuple[Any, str, dict[str, Any]]:
    """The photo tab's (and `/classify`'s) handler: the annotated image, bars, and the result."""
    if not path:
        raise FersearchError("upload an image first")
    bgr = decode_upload(path)
    predictor = models.get(key)
    result = predictor.predict(bgr)
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    boxes = [((x, y, x + w, y + h), face["label"]) for face, (x, y, w, h) in
             ((f, f["box"]) for f in result["faces"])]
    result = {**result, "model": models.choices[key].label}
    return (rgb, boxes), probability_html(result["faces"], result["whole_image"]), result


# ---------------------------------------------------------------------------- live camera


@dataclass
class LiveState:
    """One browser session's live tab: face tracks and recent frame timings."""

    tracks: list[tuple[tuple[int, int, int, int], collections.deque]] = field(default_factory=list)
    latencies: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    served: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))


def smooth(state: LiveState, boxes: list[tuple[int, int, int, int]], probs: np.ndarray) -> np.ndarray:
    """Each face's probabilities averaged with its own over the last SMOOTH_FRAMES frames.

    A face is the previous frame's face it overlaps most (IoU >= MATCH_IOU, each used once);
    faces that vanish are forgotten."""
    tracks, used = [], set()
    out = np.empty_like(probs)
    for i, box in enumerate(boxes):
        best, best_iou = None, MATCH_IOU
        for j, (old_box, _) in enumerate(state.tracks):
            shared = overlap(box, old_box)
            if j not in used and shared >= best_iou:
                best, best_iou = j, shared
        history = state.tracks[best][1] if best is not None else collections.deque(maxlen=SMOOTH_FRAMES)
        if best is not None:
            used.add(best)
        history.append(probs[i])
        out[i] = np.mean(history, axis=0)
        tracks.append((box, history))
    state.tracks = tracks
    return out


def live_frame(models: Models, key: str | None, frame: np.ndarray | None, state: LiveState | None,
               landmarks: bool = False):
    """The live tab's handler: one RGB camera frame in, the frame with labelled boxes (and the
    eyes' landmarks, when asked) out."""
    state = state or LiveState()
    if frame is None:
        return None, "waiting for the camera", state
    start = time.perf_counter()
    predictor = models.get(key)
    bgr = np.ascontiguousarray(frame[..., 2::-1]) if frame.ndim == 3 else frame
    result = predictor.predict(
        bgr, LIVE_DETECT_SIDE, whole_image=False, adjust=lambda boxes, probs: smooth(state, boxes, probs), views=LIVE_VIEWS
    )
    faces = result["faces"]
    if not faces:
        state.tracks = []
    drawn = predictor.annotate(bgr, result, landmarks=bool(landmarks))[..., ::-1]
    now = time.perf_counter()
    state.latencies.append(1000 * (now - start))
    state.served.append(now)
    rate = (len(state.served) - 1) / (state.served[-1] - state.served[0]) if len(state.served) > 1 else 0.0
    text = (f"{len(faces)} face(s) | this frame {state.latencies[-1]:.0f} ms | median "
            f"{statistics.median(state.latencies):.0f} ms over {len(state.latencies)} frames | {rate:.1f} frames/s served")
    return np.ascontiguousarray(drawn), text, state


# ---------------------------------------------------------------------------- the page

CSS = """
.fs-face { margin: 0 0 10px 0; }
.fs-row { display: flex; align-items: center; gap: 6px; font-size: 13px; }
.fs-name { width: 90px; }
.fs-bar { flex: 1; background: #eee; height: 10px; border-radius: 3px; overflow: hidden; }
.fs-bar span { display: block; height: 10px; background: #2a7ab0; }
.fs-value { width: 52px; text-align: right; font-variant-numeric: tabular-nums; }
.fs-note { font-style: italic; }
"""
# Gradio's webcam shows nothing when the camera cannot be opened: this wraps the browser's
# getUserMedia so that a denied or absent camera gets a sentence in #camera-status.
CAMERA_JS = """
() => {
  const status = (text) => {
    const el = document.querySelector('#camera-status');
    if (el) { el.textContent = text; el.style.display = text ? 'block' : 'none'; }
  };
  const md = navigator.mediaDevices;
  if (!md || !md.getUserMedia) {
    document.addEventListener('click', (e) => {
      if (e.target.closest && e.target.closest('#camera')) status('This page gets no camera from the browser (it needs https or localhost).');
    }, true);
    return;
  }
  const open = md.getUserMedia.bind(md);
  md.getUserMedia = async (constraints) => {
    try {
      const stream = await open(constraints);
      status('');
      return stream;
    } catch (e) {
      if (e.name === 'NotAllowedError' || e.name === 'SecurityError') {
        status('Camera access was denied: allow the camera for this page in the browser, then reload.');
      } else if (e.name === 'NotFoundError' || e.name === 'OverconstrainedError' || e.name === 'NotReadableError') {
        status('No usable camera was found: connect one (or close the program using it), then reload. The photo tab works without one.');
      } else {
        status('The camera cannot be opened (' + e.name + ': ' + e.message + ').');
      }
      throw e;
    }
  };
}
"""
CAMERA_HELP = (
    "Press the camera button to start. If the browser reports no camera, or you denied access, "
    "allow the camera for this page in the browser's site settings (or plug one in) and reload; "
    "the photo tab works without one."
)


def build_app(models: Models):
    """The Gradio Blocks app over `models` (not launched)."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home, before gradio loads
    import gradio as gr

    def guarded(handler):
        """Our errors become a message on the page (and an error for an API client); the
        server keeps serving."""
        @functools.wraps(handler)
        def run(*args):
            try:
                return handler(*args)
            except FersearchError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        return run

    @guarded
    def classify(model: str, image: str):
        return classify_photo(models, model, image)

    @guarded
    def live(model: str, frame: np.ndarray, state: LiveState | None, landmarks: bool = False):
        return live_frame(models, model, frame, state, landmarks)

    # System fonts only: the page must load offline, and one that waits for a web font never does.
    theme = gr.themes.Base(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    choices = [(c.label, c.key) for c in models.choices.values()]
    with gr.Blocks(title="fersearch", analytics_enabled=False) as demo:
        gr.Markdown("# fersearch: facial expressions")
        if not choices:
            gr.Markdown(NO_MODEL, elem_id="no-model")
        picker = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Model", elem_id="model")
        with gr.Tab("Photo", elem_id="photo-tab"):
            with gr.Row():
                upload = gr.File(label="Image (upload or drop)", file_types=["image"], type="filepath", elem_id="upload")
                shown = gr.AnnotatedImage(label="Faces", elem_id="faces")
            bars = gr.HTML(elem_id="bars")
            details = gr.JSON(label="Result", elem_id="result")
            upload.upload(classify, [picker, upload],
                          [shown, bars, details], api_name="classify", concurrency_limit=1, concurrency_id="model")
        with gr.Tab("Live", elem_id="live-tab"):
            gr.Markdown(CAMERA_HELP)
            gr.HTML('<div id="camera-status" role="alert" style="display:none; color:#b00020; font-weight:600"></div>')
            state = gr.State(None)
            with gr.Row():
                camera = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Camera", elem_id="camera")
                labelled = gr.Image(label="Labelled", elem_id="labelled", format="jpeg")
            landmarks = gr.Checkbox(False, label="Show the eye landmarks the face detector found", elem_id="landmarks")
            latency = gr.Markdown(elem_id="latency")
            camera.stream(live, [picker, camera, state, landmarks],
                          [labelled, latency, state], stream_every=STREAM_EVERY, time_limit=STREAM_TIME_LIMIT,
                          concurrency_limit=1, api_name="live", show_progress="hidden")
    return demo, theme


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def serve(mlruns: Path, bundles: list[Path], host: str = SERVE_HOST, port: int = APP_PORT, block: bool = True,
          detector: str = DEFAULT_DETECTOR):
    """Build and launch the app; returns the Gradio app (running in a thread when not `block`).
    Blocking, it ends on Ctrl-C or SIGTERM and removes its folder of downloaded models."""
    models = Models(find_models(mlruns, bundles), mlruns, detector)
    demo, theme = build_app(models)
    demo.queue(default_concurrency_limit=1)
    if block:  # SIGTERM (a service manager, kill) ends it as Ctrl-C does: cleanly
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, show_error=True,
                    theme=theme, css=CSS, js=CAMERA_JS, footer_links=["api"], ssr_mode=False, max_file_size=MAX_UPLOAD_BYTES)
    except KeyboardInterrupt:
        pass
    finally:
        if block:
            demo.close()
            models.close()
    return demo
