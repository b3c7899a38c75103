"""Configs validate themselves; unknown keys are errors, overrides work."""

import pytest

from builder.config import BuildConfig, load_config
from builder.errors import ConfigError

BASE = {"models": [{"name": "m", "target": "planted", "probe": "p", "layers": ["detectors"]}]}


def test_defaults_are_the_papers_hyperparameters():
    cfg = BuildConfig.from_dict(BASE)
    assert (cfg.record.top_k, cfg.describe.n_candidates, cfg.dissect.images_per_concept, cfg.dissect.beta) == (10, 5, 10, 5)
    assert (cfg.crop.max_crops, cfg.crop.iou_keep, cfg.crop.iou_image, cfg.labels.dedup_threshold) == (4, 0.5, 0.8, 0.81)


def test_round_trip():
    cfg = BuildConfig.from_dict(BASE)
    assert BuildConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("data, words", [
    ({**BASE, "recrod": {}}, "unknown config key 'recrod'"),
    ({**BASE, "record": {"topk": 3}}, "unknown config key 'record.topk'"),
    ({**BASE, "record": {"top_k": 0}}, "top_k"),
    ({**BASE, "crop": {"iou_keep": 2}}, "iou_keep"),
    ({**BASE, "dissect": {"scoring": "nope"}}, "dissect.scoring"),
    ({"models": []}, "names no model"),
    ({"models": [{"name": "m", "target": "t", "probe": "p"}]}, "layers"),
])
def test_bad_configs_raise_config_errors(data, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("'", "'")):
        BuildConfig.from_dict(data)


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "b.toml"
    f.write_text('out = "x"\n[[models]]\nname = "m"\ntarget = "planted"\nprobe = "p"\nlayers = ["detectors"]\n')
    cfg = load_config(f, ["record.top_k=20", "models.0.layers=['a', 'b']", "describe.captioner=precomputed"])
    assert cfg.record.top_k == 20
    assert cfg.models[0].layers == ("a", "b")
    assert cfg.describe.captioner == "precomputed"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    f.write_text("not = [toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)


def test_secrets_are_redacted_from_what_the_atlas_saves():
    cfg = BuildConfig.from_dict({**BASE, "describe": {"summarizer": "openai",
                                                      "summarizer_options": {"model": "m", "api_key": "sk-abc"}}})
    saved = cfg.redacted()
    assert saved["describe"]["summarizer_options"] == {"model": "m", "api_key": "<redacted>"}
    assert cfg.describe.summarizer_options["api_key"] == "sk-abc"  # the build itself still has it


def test_only_secret_keys_are_redacted():
    cfg = BuildConfig.from_dict({**BASE, "dissect": {"generator_options": {"hf_token": "x", "steps": 2}}})
    saved = cfg.redacted()
    assert saved["models"][0]["vit_tokens"] == "cls"
    assert saved["dissect"]["generator_options"] == {"hf_token": "<redacted>", "steps": 2}
    assert BuildConfig.from_dict({**saved, "dissect": {}}).models == cfg.models
