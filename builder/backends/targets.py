"""Target models: what is dissected.

A target is a torch module, a preprocessing callable (PIL image -> tensor)
and what the builder needs to know about it. It is loaded from a registry
name (``demo-cnn``, ``planted``), a torchvision model name (``resnet50``,
``torchvision:resnet50``), a TorchScript file, or ``module:callable``
returning ``(module, preprocess)`` or a module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from builder.backends.registry import load_callable, targets
from builder.errors import BackendError, LayerError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Target:
    """A loaded target model, in eval mode on its device."""

    name: str
    module: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    device: torch.device
    input_size: tuple[int, int] | None = None  # (w, h) crops are resized to; None = native
    dtype: torch.dtype = torch.float32
    # (w, h) every image is resized to before a preprocess that keeps each image's size (FitThen)
    fit_size: tuple[int, int] | None = None
    # {layer: {"role": "output" | "planted", "concepts": [[term, ...] per unit]}}, when known
    ground_truth: dict[str, dict] = field(default_factory=dict)

    def layer_names(self) -> list[str]:
        return [n for n, _ in self.module.named_modules() if n]

    def check_layers(self, layers: tuple[str, ...] | list[str]) -> None:
        """Raise LayerError naming the valid layers if any is unknown."""
        valid = set(self.layer_names())
        bad = [lay for lay in layers if lay not in valid]
        if bad:
            names = self.layer_names()
            shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
            raise LayerError(f"model {self.name!r} has no layer {bad[0]!r}; valid layers: {shown}")


def target_fingerprint(target: Target, spec: str, options: dict[str, Any]) -> str:
    """Hash of the target's spec, options and every weight: recordings are
    reused only for the very same model."""
    h = hashlib.sha256(json.dumps([spec, options], sort_keys=True, default=str).encode())
    for name, t in sorted(target.module.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for but CUDA is not available")
    return torch.device(device)


def imagenet_preprocess(size: int = 224, resize: int | None = 256, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize, center-crop and normalize: torchvision's classic eval transform."""
    from torchvision import transforms as T

    steps: list[Any] = []
    if resize:
        steps.append(T.Resize(resize))
    steps += [T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 (recordings are compared across images, so the
    target runs in full precision unless asked otherwise)."""
    if dtype == "auto":
        return torch.float32
    if dtype not in DTYPES:
        raise BackendError(f"dtype {dtype!r} is unknown; choose auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and dtype == "float16":
        raise BackendError("float16 needs a CUDA device; use bfloat16 or float32 on the CPU")
    return DTYPES[dtype]


def load_target(
    name: str, spec: str, options: dict[str, Any], device: torch.device, dtype: torch.dtype = torch.float32
) -> Target:
    """Load the target model ``spec`` with ``options`` onto ``device``.
    ``options["dictionaries"]`` attaches sparse autoencoders to layers
    (see :mod:`builder.backends.sae`); ``options["input_size"]`` fixes the crop
    size and, for a preprocess that keeps each image's size (the planted
    models' ToTensor), the size every image is resized to first."""
    options = dict(options)
    input_size_opt = options.pop("input_size", None)
    dictionaries = options.pop("dictionaries", None)
    module, preprocess = _load(spec, options)
    if not isinstance(module, torch.nn.Module):
        raise BackendError(f"target {spec!r} did not give a torch.nn.Module")
    if dictionaries:  # SAEs on some layers: their latents become layers "sae.NAME" (builder/sae.py)
        from builder.backends.sae import attach_dictionaries

        attach_dictionaries(module, dictionaries)
    module = module.eval().to(device=device, dtype=dtype)
    if preprocess is None:
        size = int(input_size_opt or 224)
        preprocess = imagenet_preprocess(size, round(size * 256 / 224))
    native = _infer_input_size(preprocess)
    input_size, fit = native, None
    if input_size_opt:
        input_size = (int(input_size_opt), int(input_size_opt))
        if native is None:  # the preprocess keeps each image's size: images are fitted to the declared one
            preprocess, fit = FitThen(preprocess, input_size), input_size
    gt = getattr(module, "ground_truth", None)
    return Target(name, module, preprocess, device, input_size=input_size, dtype=dtype,
                  ground_truth=dict(gt) if isinstance(gt, dict) else {}, fit_size=fit)


class FitThen:
    """A preprocess applied to images resized (bilinear) to ``size`` (w, h)
    first, unless they have that size: for targets whose own preprocess keeps
    each image's size, so every probe image gives one tensor size and a 1 x 1
    or a 12000 x 12000 image cannot abort a batch. Picklable, for DataLoader
    workers."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], size: tuple[int, int]) -> None:
        self.preprocess = preprocess
        self.size = (int(size[0]), int(size[1]))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != self.size:
            image = image.resize(self.size, Image.BILINEAR)
        return self.preprocess(image)


def fit_to_probe(target: Target, probe: Any) -> Target:
    """``target`` itself when its preprocess gives one size (or it was fitted
    to a declared ``input_size``); else a copy whose preprocess first resizes
    every image to the most common image size of ``probe`` (a
    ``builder.probe.ProbeSet``). A folder of one size is recorded as before;
    an odd-sized image among them is resized to that size. Crops keep their
    source image's size (``input_size`` stays None): only what enters the
    model is fitted."""
    if target.input_size is not None or target.fit_size is not None:
        return target
    size = probe.common_size()
    if size is None:  # nothing readable: recording will say so
        return target
    log.info("target %s keeps each image's size: probe images are fitted to %d x %d (the most common size; "
             "set target_options.input_size to choose another)", target.name, *size)
    return dataclasses.replace(target, preprocess=FitThen(target.preprocess, size), fit_size=size)


def _load(spec: str, options: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    if spec in targets.names():
        return _split(targets.create(spec, **options))
    if spec.startswith("torchvision:") or is_torchvision_name(spec):
        return _torchvision(spec.removeprefix("torchvision:"), options)
    if spec.startswith("timm:"):
        return _timm(spec.removeprefix("timm:"), options)
    if Path(spec).suffix in (".pt", ".pth", ".ts", ".jit") and Path(spec).is_file():
        return _torchscript(spec, options)
    if ":" in spec:
        fn = load_callable(spec)
        try:
            return _split(fn(**options))
        except TypeError as exc:
            raise BackendError(f"target {spec!r}: bad options: {exc}") from exc
    raise BackendError(
        f"unknown target {spec!r}: give a registered name ({', '.join(targets.names())}), a "
        "torchvision model name, a TorchScript file or a module:callable path"
    )


def _split(result: Any) -> tuple[torch.nn.Module, Any]:
    if isinstance(result, tuple) and len(result) == 2:
        return result[0], result[1]
    return result, None


def is_torchvision_name(spec: str) -> bool:
    if ":" in spec or "/" in spec:
        return False
    import torchvision

    return spec in torchvision.models.list_models()


def _torchvision(name: str, options: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    import torchvision

    if name not in torchvision.models.list_models():
        raise BackendError(f"torchvision has no model {name!r}")
    weights = options.pop("weights", None)
    weights_path = options.pop("weights_path", None)
    try:
        if weights:
            enum = torchvision.models.get_model_weights(name)
            w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
            model = torchvision.models.get_model(name, weights=w, **options)
            preprocess = w.transforms()
        else:
            model = torchvision.models.get_model(name, weights=None, **options)
            preprocess = None
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"torchvision model {name!r}: {exc}") from exc
    if weights_path:
        model.load_state_dict(_read_state_dict(weights_path))
    return model, preprocess


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a file: plain, or a training checkpoint holding
    ``state_dict`` (e.g. the Places365 releases), with any ``module.`` prefix
    of DataParallel stripped."""
    if not Path(path).is_file():
        raise BackendError(f"weights file {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files
        raise BackendError(f"{path}: not a readable weights file: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _timm(name: str, options: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
    except ImportError as exc:
        raise BackendError("timm targets need timm: pip install 'dnd-atlas[timm]'") from exc
    pretrained = bool(options.pop("pretrained", False))
    weights_path = options.pop("weights_path", None)
    try:
        model = timm.create_model(name, pretrained=pretrained, **options)
    except Exception as exc:  # unknown model names, download failures offline
        raise BackendError(f"timm model {name!r}: {exc}") from exc
    if weights_path:
        model.load_state_dict(_read_state_dict(weights_path))
    return model, create_transform(**resolve_data_config({}, model=model))


def _torchscript(path: str, options: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    try:
        module = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise BackendError(f"{path}: not a TorchScript file: {exc}") from exc
    mean = tuple(options.pop("mean", IMAGENET_MEAN))
    std = tuple(options.pop("std", IMAGENET_STD))
    size = int(options.pop("size", 224))
    return module, imagenet_preprocess(size, options.pop("resize", int(size * 256 / 224)), mean, std)


def _infer_input_size(preprocess: Callable[[Image.Image], torch.Tensor]) -> tuple[int, int] | None:
    """(w, h) when the preprocessing always yields one size, else None (the
    model takes images at their own size, and crops are resized to that of
    their source image)."""
    a = preprocess(Image.new("RGB", (97, 71)))
    b = preprocess(Image.new("RGB", (130, 151)))
    if tuple(a.shape) == tuple(b.shape):
        return int(a.shape[-1]), int(a.shape[-2])
    return None
