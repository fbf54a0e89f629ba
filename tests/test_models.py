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
    "overrides",
    [
        {"channels": "32,64,128", "padding": "same", "kernel_size": 3, "fc": "256"},
        {"channels": "6", "batch_norm": False, "activation": "sigmoid", "dropout": 0.0},
        {"channels": "16,32", "activation": "gelu", "fc": ""},
    ],
)
def test_cnn_family_variants(overrides):
    model = build_model(resolve_config("cnn", overrides), 8)
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 8)


def test_resnet_small_stem_and_freezing():
    small = build_model(resolve_config("resnet18", {"pretrained": False, "stem": "small"}), 8)
    assert small(torch.randn(2, 1, 48, 48)).shape == (2, 8)
    body = build_model(resolve_config("resnet18", {"pretrained": False, "freeze": "body"}), 8)
    head = build_model(resolve_config("resnet18", {"pretrained": False, "freeze": "all_but_head"}), 8)
    assert count_parameters(head, trainable_only=True) == 512 * 8 + 8
    assert count_parameters(body, trainable_only=True) == 512 * 8 + 8 + 64 * 49 + 128


def test_pretrained_weights_from_a_local_file_fold_the_rgb_stem(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    imagenet_like = resnet18(weights=None)
    torch.save(imagenet_like.state_dict(), tmp_path / "weights.pth")
    model = build_model(resolve_config("resnet18", {"pretrained_path": str(tmp_path / "weights.pth")}), 8)
    assert torch.allclose(model.conv1.weight, imagenet_like.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, imagenet_like.layer1[0].conv1.weight)
    with pytest.raises(FersearchError, match="does not exist"):
        build_model(resolve_config("resnet18", {"pretrained_path": str(tmp_path / "nope.pth")}), 8)


def test_imagenet_weights_offline_fail_clearly(tmp_path, monkeypatch):
    # A closed local port stands in for "no network": the real download code runs and fails.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(FersearchError, match="pretrained_path=FILE"):
        build_model(resolve_config("resnet18"), 8)
