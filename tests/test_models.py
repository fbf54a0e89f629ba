import pytest
import torch

from fersearch.config import resolve_config
from fersearch.errors import FersearchError
from fersearch.models import MODELS, build_model, count_parameters

# Parameter counts with 10 outputs: the seed's Net, and ResNet-18 with a one-channel stem.
EXPECTED_PARAMS = {"cnn": 169_270, "resnet18": 11_175_370}
SCRATCH = {"cnn": {}, "resnet18": {"pretrained": False}}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_forward(name):
    assert name in EXPECTED_PARAMS, f"add {name} to EXPECTED_PARAMS"
    torch.manual_seed(0)
    model = build_model(resolve_config(name, SCRATCH[name]), 10)
    assert count_parameters(model) == EXPECTED_PARAMS[name]
    out = model(torch.randn(4, 1, 48, 48))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "overrides, convs, activation, batch_norms, linears",
    [
        ({"channels": "32,64,128", "padding": "same", "kernel_size": 3, "fc": "256"},
         [32, 64, 128], torch.nn.ReLU, 3, [(128 * 6 * 6, 256), (256, 8)]),
        ({"channels": "6", "batch_norm": False, "activation": "sigmoid", "dropout": 0.0},
         [6], torch.nn.Sigmoid, 0, [(6 * 22 * 22, 120), (120, 84), (84, 8)]),
        ({"channels": "16,32", "activation": "gelu", "fc": ""}, [16, 32], torch.nn.GELU, 2, [(32 * 9 * 9, 8)]),
    ],
)
def test_cnn_family_variants(overrides, convs, activation, batch_norms, linears):
    """Each variant builds what its config says: conv widths, activation, BN, the head's layers."""
    model = build_model(resolve_config("cnn", overrides), 8)
    modules = list(model.modules())
    assert [m.out_channels for m in modules if isinstance(m, torch.nn.Conv2d)] == convs
    assert any(isinstance(m, activation) for m in modules)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in modules) == batch_norms
    assert [(m.in_features, m.out_features) for m in modules if isinstance(m, torch.nn.Linear)] == linears
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 8)


def test_resnet_small_stem_and_freezing():
    small = build_model(resolve_config("resnet18", {"pretrained": False, "stem": "small"}), 8)
    assert small(torch.randn(2, 1, 48, 48)).shape == (2, 8)
    body = build_model(resolve_config("resnet18", {"pretrained": False, "freeze": "body"}), 8)
    head = build_model(resolve_config("resnet18", {"pretrained": False, "freeze": "all_but_head"}), 8)
    assert count_parameters(head, trainable_only=True) == 512 * 8 + 8
    assert count_parameters(body, trainable_only=True) == 512 * 8 + 8 + 64 * 49 + 128


def _imagenet_like_file(tmp_path):
    """A weights file in torchvision's ResNet-18 layout (a seeded random initialisation with
    non-trivial BN statistics): the ImageNet path, tested offline."""
    from torchvision.models import resnet18

    torch.manual_seed(1)
    source = resnet18(weights=None)
    with torch.no_grad():
        for buffer in source.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    return source.state_dict(), str(tmp_path / "weights.pth")


def test_pretrained_weights_from_a_local_file_fold_the_rgb_stem_and_copy_the_rest(tmp_path):
    source, path = _imagenet_like_file(tmp_path)
    model = build_model(resolve_config("resnet18", {"pretrained_path": path}), 8)
    loaded = model.state_dict()
    # The one-channel stem is the sum of the three RGB filters (a gray pixel is R=G=B).
    assert loaded["conv1.weight"].shape == (64, 1, 7, 7)
    assert torch.allclose(loaded["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    # Every other tensor but the new 8-class head is copied unchanged.
    copied = [k for k in source if k != "conv1.weight" and not k.startswith("fc.")]
    assert len(copied) == len(source) - 3 and all(torch.equal(loaded[k], source[k]) for k in copied)
    assert loaded["fc.weight"].shape == (8, 512)
    # The small stem keeps the body's weights and starts its 3x3 stem afresh.
    small = build_model(resolve_config("resnet18", {"pretrained_path": path, "stem": "small"}), 8).state_dict()
    assert small["conv1.weight"].shape == (64, 1, 3, 3) and torch.equal(small["layer4.1.bn2.weight"], source["layer4.1.bn2.weight"])
    with pytest.raises(FersearchError, match="does not exist"):
        build_model(resolve_config("resnet18", {"pretrained_path": str(tmp_path / "nope.pth")}), 8)
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(FersearchError, match="do not fit resnet18"):
        build_model(resolve_config("resnet18", {"pretrained_path": str(tmp_path / "other.pth")}), 8)


@pytest.mark.parametrize("freeze, trains", [("body", {"conv1", "bn1", "fc"}), ("all_but_head", {"fc"}), ("none", None)])
def test_freezing_trains_only_what_it_says(freeze, trains, tmp_path):
    """One real optimizer step (the engine's optimizer, with weight decay): the frozen tensors
    keep their pretrained values, the trained ones move."""
    from fersearch.engine import build_optimizer

    _, path = _imagenet_like_file(tmp_path)
    cfg = resolve_config("resnet18", {"pretrained_path": path, "freeze": freeze, "weight_decay": 0.01})
    model = build_model(cfg, 8)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    grads = {k for k, p in model.named_parameters() if p.requires_grad}
    tops = {k.split(".")[0] for k in before}
    assert {k.split(".")[0] for k in grads} == (trains if trains is not None else tops)
    optimizer = build_optimizer(cfg, model)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 48, 48)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()
    moved = {k for k, p in model.named_parameters() if not torch.equal(p.detach(), before[k])}
    assert moved == grads


def test_imagenet_weights_offline_fail_clearly(tmp_path, monkeypatch):
    # A closed local port stands in for "no network": the real download code runs and fails.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(FersearchError, match="pretrained_path=FILE"):
        build_model(resolve_config("resnet18"), 8)


# One fixed configuration per new axis, with its parameter count worked out by hand (8 outputs).
SAME3 = {"padding": "same", "kernel_size": 3}
AXES = {
    # conv 1->8 (80) + BN (16); conv 8->8 (584) + BN (16); pool 48->24; conv 8->16 (1,168) + BN
    # (32); conv 16->16 (2,320) + BN (32); pool 24->12; flatten 16*12*12=2304 -> 8 (18,440).
    "vgg": ({**SAME3, "channels": "8,16", "convs_per_stage": "2", "fc": "", "stage_dropout": 0.2}, 22_688),
    # stage 1 (1->8): body conv (80) + BN (16) + conv 8->8 (584) + BN (16), shortcut 1x1 1->8
    # without bias (8) + BN (16); stage 2 (8->16): 1,168 + 32 + 2,320 + 32, shortcut 128 + 32;
    # GAP -> 16 -> 8 (136).
    "residual": ({**SAME3, "channels": "8,16", "convs_per_stage": "2", "block": "residual", "head": "gap", "fc": ""}, 4_568),
    # stage 1: standard conv 1->8 (80) + BN (16); stage 2: depthwise 3x3 on 8 (72) + 1x1 8->16
    # (144) + BN (32); stage 3: depthwise on 16 (144) + 1x1 16->32 (544) + BN (64);
    # GAP -> 32 -> fc 16 (528) -> 8 (136).
    "separable": ({**SAME3, "channels": "8,16,32", "conv_type": "separable", "head": "gap", "fc": "16"}, 1_760),
    # conv 1->4 (40) + BN (8), pool 48->24; convs_per_stage "1,2": conv 4->8 (296) + BN (16),
    # conv 8->8 (584) + BN (16), pool 24->12; GAP -> 8 -> 8 (72).
    "per-stage convs + gap": ({**SAME3, "channels": "4,8", "convs_per_stage": "1,2", "head": "gap", "fc": ""}, 1_032),
}


@pytest.mark.parametrize("axis", sorted(AXES))
def test_every_architecture_axis_counts_trains_and_round_trips(axis, tmp_path):
    from fersearch.augment import Augment
    from fersearch.bundle import PixelModel
    from fersearch.engine import Loss, Normalize, build_optimizer, train_one_epoch

    overrides, expected = AXES[axis]
    cfg = resolve_config("cnn", overrides)
    torch.manual_seed(0)
    model = build_model(cfg, 8)
    assert count_parameters(model) == expected
    # One training batch through the engine (the CPU kernels' path) moves every weight.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (16, 48, 48), dtype=torch.uint8)
    targets = torch.softmax(torch.randn(16, 8), 1)
    train_one_epoch(model, images, targets, optimizer=build_optimizer(cfg, model), loss_fn=Loss("probability"),
                    normalize=Normalize(0.5, 0.25), augment=Augment(), batch_size=16, gen=torch.Generator())
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(moved) >= len(list(model.parameters()))
    # Same outputs after a state-dict round trip and through TorchScript (what export writes).
    model.eval()
    x = torch.randn(3, 1, 48, 48)
    rebuilt = build_model(cfg, 8)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert torch.allclose(rebuilt(x), model(x), atol=1e-6)
    traced = torch.jit.trace(PixelModel(model, 0.5, 0.25).eval(), torch.zeros(1, 1, 48, 48))
    traced.save(str(tmp_path / "m.pt"))
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    pixels = torch.rand(3, 1, 48, 48) * 255
    assert torch.allclose(loaded(pixels), PixelModel(model, 0.5, 0.25).eval()(pixels), atol=1e-5)


def test_kernel_path_matches_pytorch_layers_for_a_deep_family_member():
    cfg = resolve_config("cnn", {**SAME3, "channels": "8,16,32", "convs_per_stage": "1,2", "fc": "16", "dropout": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg, 8).train()
    x = torch.randn(4, 1, 48, 48)
    fast = model(x)
    model.use_kernels = False
    assert torch.allclose(fast, model(x), atol=1e-4)


def test_invalid_family_combinations_are_refused():
    with pytest.raises(FersearchError, match="residual .* needs padding=same"):
        resolve_config("cnn", {"block": "residual"})
    with pytest.raises(FersearchError, match="convs_per_stage takes 1 to 2 counts"):
        resolve_config("cnn", {"convs_per_stage": "1,2,2"})
    with pytest.raises(FersearchError, match="shrink a 48x48 input to nothing"):
        resolve_config("cnn", {"channels": "8,16,32", "convs_per_stage": "3"})


def test_training_flops_follow_the_architecture():
    from fersearch.models import training_flops

    seed = build_model(resolve_config("cnn"), 10)
    # Forward multiply-adds of the seed Net: conv1 44*44*6*25, conv2 18*18*16*6*25, fc layers;
    # training = forward + input and weight gradients (the first conv has no input gradient).
    conv1, conv2 = 44 * 44 * 6 * 25, 18 * 18 * 16 * 150
    fc = 1296 * 120 + 120 * 84 + 84 * 10
    expected = 2 * (conv1 + conv2 + fc) + 2 * (conv1 + 2 * conv2 + 2 * fc)
    assert training_flops(seed) == expected


@pytest.mark.parametrize(
    ("overrides", "side"),
    [
        # k=4, same: a convolution adds one. 48 -> 49 -> pool 24; 24 -> 25 -> 26 -> 13; 13 -> 15 -> 7.
        ({"padding": "same", "kernel_size": 4, "channels": "4,8,8", "convs_per_stage": "1,2", "fc": ""}, 7),
        # k=2, same: 48 -> 51 -> pool 25; 25 -> 28 -> 14.
        ({"padding": "same", "kernel_size": 2, "channels": "4,8", "convs_per_stage": "3", "fc": "16"}, 14),
        # k=4, valid: a convolution takes three. 48 -> 42 -> pool 21; 21 -> 15 -> 7.
        ({"padding": "valid", "kernel_size": 4, "channels": "4,8", "convs_per_stage": "2", "fc": ""}, 7),
        # k=5, same: the side is kept. 48 -> 24 -> 12 -> 6 -> 3.
        ({"padding": "same", "kernel_size": 5, "channels": "4,8,8,8", "convs_per_stage": "1", "fc": ""}, 3),
    ],
)
def test_feature_size_is_the_map_the_network_makes(overrides, side):
    """`CNNConfig.feature_size` sizes the flatten head; it must be the side the layers make,
    which for an even kernel with padding=same is not the side of an odd one."""
    cfg = resolve_config("cnn", {**overrides, "head": "flatten"})
    assert cfg.feature_size == side
    model = build_model(cfg, 8).eval()
    with torch.no_grad():
        assert model.features(torch.zeros(2, 1, 48, 48)).shape[-2:] == (side, side)
        assert model(torch.zeros(2, 1, 48, 48)).shape == (2, 8)


def test_residual_stages_need_an_odd_kernel():
    with pytest.raises(FersearchError, match="odd kernel_size"):
        resolve_config("cnn", {"padding": "same", "kernel_size": 4, "block": "residual"})
