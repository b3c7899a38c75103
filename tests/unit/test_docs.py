"""Docs coverage: every CLI command and every config key is in README.md."""

import dataclasses
import re
from pathlib import Path

from builder.config import (
    FidelityConfig,
    BuildConfig,
    CropConfig,
    DescribeConfig,
    DissectConfig,
    LabelConfig,
    ModelConfig,
    RecordConfig,
)
from query.cli import all_commands

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_command_is_documented():
    for cmd in all_commands():
        assert re.search(rf"dnd-atlas {cmd.name}\b", README), f"README lacks `dnd-atlas {cmd.name}`"


def test_every_config_key_is_documented():
    sections = {"record": RecordConfig, "crop": CropConfig, "describe": DescribeConfig,
                "dissect": DissectConfig, "labels": LabelConfig, "fidelity": FidelityConfig}
    for f in dataclasses.fields(BuildConfig):
        assert re.search(rf"^{f.name}\b|^\[{f.name}\]|^\[\[{f.name}\]\]", README, re.M), f"README lacks {f.name}"
    for cls in [ModelConfig, *sections.values()]:
        for f in dataclasses.fields(cls):
            assert re.search(rf"^{f.name} = ", README, re.M), f"README lacks config key {cls.__name__}.{f.name}"


def test_quick_start_is_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert re.findall(r"^make \w+", quick, re.M) == ["make demo", "make test"]


def test_every_openai_backend_option_is_documented():
    import inspect

    from builder.backends.openai_api import OpenAISummarizer, OpenAIVisionCaptioner

    llm = README.split("## Using an LLM", 1)[1].split("\n## ", 1)[0]
    for cls in (OpenAISummarizer, OpenAIVisionCaptioner):
        for name in inspect.signature(cls.__init__).parameters:
            if name not in ("self", "base_url", "api_key"):  # those two are named in the prose above
                assert f"`{name}" in llm, f"README's 'Using an LLM' lacks {cls.__name__} option {name}"
    assert "`base_url`" in llm and "`api_key`" in llm
