"""The synthetic dictionaries' cache: made once, remade when what makes them changes."""

import sys
import types
from pathlib import Path

from builder.synthetic import dictionaries


def _fake_generator(tmp_path: Path, monkeypatch) -> tuple[list[Path], Path]:
    """A generator module writing a one-file SAELens folder, made from ``weights``."""
    source = tmp_path / "fake_gen.py"
    source.write_text("# the generating code\n")
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"v1")
    calls: list[Path] = []

    def write(folder: Path) -> None:
        calls.append(folder)
        folder.mkdir(parents=True)
        (folder / "cfg.json").write_text("{}")

    module = types.ModuleType("fake_gen")
    module.__file__ = str(source)
    module.write = write
    module.made_from = lambda: [weights]
    monkeypatch.setitem(sys.modules, "fake_gen", module)
    monkeypatch.setitem(dictionaries.GENERATED, "fake", ("fake_gen", "write"))
    monkeypatch.setenv("DND_ATLAS_CACHE", str(tmp_path / "cache"))
    return calls, weights


def test_made_once_then_reused(tmp_path, monkeypatch):
    calls, _ = _fake_generator(tmp_path, monkeypatch)
    first = dictionaries.generated_dictionary("fake")
    assert dictionaries.generated_dictionary("fake") == first
    assert len(calls) == 1 and (first / "cfg.json").is_file()
    assert first.parent == tmp_path / "cache" / "sae" and not list(first.parent.glob(".*tmp"))


def test_changed_inputs_make_a_new_folder(tmp_path, monkeypatch):
    calls, weights = _fake_generator(tmp_path, monkeypatch)
    first = dictionaries.generated_dictionary("fake")
    weights.write_bytes(b"v2")  # retrained weights: the old dictionary no longer fits them
    second = dictionaries.generated_dictionary("fake")
    assert second != first and len(calls) == 2


def test_other_names_are_not_generated(tmp_path, monkeypatch):
    monkeypatch.setenv("DND_ATLAS_CACHE", str(tmp_path))
    assert dictionaries.generated_dictionary("some/user/folder") is None
    assert not (tmp_path / "sae").exists()


def test_the_demo_dictionary_is_keyed_by_the_demo_cnn_weights():
    from builder.synthetic import train_sae
    from builder.synthetic.demo_cnn import default_weights_path

    assert default_weights_path() in train_sae.made_from()
