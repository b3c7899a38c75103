"""``diffusers``: text-to-image generation with any diffusers pipeline.

The pipeline loads once per instance from a hub id or a local folder
(``AutoPipelineForText2Image``, falling back to ``DiffusionPipeline`` for
pipelines the auto class does not know). Images are generated in batches
that mix prompts: all (prompt, i) pairs of a call are flattened and run
``batch_size`` at a time.

Determinism: every image gets its own CPU ``torch.Generator`` seeded from a
sha256 of (prompt, i, seed), and diffusers draws each image's initial
latents (and any per-step noise) from its own generator. So image i of a
prompt depends only on (prompt, i, seed, config), not on which prompts share
its batch, and the builder can cache it under that key. CPU generators give
the same starting noise on every device.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from builder.backends.hf import dtype_kwarg, load_error_message, resolve_device_dtype
from builder.backends.interfaces import Generator
from builder.errors import BackendError
from builder.progress import progress

log = logging.getLogger(__name__)

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# scheduler option -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}


def image_seed(prompt: str, i: int, seed: int) -> int:
    """The 63-bit seed of image ``i`` of ``prompt`` under the build seed
    ``seed``: a sha256 of the three, so it is stable across processes,
    machines and Python versions (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}\x1f{i}\x1f{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class DiffusersGenerator(Generator):
    """Text-to-image with a diffusers pipeline (Stable Diffusion 1.5 by default).

    Options: ``model`` (hub id or local folder), ``revision``, ``scheduler``
    ("dpm++" = DPMSolverMultistep with dpmsolver++; "ddim", "euler",
    "euler-a", "pndm", or "default" for the pipeline's own), ``steps`` (25),
    ``guidance_scale`` (7.5), ``height``/``width`` (default: the
    pipeline's), ``output_size`` (optional (w, h) resize of the results),
    ``device`` ("auto"), ``dtype`` ("auto": fp16 on CUDA, fp32 on CPU),
    ``safety_checker`` (False: off, so that no image is blacked out),
    ``batch_size`` (8 images per pipeline call, across prompts),
    ``negative_prompt``."""

    name = "diffusers"

    def __init__(
        self,
        model: str | None = None,
        revision: str | None = None,
        scheduler: str = "dpm++",
        steps: int = 25,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        output_size: Sequence[int] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        safety_checker: bool = False,
        batch_size: int = 8,
        negative_prompt: str | None = None,
    ) -> None:
        self.model_id = str(model or DEFAULT_MODEL)
        self.revision = revision or None
        self.scheduler_name = str(scheduler).lower()
        if self.scheduler_name not in (*SCHEDULERS, "default"):
            raise BackendError(
                f"diffusers generator: unknown scheduler {scheduler!r}; choose one of "
                f"{', '.join([*SCHEDULERS, 'default'])}"
            )
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.batch_size = int(batch_size)
        if self.steps < 1 or self.batch_size < 1:
            raise BackendError("diffusers generator: steps and batch_size must be >= 1")
        self.height = int(height) if height else None
        self.width = int(width) if width else None
        if output_size is not None:
            if len(output_size) != 2 or min(int(v) for v in output_size) < 1:
                raise BackendError(
                    f"diffusers generator: output_size must be (width, height), got {output_size!r}"
                )
            self.output_size: tuple[int, int] | None = (int(output_size[0]), int(output_size[1]))
        else:
            self.output_size = None
        self.safety_checker = bool(safety_checker)
        self.negative_prompt = negative_prompt or None
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.pipe = self._load()
        self._set_scheduler()
        self.pipe.set_progress_bar_config(disable=True)  # one bar over batches instead

    def _load(self) -> Any:
        import diffusers

        kind = "diffusers pipeline"
        try:
            index = diffusers.DiffusionPipeline.load_config(self.model_id, revision=self.revision)
        except Exception as exc:  # hub, file-system and format errors all mean "cannot load"
            raise BackendError(load_error_message(kind, self.model_id, self.revision, exc)) from exc
        kwargs: dict[str, Any] = {"revision": self.revision, **dtype_kwarg("diffusers", self.dtype)}
        if not self.safety_checker and "safety_checker" in index:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            try:
                pipe = diffusers.AutoPipelineForText2Image.from_pretrained(self.model_id, **kwargs)
            except ValueError as exc:
                # a pipeline class the auto mapping does not list: load it as itself
                log.info("AutoPipelineForText2Image cannot load %s (%s); using DiffusionPipeline",
                         self.model_id, exc)
                pipe = diffusers.DiffusionPipeline.from_pretrained(self.model_id, **kwargs)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(load_error_message(kind, self.model_id, self.revision, exc)) from exc
        return pipe.to(self.device)

    def _set_scheduler(self) -> None:
        if self.scheduler_name == "default":
            return
        import diffusers

        cls_name, extra = SCHEDULERS[self.scheduler_name]
        cls = getattr(diffusers, cls_name)
        try:
            self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config, **extra)
        except Exception as exc:
            raise BackendError(f"diffusers generator: cannot use scheduler {self.scheduler_name!r} "
                               f"with {self.model_id!r}: {exc}") from exc

    def default_size(self) -> tuple[int | None, int | None]:
        """(height, width) the pipeline generates when none is set, or
        (None, None) if it cannot tell."""
        scale = getattr(self.pipe, "vae_scale_factor", None)
        sample = getattr(self.pipe, "default_sample_size", None)
        if sample is None:
            for part in ("unet", "transformer"):
                cfg = getattr(getattr(self.pipe, part, None), "config", None)
                if cfg is not None and getattr(cfg, "sample_size", None):
                    sample = cfg.sample_size
                    break
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        if not sample or not scale:
            return None, None
        return int(sample) * int(scale), int(sample) * int(scale)

    def config_key(self) -> dict[str, Any]:
        dh, dw = self.default_size()
        return {
            "name": self.name, "model": self.model_id, "revision": self.revision,
            "scheduler": self.scheduler_name, "steps": self.steps, "guidance_scale": self.guidance_scale,
            "height": self.height or dh, "width": self.width or dw,
            "output_size": list(self.output_size) if self.output_size else None,
            "dtype": str(self.dtype).removeprefix("torch."), "negative_prompt": self.negative_prompt,
            "safety_checker": self.safety_checker,
        }

    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[list[Image.Image]]:
        """``n`` images per prompt; image i of a prompt is a function of
        (prompt, i, seed, config) only (see the module docstring)."""
        pairs = [(p, i) for p in prompts for i in range(n)]
        images: list[Image.Image] = []
        bar = progress(total=len(pairs), desc="generate", unit="image")
        try:
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start : start + self.batch_size]
                images.extend(self._run(chunk, seed))
                bar.update(len(chunk))
        finally:
            bar.close()
        return [images[k * n : (k + 1) * n] for k in range(len(prompts))]

    @torch.inference_mode()
    def _run(self, chunk: Sequence[tuple[str, int]], seed: int) -> list[Image.Image]:
        generators = [torch.Generator("cpu").manual_seed(image_seed(p, i, seed)) for p, i in chunk]
        kwargs: dict[str, Any] = {
            "prompt": [p for p, _ in chunk],
            "generator": generators,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "num_images_per_prompt": 1,
            "output_type": "pil",
        }
        if self.negative_prompt:
            kwargs["negative_prompt"] = [self.negative_prompt] * len(chunk)
        if self.height:
            kwargs["height"] = self.height
        if self.width:
            kwargs["width"] = self.width
        try:
            out = self.pipe(**kwargs)
        except Exception as exc:
            raise BackendError(f"diffusers generator ({self.model_id!r}) failed: {exc}") from exc
        imgs = list(out.images)
        if len(imgs) != len(chunk):
            raise BackendError(
                f"diffusers generator: the pipeline returned {len(imgs)} images for {len(chunk)}"
            )
        imgs = [im.convert("RGB") for im in imgs]
        if self.output_size:
            imgs = [im.resize(self.output_size, Image.Resampling.BICUBIC) for im in imgs]
        return imgs
