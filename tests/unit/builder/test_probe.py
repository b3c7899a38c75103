"""Probe sets: image folders and CIFAR releases exported to folders."""

import pickle

import numpy as np
import pytest

from builder.errors import BuildError
from builder.probe import ProbeSet


def fake_cifar10(root, n=7):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"class{i}".encode() for i in range(10)]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [i % 3 for i in range(n)]}, f)
    return data


def test_cifar_is_exported_once_to_class_folders(tmp_path):
    data = fake_cifar10(tmp_path)
    probe = ProbeSet.scan(f"cifar10:{tmp_path}")
    assert len(probe) == 7
    assert probe.files[0] == "class0/00000.png"
    img = np.asarray(probe.open(0))
    assert img.shape == (32, 32, 3)
    assert (img == data[0].reshape(3, 32, 32).transpose(1, 2, 0)).all()
    again = ProbeSet.scan(f"cifar10:{tmp_path}:test")
    assert again.files == probe.files
    with pytest.raises(BuildError, match="no split"):
        ProbeSet.scan(f"cifar10:{tmp_path}:valid")
    with pytest.raises(BuildError, match="no cifar100 data"):
        ProbeSet.scan(f"cifar100:{tmp_path}")


def test_folder_errors(tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        ProbeSet.scan(tmp_path / "nope")
    with pytest.raises(BuildError, match="holds no image files"):
        ProbeSet.scan(tmp_path)


def test_hf_dataset_saved_to_disk_is_exported_to_class_folders(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    monkeypatch.setenv("DND_ATLAS_CACHE", str(tmp_path / "cache"))
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    ds = datasets.Dataset.from_dict({"img": images, "label": [0, 1, 0, 1, 1]}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    probe = ProbeSet.scan(f"hf:{tmp_path / 'saved'}:test")
    assert probe.files == ("cat/000000.png", "cat/000002.png", "dog/000001.png", "dog/000003.png", "dog/000004.png")
    assert np.asarray(probe.open(1))[0, 0, 0] == 80
    assert ProbeSet.scan(f"hf:{tmp_path / 'saved'}").files == probe.files  # one split: no need to name it
    with pytest.raises(BuildError, match="splits test"):
        ProbeSet.scan(f"hf:{tmp_path / 'saved'}:train")
