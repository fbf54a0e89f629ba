"""Self-contained model bundles: write (export) and load them safely.

A bundle folder holds `model.pt` (a bare state dict), `config.yaml` (the resolved training
config plus what inference needs: classes, protocol, normalisation, input size),
`model.torchscript.pt` (runs without fersearch: float pixels 0..255, shape (N, 1, 48, 48), in;
logits out), `metrics.json`, `confusion_matrix.png` and `source.json` (where it came from).
Loading never unpickles arbitrary objects (`weights_only=True`), and a bundle that does not
match what the caller expects (model, classes, protocol) is refused with a clear message.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from fersearch.config import IMAGE_SIZE, TrainConfig, config_from_dict
from fersearch.engine import Normalize
from fersearch.errors import FersearchError
from fersearch.models import build_model, untrained
from fersearch.outputs import staged_dir
from fersearch.run_files import (
    CONFIG_FILE,
    METRICS_FILE,
    SOURCE_FILE,
    TORCHSCRIPT_FILE,
    WEIGHTS_FILE,
)

BUNDLE_FILES = (WEIGHTS_FILE, CONFIG_FILE, TORCHSCRIPT_FILE, METRICS_FILE, SOURCE_FILE)


class PixelModel(nn.Module):
    """The network with its normalisation folded in: raw 0..255 grayscale pixels -> logits."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean * 255.0))
        self.register_buffer("scale", torch.tensor(1.0 / (std * 255.0)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.mean) * self.scale)


@dataclass
class Bundle:
    path: Path
    cfg: TrainConfig
    classes: tuple[str, ...]
    mean: float
    std: float
    model: nn.Module
    meta: dict[str, Any]

    @property
    def normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)

    @property
    def protocol(self) -> str:
        return self.cfg.protocol


def gray_of(image: np.ndarray) -> np.ndarray:
    """A BGR (OpenCV's order) or grayscale uint8 image as grayscale, with PIL's ITU-R 601-2
    luma: the conversion `evaluate` gets from decoding a colour file straight to grayscale."""
    if image.ndim == 2:
        return image
    rgb = np.ascontiguousarray(image[..., 2::-1])  # BGR(A) -> RGB
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))


# The filter of the one resize of inference. PIL's filters widen to cover every source pixel
# when they shrink (no point samples); Lanczos keeps the most of a face's detail: FERPlus test
# faces scaled up and cut out again exactly where they were pasted keep the model's label on
# 94-95% with it, 91-92% with bilinear (bench/face_pipeline.py's ceiling line).
RESIZE_FILTER = Image.Resampling.LANCZOS


def face_pixels(gray: np.ndarray, resample: Image.Resampling = RESIZE_FILTER) -> np.ndarray:
    """A grayscale face of any size -> the model's 48x48 uint8 input. The one resize of inference
    (evaluate, predict, the app), with RESIZE_FILTER (`resample`: the benchmark compares others)."""
    if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return np.ascontiguousarray(gray, dtype=np.uint8)
    resized = Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8), "L").resize((IMAGE_SIZE, IMAGE_SIZE), resample)
    return np.asarray(resized)


def rebuild(cfg: TrainConfig, num_classes: int, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """The architecture of `cfg` with trained weights `state` (no ImageNet download)."""
    net = build_model(untrained(cfg), num_classes)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise FersearchError(
            f"{where} does not fit its config ({cfg.model}, {num_classes} classes): {str(exc).splitlines()[0]}"
        ) from None
    return net


def bundle_config(cfg: TrainConfig, classes, mean: float, std: float) -> dict[str, Any]:
    return {
        "model": cfg.to_dict(),
        "classes": list(classes),
        "protocol": cfg.protocol,
        "normalize": {"mean": float(mean), "std": float(std)},
        "input": {"channels": 1, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "pixels": "grayscale 0..255"},
    }


def write_bundle(
    out: Path,
    cfg: TrainConfig,
    net: nn.Module,
    classes,
    mean: float,
    std: float,
    metrics: dict[str, Any],
    source: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Build the bundle in a temp folder beside `out`, then move it into place."""
    out = Path(out).resolve()
    with staged_dir(out) as staging:
        net = net.cpu().eval()
        torch.save(net.state_dict(), staging / WEIGHTS_FILE)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(bundle_config(cfg, classes, mean, std), sort_keys=False))
        example = torch.full((2, 1, IMAGE_SIZE, IMAGE_SIZE), 128.0)
        pixel_model = PixelModel(net, mean, std).eval()
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is the bundle's promised format (plain torch.jit.load, no fersearch);
            # torch 2.14 marks tracing deprecated in favour of torch.export, which has no such
            # loader: the notice is not for the user of `fersearch export`.
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.")
            scripted = torch.jit.trace(pixel_model, example)
            # The traced file must compute what the model does, on images unlike the example.
            probe = torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 255
            if not torch.allclose(scripted(probe), pixel_model(probe), atol=1e-4, rtol=1e-4):
                raise FersearchError("the TorchScript trace of this model does not reproduce it; the bundle was not written")
        scripted.save(str(staging / TORCHSCRIPT_FILE))
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=float))
        (staging / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        for name, file in (extra_files or {}).items():
            shutil.copy(file, staging / name)
    return out


def load_bundle(
    path: str | Path,
    *,
    model: str | None = None,
    classes: tuple[str, ...] | None = None,
    protocol: str | None = None,
    device: str | torch.device = "cpu",
) -> Bundle:
    """Rebuild the network from `config.yaml` + `model.pt`, refusing any mismatch.

    Also reads the `--out` folder of `fersearch train` (its `model.pt` carries the config,
    classes and normalisation beside the weights), so a hand-trained model is usable as is.
    """
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise FersearchError(f"bundle {path} does not exist (expected a folder made by fersearch export or train)")
    if not path.is_dir():
        raise FersearchError(f"bundle {path} is a file; pass the folder made by fersearch export or train")
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (path / name).is_file()]
    if missing:
        raise FersearchError(f"{path} is not a fersearch bundle: missing {', '.join(missing)}")
    doc = _read_yaml(path / CONFIG_FILE)
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict):
        try:
            cfg = config_from_dict(doc["model"])
            bundle_classes = tuple(doc["classes"])
            mean, std = float(doc["normalize"]["mean"]), float(doc["normalize"]["std"])
        except FersearchError as exc:
            raise FersearchError(f"{path}/config.yaml: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise FersearchError(f"{path}/config.yaml is not a valid bundle config (bad or missing {exc})") from None
        state = _load_weights(path / WEIGHTS_FILE)
    elif isinstance(doc, dict) and isinstance(doc.get("model"), str):
        cfg, bundle_classes, mean, std, state = _train_output(path)
    else:
        raise FersearchError(
            f"{path}/config.yaml is neither a bundle's config nor a fersearch train config "
            "(pass a folder made by fersearch export or fersearch train)"
        )
    if model and cfg.model != model:
        raise FersearchError(f"bundle {path} holds a {cfg.model} model, not {model}")
    if classes and tuple(classes) != bundle_classes:
        raise FersearchError(f"bundle {path} predicts {len(bundle_classes)} classes, expected {len(classes)}")
    if protocol and cfg.protocol != protocol:
        raise FersearchError(f"bundle {path} was trained under protocol {cfg.protocol}, not {protocol}")
    net = rebuild(cfg, len(bundle_classes), state, f"{path}/model.pt")
    meta = _read_json(path / SOURCE_FILE) if (path / SOURCE_FILE).is_file() else {}
    return Bundle(path, cfg, bundle_classes, mean, std, net.to(device).eval(), meta)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise FersearchError(f"{path} is not valid YAML ({where}{exc.problem})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise FersearchError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FersearchError(f"{path} is not valid JSON ({exc})") from None
    return doc if isinstance(doc, dict) else {}


def _load_weights(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        raise FersearchError(f"{path} is not a plain state dict ({str(exc).splitlines()[0]})") from None


def _train_output(path: Path) -> tuple[TrainConfig, tuple[str, ...], float, float, dict[str, torch.Tensor]]:
    """The model of a `fersearch train --out` folder: everything is in its `model.pt` payload."""
    payload = _load_weights(path / WEIGHTS_FILE)
    try:
        cfg = config_from_dict(payload["config"])
        classes = tuple(payload["classes"])
        mean, std = float(payload["normalize"]["mean"]), float(payload["normalize"]["std"])
        state = payload["state_dict"]
    except FersearchError as exc:
        raise FersearchError(f"{path}/model.pt: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise FersearchError(
            f"{path} is not a bundle: its model.pt is not a fersearch train output (bad or missing {exc})"
        ) from None
    return cfg, classes, mean, std, state
