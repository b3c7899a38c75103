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


# -- one size for any input: fitting images for a preprocess that keeps sizes -------


def test_a_declared_input_size_fits_images_for_a_size_keeping_preprocess():
    from PIL import Image

    t = load_target("planted", "planted", {"input_size": 48}, CPU)
    assert t.input_size == (48, 48) and t.fit_size == (48, 48)
    for size in ((1, 1), (300, 90), (48, 48)):
        assert tuple(t.preprocess(Image.new("RGB", size)).shape) == (3, 48, 48)
    plain = load_target("planted", "planted", {}, CPU)
    assert plain.input_size is None and plain.fit_size is None  # takes any size until fitted to a probe set


def test_a_preprocess_that_resizes_is_left_alone():
    t = load_target("cnn", "demo-cnn", {"input_size": 64}, CPU)
    assert t.fit_size is None and t.input_size == (64, 64)


def test_fit_to_probe_uses_the_most_common_size(tmp_path):
    from PIL import Image

    from builder.backends.targets import fit_to_probe
    from builder.probe import ProbeSet

    for i in range(5):
        Image.new("RGB", (40, 30), (i, 0, 0)).save(tmp_path / f"{i}.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    probe = ProbeSet.scan(tmp_path)
    plain = load_target("planted", "planted", {}, CPU)
    fitted = fit_to_probe(plain, probe)
    assert fitted.fit_size == (40, 30) and fitted.input_size is None  # crops keep their source's size
    shapes = {tuple(fitted.preprocess(probe.open(i)).shape) for i in range(len(probe))}
    assert shapes == {(3, 30, 40)}
    same = torch.equal(fitted.preprocess(probe.open(0)), plain.preprocess(probe.open(0)))
    assert same  # images of the common size are recorded exactly as before
    declared = load_target("planted", "planted", {"input_size": 16}, CPU)
    assert fit_to_probe(declared, probe) is declared
    cnn = load_target("cnn", "demo-cnn", {}, CPU)
    assert fit_to_probe(cnn, probe) is cnn


def test_torchscript_with_resize_off_still_gives_one_size(tmp_path):
    from PIL import Image

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
    path = tmp_path / "m.pt"
    torch.jit.script(m).save(str(path))
    t = load_target("ts", str(path), {"size": 32, "resize": 0}, CPU)
    assert t.input_size == (32, 32) and t.fit_size is None  # center crop, small images padded
    assert {tuple(t.preprocess(Image.new("RGB", s)).shape) for s in ((1, 1), (500, 20))} == {(3, 32, 32)}
