"""The Ray Tune function trainable: one trial = one `Trainer`, reported every epoch.

The decoded dataset arrives through Ray's object store (`tune.with_parameters`), so it is read
once in the driver, not per trial. Each epoch reports the engine's metrics with a checkpoint
holding the full training state; a resumed trial continues from its latest checkpoint. A trial
that diverges reports a finite worst score (so no NaN reaches ASHA or Optuna) and then fails.
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
from fersearch.config import resolve_config
from fersearch.data import RawData, apply_protocol
from fersearch.errors import DivergedError
from fersearch.models import count_parameters, training_flops
from fersearch.training import Trainer

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"  # a trial checkpoint: the Trainer's whole state


def train_trial(config: dict[str, Any], *, raw: RawData, model: str, threads: int, device: str = "auto") -> None:
    """Build data, model and optimizer from the trial config and train, reporting each epoch."""
    torch.set_num_threads(max(1, threads))
    cfg = resolve_config(model, config)
    checkpoint = tune.get_checkpoint()
    trainer = Trainer(cfg, apply_protocol(raw, cfg.protocol), device, from_checkpoint=checkpoint is not None)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True))
        log.info("resumed at epoch %d", trainer.epoch)
    size = {M.PARAMETERS: count_parameters(trainer.model), M.TRAIN_FLOPS: training_flops(trainer.model)}
    node = {M.NODE: ray.get_runtime_context().get_node_id()}
    while trainer.epoch < cfg.epochs:
        try:
            row = trainer.run_epoch()
        except DivergedError as exc:
            # The trial ends here, failed by its `diverged` flag (outcome.trial_outcome), rather
            # than by an exception: Ray would retry an exception from the last checkpoint, and
            # the same weights would diverge again.
            log.warning("%s", exc)
            tune.report({M.EPOCH: trainer.epoch + 1, M.SELECT_METRIC: 0.0, M.BEST_METRIC: 0.0, M.DIVERGED: 1})
            return
        row[M.BEST_METRIC] = trainer.best_score
        row[M.DIVERGED] = 0
        row.update(size)
        if not all(math.isfinite(v) for v in row.values()):
            log.warning("non-finite metrics at epoch %d: %s", trainer.epoch, row)
            tune.report({**row, M.SELECT_METRIC: 0.0, M.BEST_METRIC: 0.0, M.DIVERGED: 1})
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
