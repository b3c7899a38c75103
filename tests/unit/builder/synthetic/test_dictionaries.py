"""The synthetic dictionaries' cache: made once, remade when what makes them changes."""

import sys
import types
from pathlib import Path

from builder.synthetic import dictionaries


def _fake_generator(tmp_path: Path, monkeypatch) -> tuple[list[Path], Path]:
    """A generator module (its code in ``source``) writing a one-file SAELens folder."""
    source = tmp_path / "fake_gen.py"
    source.write_text("# the generating code\n")
    calls: list[Path] = []

    def write(folder: Path) -> None:
        calls.append(folder)
        folder.mkdir(parents=True)
        (folder / "cfg.json").write_text("{}")

    module = types.ModuleType("fake_gen")
    module.__file__ = str(source)
    module.write = write
    monkeypatch.setitem(sys.modules, "fake_gen", module)
    monkeypatch.setitem(dictionaries.GENERATED, "fake", ("fake_gen", "write"))
    monkeypatch.setenv("DND_ATLAS_CACHE", str(tmp_path / "cache"))
    return calls, source


def test_made_once_then_reused(tmp_path, monkeypatch):
    calls, _ = _fake_generator(tmp_path, monkeypatch)
    first = dictionaries.generated_dictionary("fake")
    assert dictionaries.generated_dictionary("fake") == first
    assert len(calls) == 1 and (first / "cfg.json").is_file()
    assert first.parent == tmp_path / "cache" / "sae" and not list(first.parent.glob(".*tmp"))


def test_changed_code_makes_a_new_folder(tmp_path, monkeypatch):
    calls, source = _fake_generator(tmp_path, monkeypatch)
    first = dictionaries.generated_dictionary("fake")
    source.write_text("# the generating code, changed\n")  # the old dictionary is not what it makes now
    second = dictionaries.generated_dictionary("fake")
    assert second != first and len(calls) == 2


def test_other_names_are_not_generated(tmp_path, monkeypatch):
    monkeypatch.setenv("DND_ATLAS_CACHE", str(tmp_path))
    assert dictionaries.generated_dictionary("some/user/folder") is None
    assert not (tmp_path / "sae").exists()



def test_the_trained_demo_dictionary_ships_and_the_planted_one_is_generated():
    from builder.backends.builtin import GENERATED_DICTIONARIES
    from builder.backends.sae import resolve_dictionary_path

    shipped = resolve_dictionary_path("demo-cnn-conv4")
    assert shipped.parts[-3:] == ("data", "sae", "demo-cnn-conv4") and (shipped / "sae_weights.safetensors").is_file()
    assert "demo-cnn-conv4" not in dictionaries.GENERATED and set(GENERATED_DICTIONARIES) == set(dictionaries.GENERATED)
