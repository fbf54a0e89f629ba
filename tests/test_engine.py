import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fersearch.augment import Augment, _affine_grid
from fersearch.config import LABEL_MODES, resolve_config
from fersearch.data import load_dataset
from fersearch.engine import Loss
from fersearch.errors import DivergedError, FersearchError
from fersearch.training import Trainer


def _batch():
    x = torch.zeros(8, 1, 48, 48)
    x[:, :, 10:30, 5:20] = 1.0
    return x


@pytest.mark.parametrize(
    "aug",
    [
        Augment(flip=True),
        Augment(shift=0.2),
        Augment(scale=0.2),
        Augment(rotation=30),
        Augment(crop_padding=4),
        Augment(erasing=1.0, erasing_scale=0.3),
    ],
)
def test_each_augmentation_changes_images_reproducibly(aug):
    x = _batch()
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)


@pytest.mark.parametrize("size", [(48, 48), (40, 44)])
def test_affine_grid_equals_pytorch(size):
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    want = F.affine_grid(theta, [5, 1, *size], align_corners=False)
    torch.testing.assert_close(_affine_grid(theta, *size), want)


def test_flip_folded_into_the_affine_grid_equals_flipping_first():
    """With an affine transform the mirror is part of the sampling grid; it must equal mirroring
    the chosen images, then transforming them with the same draws."""
    x = torch.randn(16, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    aug = Augment(flip=True, shift=0.1, scale=0.1, rotation=10)
    got = aug(x, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    flips = torch.rand(16, generator=gen) < 0.5
    assert 0 < int(flips.sum()) < 16  # both kinds in the batch
    mirrored = torch.where(flips[:, None, None, None], x.flip(-1), x)
    want = Augment(shift=0.1, scale=0.1, rotation=10)(mirrored, gen)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_no_augmentation_is_identity():
    assert not Augment().active


@pytest.mark.parametrize("mode", LABEL_MODES)
def test_loss_for_every_label_mode(mode):
    logits = torch.randn(4, 8, requires_grad=True)
    targets = torch.softmax(torch.randn(4, 8), 1)
    loss_fn = Loss(mode, label_smoothing=0.1, weights=torch.ones(8))
    loss = loss_fn(logits, loss_fn.targets(targets, torch.Generator().manual_seed(0)))
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None


def test_training_is_reproducible_and_learns(synthetic_dir):
    data = load_dataset(synthetic_dir, "ferplus8")
    cfg = resolve_config("cnn", {"epochs": 3, "shift": 0.1, "erasing": 0.3, "class_balance": "sampler"})
    runs = []
    for _ in range(2):
        trainer = Trainer(cfg, data, "cpu")
        runs.append([trainer.run_epoch() for _ in range(3)])
    assert [r["train/loss"] for r in runs[0]] == [r["train/loss"] for r in runs[1]]
    assert runs[0][-1]["train/loss"] < runs[0][0]["train/loss"]


def test_trainer_from_checkpoint_does_not_read_imagenet_weights(synthetic_dir, tmp_path):
    data = load_dataset(synthetic_dir, "ferplus8")
    cfg = resolve_config("resnet18", {"pretrained_path": str(tmp_path / "gone.pth")})
    with pytest.raises(FersearchError, match="does not exist"):
        Trainer(cfg, data, "cpu")
    trained = resolve_config("resnet18", {"pretrained": False})
    state = Trainer(trained, data, "cpu").state_dict()
    state["config"] = cfg.to_dict()  # as if trained from those weights
    resumed = Trainer(cfg, data, "cpu", from_checkpoint=True)
    resumed.load_state_dict(state)
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name


def test_checkpoint_state_round_trips(synthetic_dir):
    data = load_dataset(synthetic_dir, "seed10")
    cfg = resolve_config("cnn", {"epochs": 3, "scheduler": "onecycle"})
    straight = Trainer(cfg, data, "cpu")
    expected = [straight.run_epoch()["val/loss"] for _ in range(3)]
    first = Trainer(cfg, data, "cpu")
    first.run_epoch()
    state = first.state_dict()
    resumed = Trainer(cfg, data, "cpu")
    resumed.load_state_dict(state)
    got = [resumed.run_epoch()["val/loss"] for _ in range(2)]
    assert np.allclose(got, expected[1:])


def test_divergence_is_detected(synthetic_dir):
    data = load_dataset(synthetic_dir, "ferplus8")
    trainer = Trainer(resolve_config("cnn", {"lr": 10.0, "momentum": 0.99, "batch_norm": False}), data, "cpu")
    with pytest.raises(DivergedError, match="diverged"):
        for _ in range(3):
            trainer.run_epoch()


def test_final_report_uses_best_validation_epoch_and_both_protocols(synthetic_dir):
    from fersearch.data import load_raw

    raw = load_raw(synthetic_dir)
    data = load_dataset(synthetic_dir, "ferplus8")
    trainer = Trainer(resolve_config("cnn", {"epochs": 3}), data, "cpu")
    rows = [trainer.run_epoch() for _ in range(3)]
    report = trainer.final_report(raw)
    best = max(rows, key=lambda r: r["val/accuracy"])
    assert report["best_epoch"] == best["epoch"]
    assert report["val"]["accuracy"] == pytest.approx(best["val/accuracy"])
    assert set(report["by_protocol"]) == {"ferplus8", "seed10"}
    assert report["by_protocol"]["seed10"]["test"]["accuracy"] <= 1.0
    assert np.asarray(report["test"]["confusion_matrix"]).sum() == len(data.test)
