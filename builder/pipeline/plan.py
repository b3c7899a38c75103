"""``dnd-atlas build --dry-run``: what a build will cost, before it runs.

Resolves the config, lists every layer with its neuron count and prints the
expected calls per stage. torchvision and timm targets are built on PyTorch's
``meta`` device (shapes only: no weights are loaded or downloaded); other
targets (registered, TorchScript, module:callable) are local and are loaded
on the CPU to read their shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from builder.backends.layers import activation_maps, hooked, layer_kind
from builder.backends.targets import is_torchvision_name, load_target
from builder.config import BuildConfig, ModelConfig
from builder.probe import ProbeSet


@dataclass(frozen=True)
class LayerPlan:
    model: str
    layer: str
    kind: str
    n_units: int
    has_maps: bool


def _meta_module(spec: str, options: dict[str, Any]) -> torch.nn.Module | None:
    opts = {k: v for k, v in options.items()
            if k not in ("weights", "weights_path", "pretrained", "input_size", "dictionaries")}
    if spec.startswith("torchvision:") or is_torchvision_name(spec):
        import torchvision

        with torch.device("meta"):
            return torchvision.models.get_model(spec.removeprefix("torchvision:"), weights=None, **opts)
    if spec.startswith("timm:"):
        import timm

        with torch.device("meta"):
            return timm.create_model(spec.removeprefix("timm:"), pretrained=False, **opts)
    return None


def unit_counts(target: Any, layers: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Neurons in each of ``layers`` of a loaded target (one forward pass of a
    blank image): what a build checks ``units`` against before recording."""
    x = target.preprocess(Image.new("RGB", (224, 224))).unsqueeze(0).to(target.device, target.dtype)
    outs: dict[str, torch.Tensor] = {}
    with hooked(target.module, list(layers), outs.__setitem__), torch.no_grad():
        target.module(x)
    return {lay: int(outs[lay].shape[2] if layer_kind(outs[lay]) == "vit" else outs[lay].shape[1])
            for lay in layers}


def layer_plans(m: ModelConfig) -> list[LayerPlan]:
    """Kind and neuron count of each selected layer of ``m``."""
    module = _meta_module(m.target, m.target_options)
    if module is not None and m.target_options.get("dictionaries"):  # SAE latents as layers, on meta too
        from builder.backends.sae import attach_dictionaries

        attach_dictionaries(module, m.target_options["dictionaries"])
    if module is not None:
        size = int(m.target_options.get("input_size", 224))
        x = torch.empty(1, 3, size, size, device="meta")
    else:
        target = load_target(m.name, m.target, m.target_options, torch.device("cpu"))
        module = target.module
        x = target.preprocess(Image.new("RGB", (224, 224))).unsqueeze(0)
    names = {n for n, _ in module.named_modules() if n}
    bad = [lay for lay in m.layers if lay not in names]
    if bad:
        from builder.errors import LayerError

        shown = sorted(names)[:60]
        raise LayerError(f"model {m.name!r} has no layer {bad[0]!r}; valid layers: {', '.join(shown)}")
    outs: dict[str, torch.Tensor] = {}
    with hooked(module, m.layers, outs.__setitem__), torch.no_grad():
        module.eval()(x)
    plans = []
    for lay in m.layers:
        out = outs[lay]
        kind = layer_kind(out)
        n = int(out.shape[2] if kind == "vit" else out.shape[1])
        plans.append(LayerPlan(m.name, lay, kind, n, activation_maps(out[:1]) is not None))
    return plans


def plan(cfg: BuildConfig) -> dict[str, Any]:
    """Layers, neuron counts and the expected calls per stage (upper bounds:
    the build shares captions, generated images and recordings, so it makes
    fewer)."""
    k, n, q = cfg.record.top_k, cfg.describe.n_candidates, cfg.dissect.images_per_concept
    models = []
    for m in cfg.models:
        probe = ProbeSet.scan(m.probe)
        layers = layer_plans(m)
        def count(p: LayerPlan) -> int:
            return len([u for u in m.units if u < p.n_units]) if m.units else p.n_units

        neurons = sum(count(p) for p in layers)
        croppable = sum(count(p) for p in layers if p.has_maps) if cfg.crop.enabled else 0
        generated = neurons * n * q if cfg.dissect.enabled else 0
        calls = {
            "target_forward_images": len(probe) + croppable * k * cfg.crop.max_crops + generated,
            "captioner_images": neurons * k,
            "summarizer_requests": neurons,
            "generated_images": generated,
        }
        models.append({
            "model": m.name,
            "target": m.target,
            "probe_images": len(probe),
            "neurons": neurons,
            "layers": [p.__dict__ for p in layers],
            "expected_calls": calls,
            "expected_calls_per_neuron": {s: round(c / max(1, neurons), 1) for s, c in calls.items()},
        })
    return {
        "out": cfg.out,
        "models": models,
        "note": "expected calls are upper bounds: captions, generated images and recordings "
                "are shared across neurons and cached, so a build makes fewer",
        "backends": {
            "captioner": cfg.describe.captioner, "summarizer": cfg.describe.summarizer,
            "generator": cfg.dissect.generator if cfg.dissect.enabled else None,
            "similarity": cfg.dissect.similarity,
        },
    }


def plan_text(p: dict[str, Any]) -> str:
    """The dry run as text."""
    lines = [f"dry run: nothing is loaded or written; the atlas would go to {p['out']}"]
    b = p["backends"]
    lines.append(f"backends: captioner {b['captioner']}, summarizer {b['summarizer']}, "
                 f"generator {b['generator']}, similarity {b['similarity']}")
    for m in p["models"]:
        lines.append(f"\nmodel {m['model']} ({m['target']}): {m['neurons']} neurons, {m['probe_images']} probe images")
        for lay in m["layers"]:
            lines.append(f"  {lay['layer']:<40} {lay['kind']:<7} {lay['n_units']:>6} neurons")
        lines.append("  expected calls (upper bounds):   total   per neuron")
        for s, c in m["expected_calls"].items():
            lines.append(f"    {s:<26} {c:>10}   {m['expected_calls_per_neuron'][s]:>8}")
    lines.append("\n" + p["note"])
    return "\n".join(lines)
