"""The web app (issue 12), as a user runs it: `fersearch app` in its own process on a loopback
port, asked through `gradio_client` and driven in headless Chromium (Debian's package, through
Playwright), with Chromium's fake camera fed a real face.

Screenshots and the live-mode figures are written to FERSEARCH_TEST_ARTIFACTS (default
`.test-artifacts/` in the project).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fersearch.cli import main
from fersearch.data import EMOTIONS
from tests.helpers import free_port, listening

gradio_client = pytest.importorskip("gradio_client", reason="the app extra is not installed (pip install -e '.[app]')")
pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")

from fersearch.app import NO_MODEL, SMOOTH_FRAMES, LiveState, Models, build_app, find_models, smooth  # noqa: E402

ARTIFACTS = Path(os.environ.get("FERSEARCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / ".test-artifacts"))


def _astronaut() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def app_models(smoke_search, synthetic_dir, tmp_path_factory):
    """A store with an export and its registered version (a copy of the smoke search's, so the
    registry of the shared one is untouched), the seed CNN trained by hand, and two bad bundles."""
    _, mlruns, _ = smoke_search
    root = tmp_path_factory.mktemp("app")
    store = root / "mlruns"
    shutil.copytree(mlruns, store, ignore=shutil.ignore_patterns("exports", "reports"))
    assert main(["export", "--model", "cnn", "--search", "smoke", "--mlruns", str(store),
                 "--out", str(store / "exports" / "cnn-smoke")]) == 0
    seed = root / "seed-cnn"  # the default config is the seed report's Net
    assert main(["train", "--model", "cnn", "--data", str(synthetic_dir), "--epochs", "1", "--smoke", "--out", str(seed)]) == 0
    broken = root / "broken"
    shutil.copytree(seed, broken)
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    other = root / "other-task"
    shutil.copytree(seed, other)
    payload = torch.load(other / "model.pt", weights_only=True)
    payload["classes"] = ["cat", "dog", "bird", "fish", "frog", "horse", "ship", "truck"]
    torch.save(payload, other / "model.pt")
    return {"store": store, "seed": seed, "broken": broken, "other": other}


@pytest.fixture(scope="module")
def app_url(app_models):
    """`fersearch app` in a process of its own; ended (killed if need be) after the module."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "fersearch", "app", "--mlruns", str(app_models["store"]), "--port", str(port)]
    for name in ("seed", "broken", "other"):
        command += ["--bundle", str(app_models[name])]
    log = open(app_models["store"].parent / "app.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError("the app exited: " + (app_models["store"].parent / "app.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError("the app did not answer within 180 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(app_url):
    return gradio_client.Client(app_url, verbose=False)


def _key(kind: str, folder: Path) -> str:
    return f"{kind}:{Path(folder).resolve()}"


def _classify(client, model: str, path: Path):
    return client.predict(model, gradio_client.handle_file(str(path)), api_name="/classify")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(_astronaut()).save(path)
    return path


def test_the_picker_lists_exports_bundles_and_registered_versions_with_test_accuracy(app_models):
    choices = find_models(app_models["store"], [app_models["seed"]])
    kinds = [c.kind for c in choices]
    # The store is a copy of the session's smoke store: when test_export ran first, the copy
    # already holds its registered version too, so the fixture's export registered the next one.
    assert kinds[:2] == ["export", "bundle"] and kinds[2:] and set(kinds[2:]) == {"registry"}
    registered = json.loads((app_models["store"] / "exports" / "cnn-smoke" / "source.json").read_text())["registered"]
    name, version = registered.split(" v")
    mine = next(c for c in choices[2:] if c.location == f"{name}/{version}")
    export = json.loads((app_models["store"] / "exports" / "cnn-smoke" / "metrics.json").read_text())
    assert f"test accuracy {export['test']['accuracy']:.2%}" in choices[0].label
    seed = json.loads((app_models["seed"] / "metrics.json").read_text())
    assert f"test accuracy {seed['test']['accuracy']:.2%}" in choices[1].label
    assert name == "fersearch-cnn" and "test accuracy" in mine.label
    # A model is loaded once per selection and then kept.
    models = Models(choices, app_models["store"])
    assert models.get(choices[1].key) is models.get(choices[1].key)
    # Without any model, the page says how to make one instead of failing.
    demo, _ = build_app(Models([], app_models["store"]))
    assert NO_MODEL in json.dumps(demo.config, default=str)


def test_live_labels_are_averaged_per_face_over_the_last_frames():
    state = LiveState()
    a, b = np.array([[0.7, 0.3]]), np.array([[0.2, 0.8]])
    box = (100, 100, 80, 80)
    assert np.allclose(smooth(state, [box], a), a)
    # The same face, moved a little: averaged with its previous frame.
    assert np.allclose(smooth(state, [(104, 98, 80, 80)], b), (a + b) / 2)
    # Only the last SMOOTH_FRAMES frames count.
    for _ in range(SMOOTH_FRAMES):
        out = smooth(state, [box], b)
    assert np.allclose(out, b)
    # A second face far away starts its own history; the first keeps its own.
    out = smooth(state, [box, (400, 50, 60, 60)], np.vstack([a, a]))
    assert np.allclose(out[1], a[0]) and np.allclose(out[0], (a[0] + (SMOOTH_FRAMES - 1) * b[0]) / SMOOTH_FRAMES)
    # A frame without faces forgets them.
    smooth(state, [], np.zeros((0, 2)))
    assert np.allclose(smooth(state, [box], b), b)


def test_a_photo_with_a_face_gets_a_box_and_a_label(client, app_models, photo):
    annotated, bars, result = _classify(client, _key("bundle", app_models["seed"]), photo)
    assert not result["whole_image"] and len(result["faces"]) >= 1
    face = result["faces"][0]
    x, y, w, h = face["box"]
    # The astronaut's face: skimage's image has it around x 170-280, y 60-170.
    assert 150 <= x <= 200 and 40 <= y <= 100 and 70 <= w <= 130
    assert face["label"] in EMOTIONS and set(face["probabilities"]) == set(EMOTIONS)
    assert face["label"] == max(face["probabilities"], key=face["probabilities"].get)
    assert abs(sum(face["probabilities"].values()) - 1) < 1e-3
    assert [a["label"] for a in annotated["annotations"]] == [f["label"] for f in result["faces"]]
    assert f'data-label="{face["label"]}"' in bars
    assert Image.open(annotated["image"]).size == (512, 512)  # the photo, with a box mask per face
    mask = np.asarray(Image.open(annotated["annotations"][0]["image"]).convert("L"))
    ys, xs = np.nonzero(mask)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_no_face_means_the_whole_image_and_the_page_says_so(client, app_models, tmp_path):
    path = tmp_path / "sky.png"
    Image.fromarray(np.full((200, 300, 3), (90, 140, 220), np.uint8)).save(path)
    _, bars, result = _classify(client, _key("bundle", app_models["seed"]), path)
    assert result["whole_image"] and result["faces"][0]["box"] == [0, 0, 300, 200]
    assert "No face found" in bars


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    text = folder / "notes.png"
    text.write_text("these are notes, not pixels")
    files["not an image"] = (text, "is not an image")
    whole = folder / "whole.png"
    Image.fromarray(_astronaut()).save(whole)
    truncated = folder / "truncated.png"
    truncated.write_bytes(whole.read_bytes()[:40_000])
    files["truncated"] = (truncated, "damaged or truncated")
    huge = folder / "huge.png"
    Image.new("L", (10_000, 6_000)).save(huge)  # 60 megapixels, 60 KB on disk
    files["huge"] = (huge, "is 10000x6000 (60 megapixels); the limit is 50 megapixels")
    gif = folder / "animated.gif"
    frames = [Image.fromarray(_astronaut()).convert("P"), Image.fromarray(_astronaut()[::-1]).convert("P")]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated"] = (gif, "is animated (2 frames)")
    cmyk = folder / "cmyk.jpg"
    Image.fromarray(_astronaut()).convert("CMYK").save(cmyk)
    files["cmyk"] = (cmyk, "is a CMYK image")
    deep = folder / "deep.png"
    Image.fromarray(np.asarray(Image.fromarray(_astronaut()).convert("L")).astype(np.uint16) * 257).save(deep)
    files["16-bit"] = (deep, "more than 8 bits")
    return files


BAD_FILES = ["not an image", "truncated", "huge", "animated", "cmyk", "16-bit"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_each_bad_file_gets_its_error_and_the_server_keeps_serving(client, app_models, photo, tmp_path, case):
    path, message = _bad_files(tmp_path)[case]
    with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)):
        _classify(client, _key("bundle", app_models["seed"]), path)
    _, _, result = _classify(client, _key("bundle", app_models["seed"]), photo)  # still serving
    assert result["faces"]


@pytest.mark.parametrize(
    ("bundle", "message"),
    [("broken", "is not a plain state dict"), ("other", "not FERPlus's emotions: it is a model for another task")],
)
def test_a_bundle_that_cannot_serve_gets_its_error(client, app_models, photo, bundle, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)):
        _classify(client, _key("bundle", app_models[bundle]), photo)
    _, _, result = _classify(client, _key("bundle", app_models["seed"]), photo)
    assert result["faces"]


def test_switching_models_changes_the_prediction_source(client, app_models, photo):
    keys = {
        "seed": _key("bundle", app_models["seed"]),
        "export": _key("export", app_models["store"] / "exports" / "cnn-smoke"),
        "registry": "registry:fersearch-cnn/1",
    }
    results = {name: _classify(client, key, photo)[2] for name, key in keys.items()}
    assert len({r["model"] for r in results.values()}) == 3
    probs = {name: r["faces"][0]["probabilities"] for name, r in results.items()}
    assert probs["seed"] != probs["export"]  # another network
    # The registered version is the exported trial: the same weights, the same probabilities.
    assert probs["registry"] == probs["export"]


# ----------------------------------------------------------------------------- in a browser


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium on this machine (Debian: apt install chromium)")
    pytest.importorskip("playwright", reason="playwright is not installed (pip install -e '.[dev]')")
    return path


def write_y4m(path: Path, rgb: np.ndarray, frames: int = 10, size: tuple[int, int] = (640, 480)) -> Path:
    """A raw YUV 4:2:0 video of `rgb` for Chromium's fake camera (which loops it)."""
    image = Image.fromarray(rgb).resize(size)
    y, cb, cr = image.convert("YCbCr").split()
    half = (size[0] // 2, size[1] // 2)
    planes = y.tobytes() + cb.resize(half).tobytes() + cr.resize(half).tobytes()
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{size[0]} H{size[1]} F10:1 Ip A1:1 C420jpeg\n".encode())
        for _ in range(frames):
            f.write(b"FRAME\n" + planes)
    return path


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url, wait_until="load")
    page.wait_for_selector("#upload", timeout=60_000)
    return page


def _pick(page, text: str) -> None:
    """Choose the model whose label contains `text` in the picker."""
    box = page.locator("#model input")
    box.click()
    box.fill(text)
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    page.wait_for_function(f"() => document.querySelector('#model input').value.includes({json.dumps(text)})")


def _start_camera(page) -> None:
    page.get_by_role("tab", name="Live").click()
    page.get_by_text("Click to Access Webcam").click()


@pytest.mark.slow
def test_in_chromium_photo_and_live_camera(app_url, app_models, photo, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    face = _astronaut()[0:400, 56:456]  # the face fills the camera's frame
    video = write_y4m(tmp_path / "face.y4m", face)
    camera_flags = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                    f"--use-file-for-fake-video-capture={video}"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=camera_flags)
        try:
            page = _open(browser, app_url)
            _pick(page, "seed-cnn")
            # Photo tab: upload, then read the labels from the page.
            page.locator("#upload input[type=file]").set_input_files(str(photo))
            page.wait_for_selector("#bars .fs-label", timeout=120_000)
            labels = page.locator("#bars .fs-label").all_inner_texts()
            assert labels and all(label in EMOTIONS for label in labels)
            page.screenshot(path=str(ARTIFACTS / "app-photo.png"), full_page=True)
            # Live tab: the fake camera's face comes back with a labelled box.
            _start_camera(page)
            page.get_by_role("button", name="capture photo").click()
            page.wait_for_function(
                "() => /\\b[1-9]\\d* face\\(s\\)/.test(document.querySelector('#latency')?.innerText || '')",
                timeout=120_000,
            )
            samples = []
            end = time.time() + 12
            while time.time() < end:
                samples.append(page.locator("#latency").inner_text())
                page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "app-live.png"), full_page=True)
        finally:
            browser.close()
    last = samples[-1]
    assert " face(s)" in last and not last.startswith("0 ")
    median_ms = float(last.split("median ")[1].split(" ms")[0])
    served = float(last.split("| ")[-1].split(" frames/s")[0])
    figures = {"frames_per_second_served": served, "median_latency_ms": median_ms,
               "frames_in_window": int(last.split(" over ")[1].split(" frames")[0]),
               "model": "seed CNN (fersearch train --smoke, 1 epoch)", "camera": "640x480 Y4M, Chromium fake device"}
    (ARTIFACTS / "app-live.json").write_text(json.dumps(figures, indent=2))  # README's live figures: the browser's view
    # The stream ran for the 12 s sampled (at least a frame a second answered) ...
    assert figures["frames_in_window"] >= 10 and served >= 1.0, last
    # ... and frames are not queued: the rate served never exceeds the rate the browser sends.
    from fersearch.app import STREAM_EVERY

    assert served <= 1 / STREAM_EVERY * 1.25


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--use-fake-device-for-media-stream", "--deny-permission-prompts"]],
                         ids=["absent", "denied"])
def test_in_chromium_a_missing_or_denied_camera_is_explained(app_url, flags):
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=flags)
        try:
            page = _open(browser, app_url)
            _start_camera(page)
            page.wait_for_function("() => document.querySelector('#camera-status')?.innerText.length > 0", timeout=30_000)
            text = page.locator("#camera-status").inner_text()
        finally:
            browser.close()
    expected = "No usable camera was found" if not flags else "Camera access was denied"
    assert text.startswith(expected)


def test_app_listens_on_loopback_unless_asked_and_then_warns(tmp_path, capsys):
    with socket.socket() as busy:  # a taken port: the command stops right after its checks
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", "--mlruns", str(tmp_path), "--host", "0.0.0.0", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "warning: --host 0.0.0.0 makes this server reachable from the network" in err
    assert f"cannot listen on 0.0.0.0:{port}" in err
    assert main(["app", "--mlruns", str(tmp_path), "--bundle", str(tmp_path / "nowhere"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "--bundle" in err and "is not a folder" in err and "warning" not in err


def test_the_running_app_listens_on_127_0_0_1_only(app_url):
    """By default: every socket listening on the app's port is on 127.0.0.1 (psutil)."""
    port = int(app_url.rstrip("/").rsplit(":", 1)[1])
    assert {address for address, at, _ in listening() if at == port} == {"127.0.0.1"}


def test_the_page_stays_responsive_while_a_large_photo_is_classified(client, app_url, app_models, tmp_path):
    """The page is asked for while the server classifies a 36-megapixel photo: it answers
    quickly. Deterministic: the requests start once the server reports the job as processing,
    and only answers that came back before the job finished count (a machine fast enough to
    finish first just runs the job again, up to three times)."""
    from gradio_client.utils import Status

    big = tmp_path / "big.png"
    ramp = np.linspace(0, 255, 6000, dtype=np.float32)
    Image.fromarray((ramp[None, :] * 0.5 + ramp[:, None] * 0.5).astype(np.uint8)).save(big)  # 36 megapixels
    during = []  # page answer times that ended while the classification was still running
    for _attempt in range(3):
        job = client.submit(_key("bundle", app_models["seed"]), gradio_client.handle_file(str(big)), api_name="/classify")
        deadline = time.time() + 300
        while job.status().code != Status.PROCESSING and not job.done():
            assert time.time() < deadline, "the job never started"
            time.sleep(0.02)
        while not job.done() and len(during) < 5:
            t = time.perf_counter()
            with urllib.request.urlopen(app_url, timeout=10) as response:
                assert response.status == 200
            took = time.perf_counter() - t
            if not job.done():
                during.append(took)
        assert job.result(timeout=300)[2]["size"] == [6000, 6000]
        if during:
            break
    assert during, "the classification always ended before the page answered"
    assert max(during) < 2.0, during  # the page answered while the photo was being classified
