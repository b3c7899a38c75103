"""--dry-run resolves a preset and counts neurons without loading weights."""

import json

from PIL import Image

from query.cli import main


def test_dry_run_of_the_resnet50_preset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for i in range(3):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
    # IMAGENET1K_V2 weights are not on this machine: a dry run must not need them
    rc = main(["build", "--preset", "resnet50-imagenet", "--probe", str(tmp_path), "--dry-run", "--json"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    (model,) = plan["models"]
    assert model["neurons"] == 256 + 512 + 1024 + 2048 + 1000
    assert [lay["kind"] for lay in model["layers"]] == ["conv"] * 4 + ["linear"]
    assert model["expected_calls_per_neuron"]["summarizer_requests"] == 1.0
    assert model["expected_calls"]["generated_images"] == 4840 * 5 * 10
    assert plan["backends"]["generator"] == "diffusers"


def test_dry_run_with_a_unit_sample(tmp_path, capsys):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    rc = main(["build", "--preset", "vit-b16-imagenet", "--probe", str(tmp_path), "--dry-run", "--json",
               "--set", "models.0.units=[0, 1, 2]"])
    assert rc == 0
    (model,) = json.loads(capsys.readouterr().out)["models"]
    assert model["neurons"] == 4 * 3
    assert model["layers"][0]["kind"] == "vit" and model["layers"][0]["n_units"] == 768
