"""Target loading: torchvision names, TorchScript files, module:callable."""

import sys
import types

import pytest
import torch

from builder.backends.targets import load_target
from builder.errors import BackendError, LayerError

CPU = torch.device("cpu")


def test_torchvision_by_name_with_random_weights():
    t = load_target("r", "resnet18", {"num_classes": 7}, CPU)
    assert t.input_size == (224, 224)
    assert t.module.fc.out_features == 7
    t.check_layers(["layer4", "fc"])
    with pytest.raises(LayerError, match="valid layers: conv1, bn1"):
        t.check_layers(["layer9"])


def test_torchscript_file(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    path = tmp_path / "m.pt"
    torch.jit.script(m).save(str(path))
    t = load_target("ts", str(path), {"size": 32, "resize": 40}, CPU)
    assert t.input_size == (32, 32)
    assert "0" in t.layer_names()


def test_module_callable_and_native_size():
    mod = types.ModuleType("my_targets")

    def factory(width=3):
        return torch.nn.Conv2d(3, width, 1), lambda im: torch.zeros(3, im.height, im.width)

    mod.factory = factory
    sys.modules["my_targets"] = mod
    try:
        t = load_target("mine", "my_targets:factory", {"width": 5}, CPU)
        assert t.module.out_channels == 5
        assert t.input_size is None  # preprocessing keeps each image's size
        with pytest.raises(BackendError, match="bad options"):
            load_target("mine", "my_targets:factory", {"nope": 1}, CPU)
    finally:
        del sys.modules["my_targets"]


def test_unknown_target():
    with pytest.raises(BackendError, match="unknown target"):
        load_target("x", "no-such-thing", {}, CPU)
