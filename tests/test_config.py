import pytest
import torch

from fersearch import config as C
from fersearch import engine, models
from fersearch.errors import FersearchError


def test_defaults_are_the_seed_reports_final_choices():
    cnn = C.resolve_config("cnn")
    assert (cnn.optimizer, cnn.lr, cnn.scheduler, cnn.gamma, cnn.batch_size) == ("sgd", 0.01, "exponential", 0.9, 32)
    assert (cnn.dropout, cnn.activation, cnn.label_mode, cnn.protocol) == (0.1, "relu", "probability", "ferplus8")
    assert (cnn.channels, cnn.kernel_size, cnn.fc, cnn.batch_norm) == ((6, 16), 5, (120, 84), True)
    res = C.resolve_config("resnet18")
    assert (res.optimizer, res.lr, res.scheduler, res.gamma, res.batch_size) == ("adam", 0.001, "exponential", 0.9, 32)
    assert res.pretrained and res.freeze == "none"


def test_strings_are_coerced_to_field_types():
    cfg = C.resolve_config("cnn", C.parse_assignments(["lr=0.1", "flip=false", "channels=32,64,128", "epochs=3", "padding=same"]))
    assert cfg.lr == 0.1 and cfg.flip is False and cfg.channels == (32, 64, 128) and cfg.epochs == 3


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"learning_rate": "0.1"}, "unknown hyperparameter 'learning_rate'"),
        ({"lr": "-0.1"}, "lr=-0.1 is out of range"),
        ({"lr": "abc"}, "lr='abc' is not a number"),
        ({"epochs": "2.5"}, "epochs='2.5' is not an integer"),
        ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
        ({"label_mode": "votes"}, "unknown label_mode 'votes'"),
        ({"protocol": "fer7"}, "unknown protocol 'fer7'"),
        ({"flip": "maybe"}, "flip='maybe' is not true/false"),
        ({"nesterov": "true", "optimizer": "adam"}, "nesterov needs optimizer=sgd"),
        ({"channels": "6,16,32,64,128"}, "shrink a 48x48 input to nothing"),
        ({"pretrained": "true"}, "unknown hyperparameter 'pretrained' for model cnn"),
    ],
)
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(FersearchError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        C.resolve_config("cnn", overrides)


def test_unknown_model_and_bad_assignment():
    with pytest.raises(FersearchError, match="unknown model 'vgg'"):
        C.resolve_config("vgg")
    with pytest.raises(FersearchError, match="key=value"):
        C.parse_assignments(["lr"])


def test_config_round_trips_through_dict():
    cfg = C.resolve_config("cnn", {"channels": "8,16,32", "padding": "same", "lr": 0.05})
    assert C.config_from_dict(cfg.to_dict()) == cfg
    assert cfg.to_params()["channels"] == "8,16,32"


def test_names_in_config_match_the_building_registries():
    assert set(C.MODEL_CONFIGS) == set(models.MODELS)
    assert set(C.ACTIVATIONS) == set(models.ACTIVATIONS)
    net = models.build_model(C.resolve_config("cnn", {"epochs": 2}), 8)
    optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    assert set(optimizers) == set(C.OPTIMIZERS)
    for name, cls in optimizers.items():
        opt = engine.build_optimizer(C.resolve_config("cnn", {"optimizer": name, "lr": 0.03}), net)
        assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.03, name
    schedulers = {
        "none": None,
        "exponential": torch.optim.lr_scheduler.ExponentialLR,
        "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau,
        "cosine": torch.optim.lr_scheduler.CosineAnnealingLR,
        "onecycle": torch.optim.lr_scheduler.OneCycleLR,
        "wsd": torch.optim.lr_scheduler.LambdaLR,
    }
    assert set(schedulers) == set(C.SCHEDULERS)
    for name, cls in schedulers.items():
        cfg = C.resolve_config("cnn", {"scheduler": name, "epochs": 2})
        schedule = engine.build_schedule(cfg, engine.build_optimizer(cfg, net), 10)
        assert (schedule.scheduler is None) if cls is None else type(schedule.scheduler) is cls, name


def test_a_parameter_added_later_keeps_stored_results_found_at_its_neutral_value():
    """config_key of a config with `resample` at 0 is the key the version before `resample`
    existed gave (commit 46ae93a, the literals below), so a stored known point is not trained
    again; any other value of it is another result."""
    from fersearch.tracking import config_key

    modern = C.RECIPES["cnn"]["modern"]
    assert config_key("cnn", {}, "fingerprint") == "c893729563653fbc82e783568f9d17aa"
    assert config_key("cnn", {**modern, "resample": 0.0}, "fingerprint") == "d9853583cab78d24976e2740e0a48dca"
    assert config_key("cnn", {**modern, "resample": 0.5}, "fingerprint") != config_key("cnn", modern, "fingerprint")
    for name, neutral in C.KEY_NEUTRAL.items():  # the defaults are neutral: a default config trains as before
        assert getattr(C.resolve_config("cnn"), name) == neutral


# sha256 of the two random streams (the trainer's data/augmentation generator, torch's global one)
# after one epoch of each known point of the default cnn space on the tests' synthetic set, taken
# on commit 6c227ae, the version whose known-point results the stores hold.
KNOWN_POINT_STREAMS = {
    "seed": "d9e93becab8606199ded3a0ff6dbd4588ca7f6bd39b6454eac5d0e4c153518ce",
    "modern": "10cf5a9efa2057115af50a0cad985ce816debee5352111f9933f15ec05b145bf",
}


@pytest.mark.parametrize("point", sorted(KNOWN_POINT_STREAMS))
def test_a_known_point_draws_the_random_numbers_its_stored_result_drew(point, synthetic_dir):
    """A stored known-point result is reused by its config key (tracking.config_key), which leaves
    out a parameter of KEY_NEUTRAL at its neutral value. That is only sound if the neutral value
    draws nothing: one more draw anywhere shifts every augmentation and dropout mask after it, and
    the training the stored result stands for is no longer this one. The count of draws does not
    depend on float rounding, so the digest is the same on every machine."""
    import hashlib

    from fersearch.data import load_dataset
    from fersearch.space import default_space_path, load_space
    from fersearch.training import Trainer

    space = load_space(default_space_path("cnn"), "cnn")
    params = {**space.point(point), **C.KEY_NEUTRAL, "epochs": 1}
    trainer = Trainer(C.resolve_config("cnn", params), load_dataset(synthetic_dir, "ferplus8"), "cpu")
    trainer.run_epoch()
    streams = trainer.gen.get_state().numpy().tobytes() + torch.default_generator.get_state().numpy().tobytes()
    assert hashlib.sha256(streams).hexdigest() == KNOWN_POINT_STREAMS[point], (
        "a known point draws other random numbers than the version whose stored results it reuses: a parameter's "
        "neutral value (config.KEY_NEUTRAL) must draw nothing; if training changed on purpose, change "
        "config.FIDELITY (stored results are trained again) and these digests"
    )


def test_the_first_rung_comes_after_about_the_same_number_of_faces_on_any_data():
    """Without --grace-period, ASHA's first rung is the report nearest SEARCH_FIRST_RUNG_FACES
    faces: a quarter epoch of FERPlus's 28,558 training faces, one epoch of the 6,000-face
    synthetic set; never before the first report, and never so late that the budget has no rung."""
    assert C.SEARCH_FIRST_RUNG_FACES == 6000
    assert C.first_rung(28_558, 24, 4) == 0.25 and C.asha_rungs(0.25, 4, 24) == [0.25, 1, 4, 16]
    assert C.first_rung(6_000, 4, 4) == 1.0 and C.asha_rungs(1.0, 4, 4) == [1.0]
    assert C.first_rung(5_900, 4, 4) == 1.0  # the nearest report, not the first one past the count
    assert C.first_rung(3_000, 24, 4) == 2.0
    assert C.first_rung(1_000_000, 24, 4) == 0.25  # at least one report of training
    assert C.first_rung(240, 4, 4) == 1.0 and C.first_rung(240, 2, 4) == 0.5  # capped at max_epochs / factor
    assert C.first_rung(240, 1, 8) == 0.25  # a budget too short for the cap still gets its first report
