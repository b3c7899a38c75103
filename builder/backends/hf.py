"""Captioners backed by Hugging Face transformers: ``blip`` and ``blip2``.

Both load a model and its processor once per instance with
``from_pretrained(model, revision=...)``, so a hub id, a hub id already in
the local cache (``HF_HUB_OFFLINE=1``) and a local folder written by
``save_pretrained`` all go through the same code. Captioning is batched.

The small helpers at the bottom (device/dtype resolution, load errors) are
shared by the other transformers/diffusers backends
(``builder.backends.diffusion``, ``builder.backends.clip``).
transformers is imported inside the constructors: importing this module
costs only torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from builder.backends.interfaces import Captioner, CaptionItem
from builder.errors import BackendError

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class _HFCaptioner(Captioner):
    """BLIP-style image-to-text: processor + ``generate`` + decode."""

    name = "hf-captioner"
    default_model = ""
    model_kind = ""

    def __init__(
        self,
        model: str | None = None,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 32,
        min_length: int = 5,
        num_beams: int = 1,
        batch_size: int = 16,
        prompt: str | None = None,
    ) -> None:
        self.model_id = str(model or self.default_model)
        self.revision = revision or None
        self.max_new_tokens = int(max_new_tokens)
        self.min_length = int(min_length)
        self.num_beams = int(num_beams)
        self.batch_size = int(batch_size)
        self.prompt = (prompt or "").strip() or None
        if self.max_new_tokens < 1 or self.num_beams < 1 or self.batch_size < 1 or self.min_length < 0:
            raise BackendError(
                f"{self.name} captioner: max_new_tokens, num_beams and batch_size must be >= 1 "
                f"and min_length >= 0"
            )
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        model_cls, processor_cls = self._classes()
        self.model = load_pretrained(
            model_cls.from_pretrained, self.model_id, self.revision, self.model_kind,
            **dtype_kwarg("transformers", self.dtype),
        ).to(self.device).eval()
        self.processor = load_pretrained(
            processor_cls.from_pretrained, self.model_id, self.revision, self.model_kind
        )

    def _classes(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def config_key(self) -> dict[str, Any]:
        # device is left out on purpose: the same model gives the same captions
        # up to numerics; dtype is in, since fp16 can change beam choices
        return {
            "name": self.name, "model": self.model_id, "revision": self.revision,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_new_tokens": self.max_new_tokens, "min_length": self.min_length,
            "num_beams": self.num_beams, "prompt": self.prompt,
        }

    def caption(self, items: Sequence[CaptionItem]) -> list[str]:
        """One caption per item, in order; batches of ``batch_size`` images."""
        out: list[str] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            out.extend(self._caption_batch([it.image.convert("RGB") for it in chunk]))
        return out

    @torch.inference_mode()
    def _caption_batch(self, images: list) -> list[str]:
        kwargs: dict[str, Any] = {"images": images, "return_tensors": "pt"}
        if self.prompt:
            kwargs.update(text=[self.prompt] * len(images), padding=True)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        ids = self.model.generate(
            # min_length counts generated tokens only, so it means the same for
            # BLIP and BLIP-2 (whose inputs carry 32 query tokens) and with a prompt
            **inputs, max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_length,
            num_beams=self.num_beams, do_sample=False,
        )
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [self._clean(t) for t in texts]

    def _clean(self, text: str) -> str:
        text = " ".join(text.split())
        if self.prompt and text.lower().startswith(self.prompt.lower()):
            # conditional captioning echoes the prefix: keep only the continuation
            text = text[len(self.prompt):].strip()
        return text


class BlipCaptioner(_HFCaptioner):
    """BLIP (``BlipForConditionalGeneration``), the paper's captioner.

    Options: ``model`` (hub id or local folder), ``revision``, ``device``
    ("auto"), ``dtype`` ("auto": fp16 on CUDA, fp32 on CPU),
    ``max_new_tokens`` (32), ``min_length`` (5 generated tokens at least,
    the prompt not counted), ``num_beams`` (1),
    ``batch_size`` (16), ``prompt`` (optional conditional prefix such as
    "a photo of", stripped from the captions)."""

    name = "blip"
    default_model = "Salesforce/blip-image-captioning-base"
    model_kind = "BLIP"

    def _classes(self) -> tuple[Any, Any]:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        return BlipForConditionalGeneration, BlipProcessor


class Blip2Captioner(_HFCaptioner):
    """BLIP-2 (``Blip2ForConditionalGeneration``: a frozen image encoder, a
    Q-Former and an LLM decoder). Same options as ``blip``; the default
    model is ``Salesforce/blip2-opt-2.7b`` (about 15 GB in fp32: use a GPU)."""

    name = "blip2"
    default_model = "Salesforce/blip2-opt-2.7b"
    model_kind = "BLIP-2"

    def _classes(self) -> tuple[Any, Any]:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        return Blip2ForConditionalGeneration, Blip2Processor


# --- shared by the transformers / diffusers backends --------------------------------------------


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``(torch.device, torch.dtype)`` for a backend's ``device`` and
    ``dtype`` options: ``auto`` device is CUDA when available; ``auto``
    dtype is fp16 on CUDA and fp32 elsewhere (fp16 is slow or unsupported on
    CPUs). Raises :class:`BackendError` for an unknown dtype or a CUDA device
    that is not there."""
    from builder.backends.targets import resolve_device

    dev = resolve_device(str(device))
    if dtype in (None, "", "auto"):
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(_DTYPES))}")
    return dev, _DTYPES[key]


def dtype_kwarg(library: str, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for a dtype: ``dtype`` where the
    library has it (transformers >= 4.56, diffusers >= 0.42), else the older
    ``torch_dtype`` (deprecated since then)."""
    from importlib.metadata import version

    from packaging.version import Version

    since = {"transformers": "4.56", "diffusers": "0.42"}[library]
    return {"dtype" if Version(version(library)) >= Version(since) else "torch_dtype": dtype}


def load_pretrained(
    loader: Callable[..., Any], model: str, revision: str | None, kind: str, **kwargs: Any
) -> Any:
    """``loader(model, revision=revision, **kwargs)``, turning any failure
    into a :class:`BackendError` that says where the model was looked for
    and how to make it available offline."""
    try:
        return loader(model, revision=revision, **kwargs)
    except Exception as exc:  # hub, file-system and format errors all mean "cannot load"
        raise BackendError(load_error_message(kind, model, revision, exc)) from exc


def load_error_message(kind: str, model: str, revision: str | None, exc: BaseException) -> str:
    """One clear message for a model that could not be loaded."""
    where = f"{model!r}" + (f" (revision {revision!r})" if revision else "")
    if os.path.isdir(model):
        hint = (f"{model} is a local folder but does not hold a loadable {kind} model "
                "(write one with save_pretrained)")
    elif _looks_local(model):
        hint = f"no such local folder: {model}"
    elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        hint = ("HF_HUB_OFFLINE is set, so only models already in the Hugging Face cache load; "
                "download it first, or give a local folder written by save_pretrained")
    else:
        hint = ("not a local folder, and the hub download failed; check the id, the network, "
                "or give a local folder written by save_pretrained")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot load {kind} model {where}: {hint} ({type(exc).__name__}: {first[:300]})"


def _looks_local(model: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a separator is a path
    return model.startswith(("/", "./", "../", "~", ".\\")) or model.count("/") > 1 or "\\" in model
