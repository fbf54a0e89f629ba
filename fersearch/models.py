"""Model registry: `MODELS[name](config, num_classes) -> nn.Module`.

- `cnn`: a configurable conv-net family whose defaults are exactly the seed's Net
  (conv 1->6 5x5, BN, ReLU, maxpool, conv 6->16 5x5, BN, ReLU, maxpool, fc 1296-120-84-C,
  dropout after fc1 and fc2): 169,270 parameters with 10 outputs. CPU training runs its
  narrow convolutions and BN-ReLU-maxpool blocks through `fersearch.kernels`.
- `resnet18`: torchvision's ResNet-18 with a one-channel stem; ImageNet weights have their RGB
  stem filters summed into one channel (a gray image replicated to RGB gives the same response).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fersearch.config import CNNConfig, ResNetConfig, TrainConfig, config_from_dict
from fersearch.data import IMAGE_SIZE
from fersearch.errors import FersearchError
from fersearch.kernels import bn_relu_pool, conv, fusable

log = logging.getLogger(__name__)

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}


class ConvNet(nn.Module):
    """Conv blocks (conv, optional BN, activation, 2x2 max-pool) then an MLP head."""

    def __init__(self, cfg: CNNConfig, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        # Each block's (conv, bn or None, activation, pool), in the order of `features`.
        self._blocks: list[tuple[nn.Module, nn.BatchNorm2d | None, nn.Module, nn.Module]] = []
        in_ch, size = 1, IMAGE_SIZE
        pad = cfg.kernel_size // 2 if cfg.padding == "same" else 0
        for out_ch in cfg.channels:
            conv = nn.Conv2d(in_ch, out_ch, cfg.kernel_size, padding=pad)
            bn = nn.BatchNorm2d(out_ch) if cfg.batch_norm else None
            act, pool = ACTIVATIONS[cfg.activation](), nn.MaxPool2d(2)
            self._blocks.append((conv, bn, act, pool))
            layers += [m for m in (conv, bn, act, pool) if m is not None]
            size = (size + 2 * pad - cfg.kernel_size + 1) // 2
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        # Training on a CPU runs narrow convolutions and each BN-ReLU-maxpool through the
        # kernels of `fersearch.kernels` where they apply (same values and gradients, to float
        # rounding); `use_kernels = False` keeps PyTorch's layers throughout.
        # The modules and state-dict keys are those of the plain layers, which eval mode uses.
        self.use_kernels = True
        head: list[nn.Module] = [nn.Flatten()]
        width = in_ch * size * size
        for hidden in cfg.fc:
            head += [nn.Linear(width, hidden), ACTIVATIONS[cfg.activation]()]
            if cfg.dropout > 0:
                head.append(nn.Dropout(cfg.dropout))
            width = hidden
        head.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.use_kernels and self.training):
            return self.head(self.features(x))
        for layer, bn, act, pool in self._blocks:
            x = conv(x, layer)
            if bn is not None and isinstance(act, nn.ReLU) and fusable(x, bn):
                x = bn_relu_pool(x, bn)
            else:
                x = pool(act(bn(x) if bn is not None else x))
        return self.head(x)


def build_cnn(cfg: TrainConfig, num_classes: int) -> nn.Module:
    assert isinstance(cfg, CNNConfig)
    return ConvNet(cfg, num_classes)


RESNET_WEIGHTS_FILE = "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 file name


def imagenet_state_dict(path: str) -> dict[str, torch.Tensor]:
    """ImageNet ResNet-18 weights from a local file, the torch hub cache, or the network."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FersearchError(f"pretrained_path {file} does not exist")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise FersearchError(f"pretrained_path {file} is not a torch state dict ({exc})") from None
        return state.get("state_dict", state) if isinstance(state, dict) else state
    from torchvision.models import ResNet18_Weights

    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / RESNET_WEIGHTS_FILE
        raise FersearchError(
            f"ImageNet weights for resnet18 are not cached at {cache} and could not be "
            f"downloaded ({exc.__class__.__name__}); copy {RESNET_WEIGHTS_FILE} there, pass "
            "--set pretrained_path=FILE, or train from scratch with --set pretrained=false"
        ) from None


def build_resnet18(cfg: TrainConfig, num_classes: int) -> nn.Module:
    assert isinstance(cfg, ResNetConfig)
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    if cfg.pretrained:
        state = imagenet_state_dict(cfg.pretrained_path)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise FersearchError(f"pretrained weights do not fit resnet18 ({str(exc)[:200]})") from None
    rgb_stem = model.conv1.weight.detach()
    if cfg.stem == "small":
        # 3x3 stride-1 stem and no max-pool: keeps 48x48 detail (CIFAR-style); new weights.
        model.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        if cfg.pretrained:
            with torch.no_grad():
                model.conv1.weight.copy_(rgb_stem.sum(dim=1, keepdim=True))
    head = nn.Linear(model.fc.in_features, num_classes)
    model.fc = nn.Sequential(nn.Dropout(cfg.dropout), head) if cfg.dropout > 0 else head
    _freeze(model, cfg.freeze)
    return model


def _freeze(model: nn.Module, mode: str) -> None:
    """none: train all; body: train stem (conv1, bn1) and head (the seed's); all_but_head."""
    if mode == "none":
        return
    trainable = ("fc",) if mode == "all_but_head" else ("conv1", "bn1", "fc")
    for name, param in model.named_parameters():
        param.requires_grad = name.split(".")[0] in trainable


MODELS: dict[str, Callable[[TrainConfig, int], nn.Module]] = {
    "cnn": build_cnn,
    "resnet18": build_resnet18,
}


def untrained(cfg: TrainConfig) -> TrainConfig:
    """The same architecture without fetching ImageNet weights, for when trained ones follow."""
    return config_from_dict({**cfg.to_dict(), "pretrained": False}) if cfg.model == "resnet18" else cfg


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    if cfg.model not in MODELS:
        raise FersearchError(f"unknown model {cfg.model!r} (choose from {', '.join(MODELS)})")
    return MODELS[cfg.model](cfg, num_classes)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
