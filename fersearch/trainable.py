"""The Ray Tune function trainable: one trial = one `Trainer`, reported several times an epoch.

The decoded dataset arrives through Ray's object store (`tune.with_parameters`), so it is read
once in the driver, not per trial. A trial reports `REPORTS_PER_EPOCH` times an epoch: between
epochs with the accuracy on the fixed validation subset (cheap: ASHA's low rungs come after a
fraction of an epoch); at each epoch's end with the whole validation set and a checkpoint of
the full training state. Checkpoints are taken at full epochs only: a trial restarted after a
fault, or resumed after ASHA paused it at a rung and then promoted it (scheduler.py), continues
from its last whole epoch and repeats the sub-epoch reports after it (MLflow logs them once,
Optuna keeps the first, ASHA decided each rung once); training is seeded, so the repeat
retraces the same course. A trial that diverges reports a finite worst score
(so no NaN reaches ASHA or Optuna) and then fails.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from fersearch import metrics as M
from fersearch.config import REPORTS_PER_EPOCH, resolve_config
from fersearch.data import RawData, apply_protocol
from fersearch.errors import DivergedError, FersearchError
from fersearch.models import count_parameters, training_flops
from fersearch.training import Trainer

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"  # a trial checkpoint: the Trainer's whole state


def report_marks(train_size: int, reports: int = REPORTS_PER_EPOCH) -> list[int]:
    """Samples into an epoch after which a sub-epoch report is due (the epoch's end reports
    with the whole validation set)."""
    return [math.ceil(train_size * k / reports) for k in range(1, reports)]


def fidelity(trainer: Trainer, samples_into_epoch: int) -> dict[str, Any]:
    """The report's place in the trial: epochs seen (ASHA's time) and its index (Optuna's step)."""
    seen = trainer.epoch + samples_into_epoch / trainer.train_size
    return {M.EPOCHS_SEEN: seen, M.REPORT: round(seen * REPORTS_PER_EPOCH), M.EPOCH: trainer.epoch}


def cools_at(cfg, epochs: float | None) -> bool:
    """Whether a trial of `cfg` reports a decayed branch (Trainer.cooldown) at `epochs`, the
    capped rung of a time-budgeted search: only a whole epoch (an epoch's end has a checkpoint
    and the whole validation set) inside a warmup-stable-decay run's stable phase (elsewhere the
    run's own LR is not constant, and its scores already decay)."""
    return (
        epochs is not None
        and float(epochs).is_integer()
        and cfg.scheduler == "wsd"
        and 0 < epochs <= cfg.epochs * (1 - cfg.decay_fraction) - 1e-9
    )


def train_trial(
    config: dict[str, Any], *, raw: RawData, model: str, threads: int, device: str = "auto", cool_at: float | None = None
) -> None:
    """Build data, model and optimizer from the trial config and train, reporting as it goes.
    `cool_at`: the capped rung's epochs (search.py); the report there carries the score of a
    decayed branch (Trainer.cooldown over the run's decay share of the epochs so far) as its
    judgement, and the branch's whole-validation accuracy."""
    torch.set_num_threads(max(1, threads))
    checkpoint = tune.get_checkpoint()
    try:
        cfg = resolve_config(model, config)
        trainer = Trainer(cfg, apply_protocol(raw, cfg.protocol), device, from_checkpoint=checkpoint is not None)
    except FersearchError as exc:
        # A combination of draws the model refuses: the trial fails here, once; raising would
        # make Ray retry a configuration that can never pass.
        log.warning("invalid configuration: %s", exc)
        tune.report({M.EPOCHS_SEEN: 0.0, M.REPORT: 0, M.EPOCH: 0, M.JUDGE_METRIC: 0.0, M.INVALID: 1, M.ERROR: str(exc)})
        return
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True))
        log.info("resumed at epoch %d", trainer.epoch)
    size = {M.PARAMETERS: count_parameters(trainer.model), M.TRAIN_FLOPS: training_flops(trainer.model)}
    node = {M.NODE: ray.get_runtime_context().get_node_id()}
    marks = report_marks(trainer.train_size)

    def between_epochs(samples: int) -> None:
        if marks and samples >= marks[0]:
            while marks and samples >= marks[0]:
                marks.pop(0)
            if samples >= trainer.train_size:
                return  # the epoch's last batch: its end reports with the whole validation set
            row = {**fidelity(trainer, samples), M.JUDGE_METRIC: trainer.judge(), **size}
            if trainer.epoch:
                row[M.BEST_METRIC] = trainer.best_score
            tune.report({**row, M.DIVERGED: 0, **node})

    while trainer.epoch < cfg.epochs:
        marks[:] = report_marks(trainer.train_size)
        try:
            row = trainer.run_epoch(progress=between_epochs)
        except DivergedError as exc:
            # The trial ends here, failed by its `diverged` flag (outcome.trial_outcome), rather
            # than by an exception: Ray would retry an exception from the last checkpoint, and
            # the same weights would diverge again.
            log.warning("%s", exc)
            tune.report({**fidelity(trainer, trainer.train_size), M.SELECT_METRIC: 0.0, M.JUDGE_METRIC: 0.0,
                         M.BEST_METRIC: 0.0, M.DIVERGED: 1})
            return
        row.update(fidelity(trainer, 0))
        row[M.JUDGE_METRIC] = trainer.judge()
        if cools_at(cfg, cool_at) and trainer.epoch == cool_at:
            row.update(trainer.cooldown(cfg.decay_fraction * trainer.epoch))
        row[M.BEST_METRIC] = trainer.best_score
        row[M.DIVERGED] = 0
        row.update(size)
        if not all(math.isfinite(v) for v in row.values()):
            log.warning("non-finite metrics at epoch %d: %s", trainer.epoch, row)
            tune.report({**row, M.SELECT_METRIC: 0.0, M.JUDGE_METRIC: 0.0, M.BEST_METRIC: 0.0, M.DIVERGED: 1})
            return
        row.update(node)  # after the finiteness check: an id, not a number
        with tempfile.TemporaryDirectory() as folder:
            torch.save(trainer.state_dict(include_best=False), Path(folder) / CHECKPOINT_FILE)
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(folder))


def load_trainer(checkpoint_dir: str | Path, raw: RawData, device: str = "auto") -> Trainer:
    """Rebuild a trial's Trainer (weights as of that checkpoint) in the driver."""
    from fersearch.config import config_from_dict

    state = torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")
    cfg = config_from_dict(state["config"])
    trainer = Trainer(cfg, apply_protocol(raw, cfg.protocol), device, from_checkpoint=True)
    trainer.load_state_dict(state)
    trainer.choose_current_weights()  # the checkpoint is the epoch validation chose
    return trainer
