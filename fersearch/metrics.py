"""Metric names (defined once) and classification metrics (scikit-learn).

The same names are used by the training loop, the Ray trainable, ASHA, Optuna, MLflow and the
export: `val/accuracy` is the selection metric everywhere; test is never used to select.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
)

SELECT_METRIC = "val/accuracy"
SELECT_MODE = "max"
# Running best of SELECT_METRIC over a trial's epochs: what a finished trial is worth.
BEST_METRIC = "val/best_accuracy"
EPOCH = "epoch"  # whole epochs trained (on a sub-epoch report: those before it)
TRAINING_ITERATION = "training_iteration"  # Ray Tune's count of a trial's reports
# A search's trials report several times an epoch (config.REPORTS_PER_EPOCH): the epochs seen
# so far, fractional (ASHA's time), the report's index (Optuna's step: epochs_seen times the
# reports per epoch) and the accuracy on the fixed validation subset every report carries (what
# ASHA and Optuna's intermediate values compare). `val/accuracy` is the whole validation set,
# on epoch-end reports only.
EPOCHS_SEEN = "epochs_seen"
REPORT = "report"
JUDGE_METRIC = "val/judge_accuracy"
# The whole validation set's accuracy of a decayed branch of the trial at the capped rung of a
# time-budgeted search (Trainer.cooldown; the report's JUDGE_METRIC is then the branch's too):
# what the trial would score if its LR decayed to 0 there. Its training goes on undecayed.
COOLED_ACCURACY = "val/cooled_accuracy"
COOLED_SECONDS = "time/cooled_s"  # the branch's seconds (training and scoring), outside the trial's pace
DONE = "done"  # Ray Tune: True on the last result of a trial that ended
DIVERGED = "diverged"  # 1 on the report of a trial whose loss went non-finite
# 1 on the report at which ASHA paused the trial at a rung: it waits there for a promotion
# (scheduler.py); a trial never promoted was stopped early at that rung.
PAUSED = "paused"
# 1 on the only report of a trial whose configuration is invalid (a combination of draws the
# model refuses): it fails at once, never retried; ERROR holds the reason (text).
INVALID = "invalid_config"
ERROR = "error"
TRAIN_LOSS = "train/loss"
TRAIN_ACCURACY = "train/accuracy"
VAL_LOSS = "val/loss"
VAL_ACCURACY = "val/accuracy"
VAL_F1_MACRO = "val/f1_macro"
LR = "lr"
EPOCH_SECONDS = "time/epoch_s"
EPOCHS_TRAINED = "epochs_trained"  # MLflow: epochs a trial (or, on the parent, a whole search) trained
# The trial's model size, reported with every epoch (logged once as MLflow params).
PARAMETERS = "model/parameters"
TRAIN_FLOPS = "model/train_flops"
# The Ray node that trained the epoch (its id; Ray adds `node_ip` itself): a cluster's trials are
# tagged with it in MLflow, and a trial moved off a lost node shows both.
NODE = "node_id"
NODE_IP = "node_ip"  # Ray Tune's own result key
# Summary metrics every report carries (acceptance: accuracy, f1_macro, f1_weighted at least).
SUMMARY_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> dict[str, object]:
    """Accuracy, balanced accuracy, macro/weighted P/R/F1, per-class report, confusion matrix."""
    labels = list(range(len(classes)))
    out: dict[str, object] = {"n": int(len(y_true))}
    with warnings.catch_warnings():
        # Classes absent from a small split make sklearn warn; zero_division=0 is the answer.
        warnings.simplefilter("ignore")
        out["accuracy"] = float(accuracy_score(y_true, y_pred))
        out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
        for average in ("macro", "weighted"):
            p, r, f, _ = precision_recall_fscore_support(
                y_true, y_pred, labels=labels, average=average, zero_division=0
            )
            out[f"precision_{average}"], out[f"recall_{average}"], out[f"f1_{average}"] = (
                float(p),
                float(r),
                float(f),
            )
        p, r, f, s = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=None, zero_division=0
        )
    out["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(classes)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    out["classes"] = list(classes)
    return out


def summary(metrics: dict[str, object]) -> dict[str, float]:
    """Only the scalar summary metrics (for logs and trackers)."""
    return {k: float(metrics[k]) for k in SUMMARY_KEYS if k in metrics}  # type: ignore[arg-type]
