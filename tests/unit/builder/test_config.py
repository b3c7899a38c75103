"""Configs validate themselves; unknown keys are errors, overrides work."""

import re

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


# -- values parsed to their declared types -------------------------------------------------

MODEL_SET = "models=[{name = 'm', target = 'planted', probe = 'p', layers = ['detectors']}]"


def _set(*items):
    return load_config(None, [MODEL_SET, *items])


@pytest.mark.parametrize("raw, expected", [
    ("False", False), ('"false"', False), ("no", False), ("NO", False), ("0", False), ("false", False),
    ("True", True), ('"yes"', True), ("Yes", True), ("1", True), ("true", True), ("'TRUE'", True),
])
def test_booleans_parse_from_words_any_case(raw, expected):
    assert _set(f"crop.enabled={raw}").crop.enabled is expected
    assert _set(f"labels.drop_nested_labels={raw}").labels.drop_nested_labels is expected


@pytest.mark.parametrize("item, words", [
    ("crop.enabled=maybe", ["'crop.enabled'", "'maybe'", "a boolean"]),
    ("crop.enabled=2", ["'crop.enabled'", "2", "a boolean"]),
    ("crop.enabled=[]", ["'crop.enabled'", "[]", "a boolean"]),
    ('dissect.seed="x"', ["'dissect.seed'", "'x'", "an integer"]),
    ("dissect.seed=3.5", ["'dissect.seed'", "3.5", "an integer"]),
    ("record.top_k=true", ["'record.top_k'", "True", "an integer"]),
    ("record.top_k=99999999999999999999", ["'record.top_k'", "an integer", "64 bits"]),
    ("crop.iou_keep=nan", ["'crop.iou_keep'", "nan", "a finite number"]),
    ("crop.iou_keep=inf", ["'crop.iou_keep'", "inf", "a finite number"]),
    ("crop.iou_keep=half", ["'crop.iou_keep'", "'half'", "a finite number"]),
    ("labeler=['dnd']", ["'labeler'", "['dnd']", "a string"]),
    ("models.0.layers=[5]", ["'models[0].layers'", "[5]", "a list of strings"]),
    ("models.0.layers={a = 1}", ["'models[0].layers'", "a list of strings"]),
    ("models.0.units=['x']", ["'models[0].units'", "['x']", "a list of integers"]),
    ("models.0.target_options=3", ["'models[0].target_options'", "3", "a table"]),
    ("models.0.target_options=['weights']", ["'models[0].target_options'", "a table"]),
    ("describe.captioner_options.x=1979-05-27", ["'describe.captioner_options.x'", "date", "quote it"]),
    ("describe.captioner_options={a = nan}", ["'describe.captioner_options.a'", "a finite number"]),
    ("record=5", ["'record'", "5", "a table"]),
    ("models={name = 'x'}", ["'models'", "an array of tables"]),
    ("models=[3]", ["'models[0]'", "a table"]),
    ("models=[{name = 'x'}]", ["'models[0].target'", "is required"]),
])
def test_values_of_the_wrong_type_are_refused_in_one_line(item, words):
    with pytest.raises(ConfigError) as info:
        _set(item)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    for w in words:
        assert w in message, message


def test_values_are_parsed_to_their_declared_types():
    cfg = _set('record.top_k="20"', "crop.iou_keep=1", 'crop.iou_image="0.25"', "models.0.name=123",
               "models.0.units=7", "models.0.target_options={weights = 'W', size = 2}", "out=1e3")
    assert cfg.record.top_k == 20 and type(cfg.record.top_k) is int
    assert cfg.crop.iou_keep == 1.0 and type(cfg.crop.iou_keep) is float
    assert cfg.crop.iou_image == 0.25
    assert cfg.models[0].name == "123"  # the text as typed, not the number
    assert cfg.out == "1e3"
    assert cfg.models[0].units == (7,)
    assert cfg.models[0].target_options == {"weights": "W", "size": 2}
    assert _set("models.0.units=[1, '2']").models[0].units == (1, 2)


@pytest.mark.parametrize("raw, layers", [
    ("detectors", ("detectors",)),  # a bare word is one layer, not its characters
    ('"detectors"', ("detectors",)),
    ("['conv3', 'fc']", ("conv3", "fc")),
    ("0", ("0",)),  # nn.Sequential layers are named by digits
    ("[]", ()),
])
def test_a_list_of_strings_takes_one_word_or_a_list(raw, layers):
    if not layers:
        with pytest.raises(ConfigError, match="layers"):
            _set(f"models.0.layers={raw}")
        return
    assert _set(f"models.0.layers={raw}").models[0].layers == layers


def test_toml_files_are_parsed_the_same_way(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[[models]]\nname = "m"\ntarget = "planted"\nprobe = "p"\nlayers = "detectors"\n'
                 '[crop]\nenabled = "no"\n')
    cfg = load_config(f)
    assert cfg.models[0].layers == ("detectors",) and cfg.crop.enabled is False
    f.write_text('[[models]]\nname = "m"\ntarget = "planted"\nprobe = "p"\nlayers = 5\n')
    with pytest.raises(ConfigError, match=r"'models\[0\]\.layers' = 5: expected a list of strings"):
        load_config(f)


def test_new_keys_get_the_parsing_for_free():
    """Nothing in the parser names a key: any dataclass's annotations drive it."""
    import dataclasses
    from typing import Literal

    from builder.config_values import parse_table

    @dataclasses.dataclass(frozen=True)
    class Section:
        flag: bool = False
        count: int = 1
        ratio: float | None = None
        mode: Literal["a", "b"] = "a"
        names: tuple[str, ...] = ()

    got = parse_table(Section, {"flag": "Yes", "count": "4", "ratio": "0.5", "mode": "b", "names": "x"}, "new.")
    assert got == {"flag": True, "count": 4, "ratio": 0.5, "mode": "b", "names": ("x",)}
    assert parse_table(Section, {"ratio": None})["ratio"] is None
    with pytest.raises(ConfigError, match=r"'new\.mode' = 'c': expected one of 'a', 'b'"):
        parse_table(Section, {"mode": "c"}, "new.")
    with pytest.raises(ConfigError, match=r"unknown config key 'new\.other'"):
        parse_table(Section, {"other": 1}, "new.")


@pytest.mark.parametrize("item, words", [
    ("models.3.layers=x", "no list entry '3'"),
    ("models.-1.layers=x", "no list entry '-1'"),
    ("models.0=3", "cannot set a list entry"),
    ("out.x=1", "'out' = {'x': 1}: expected a string"),
    ("a..b=1", "must look like section.key=value"),
    ("record.top_k", "must look like section.key=value"),
    ("out=", "out must name the atlas folder"),
])
def test_bad_override_paths_are_one_line_errors(item, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        _set(item)
    with pytest.raises(ConfigError, match="no list 'models' to index"):
        load_config(None, ["models.0.layers=x"])
    with pytest.raises(ConfigError, match="holds str value"):
        load_config(None, ["out=x", "out.y.z=1"])


def test_an_override_sets_one_key_whatever_its_text_holds():
    with pytest.raises(ConfigError, match="'record.top_k'"):
        _set("record.top_k=3\n[crop]\nenabled = false")
    assert _set("record.top_k=3 # a comment").record.top_k == 3


def test_the_fidelity_section_and_mains_new_keys_are_typed_too():
    cfg = _set("fidelity.enabled=no", 'fidelity.seed="7"', "fidelity.positive_fraction=0.2", "crop.heatmaps=NO",
               'crop.max_per_image="3"', "crop.min_fraction=0", "describe.fidelity_candidates=2",
               "labels.selection=dissect", "labels.min_fidelity_gain='0.1'")
    assert cfg.fidelity.enabled is False and cfg.fidelity.seed == 7 and cfg.fidelity.positive_fraction == 0.2
    assert cfg.crop.heatmaps is False and cfg.crop.max_per_image == 3 and cfg.crop.min_fraction == 0.0
    assert cfg.describe.fidelity_candidates == 2 and cfg.labels.selection == "dissect"
    assert cfg.labels.min_fidelity_gain == 0.1 and type(cfg.crop.min_fraction) is float
    for item, words in [('fidelity.seed="x"', "'fidelity.seed' = 'x': expected an integer"),
                        ("fidelity.enabled=sometimes", "'fidelity.enabled' = 'sometimes': expected a boolean"),
                        ("fidelity.shuffles=true", "'fidelity.shuffles' = True: expected an integer"),
                        ("describe.fidelity_candidates=yes", "'describe.fidelity_candidates' = 'yes'"),
                        ("labels.fidelity_tolerance=nan", "'labels.fidelity_tolerance' = nan"),
                        ("crop.heatmaps=[]", "'crop.heatmaps' = []: expected a boolean"),
                        ("fidelity=3", "'fidelity' = 3: expected a table"),
                        ("fidelity.presence=['joint']", "'fidelity.presence'")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            _set(item)
