"""A target's layers as the pipeline reads them: forward hooks that never
leak, the kind of a layer's output, one number per channel and image, and
spatial activation maps.

A layer's output is (B, C, H, W) for a conv map, (B, C) for a linear layer
and (B, tokens, C) for a ViT block; every stage (recording, crops,
classification, the dry run, the target-features similarity) reads layers
through these functions, so a new kind of unit is added here once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch

from builder.errors import BuildError, LayerError


@contextlib.contextmanager
def hooked(module: torch.nn.Module, layers: Sequence[str], sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Forward hooks calling ``sink(layer, output)`` on every named layer;
    always removed on exit, even when the forward pass raises."""
    modules = dict(module.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise LayerError(f"no layer {missing[0]!r}; valid layers: {', '.join(n for n in modules if n)}")
    handles = []
    try:
        for name in layers:
            def hook(_m, _inp, out, name=name):
                sink(name, _first_tensor(out))

            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state  # type: ignore[no-any-return]
    raise BuildError(f"a hooked layer returned {type(out).__name__}, not a tensor")


def layer_kind(out: torch.Tensor) -> str:
    """conv for (B, C, H, W), linear for (B, C), vit for (B, tokens, C)."""
    return {4: "conv", 2: "linear", 3: "vit"}.get(out.dim(), "other")


def summarize(out: torch.Tensor, summary: str, vit_tokens: str = "cls") -> torch.Tensor:
    """One number per channel and image, shape (B, C)."""
    kind = layer_kind(out)
    if kind == "conv":
        return out.mean(dim=(2, 3)) if summary == "mean" else out.amax(dim=(2, 3))
    if kind == "linear":
        return out
    if kind == "vit":
        if vit_tokens == "cls":
            return out[:, 0, :]
        patches = _patch_tokens(out)
        return patches.mean(dim=1) if summary == "mean" else patches.amax(dim=1)
    raise BuildError(f"cannot summarize a layer output of shape {tuple(out.shape)}")


def _patch_tokens(out: torch.Tensor) -> torch.Tensor:
    t = out.shape[1]
    return out[:, 1:, :] if _is_square(t - 1) and not _is_square(t) else out


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def activation_maps(out: torch.Tensor) -> torch.Tensor | None:
    """Spatial maps (B, C, h, w) for cropping; None for a linear layer."""
    kind = layer_kind(out)
    if kind == "conv":
        return out
    if kind == "vit":
        p = _patch_tokens(out)
        side = math.isqrt(p.shape[1])
        if side * side != p.shape[1]:
            return None
        return p.transpose(1, 2).reshape(p.shape[0], p.shape[2], side, side)
    return None
