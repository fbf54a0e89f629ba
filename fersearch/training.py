"""One training run built from a config: model, optimizer, schedule and data on the device.

`Trainer.run_epoch()` trains one epoch, evaluates on validation and returns the epoch's metrics
under the names in `metrics`; the best-validation weights are kept, and `final_report()` scores
them (never the last or a test-selected epoch) on val and test under every protocol. The CLI's
`train` command and the Ray trainable both drive this class; its state round-trips through
`state_dict()` for checkpoints.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from fersearch import metrics as M
from fersearch.augment import Augment, Mix
from fersearch.config import JUDGE_IMAGES, TrainConfig, config_from_dict
from fersearch.data import (
    IMAGE_SIZE,
    PROTOCOL_CLASSES,
    FerData,
    RawData,
    apply_protocol,
    stratified_subset,
    training_targets,
)
from fersearch.engine import (
    Loss,
    Normalize,
    build_ema,
    build_optimizer,
    build_schedule,
    class_weights,
    cooldown_schedule,
    evaluate,
    place_model,
    predict_logits,
    select_device,
    set_seed,
    train_one_epoch,
    tune_cpu_allocator,
)
from fersearch.errors import DivergedError
from fersearch.models import build_model, count_parameters, untrained

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self, cfg: TrainConfig, data: FerData, device: str | torch.device = "auto", *, from_checkpoint: bool = False
    ) -> None:
        """`from_checkpoint`: trained weights are loaded next, so ImageNet weights are not read."""
        self.cfg = cfg
        self.data = data
        self.device = device if isinstance(device, torch.device) else select_device(device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.gen = set_seed(cfg.seed)
        self.model = place_model(build_model(untrained(cfg) if from_checkpoint else cfg, len(data.classes)), self.device)
        self.normalize = Normalize(data.mean, data.std)
        self.augment = Augment.from_config(cfg)
        self.mix = Mix.from_config(cfg)
        train = data.train
        self.train_images = torch.as_tensor(train.images, device=self.device)
        self.train_targets = torch.as_tensor(training_targets(train.votes, cfg.label_mode), device=self.device)
        self.val_images = torch.as_tensor(data.valid.images, device=self.device)
        judged = stratified_subset(data.valid.labels, JUDGE_IMAGES)
        self.judge_images, self.judge_labels = self.val_images[torch.as_tensor(judged)], data.valid.labels[judged]
        weights = class_weights(train.labels, len(data.classes))
        self.loss_fn = Loss(
            cfg.label_mode,
            cfg.label_smoothing,
            torch.as_tensor(weights, device=self.device) if cfg.class_balance == "loss" else None,
        )
        self.sample_weights = (
            torch.as_tensor(weights[train.labels], dtype=torch.float64) if cfg.class_balance == "sampler" else None
        )
        self.optimizer = build_optimizer(cfg, self.model)
        self.ema = build_ema(cfg, self.model)
        steps = -(-len(train) // cfg.batch_size)
        self.schedule = build_schedule(cfg, self.optimizer, steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best_score = -float("inf")
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        log.info(
            "%s: %d parameters (%d trainable) on %s",
            cfg.model,
            count_parameters(self.model),
            count_parameters(self.model, trainable_only=True),
            self.device,
        )

    def run_epoch(self, max_batches: int | None = None, progress=None) -> dict[str, float]:
        """Train one epoch, validate, step the schedule; returns this epoch's metrics.
        `progress(samples_done)` is called after every batch (engine.train_one_epoch)."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        train = self._train(self.schedule, max_batches, progress)
        val = evaluate(self.eval_model, self.val_images, self.data.valid.labels, self.data.classes, self.normalize)
        self.epoch += 1
        score = float(val["accuracy"])
        self.schedule.after_epoch(score)
        row = {
            M.EPOCH: self.epoch,
            M.TRAIN_LOSS: train["loss"],
            M.TRAIN_ACCURACY: train["accuracy"],
            M.VAL_LOSS: float(val["loss"]),
            M.VAL_ACCURACY: score,
            M.VAL_F1_MACRO: float(val["f1_macro"]),
            M.LR: lr,
            M.EPOCH_SECONDS: time.perf_counter() - start,
        }
        self.history.append(row)
        if score > self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            self.best_state = copy.deepcopy(self.eval_model.state_dict())
        return row

    def _train(self, schedule, max_batches: int | None = None, progress=None) -> dict[str, float]:
        """One pass of training (or its first `max_batches` batches) on `schedule`."""
        return train_one_epoch(
            self.model,
            self.train_images,
            self.train_targets,
            optimizer=self.optimizer,
            loss_fn=self.loss_fn,
            normalize=self.normalize,
            augment=self.augment,
            batch_size=self.cfg.batch_size,
            gen=self.gen,
            schedule=schedule,
            scaler=self.scaler,
            sample_weights=self.sample_weights,
            max_batches=max_batches,
            mix=self.mix,
            ema=self.ema,
            progress=progress,
        )

    def cooldown(self, epochs: float) -> dict[str, float]:
        """The score this run would have if its LR decayed to 0 now: train `epochs` more (a
        fraction allowed) with the LR on a cosine from its current value to 0, score the whole
        validation set and the judging subset, then put every piece of training state back
        (weights, optimizer, schedule, EMA, random streams), so the run goes on exactly as if
        this had never happened. A warmup-stable-decay run is constant before its decay: its
        decayed score is what a finished run at this length would have reached, which is what
        a search wants to rank by, not the undecayed weights. A branch that diverges judges 0
        (as a diverged trial does) and has no cooled accuracy: its rung then compares it by the
        same decayed rule as the others, not by its undecayed weights."""
        start = time.perf_counter()
        batches = max(1, round(epochs * -(-self.train_size // self.cfg.batch_size)))
        saved = copy.deepcopy(self.state_dict(include_best=False))
        best = (self.best_score, self.best_epoch, self.best_state)
        try:
            self._train(cooldown_schedule(self.optimizer, batches), batches)
            val = evaluate(self.eval_model, self.val_images, self.data.valid.labels, self.data.classes, self.normalize)
            out = {M.COOLED_ACCURACY: float(val["accuracy"]), M.JUDGE_METRIC: self.judge(),
                   M.COOLED_SECONDS: time.perf_counter() - start}
        except DivergedError as exc:
            log.warning("the cooled branch diverged (%s): it judges 0; the run goes on", exc)
            out = {M.JUDGE_METRIC: 0.0, M.COOLED_SECONDS: time.perf_counter() - start}
        finally:
            self.load_state_dict(saved)
            self.best_score, self.best_epoch, self.best_state = best
        return out

    def judge(self) -> float:
        """Accuracy of the current (EMA) weights on the fixed stratified validation subset: what a
        search compares its trials by at every report, between epochs too."""
        logits = predict_logits(self.eval_model, self.judge_images, self.normalize)
        return float((logits.argmax(1).cpu().numpy() == self.judge_labels).mean())

    @property
    def train_size(self) -> int:
        return len(self.train_images)

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation scores and checkpoints keep: the EMA weights when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def best_model(self) -> torch.nn.Module:
        """The model with its best-validation weights (a copy; training state is untouched)."""
        model = copy.deepcopy(self.eval_model)
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        return model

    def final_report(self, raw: RawData | None = None) -> dict[str, Any]:
        """Best-validation weights scored on val and test, under its own and every other protocol.

        `raw` (the undecorated source) lets the other protocols be scored; without it only the
        training protocol is.
        """
        model = self.best_model()
        report: dict[str, Any] = {"best_epoch": self.best_epoch, "protocol": self.data.protocol}
        datasets = {self.data.protocol: self.data}
        if raw is not None:
            datasets.update({p: apply_protocol(raw, p) for p in PROTOCOL_CLASSES if p != self.data.protocol})
        by_protocol: dict[str, dict[str, Any]] = {}
        for protocol, data in datasets.items():
            class_map = [
                self.data.classes.index(c) if c in self.data.classes else -1 for c in data.classes
            ]
            by_protocol[protocol] = {
                split: evaluate(
                    model,
                    torch.as_tensor(data.split(split).images, device=self.device),
                    data.split(split).labels,
                    data.classes,
                    self.normalize,
                    tta=self.cfg.tta,
                    class_map=None if data is self.data else class_map,
                )
                for split in ("valid", "test")
            }
        own = by_protocol[self.data.protocol]
        report["val"], report["test"] = own["valid"], own["test"]
        report["by_protocol"] = {
            p: {"val": M.summary(r["valid"]), "test": M.summary(r["test"])} for p, r in by_protocol.items()
        }
        return report

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self, include_best: bool = True) -> dict[str, Any]:
        """Everything needed to continue this run exactly (for checkpoints).

        `include_best=False` leaves out the copy of the best weights: a search keeps its best
        epoch as its own checkpoint, and the copy would double every checkpoint's size.
        """
        return {
            "config": self.cfg.to_dict(),
            "classes": list(self.data.classes),
            "normalize": {"mean": self.normalize.mean, "std": self.normalize.std},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "history": self.history,
            "best": {
                "score": self.best_score,
                "epoch": self.best_epoch,
                "state": self.best_state if include_best else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if config_from_dict(state["config"]) != self.cfg:
            raise ValueError("checkpoint was written for a different config")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state.get("schedule") or {"scheduler": state.get("scheduler")})
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        best = state["best"]
        self.best_score, self.best_epoch, self.best_state = best["score"], best["epoch"], best["state"]

    def choose_current_weights(self) -> None:
        """Make the weights as they are now the chosen ones (a checkpoint the search selected by
        validation): `best_model` and `final_report` then score exactly these."""
        self.best_state, self.best_epoch = None, self.epoch


def model_file_payload(trainer: Trainer) -> dict[str, Any]:
    """What `model.pt` holds: best weights, the resolved config, classes and normalisation."""
    model = trainer.best_model()
    return {
        "state_dict": model.state_dict(),
        "config": trainer.cfg.to_dict(),
        "classes": list(trainer.data.classes),
        "normalize": {"mean": trainer.normalize.mean, "std": trainer.normalize.std},
        "best_epoch": trainer.best_epoch,
        "input_size": [1, IMAGE_SIZE, IMAGE_SIZE],
    }
