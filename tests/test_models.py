"""Every registered model, through the registry (generated from it, as timm's tests)."""

import pytest
import torch

from cnnbench.models import get_model, list_models, model_entry, register_model

# parameters with 10 classes, counted by hand from the layer sizes (see each model's file)
EXPECTED_PARAMS = {
    "lenet5": 61_706,  # 156 + 2,416 + 48,120 + 10,164 + 850
    "lenet": 61_706,  # document 000's ReLU LeNet: the same layers
    "alexnet": 163_146,
    "alexnet_paper": 58_322_314,  # 34,944 + 614,656 + 885,120 + 1,327,488 + 884,992 + 37,752,832 + 16,781,312 + 40,970
    "alexnet_tv": 57_044_810,  # torchvision's 61,100,840 less 990 classes of FC8
    "inception": 97_298,  # 260 + 19,104 + 44,020 + 19,824 + 14,090
    "resnet": 41_514,  # 416 + 4,640 + 12,832 + 18,496 + 5,130
    "resnet_bn": 41_658,  # resnet less 144 conv biases, plus 288 batch-norm weights and shifts
    "resnet18": 11_181_642,
    "googlenet": 5_610_154,
    "vgg16": 134_301_514,
}
LARGE = {"alexnet_paper", "alexnet_tv", "googlenet", "resnet18", "vgg16"}


def test_every_model_has_an_expected_count():
    assert sorted(EXPECTED_PARAMS) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_parameter_count(name):
    assert sum(p.numel() for p in get_model(name).parameters()) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", list_models())
def test_logits_shape_in_train_and_eval(name):
    torch.manual_seed(0)
    model = get_model(name)
    x = torch.randn(2, 1, 28, 28)
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            out = model(x)
        assert type(out) is torch.Tensor, f"{name} returns {type(out)} in {'train' if mode else 'eval'} mode"
        assert out.shape == (2, 10)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(set(list_models()) - LARGE))
@pytest.mark.parametrize("dataset", [(1, 28), (3, 32)])
def test_small_models_adapt_to_the_input(name, dataset):
    channels, size = dataset
    model = get_model(name, in_channels=channels, image_size=size, num_classes=7)
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)


def test_activation_replaces_sigmoid_and_tanh_in_lenet5():
    mods = lambda m: {type(x).__name__ for x in m.modules()}  # noqa: E731
    assert {"Sigmoid", "Tanh"} <= mods(get_model("lenet5"))
    relu = mods(get_model("lenet5", activation="relu"))
    assert "ReLU" in relu and not {"Sigmoid", "Tanh"} & relu


def test_lenet_of_document_000_differs_from_lenet5_relu_only_after_c5():
    a = get_model("lenet", activation="relu")
    b = get_model("lenet5", activation="relu")
    count = lambda m: sum(isinstance(x, torch.nn.ReLU) for x in m.modules())  # noqa: E731
    assert count(a) == count(b) + 1


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(KeyError, match="known: alexnet"):
        get_model("lenet7")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5")(lambda **kw: None)


def test_model_without_activation_setting_refuses_one():
    assert "activation" not in model_entry("resnet18").settings
    with pytest.raises(ValueError, match="no activation setting"):
        get_model("resnet18", activation="relu")
