"""Model registry: `MODELS[name](config, num_classes) -> nn.Module`.

- `cnn`: a configurable conv-net family whose defaults are exactly the seed's Net
  (conv 1->6 5x5, BN, ReLU, maxpool, conv 6->16 5x5, BN, ReLU, maxpool, fc 1296-120-84-C,
  dropout after fc1 and fc2): 169,270 parameters with 10 outputs. Its axes also express
  VGG-style stages (several convolutions per stage, dropout between stages), residual
  stages, depthwise-separable convolutions and a global-average-pooling head. CPU training
  runs its narrow convolutions and BN-ReLU-maxpool blocks through `fersearch.kernels`.
- `resnet18`: torchvision's ResNet-18 with a one-channel stem; ImageNet weights have their RGB
  stem filters summed into one channel (a gray image replicated to RGB gives the same response).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fersearch.config import (
    IMAGE_SIZE,
    CNNConfig,
    ResNetConfig,
    TrainConfig,
    config_from_dict,
    conv_padding,
)
from fersearch.errors import FersearchError
from fersearch.kernels import bn_relu_pool, bn_relu_pool_applies, conv

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


def _conv(cfg: CNNConfig, in_ch: int, out_ch: int, first: bool) -> list[nn.Module]:
    """One convolution of the family: standard, or depthwise + 1x1 pointwise (separable).

    The network's first convolution is always standard: a depthwise filter over one gray
    channel would be a single k x k filter feeding a 1x1 mix (a rank-one stem).
    """
    pad = conv_padding(cfg.kernel_size, cfg.padding)
    if cfg.conv_type == "separable" and not first:
        return [
            nn.Conv2d(in_ch, in_ch, cfg.kernel_size, padding=pad, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1),
        ]
    return [nn.Conv2d(in_ch, out_ch, cfg.kernel_size, padding=pad)]


def _conv_bn_act(cfg: CNNConfig, in_ch: int, out_ch: int, first: bool, act: bool = True) -> list[nn.Module]:
    layers = _conv(cfg, in_ch, out_ch, first)
    if cfg.batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    if act:
        layers.append(ACTIVATIONS[cfg.activation]())
    return layers


class ResidualStage(nn.Module):
    """`convs` conv-BN-activation layers whose output is added to the stage's input.

    The last layer's activation follows the sum (as in ResNet); a 1x1 convolution (with BN)
    projects the input when the width changes.
    """

    def __init__(self, cfg: CNNConfig, in_ch: int, out_ch: int, convs: int, first: bool) -> None:
        super().__init__()
        body: list[nn.Module] = []
        for i in range(convs):
            last = i == convs - 1
            body += _conv_bn_act(cfg, in_ch if i == 0 else out_ch, out_ch, first and i == 0, act=not last)
        self.body = nn.Sequential(*body)
        shortcut: list[nn.Module] = []
        if in_ch != out_ch:
            shortcut.append(nn.Conv2d(in_ch, out_ch, 1, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                shortcut.append(nn.BatchNorm2d(out_ch))
        self.shortcut = nn.Sequential(*shortcut)  # empty: identity
        self.act = ACTIVATIONS[cfg.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ConvNet(nn.Module):
    """Stages (convolutions, optional BN, activation, 2x2 max-pool, dropout), then a head.

    `features` is one flat sequence, so the seed's Net keeps its layer names (`features.0` is
    its first conv); a residual stage is one module in it.
    """

    def __init__(self, cfg: CNNConfig, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 1
        for stage, (out_ch, convs) in enumerate(zip(cfg.channels, cfg.stage_convs, strict=True)):
            if cfg.block == "residual":
                layers.append(ResidualStage(cfg, in_ch, out_ch, convs, first=stage == 0))
            else:
                for i in range(convs):
                    layers += _conv_bn_act(cfg, in_ch if i == 0 else out_ch, out_ch, first=stage == 0 and i == 0)
            layers.append(nn.MaxPool2d(2))
            if cfg.stage_dropout > 0:
                layers.append(nn.Dropout(cfg.stage_dropout))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        # Training on a CPU runs narrow convolutions and each BN-ReLU-maxpool through the
        # kernels of `fersearch.kernels` where they apply (same values and gradients, to float
        # rounding); `use_kernels = False` keeps PyTorch's layers throughout.
        # The modules and state-dict keys are those of the plain layers, which eval mode uses.
        self.use_kernels = True
        self._plan = _kernel_plan(list(self.features))
        head: list[nn.Module] = []
        if cfg.head == "gap":
            head += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            width = in_ch
        else:
            head.append(nn.Flatten())
            width = in_ch * cfg.feature_size**2
        for hidden in cfg.fc:
            head += [nn.Linear(width, hidden), ACTIVATIONS[cfg.activation]()]
            if cfg.dropout > 0:
                head.append(nn.Dropout(cfg.dropout))
            width = hidden
        if not cfg.fc and cfg.dropout > 0:  # no hidden layer: dropout before the classifier
            head.append(nn.Dropout(cfg.dropout))
        head.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.use_kernels and self.training):
            return self.head(self.features(x))
        for step in self._plan:
            if isinstance(step, nn.Conv2d):
                x = conv(x, step)
            elif isinstance(step, tuple):
                bn, act, pool = step
                x = bn_relu_pool(x, bn) if bn_relu_pool_applies(x, bn) else pool(act(bn(x)))
            else:
                x = step(x)
        return self.head(x)


def _kernel_plan(layers: list[nn.Module]) -> list[nn.Module | tuple[nn.Module, nn.Module, nn.Module]]:
    """The training path through `fersearch.kernels`: ungrouped convolutions go through
    `kernels.conv`, each BN-ReLU-maxpool run is one (bn, relu, pool) step, the rest as they are."""
    plan: list[nn.Module | tuple[nn.Module, nn.Module, nn.Module]] = []
    i = 0
    while i < len(layers):
        run = layers[i : i + 3]
        if (
            len(run) == 3
            and isinstance(run[0], nn.BatchNorm2d)
            and type(run[1]) is nn.ReLU
            and isinstance(run[2], nn.MaxPool2d)
        ):
            plan.append((run[0], run[1], run[2]))
            i += 3
            continue
        plan.append(layers[i])  # kernels.conv runs grouped convolutions through the layer itself
        i += 1
    return plan


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


def training_flops(model: nn.Module) -> int:
    """FLOPs of one training step per sample (forward and backward), by PyTorch's counter.

    `torch.utils.flop_counter` counts matrix products and convolutions (2 FLOPs per
    multiply-add), the work that dominates; element-wise ops (BN, activations) are not counted.
    Measured on a copy through PyTorch's own layers, on a batch of two 48x48 faces.
    """
    from torch.utils.flop_counter import FlopCounterMode

    probe = copy.deepcopy(model).float().cpu().train()
    if hasattr(probe, "use_kernels"):
        probe.use_kernels = False
    x = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    # Dropout draws from the global RNG: counting must not change the run it is part of.
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        probe(x).sum().backward()
    return int(counter.get_total_flops()) // 2
