"""Training configuration: names and numbers, validated in one place.

A run is described by one flat, frozen dataclass per model (`CNNConfig`, `ResNetConfig`), so
that the same keys appear in `--set key=value`, in `search_spaces/*.yaml`, in `config.yaml` and
as MLflow params. Everything here is plain data; the modules that build objects (models, engine,
data) map these names to classes, and a test checks both sides agree.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fersearch.errors import FersearchError

IMAGE_SIZE = 48  # FER2013's faces: 48x48 grayscale, the input side of every model


def conv_padding(kernel_size: int, padding: str) -> int:
    """Zero padding on each side of a stride-1 convolution: k // 2 for `same`, 0 for `valid`."""
    return kernel_size // 2 if padding == "same" else 0


def conv_output_side(side: int, kernel_size: int, padding: str) -> int:
    """Side of a stride-1 convolution's output. `same` keeps the side for an odd kernel and
    adds one for an even kernel (k // 2 on each side is one more than k - 1 needs)."""
    return side + 2 * conv_padding(kernel_size, padding) - kernel_size + 1

# Names accepted by each categorical key; the objects behind them live in the building modules.
PROTOCOLS = ("ferplus8", "seed10")
LABEL_MODES = ("majority", "probability", "crossentropy", "multi_target", "pld")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "exponential", "plateau", "cosine", "onecycle", "wsd")
MIXING = ("auto", "none", "mixup", "cutmix")
CLASS_BALANCE = ("none", "loss", "sampler")
TTA = ("none", "flip", "tencrop")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh")
PADDINGS = ("valid", "same")
BLOCKS = ("plain", "residual")
CONV_TYPES = ("standard", "separable")
HEADS = ("flatten", "gap")
FREEZE = ("none", "body", "all_but_head")
STEMS = ("imagenet", "small")

# Named recipes a search space's points may refer to by name (`modern: modern`), so that one
# recipe has one definition however many spaces run it. `modern` is the documented strong CNN
# recipe: the hand-set three-block CNN (82.56% ferplus8 test in README's first studies).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "cnn": {
        "modern": {
            "channels": "32,64,128", "padding": "same", "kernel_size": 3, "fc": "256", "dropout": 0.3,
            "lr": 0.05, "nesterov": True, "scheduler": "onecycle", "weight_decay": 5e-4, "batch_size": 64,
            "shift": 0.05, "rotation": 10.0, "scale": 0.1, "tta": "flip",
        },
    },
}

# Multi-fidelity defaults of `fersearch search`. A trial reports REPORTS_PER_EPOCH times an
# epoch; ASHA's time is the epochs a trial has seen (fractional). Its first rung (the grace
# period) comes at the report nearest SEARCH_FIRST_RUNG_FACES training faces, whatever the data
# (first_rung): on FERPlus (28,558 faces) a quarter epoch, seconds to a minute on a CPU, so with a
# quarter kept at each rung the rungs are 0.25, 1, 4 and 16 of 24 epochs; on the 6,000-face
# synthetic set one epoch. While a time-budgeted search explores, no trial trains past the
# highest rung at or below EXPLORE_SHARE of the budget (4 of 24 epochs): the finishing phase
# trains the best ones from there to the full budget (scheduler.py says why). Between epochs a
# trial is judged on a fixed stratified subset of JUDGE_IMAGES validation images; every epoch
# ends with the whole validation set.
SEARCH_TRIALS = 60
SEARCH_TRIALS_WITH_BUDGET = 2000  # --time-budget without --trials: the budget ends the search
SEARCH_MAX_EPOCHS = 24
# How many faces a configuration trains on before its first judgement. Measured: on FERPlus the
# quarter-epoch rung (7,100 faces) ranks configurations as the 1-epoch rung does (Spearman
# +0.63 to +0.90 in the 2-hour studies); on the synthetic set, after 1,500 faces no random
# configuration of the default space scored above the majority class, after 6,000 a third did.
SEARCH_FIRST_RUNG_FACES = 6000
SEARCH_REDUCTION_FACTOR = 4
EXPLORE_SHARE = 0.25
REPORTS_PER_EPOCH = 4
JUDGE_IMAGES = 1024
# What a stored result's reports mean (Optuna study attr, MLflow config key): intermediate values
# of two studies compare only when reported at the same points of training, on the same subset.
FIDELITY = f"{REPORTS_PER_EPOCH} reports/epoch, subset {JUDGE_IMAGES}, wsd-ema-warmup, cooled at the capped rung"
# Hyperparameters added after results were first stored, each with the value at which training
# is exactly what it was before the parameter existed (the augmentation is skipped, no random
# number is drawn): tracking.config_key leaves a parameter out at that value, so a result stored
# by an earlier version is still found (a known point is not trained again). A new parameter
# whose default changes training does not belong here.
KEY_NEUTRAL: dict[str, Any] = {"resample": 0.0}
SEARCH_CPUS_PER_TRIAL = 1.0  # one 1-thread trial per core: ~1.2x the samples/s of 2 threads


def first_rung(train_faces: int, max_epochs: float, factor: float) -> float:
    """ASHA's grace period in epochs when --grace-period is not given: the report nearest
    SEARCH_FIRST_RUNG_FACES faces into training, at least the first report, and no later than
    the last report at or below max_epochs / factor, so the search keeps at least one rung."""
    wanted = round(SEARCH_FIRST_RUNG_FACES * REPORTS_PER_EPOCH / max(1, train_faces))
    latest = math.floor(max_epochs / factor * REPORTS_PER_EPOCH + 1e-9)
    return max(1, min(wanted, latest)) / REPORTS_PER_EPOCH


def asha_rungs(grace: float, factor: float, max_epochs: float) -> list[float]:
    """ASHA's rungs in epochs, ascending, as Ray's bracket places them: grace * factor^k below
    the budget (none when the grace period is the whole budget or more)."""
    out, rung = [], grace
    while rung < max_epochs * (1 - 1e-9):
        out.append(rung)
        rung *= factor
    return out


def explore_cap(rungs: Sequence[float], max_epochs: float) -> int:
    """The index of the highest rung a time-budgeted search explores to: the highest at or
    below EXPLORE_SHARE of the budget (the first rung when none is)."""
    return max(0, sum(r <= max_epochs * EXPLORE_SHARE + 1e-9 for r in rungs) - 1)


def explore_cap_epochs(grace: float, factor: float, max_epochs: float) -> float | None:
    """The capped rung of a time-budgeted search in epochs (None when there are no rungs)."""
    rungs = asha_rungs(grace, factor, max_epochs)
    return rungs[explore_cap(rungs, max_epochs)] if rungs else None


def rungs_passed(epochs_seen: float, rungs: Sequence[float]) -> int:
    """How many of ASHA's rungs (in epochs) a trial that has seen `epochs_seen` has reached
    (float sums of quarter epochs may land a hair below a rung: they count as reaching it)."""
    return sum(epochs_seen >= r - 1e-9 for r in rungs)

# MLflow's HTTP client, unless the user sets these: a tracking server that is down must not
# stall a command for minutes per call (MLflow's default: 7 retries, backoff factor 2). A
# search logs a failed call as one warning; its Ray results keep what it carried (fersearch sync).
MLFLOW_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # MLflow's download bars (tqdm) are not for a terminal that shows only fersearch's lines.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# The hosts that mean this machine only (a server bound there, a Ray address on loopback).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Where `fersearch ui` and `fersearch app` listen unless told otherwise (this machine only).
SERVE_HOST = "127.0.0.1"
UI_PORT = 5000
APP_PORT = 7860


def bound_mlflow_http() -> None:
    """MLflow's HTTP retries bounded and its progress bars off (MLFLOW_HTTP_DEFAULTS); the
    user's settings win."""
    import os

    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)

CHOICES: dict[str, tuple[str, ...]] = {
    "protocol": PROTOCOLS,
    "label_mode": LABEL_MODES,
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULERS,
    "class_balance": CLASS_BALANCE,
    "tta": TTA,
    "activation": ACTIVATIONS,
    "padding": PADDINGS,
    "block": BLOCKS,
    "conv_type": CONV_TYPES,
    "head": HEADS,
    "freeze": FREEZE,
    "stem": STEMS,
    "mixing": MIXING,
}

# (low, high, low_inclusive, high_inclusive); None means unbounded on that side.
BOUNDS: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "epochs": (1, None, True, True),
    "batch_size": (1, 65536, True, True),
    "lr": (0.0, 10.0, False, True),
    "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, 1.0, True, True),
    "gamma": (0.0, 1.0, False, True),
    "plateau_factor": (0.0, 1.0, False, False),
    "plateau_patience": (0, None, True, True),
    "onecycle_pct": (0.0, 1.0, False, False),
    "label_smoothing": (0.0, 1.0, True, False),
    "shift": (0.0, 0.5, True, True),
    "scale": (0.0, 0.5, True, True),
    "rotation": (0.0, 180.0, True, True),
    "crop_padding": (0, 24, True, True),
    "erasing": (0.0, 1.0, True, True),
    "erasing_scale": (0.0, 1.0, False, True),
    "resample": (0.0, 1.0, True, True),
    "dropout": (0.0, 1.0, True, False),
    "stage_dropout": (0.0, 1.0, True, False),
    "mixup_alpha": (0.0, 10.0, True, True),
    "cutmix_alpha": (0.0, 10.0, True, True),
    "mix_prob": (0.0, 1.0, True, True),
    "ema_decay": (0.0, 1.0, True, False),
    "warmup_epochs": (0, 100, True, True),
    "decay_fraction": (0.0, 1.0, False, True),
    "kernel_size": (1, 15, True, True),
    "seed": (0, 2**31 - 1, True, True),
}


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters common to every model. Defaults are the seed report's final CNN recipe."""

    model: str = ""
    protocol: str = "ferplus8"
    label_mode: str = "probability"
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    scheduler: str = "exponential"
    gamma: float = 0.9
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    onecycle_pct: float = 0.3
    label_smoothing: float = 0.0
    class_balance: str = "none"
    flip: bool = True
    shift: float = 0.0
    scale: float = 0.0
    rotation: float = 0.0
    crop_padding: int = 0
    erasing: float = 0.0
    erasing_scale: float = 0.2
    # Probability that an image is shrunk to a random smaller side and enlarged back
    # (augment._resample): a photo's face reaches the model resampled, a FER2013 crop does not.
    resample: float = 0.0
    # Batch mixing (Zhang et al. 2018; Yun et al. 2019): with probability mix_prob a batch is
    # mixed. `mixing=auto` mixes by mixup or cutmix (one of the two, evenly, when both alphas
    # are > 0; none when both are 0); `mixup` / `cutmix` use that one alone (its alpha must be
    # > 0) and `none` never mixes: one categorical a search can condition mix_prob on.
    mixing: str = "auto"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 0.0
    # Exponential moving average of the weights (0: off); validation, checkpoints and export
    # then use the averaged weights.
    ema_decay: float = 0.0
    # Linear LR warm-up over the first epochs (a fraction allowed); the scheduler's own course
    # starts after it (wsd: its warm-up).
    warmup_epochs: float = 0.0
    # scheduler=wsd (warmup-stable-decay): the LR decays to 0 over this last fraction of the run.
    decay_fraction: float = 0.2
    tta: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in CHOICES and value not in CHOICES[f.name]:
                raise FersearchError(
                    f"unknown {f.name} {value!r} (choose from {', '.join(CHOICES[f.name])})"
                )
            if f.name in BOUNDS:
                _check_bounds(f.name, value)
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise FersearchError(
                f"nesterov needs optimizer=sgd with momentum > 0 (got {self.optimizer}, {self.momentum})"
            )
        if self.mix_prob > 0 and self.label_mode == "multi_target":
            raise FersearchError("mixup/cutmix mix target distributions; label_mode=multi_target has none")
        if self.warmup_epochs and self.scheduler == "onecycle":
            raise FersearchError("scheduler=onecycle warms up by itself (onecycle_pct); set warmup_epochs=0")
        if self.mixing in ("mixup", "cutmix") and getattr(self, f"{self.mixing}_alpha") <= 0:
            raise FersearchError(f"mixing={self.mixing} needs {self.mixing}_alpha > 0")
        if self.warmup_epochs >= self.epochs:
            raise FersearchError(f"warmup_epochs={self.warmup_epochs} must be below epochs={self.epochs}")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_params(self) -> dict[str, str | int | float | bool]:
        """Flat scalars for trackers: tuples become "6,16"."""
        return {k: param_value(v) for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class CNNConfig(TrainConfig):
    """The configurable CNN family; the defaults are exactly the seed's Net.

    One stage per entry of `channels`: `convs_per_stage` convolutions (each with optional BN and
    the activation), as a plain stack or a residual block, then a 2x2 max-pool and
    `stage_dropout`. `convs_per_stage` lists the counts of the first stages and its last count
    repeats for the rest ("2": two everywhere; "1,2": one in the first stage, two after). `conv_type=separable` makes every convolution after the first a depthwise
    plus a 1x1 pointwise one. The head flattens the last map (`flatten`) or averages it over
    space (`gap`), then runs the `fc` hidden layers (with `dropout`) and the classifier.
    """

    model: str = "cnn"
    channels: tuple[int, ...] = (6, 16)
    convs_per_stage: tuple[int, ...] = (1,)
    block: str = "plain"
    conv_type: str = "standard"
    kernel_size: int = 5
    padding: str = "valid"
    batch_norm: bool = True
    activation: str = "relu"
    stage_dropout: float = 0.0
    head: str = "flatten"
    fc: tuple[int, ...] = (120, 84)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.channels or any(c < 1 or c > 1024 for c in self.channels):
            raise FersearchError("channels must list 1 to 8 widths between 1 and 1024, e.g. 6,16")
        if len(self.channels) > 8 or len(self.fc) > 4 or any(w < 1 or w > 8192 for w in self.fc):
            raise FersearchError("channels takes at most 8 widths, fc at most 4 widths in 1..8192")
        if not 1 <= len(self.convs_per_stage) <= len(self.channels) or any(
            n < 1 or n > 3 for n in self.convs_per_stage
        ):
            raise FersearchError(
                f"convs_per_stage takes 1 to {len(self.channels)} counts (one per stage, the last "
                f"repeating) of 1 to 3 convolutions, got {','.join(map(str, self.convs_per_stage))}"
            )
        if self.block == "residual" and (self.padding != "same" or self.kernel_size % 2 == 0):
            raise FersearchError(
                "block=residual adds a stage's input to its output: it needs padding=same and an odd "
                f"kernel_size (got {self.padding}, {self.kernel_size})"
            )
        if self.feature_size < 1:
            raise FersearchError(
                f"{len(self.channels)} stages of {','.join(map(str, self.stage_convs))} conv(s) with "
                f"kernel_size={self.kernel_size} and padding={self.padding} shrink a {IMAGE_SIZE}x{IMAGE_SIZE} "
                "input to nothing; use padding=same or fewer stages"
            )

    @property
    def feature_size(self) -> int:
        """Side of the last stage's map for an IMAGE_SIZE input (0: the stages do not fit).
        The one place the family's shapes are computed: `ConvNet` sizes its head by it."""
        size = IMAGE_SIZE
        for convs in self.stage_convs:
            for _ in range(convs):
                size = conv_output_side(size, self.kernel_size, self.padding)
            size //= 2  # 2x2 max-pool, floor
            if size < 1:
                return 0
        return size

    @property
    def stage_convs(self) -> tuple[int, ...]:
        """Convolutions in each stage (`convs_per_stage` with its last count repeated)."""
        counts = self.convs_per_stage
        return tuple(counts[min(i, len(counts) - 1)] for i in range(len(self.channels)))


@dataclass(frozen=True)
class ResNetConfig(TrainConfig):
    """torchvision's ResNet-18 with a 1-channel stem; defaults are the seed's final ResNet recipe."""

    model: str = "resnet18"
    optimizer: str = "adam"
    lr: float = 0.001
    pretrained: bool = True
    pretrained_path: str = ""
    freeze: str = "none"
    stem: str = "imagenet"
    dropout: float = 0.0


MODEL_CONFIGS: dict[str, type[TrainConfig]] = {"cnn": CNNConfig, "resnet18": ResNetConfig}


def _check_bounds(key: str, value: float) -> None:
    low, high, low_inc, high_inc = BOUNDS[key]
    if isinstance(value, float) and not math.isfinite(value):
        raise FersearchError(f"{key}={value} is not a finite number")
    too_low = low is not None and (value < low or (value == low and not low_inc))
    too_high = high is not None and (value > high or (value == high and not high_inc))
    if too_low or too_high:
        left = "[" if low_inc else "("
        right = "]" if high_inc else ")"
        raise FersearchError(
            f"{key}={value} is out of range {left}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}{right}"
        )


def _coerce(key: str, kind: Any, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type, or fail naming the key."""
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin is tuple:
            items: Iterable[Any]
            if isinstance(value, str):
                items = [v for v in value.replace(" ", "").split(",") if v]
            elif isinstance(value, (list, tuple)):
                items = value
            elif isinstance(value, int) and not isinstance(value, bool):
                items = [value]
            else:
                raise ValueError
            return tuple(_coerce(key, int, v) for v in items)
    except (TypeError, ValueError):
        pass
    expected = {bool: "true/false", int: "an integer", float: "a number", str: "a name"}.get(
        kind, "a comma-separated list of integers"
    )
    raise FersearchError(f"{key}={value!r} is not {expected}")


def _field_types(cls: type[TrainConfig]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def config_keys(model: str) -> list[str]:
    """Every key a config of `model` accepts."""
    return list(_field_types(model_config_class(model)))


def model_config_class(model: str) -> type[TrainConfig]:
    if model not in MODEL_CONFIGS:
        raise FersearchError(f"unknown model {model!r} (choose from {', '.join(MODEL_CONFIGS)})")
    return MODEL_CONFIGS[model]


def resolve_config(model: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults of `model` with `overrides` applied, type-coerced and validated."""
    cls = model_config_class(model)
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    for key, raw in (overrides or {}).items():
        if key == "model" and raw != model:
            raise FersearchError(f"config is for model {raw!r}, not {model!r}")
        values[key] = _coerce(key, _field_type(types_, model, key), raw)
    return cls(**values)


def _field_type(types_: Mapping[str, Any], model: str, key: str) -> Any:
    if key not in types_:
        raise FersearchError(f"unknown hyperparameter {key!r} for model {model} (known: {', '.join(sorted(types_))})")
    return types_[key]


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """`["lr=0.1", "flip=false"]` -> {"lr": "0.1", "flip": "false"}; types are applied later."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FersearchError(f"--set expects key=value, got {item!r}")
        if key.strip() in out:
            raise FersearchError(f"{key.strip()} is given twice ({out[key.strip()]!r} and {value.strip()!r}): give it once")
        out[key.strip()] = value.strip()
    return out


def param_value(value: Any) -> Any:
    """A config value as a param is spelled (MLflow params, search-space values): a list or tuple
    as "32,64,128", anything else as it is."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def typed_params(model: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Values given as text (`--fixed lr=0.01`) typed as `model`'s config fields and spelled as
    its params are (a tuple as "32,64,128"), each on its own: whether they make a valid config
    together is resolve_config's to say."""
    types_ = _field_types(model_config_class(model))
    return {key: param_value(_coerce(key, _field_type(types_, model, key), raw)) for key, raw in values.items()}


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a config saved by `to_dict` (config.yaml, checkpoints)."""
    if not isinstance(data, Mapping) or "model" not in data:
        raise FersearchError("saved config has no 'model' key")
    return resolve_config(str(data["model"]), {k: v for k, v in data.items() if k != "model"})


__all__ = [
    "CNNConfig",
    "ResNetConfig",
    "TrainConfig",
    "MODEL_CONFIGS",
    "config_from_dict",
    "config_keys",
    "param_value",
    "parse_assignments",
    "resolve_config",
    "typed_params",
]


MAX_BUDGET_S = 366 * 86400  # a year: anything longer is a typo


def parse_duration(text: str | None) -> float | None:
    """`90`, `90s`, `30m`, `2h` -> seconds; None when no budget was given (an empty value is
    refused: `--time-budget "$UNSET"` must not mean "no budget")."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    number, unit = (text[:-1], text[-1]) if text and text[-1].lower() in units else (text, "s")
    try:
        seconds = float(number) * units[unit.lower()]
    except ValueError:
        raise FersearchError(f"--time-budget {text!r} is not a duration like 90s, 30m or 2h") from None
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_BUDGET_S:
        raise FersearchError(f"--time-budget {text!r} must be a positive duration of at most a year, like 90s, 30m or 2h")
    return seconds
