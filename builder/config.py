"""Build configuration: dataclasses that validate themselves.

One TOML file describes a build; ``--set section.key=value`` flags override
it. The resolved config is saved, whole, in the atlas ``meta`` table so every
atlas says exactly how it was made. Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.config_values import declared_type, parse_table, wants_text
from builder.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class ModelConfig:
    """One target model and the probe set it is dissected on."""

    name: str
    target: str  # registry name, torchvision name, TorchScript file or module:callable
    probe: str  # image folder (recursive); captions.jsonl beside it is optional
    layers: tuple[str, ...] = ()
    target_options: dict[str, Any] = field(default_factory=dict)
    summary: str = ""  # "" = record.summary
    vit_tokens: str = "cls"  # cls | patches: how a ViT channel is summarized
    units: tuple[int, ...] = ()  # describe only these unit indices of each layer; () = all

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"model name {self.name!r} must be non-empty and contain no '/'")
        if not self.target:
            raise ConfigError(f"model {self.name!r}: 'target' is required")
        if not self.probe:
            raise ConfigError(f"model {self.name!r}: 'probe' is required")
        if not self.layers:
            raise ConfigError(f"model {self.name!r}: 'layers' must name at least one layer")
        if self.summary not in ("", "mean", "max"):
            raise ConfigError(f"model {self.name!r}: summary must be 'mean' or 'max'")
        if self.vit_tokens not in ("cls", "patches"):
            raise ConfigError(f"model {self.name!r}: vit_tokens must be 'cls' or 'patches'")
        if any(not isinstance(u, int) or u < 0 for u in self.units):
            raise ConfigError(f"model {self.name!r}: units must be non-negative unit indices")
        if "dictionaries" in self.target_options:  # SAEs whose latents are layers (builder/sae.py)
            from builder.backends.sae import parse_dictionary_specs

            parse_dictionary_specs(self.target_options["dictionaries"],
                                   f"model {self.name!r}: target_options.dictionaries")


@dataclass(frozen=True)
class RecordConfig:
    """Step 0: recording activations over the probe set."""

    top_k: int = 10  # K
    margin: int = 3  # keep margin * K per neuron so crops can re-rank
    summary: str = "mean"  # spatial mean (default) or max
    batch_size: int = 64
    num_workers: int = 0  # DataLoader workers reading the probe set
    max_image_pixels: int = 89_478_485  # skip images declaring more pixels (0: no limit); builder.image_file

    def __post_init__(self) -> None:
        _positive(self, "top_k", "margin", "batch_size")
        if self.summary not in ("mean", "max"):
            raise ConfigError("record.summary must be 'mean' or 'max'")
        if self.num_workers < 0:
            raise ConfigError("record.num_workers must be >= 0")


@dataclass(frozen=True)
class CropConfig:
    """Step 1: attention crops."""

    enabled: bool = True
    max_crops: int = 4
    iou_keep: float = 0.5  # keep a box if IoU <= this with every kept box
    iou_image: float = 0.8  # ... and IoU < this with the whole image
    min_size: int = 4  # ignore boxes smaller than this many pixels a side
    min_fraction: float = 0.1  # ... or smaller than this fraction of the image's side
    max_per_image: int = 4  # evidence items (the image and its crops) one probe image may hold in a top-K
    heatmaps: bool = True  # store each evidence image's activation map (also when crops are off)

    def __post_init__(self) -> None:
        _positive(self, "max_crops", "max_per_image")
        _unit_interval(self, "iou_keep", "iou_image", "min_fraction")


@dataclass(frozen=True)
class DescribeConfig:
    """Step 2: captions, then candidate concepts."""

    captioner: str = "oracle"
    captioner_options: dict[str, Any] = field(default_factory=dict)
    summarizer: str = "extractive"
    summarizer_options: dict[str, Any] = field(default_factory=dict)
    n_candidates: int = 5  # N
    fidelity_candidates: int = 1  # phrases of the evidence captions added when they beat every candidate's fidelity
    batch_size: int = 32

    def __post_init__(self) -> None:
        _positive(self, "n_candidates", "batch_size")
        if not isinstance(self.fidelity_candidates, int) or self.fidelity_candidates < 0:
            raise ConfigError("describe.fidelity_candidates must be a non-negative integer")


@dataclass(frozen=True)
class DissectConfig:
    """Step 3: best concept selection with generated images."""

    enabled: bool = True
    generator: str = "procedural"
    generator_options: dict[str, Any] = field(default_factory=dict)
    images_per_concept: int = 10  # Q
    beta: int = 5
    scoring: str = "topk-squared+image-products"
    prompt_template: str = "generate.txt"  # file in data/prompts, or a path
    similarity: str = "target-features"
    similarity_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        _positive(self, "images_per_concept", "beta", "batch_size")
        from builder.pipeline.scoring import SCORERS

        if self.scoring not in SCORERS:
            raise ConfigError(
                f"dissect.scoring {self.scoring!r} is unknown; choose one of {', '.join(SCORERS)}"
            )


@dataclass(frozen=True)
class LabelConfig:
    """Step 4: labels and polysemantic multi-labels."""

    max_labels: int = 3
    dedup_threshold: float = 0.81  # drop a label this similar to a kept one
    extra_labels_need_positive_score: bool = True  # selection = "dissect": labels 2-3 need a positive score
    drop_nested_labels: bool = True  # "yellow" and "yellow circle" are one concept, not two
    selection: str = "fidelity"  # fidelity | dissect (the paper's: the generated-image score alone)
    fidelity_tolerance: float = 0.02  # candidates this close to the best fidelity: the dissect score decides
    generality_margin: float = 0.05  # extra words must raise fidelity by this much to be kept
    min_fidelity_gain: float = 0.02  # a label 2-3 must raise the label set's fidelity by this much

    def __post_init__(self) -> None:
        _positive(self, "max_labels")
        if self.max_labels > 3:
            raise ConfigError("labels.max_labels is at most 3")
        _unit_interval(self, "dedup_threshold", "fidelity_tolerance", "generality_margin", "min_fidelity_gain")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"labels.selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")


SELECTIONS = ("fidelity", "dissect")
PRESENCE_MODES = ("auto", "joint", "words", "embedding", "words+embedding")


@dataclass(frozen=True)
class FidelityConfig:
    """How true each label is: its concept's presence against the neuron's
    activation over a seeded sample of probe images (see
    ``builder.pipeline.fidelity``)."""

    enabled: bool = True
    sample_size: int = 500  # probe images per model, shared by every neuron
    seed: int = 0
    presence: str = "auto"  # auto (joint space if the similarity has one, else words+embedding) | joint | words | embedding | words+embedding
    positive_fraction: float = 0.1  # AUPRC positives: the most active fraction of the sample
    shuffles: int = 5  # label permutations averaged for the per-layer shuffled baseline

    def __post_init__(self) -> None:
        _positive(self, "sample_size", "shuffles")
        if self.presence not in PRESENCE_MODES:
            raise ConfigError(f"fidelity.presence must be one of {', '.join(PRESENCE_MODES)}, got {self.presence!r}")
        _unit_interval(self, "positive_fraction")


@dataclass(frozen=True)
class ClipDissectConfig:
    """The CLIP-Dissect baseline labeler (``labeler = "clip-dissect"``): its
    concept set and the SoftWPMI parameters (the published defaults).

    ``top_k``: size of the soft set of most activating images; ``a``: softmax
    temperature on the image-concept similarities; ``lam``: weight of the
    concept prior; ``p_start``/``p_end``: membership of the best and (about)
    the k-th best image; ``eps``: floor inside the log that keeps one image
    with a near-zero concept probability from dominating (the published
    implementation's 7e-4)."""

    concepts: str = ""  # "" = data/concepts/common-visual.txt; a name there or a path
    top_k: int = 100
    a: float = 10.0
    lam: float = 1.0
    p_start: float = 0.998
    p_end: float = 0.97
    eps: float = 0.0007

    def __post_init__(self) -> None:
        _positive(self, "top_k")
        _unit_interval(self, "p_start", "p_end")
        if self.p_end > self.p_start:
            raise ConfigError("clip_dissect.p_end must be <= clip_dissect.p_start")


@dataclass(frozen=True)
class BuildConfig:
    """A whole build: where it goes, the models, and every stage's settings."""

    out: str = "atlas"
    models: tuple[ModelConfig, ...] = ()
    labeler: str = "dnd"  # dnd | clip-dissect (the baseline)
    embedder: str = "minilm"
    embedder_quantize: str = ""  # the ONNX embedder the atlas carries: "" (fp32) | dynamic | weights (int8)
    device: str = "auto"
    dtype: str = "auto"  # target model precision: auto (float32) | float32 | float16 | bfloat16
    cache_dir: str = ""  # "" = <out>/cache
    chunk_size: int = 64  # neurons processed together (batched model calls)
    shard: str = ""  # "I/N": build only the I-th of N deterministic shares of the neurons
    record: RecordConfig = field(default_factory=RecordConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    describe: DescribeConfig = field(default_factory=DescribeConfig)
    dissect: DissectConfig = field(default_factory=DissectConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    clip_dissect: ClipDissectConfig = field(default_factory=ClipDissectConfig)

    def __post_init__(self) -> None:
        if not self.out.strip():
            raise ConfigError("out must name the atlas folder, got an empty string")
        if self.shard:
            shard_of(self.shard)  # validates
        if self.labeler not in ("dnd", "clip-dissect"):
            raise ConfigError(f"labeler must be 'dnd' or 'clip-dissect', got {self.labeler!r}")
        if not self.models:
            raise ConfigError("the config names no model: add a [[models]] table")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique, got {names}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError("device must be auto, cpu, cuda or cuda:N")
        _positive(self, "chunk_size")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError("dtype must be auto, float32, float16 or bfloat16")
        if self.embedder_quantize not in ("", "dynamic", "weights"):
            raise ConfigError(f"embedder_quantize must be '', 'dynamic' or 'weights', got {self.embedder_quantize!r}")

    # -- (de)serialization -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that ``from_dict`` turns back into this config."""
        return _to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        """Build and validate a config: every value is parsed to the type its
        field declares (``builder.config_values``); unknown keys and values
        that do not parse raise a one-line ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a table of keys, got {type(data).__name__}")
        return cls(**parse_table(cls, _drop_legacy(dict(data))))

    def redacted(self) -> dict[str, Any]:
        """``to_dict`` with secrets (``api_key``, ``token``, ``password`` in any
        backend options) replaced: this is what an atlas publishes."""
        return _redact(self.to_dict())

    def redacted_fingerprint(self) -> dict[str, Any]:
        """``fingerprint`` with secrets replaced: what an atlas's meta keeps to
        refuse resuming or merging with other settings."""
        return _redact(self.fingerprint())

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): saved in the atlas meta."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def fingerprint(self) -> dict[str, Any]:
        """The parts of the config that change the atlas content (everything
        but where the output and caches live): used to refuse resuming or
        merging with a different config."""
        d = self.to_dict()
        # embedder_quantize: only the copy of the embedder that searches the atlas, not its labels
        for key in ("out", "cache_dir", "device", "chunk_size", "shard", "embedder_quantize"):
            d.pop(key, None)
        d["record"].pop("num_workers", None)
        d["record"].pop("batch_size", None)
        d["describe"].pop("batch_size", None)
        d["dissect"].pop("batch_size", None)
        return d


# Keys older configs and atlases hold that mean nothing now, with the one value
# that is still accepted: `cost_mode = "official-shaped"` moved to the benchmarks
# (bench/official.py), so "efficient" is how every build runs.
LEGACY_KEYS = {"cost_mode": "efficient"}


def _drop_legacy(data: dict[str, Any]) -> dict[str, Any]:
    for key, value in LEGACY_KEYS.items():
        if key in data:
            if data[key] != value:
                raise ConfigError(
                    f"{key} = {data[key]!r} is no longer a build setting (the official implementation's "
                    "call pattern is reproduced by the benchmarks: python -m bench --only cost); remove it"
                )
            del data[key]
    return data


def comparable_fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
    """A stored build fingerprint without the legacy keys, so an atlas built
    before they were dropped resumes and merges as it did."""
    return {k: v for k, v in fp.items() if LEGACY_KEYS.get(k, object()) != v}


def preset_names() -> list[str]:
    """The presets shipped in data/presets."""
    from builder.data_files import data_path

    return sorted(p.stem for p in data_path("presets").glob("*.toml"))


def shard_of(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError as exc:
        raise ConfigError(f"shard {spec!r} must look like I/N, e.g. 0/4") from exc
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"shard {spec!r}: need 0 <= I < N")
    return i, n


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, preset: str | None = None
) -> BuildConfig:
    """Read a preset and/or a TOML config file (a file's keys override the
    preset's) and apply ``section.key=value`` overrides (values are parsed as
    TOML, bare words as strings)."""
    data: dict[str, Any] = {}
    if preset is not None:
        from builder.data_files import data_path

        if preset not in preset_names():
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(preset_names())}")
        data = tomllib.loads(data_path("presets", f"{preset}.toml").read_text())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = _merge(data, tomllib.loads(p.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    for item in overrides or []:
        apply_override(data, item)
    return BuildConfig.from_dict(data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; ``models.0.layers=[...]`` indexes
    the model list. The value is read as TOML; a bare word (or a number, for a
    key declared as a string) stays the text it was typed as. ``from_dict``
    then parses it to the key's declared type."""
    key, sep, raw = item.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.key=value")
    value = _override_value(raw, declared_type(BuildConfig, parts))
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, item)]
        elif parts[i + 1].isdigit() and not isinstance(node.get(part), list):
            raise ConfigError(f"override {item!r}: the config has no list {here!r} to index")
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {item!r}: {here!r} holds {type(node).__name__} value, not a table")
    if not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: cannot set a list entry; set the whole list")
    node[parts[-1]] = value


def _override_value(raw: str, declared: Any) -> Any:
    """An override's text as TOML (one value, nothing after it), else the text."""
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw.strip()
    if set(parsed) != {"v"}:  # "3\nother = 4" sets one key, not two
        return raw.strip()
    value = parsed["v"]
    if declared is not None and wants_text(declared) and not isinstance(value, (str, list, dict)):
        return raw.strip()  # --set models.0.name=123 names the model "123"
    return value


def _list_index(node: list[Any], part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {item!r}: no list entry {part!r} (the list has {len(node)})")
    return int(part)


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _unit_interval(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be in [0, 1], got {value!r}")


# whole key names (or their last _-separated part): "vit_tokens" is no secret
_SECRET_KEY = re.compile(r"(^|_)(api_?key|key|token|password|secret)$", re.IGNORECASE)


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if _SECRET_KEY.search(k) and v else _redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    return obj
