import copy
import math
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fersearch import metrics as M
from fersearch.augment import Augment, _affine_grid
from fersearch.config import resolve_config
from fersearch.data import load_dataset
from fersearch.engine import Loss, build_optimizer, evaluate, train_one_epoch
from fersearch.errors import DivergedError, FersearchError
from fersearch.training import Trainer
from tests.conftest import DIVERGES


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
        Augment(resample=1.0),
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


def test_resampling_softens_the_chosen_images_and_leaves_the_others_as_they_were():
    x = torch.randn(64, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    got = Augment(resample=0.5)(x, torch.Generator().manual_seed(5))
    chosen = torch.rand(64, generator=torch.Generator().manual_seed(5)) < 0.5
    assert 0 < int(chosen.sum()) < 64
    assert torch.equal(got[~chosen], x[~chosen])
    # Noise loses its fine detail through a smaller side; the brightness stays.
    assert (got[chosen].std(dim=(1, 2, 3)) < 0.9 * x[chosen].std(dim=(1, 2, 3))).all()
    torch.testing.assert_close(got[chosen].mean(dim=(1, 2, 3)), x[chosen].mean(dim=(1, 2, 3)), atol=0.05, rtol=0)


def test_no_augmentation_is_identity():
    x = torch.randn(8, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    aug = Augment()
    assert not aug.active
    assert torch.equal(aug(x, gen), x)
    assert torch.equal(gen.get_state(), state)  # draws nothing: the training stream is unchanged


# One image, 3 classes, logits (0, ln 2, 0): softmax = (1/4, 1/2, 1/4).
_LOGITS = torch.tensor([[0.0, math.log(2.0), 0.0]])
_LOGP = torch.log(torch.tensor([0.25, 0.5, 0.25]))


@pytest.mark.parametrize(
    "mode, target, smoothing, expected",
    [
        # cross-entropy against the target distribution: -sum(t * log p)
        ("majority", [0.0, 1.0, 0.0], 0.0, -math.log(0.5)),
        ("probability", [0.5, 0.5, 0.0], 0.0, -(0.5 * math.log(0.25) + 0.5 * math.log(0.5))),
        ("crossentropy", [0.0, 0.0, 1.0], 0.0, -math.log(0.25)),
        # label smoothing 0.3: t' = 0.7 t + 0.1
        ("probability", [1.0, 0.0, 0.0], 0.3, -(0.8 * math.log(0.25) + 0.1 * math.log(0.5) + 0.1 * math.log(0.25))),
        # multi_target: the most probable accepted label counts
        ("multi_target", [0.5, 0.5, 0.0], 0.0, -math.log(0.5)),
        ("multi_target", [0.5, 0.0, 0.5], 0.0, -math.log(0.25)),
    ],
)
def test_loss_for_every_label_mode(mode, target, smoothing, expected):
    loss_fn = Loss(mode, label_smoothing=smoothing)
    loss = loss_fn(_LOGITS, torch.tensor([target]))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    if mode != "multi_target":
        want = F.cross_entropy(_LOGITS, torch.tensor([target]), label_smoothing=smoothing)
        assert float(loss) == pytest.approx(float(want), rel=1e-6)


def test_pld_draws_one_hot_labels_from_the_votes():
    votes = torch.tensor([[0.7, 0.3, 0.0]]).repeat(4000, 1)
    drawn = Loss("pld").targets(votes, torch.Generator().manual_seed(0))
    assert torch.equal(drawn.sum(1), torch.ones(4000)) and set(drawn.unique().tolist()) == {0.0, 1.0}
    share = drawn.mean(0)
    assert share[2] == 0 and abs(float(share[0]) - 0.7) < 0.03
    # Its loss is the cross-entropy of the drawn one-hot label.
    one = drawn[:1]
    assert float(Loss("pld")(_LOGITS, one)) == pytest.approx(float(-(one * _LOGP).sum()), rel=1e-6)


def test_class_weights_scale_each_image_by_its_target_class():
    weights = torch.tensor([2.0, 1.0, 0.5])
    plain = float(Loss("majority")(_LOGITS, torch.tensor([[1.0, 0.0, 0.0]])))
    weighted = float(Loss("majority", weights=weights)(_LOGITS, torch.tensor([[1.0, 0.0, 0.0]])))
    assert weighted == pytest.approx(2.0 * plain)


def test_training_is_reproducible_and_learns(synthetic_dir):
    data = load_dataset(synthetic_dir, "ferplus8")
    cfg = resolve_config("cnn", {"epochs": 3, "shift": 0.1, "erasing": 0.3, "class_balance": "sampler"})
    runs = []
    for _ in range(2):
        trainer = Trainer(cfg, data, "cpu")
        runs.append([trainer.run_epoch() for _ in range(3)])
    assert [r[M.TRAIN_LOSS] for r in runs[0]] == [r[M.TRAIN_LOSS] for r in runs[1]]
    assert runs[0][-1][M.TRAIN_LOSS] < runs[0][0][M.TRAIN_LOSS]


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
    expected = [straight.run_epoch()[M.VAL_LOSS] for _ in range(3)]
    first = Trainer(cfg, data, "cpu")
    first.run_epoch()
    state = first.state_dict()
    resumed = Trainer(cfg, data, "cpu")
    resumed.load_state_dict(state)
    got = [resumed.run_epoch()[M.VAL_LOSS] for _ in range(2)]
    assert np.allclose(got, expected[1:])


def test_divergence_is_detected(synthetic_dir):
    data = load_dataset(synthetic_dir, "ferplus8")
    trainer = Trainer(resolve_config("cnn", DIVERGES), data, "cpu")
    with pytest.raises(DivergedError, match=M.DIVERGED):
        for _ in range(3):
            trainer.run_epoch()


def test_final_report_uses_best_validation_epoch_and_both_protocols(synthetic_dir):
    from fersearch.data import load_raw

    raw = load_raw(synthetic_dir)
    data = load_dataset(synthetic_dir, "ferplus8")
    trainer = Trainer(resolve_config("cnn", {"epochs": 3}), data, "cpu")
    rows = [trainer.run_epoch() for _ in range(3)]
    report = trainer.final_report(raw)
    best = max(rows, key=lambda r: r[M.VAL_ACCURACY])
    assert report["best_epoch"] == best["epoch"]
    assert report["val"]["accuracy"] == pytest.approx(best[M.VAL_ACCURACY])
    assert set(report["by_protocol"]) == {"ferplus8", "seed10"}
    # Each protocol's test accuracy is the chosen epoch's weights scored on that protocol's labels.
    assert trainer.cfg.tta == "none"
    model = trainer.best_model().eval()
    for protocol in ("ferplus8", "seed10"):
        split = load_dataset(synthetic_dir, protocol).test
        with torch.no_grad():
            predicted = model(trainer.normalize(torch.as_tensor(split.images))).argmax(1).numpy()
        # The 8 outputs are seed10's first 8 classes in order; its unknown / NF are never right.
        want = float((predicted == split.labels).mean())
        assert report["by_protocol"][protocol]["test"]["accuracy"] == pytest.approx(want, abs=1e-6), protocol
    assert np.asarray(report["test"]["confusion_matrix"]).sum() == len(data.test)


# ---- recipe knobs: mixup / cutmix, EMA, warm-up


def test_mixup_and_cutmix_targets_sum_to_one_and_match_a_hand_computed_case():
    from fersearch.augment import cutmix, mixup

    x = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 3.0)])
    y = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5]])  # soft vote targets
    mx, my = mixup(x, y, 0.75)
    # Sample 0 is mixed with sample 1 (the roll), sample 1 with sample 0.
    assert torch.allclose(mx[0], torch.full((1, 4, 4), 0.75 * 1 + 0.25 * 3))
    assert torch.allclose(my, torch.tensor([[0.45, 0.425, 0.125], [0.15, 0.475, 0.375]]))
    # lam 0.75 on 4x4: half side 0.5*sqrt(0.25)*4 = 1, so the box centred at (1, 2) is rows 0-1,
    # cols 1-2: 4 of 16 pixels come from the other image, and the targets weigh 12/16 : 4/16.
    cx, cy = cutmix(x, y, 0.75, 1, 2)
    assert torch.equal(cx[0, 0, 0:2, 1:3], torch.full((2, 2), 3.0)) and (cx[0] == 3.0).sum() == 4
    assert torch.allclose(cy[0], 0.75 * y[0] + 0.25 * y[1])
    for t in (my, cy):
        assert torch.allclose(t.sum(1), torch.ones(2))


def test_mixup_matches_torchvision_on_one_hot_labels():
    from torchvision.transforms import v2

    from fersearch.augment import mixup

    torch.manual_seed(3)
    images = torch.rand(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    out_images, out_labels = v2.MixUp(alpha=0.4, num_classes=8)(images, labels)
    lam = float(out_labels[0, 0])  # label 0 is not the rolled-in label (5)
    ours_images, ours_labels = mixup(images, F.one_hot(labels, 8).float(), lam)
    assert torch.allclose(ours_images, out_images, atol=1e-6)
    assert torch.allclose(ours_labels, out_labels, atol=1e-6)


def test_cutmix_weight_is_the_pasted_area_like_torchvision():
    from torchvision.transforms import v2

    from fersearch.augment import Mix

    torch.manual_seed(5)
    images = torch.rand(4, 1, 48, 48) + 1.0  # no pixel equals its neighbour image's
    labels = torch.tensor([0, 1, 2, 3])
    out_images, out_labels = v2.CutMix(alpha=1.0, num_classes=8)(images, labels)
    theirs = (out_images[0] != images[0]).float().mean()
    assert float(out_labels[0, 3]) == pytest.approx(float(theirs))
    mix = Mix(cutmix_alpha=1.0, prob=1.0)
    targets = torch.softmax(torch.randn(4, 8), 1)
    for seed in range(20):
        mixed, mixed_targets = mix(images, targets, torch.Generator().manual_seed(seed))
        pasted = float((mixed[0] != images[0]).float().mean())
        # The rolled-in sample's weight is the area that came from it, as in torchvision.
        weight = pasted
        assert torch.allclose(mixed_targets[0], (1 - weight) * targets[0] + weight * targets[3], atol=1e-6)
        assert torch.allclose(mixed_targets.sum(1), torch.ones(4))


def test_mix_probability_and_off_switch():
    from fersearch.augment import Mix

    x, y = torch.rand(8, 1, 4, 4), torch.softmax(torch.randn(8, 3), 1)
    assert Mix(mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0)(x, y, torch.Generator())[0] is x
    gen = torch.Generator().manual_seed(0)
    mixed = sum(Mix(mixup_alpha=0.4, prob=0.3)(x, y, gen)[0] is not x for _ in range(400))
    assert 80 < mixed < 160  # ~30% of batches


def test_ema_follows_averaged_model_on_a_toy_model():
    """The EMA with its warm-up, against torch's per-tensor averaging with the rule written out:
    step n (n updates so far) averages with weight 1 - min(decay, (1 + n) / (10 + n))."""
    from torch.optim.swa_utils import AveragedModel

    from fersearch.augment import Augment
    from fersearch.config import resolve_config
    from fersearch.engine import Loss, Normalize, build_ema

    cfg = resolve_config("cnn", {"ema_decay": 0.9, "lr": 0.1})
    torch.manual_seed(0)
    toy = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48 * 48, 4), torch.nn.BatchNorm1d(4))

    def warmed(averaged, current, n):
        decay = min(0.9, (1 + int(n)) / (10 + int(n)))
        return decay * averaged + (1 - decay) * current

    reference = AveragedModel(toy, avg_fn=warmed, use_buffers=True)
    ema = build_ema(cfg, toy)
    optimizer = build_optimizer(cfg, toy)

    images = torch.randint(0, 256, (40, 48, 48), dtype=torch.uint8)
    targets = torch.softmax(torch.randn(40, 4), 1)
    steps = []
    original_step = optimizer.step

    def step_and_follow(*a, **k):
        out = original_step(*a, **k)
        reference.update_parameters(toy)  # the reference average, after every optimizer step
        steps.append(1)
        return out

    optimizer.step = step_and_follow
    train_one_epoch(toy, images, targets, optimizer=optimizer, loss_fn=Loss("probability"),
                    normalize=Normalize(0.5, 0.25), augment=Augment(), batch_size=8, gen=torch.Generator(), ema=ema)
    assert len(steps) == 5 and int(ema.n_averaged) == 5
    for ours, theirs in zip(ema.module.state_dict().values(), reference.module.state_dict().values(), strict=True):
        assert torch.allclose(ours.float(), theirs.float())
    # And it is an average, not the live weights.
    assert not torch.allclose(ema.module[1].weight, toy[1].weight)


def test_trainer_validates_and_checkpoints_the_ema_weights(synthetic_dir):
    from fersearch.config import resolve_config
    from fersearch.data import apply_protocol, load_raw
    from fersearch.training import Trainer

    cfg = resolve_config("cnn", {"ema_decay": 0.5, "epochs": 2})
    trainer = Trainer(cfg, apply_protocol(load_raw(synthetic_dir), "ferplus8"), "cpu")
    row = trainer.run_epoch()
    ema_state = trainer.ema.module.state_dict()
    assert all(torch.equal(trainer.best_state[k], v) for k, v in ema_state.items())
    assert any(not torch.equal(trainer.model.state_dict()[k], v) for k, v in ema_state.items() if v.is_floating_point())
    val = evaluate(trainer.ema.module, trainer.val_images, trainer.data.valid.labels, trainer.data.classes, trainer.normalize)
    assert row[M.VAL_ACCURACY] == val["accuracy"]
    # A resumed trainer continues the same average.
    state = trainer.state_dict()
    again = Trainer(cfg, trainer.data, "cpu")
    again.load_state_dict(state)
    assert all(torch.equal(again.ema.module.state_dict()[k], v) for k, v in ema_state.items())
    best = trainer.best_model()
    assert all(torch.equal(best.state_dict()[k], v) for k, v in ema_state.items())


def test_warmup_ramps_the_lr_then_hands_over_to_the_scheduler():
    from fersearch.config import resolve_config

    lrs = _lrs(resolve_config("cnn", {"lr": 0.1, "warmup_epochs": 2, "scheduler": "cosine", "epochs": 6}), 4, 6)
    # Linear from lr/8 to lr over the first 8 batches, then cosine over the remaining 4 epochs.
    assert lrs[:8] == pytest.approx([0.1 * (i + 1) / 8 for i in range(8)])
    cosine = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert lrs[8:] == pytest.approx([c for c in cosine for _ in range(4)])
    # A fractional warm-up ends mid-epoch; the epoch scheduler starts at the next whole epoch.
    lrs = _lrs(resolve_config("cnn", {"lr": 0.1, "warmup_epochs": 0.5, "scheduler": "cosine", "epochs": 3}), 4, 3)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1] + [0.1] * 4 + [0.05] * 4)
    with pytest.raises(FersearchError, match="onecycle warms up by itself"):
        resolve_config("cnn", {"warmup_epochs": 1, "scheduler": "onecycle"})


def _lrs(cfg, steps_per_epoch, epochs):
    from fersearch.engine import build_schedule

    optimizer = build_optimizer(cfg, torch.nn.Linear(2, 2))
    schedule = build_schedule(cfg, optimizer, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.after_batch()
        schedule.after_epoch(0.0)
    return lrs


def test_wsd_warms_up_holds_then_decays_and_its_start_does_not_depend_on_the_budget():
    from fersearch.config import resolve_config

    short = _lrs(resolve_config("cnn", {"lr": 0.1, "scheduler": "wsd", "warmup_epochs": 0.5, "decay_fraction": 0.25, "epochs": 4}), 8, 4)
    long = _lrs(resolve_config("cnn", {"lr": 0.1, "scheduler": "wsd", "warmup_epochs": 0.5, "decay_fraction": 0.25, "epochs": 24}), 8, 24)
    assert short[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # warm-up: half an epoch of 8 batches
    assert short[4:24] == pytest.approx([0.1] * 20)  # stable until the last quarter (epoch 3 of 4)
    decay = short[24:]
    assert decay[0] == pytest.approx(0.1) and all(a > b for a, b in zip(decay, decay[1:], strict=False)) and decay[-1] < 0.005
    # Everything a trial of 24 epochs sees before its decay (epoch 18) is what a 4-epoch one saw
    # before its own: ASHA's early rungs compare like with like.
    assert long[:24] == pytest.approx(short[:24]) and long[24:144] == pytest.approx([0.1] * 120)


def test_a_search_schedule_is_the_same_whatever_the_budget_until_the_decay():
    """The default space's schedule (wsd) gives the same LR at the first three rungs for a 24-
    and a 12-epoch budget; one-cycle does not (its warm-up spans 30% of the budget)."""
    from fersearch.config import resolve_config

    def at_rungs(extra, epochs):
        lrs = _lrs(resolve_config("cnn", {"lr": 0.1, "epochs": epochs, **extra}), 4, epochs)
        return [lrs[round(r * 4) - 1] for r in (0.25, 0.75, 2.25)]

    wsd = {"scheduler": "wsd", "warmup_epochs": 0.25}
    assert at_rungs(wsd, 24) == pytest.approx(at_rungs(wsd, 12))
    assert at_rungs({"scheduler": "onecycle"}, 24) != pytest.approx(at_rungs({"scheduler": "onecycle"}, 12))


def test_a_decayed_branch_is_scored_and_the_run_goes_on_as_if_it_had_never_been(synthetic_dir):
    """Trainer.cooldown trains a branch with the LR on a cosine from its current value to 0,
    scores it, and puts every piece of training state back: the run after it is bit-identical
    to one without it (weights, EMA, optimizer, schedule, random streams, best epoch)."""
    from fersearch.engine import cooldown_schedule

    data = load_dataset(synthetic_dir, "ferplus8")
    cfg = resolve_config("cnn", {"epochs": 4, "scheduler": "wsd", "warmup_epochs": 0.25, "lr": 0.05, "ema_decay": 0.99,
                                 "shift": 0.1, "erasing": 0.3, "mixing": "mixup", "mixup_alpha": 0.2, "mix_prob": 0.5,
                                 "dropout": 0.3})
    plain = Trainer(cfg, data, "cpu")  # each run on its own: dropout draws from torch's global stream
    plain.run_epoch()
    plain.run_epoch()
    branched = Trainer(cfg, data, "cpu")
    branched.run_epoch()
    lr = branched.optimizer.param_groups[0]["lr"]
    cooled = branched.cooldown(0.5)
    assert set(cooled) == {M.COOLED_ACCURACY, M.JUDGE_METRIC, M.COOLED_SECONDS} and cooled[M.COOLED_SECONDS] > 0
    assert 0 <= cooled[M.COOLED_ACCURACY] <= 1 and 0 <= cooled[M.JUDGE_METRIC] <= 1
    assert branched.optimizer.param_groups[0]["lr"] == lr and branched.best_state is not None
    assert (branched.epoch, branched.best_epoch) == (1, 1) and len(branched.history) == 1
    branched.run_epoch()
    assert plain.history[-1][M.TRAIN_LOSS] == branched.history[-1][M.TRAIN_LOSS]
    for mine, theirs in ((plain.model, branched.model), (plain.eval_model, branched.eval_model)):
        for (name, a), b in zip(mine.state_dict().items(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    # The branch's LR: from the current value (not the configured one) down to 0.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    optimizer.param_groups[0]["initial_lr"] = 0.5  # where a run's own scheduler started
    schedule, lrs = cooldown_schedule(optimizer, 10), []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.after_batch()
    assert lrs[0] == pytest.approx(0.2) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] < 0.01


def test_a_decayed_branch_that_diverges_judges_zero_and_the_run_goes_on_as_before(synthetic_dir):
    """A branch whose loss turns non-finite is scored as a diverged trial is (judge 0, no cooled
    accuracy), its seconds still count as time outside the trial's pace, and the run's own state
    is put back exactly."""
    data = load_dataset(synthetic_dir, "ferplus8")
    cfg = resolve_config("cnn", {"epochs": 4, "scheduler": "wsd", "warmup_epochs": 0.25, "lr": 0.05})
    trainer = Trainer(cfg, data, "cpu")
    trainer.run_epoch()
    trainer.optimizer.param_groups[0]["lr"] = 1e12  # the branch starts from the current LR: it cannot stay finite
    before = copy.deepcopy(trainer.state_dict(include_best=False))
    cooled = trainer.cooldown(0.5)
    assert set(cooled) == {M.JUDGE_METRIC, M.COOLED_SECONDS} and cooled[M.JUDGE_METRIC] == 0.0 and cooled[M.COOLED_SECONDS] > 0
    assert trainer.optimizer.param_groups[0]["lr"] == 1e12 and trainer.epoch == 1
    after = trainer.state_dict(include_best=False)
    for name, a in before["model"].items():
        assert torch.equal(a, after["model"][name]), name


def test_a_trial_cools_only_at_a_whole_epoch_of_a_wsd_runs_stable_phase():
    from fersearch.trainable import cools_at

    wsd = resolve_config("cnn", {"epochs": 24, "scheduler": "wsd", "warmup_epochs": 0.25, "decay_fraction": 0.2})
    assert cools_at(wsd, 4) and cools_at(wsd, 1) and cools_at(wsd, 19)
    assert not cools_at(wsd, None) and not cools_at(wsd, 0.25) and not cools_at(wsd, 20)  # 20: the decay has begun
    assert not cools_at(resolve_config("cnn", {"epochs": 24, "scheduler": "onecycle"}), 4)


ALLOCATOR_PROBE = """
import ctypes, sys
from fersearch.engine import tune_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)

def cycle():
    p = libc.malloc(SIZE)
    held = libc.mallinfo2()
    libc.free(p)
    return held.hblkhd, libc.mallinfo2().fordblks

mapped_before, _ = cycle()
tune_cpu_allocator()
tune_cpu_allocator()  # a second call changes nothing
mapped_after, free_after = cycle()
print(mapped_before >= SIZE, mapped_after < SIZE, free_after >= SIZE)
"""


def test_tune_cpu_allocator_keeps_freed_buffers_in_the_heap():
    """Before: a 64 MiB buffer is its own mmap, unmapped on free. After: it comes from the heap
    and stays there, free for the next step, once freed."""
    if not sys.platform.startswith("linux") or "glibc" not in " ".join(platform.libc_ver()):
        pytest.skip("glibc's mallopt only")
    result = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True", "True"]
