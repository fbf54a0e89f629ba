"""Matplotlib figures (Agg, no display): learning curves and confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from fersearch import metrics as M  # noqa: E402


def plot_curves(history: Sequence[dict[str, float]], path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, train against validation."""
    epochs = [row[M.EPOCH] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r[M.TRAIN_LOSS] for r in history], label="train")
    ax_loss.plot(epochs, [r[M.VAL_LOSS] for r in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r[M.TRAIN_ACCURACY] for r in history], label="train")
    ax_acc.plot(epochs, [r[M.VAL_ACCURACY] for r in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (recall per true class), drawn by scikit-learn's
    ConfusionMatrixDisplay; each true class's image count is in its row label."""
    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(2.2 + 0.8 * len(classes), 0.8 + 0.7 * len(classes)))
    display = ConfusionMatrixDisplay(norm, display_labels=list(classes))
    display.plot(ax=ax, cmap="Blues", values_format=".2f", xticks_rotation=45, im_kw={"vmin": 0, "vmax": 1})
    for text in display.text_.ravel():
        text.set_fontsize(7)
    ax.set_yticks(range(len(classes)), [f"{c} ({n})" for c, n in zip(classes, rows[:, 0], strict=True)])
    ax.set(xlabel="predicted", ylabel="true (images)", title=title or "recall per true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
