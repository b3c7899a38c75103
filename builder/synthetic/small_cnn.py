"""What the synthetic world's two target CNNs share (``demo_cnn``, ``marks_cnn``).

Their conv blocks and pooling, input normalization, the multi-label
training loop and its metrics, and their float16 weights: written
atomically, found in the installed ``dnd_atlas_data`` package or the
repository's ``data/`` folder, loaded back as float32. Each model's module
keeps what is its own: the architecture, the scenes and labels, the
augmentation, the defaults.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from builder.errors import BackendError

log = logging.getLogger(__name__)

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def conv_block(cin: int, cout: int, pool: bool, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias), BatchNorm, ReLU, and a 2x2 max pool when ``pool``."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class AvgMaxPool(nn.Module):
    """(B, C, H, W) -> (B, 2C): spatial mean and spatial max, concatenated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) floats in [0, 1] -> (x - MEAN) / STD per channel."""
    shape = (1,) * (x.dim() - 3) + (3, 1, 1)
    return (x - torch.tensor(MEAN).view(shape)) / torch.tensor(STD).view(shape)


def batch_inputs(x_uint8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 images -> normalized float inputs."""
    return normalize(x_uint8.float().div_(255.0))


def array_input(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array -> normalized float tensor (3, H, W)."""
    return normalize(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0)


def image_input(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> normalized float tensor (3, size, size), resized bilinearly when needed."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return array_input(np.array(image))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties
    count half), from the rank-sum statistic; NaN when one class is absent."""
    from scipy.stats import rankdata

    pos = labels >= 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, concepts: list[str],
             inputs: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, object]:
    """Per-label accuracy (threshold 0.5), AUROC and positive rate of a
    multi-label model on ``x`` (made model inputs by ``inputs``), and the means."""
    model.eval()
    probs = torch.cat([torch.sigmoid(model(inputs(x[i : i + 256]))) for i in range(0, len(x), 256)])
    p, t = probs.numpy(), y.numpy()
    acc = ((p >= 0.5) == (t >= 0.5)).mean(axis=0)
    aucs = [auroc(p[:, j], t[:, j]) for j in range(t.shape[1])]
    return {
        "per_label_accuracy": {c: round(float(a), 4) for c, a in zip(concepts, acc)},
        "per_label_auroc": {c: round(float(a), 4) for c, a in zip(concepts, aucs)},
        "per_label_positive_rate": {c: round(float(r), 4) for c, r in zip(concepts, t.mean(0))},
        "mean_accuracy": float(acc.mean()),
        "mean_auroc": float(np.nanmean(aucs)),
    }


def train_multilabel(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    concepts: list[str],
    augment: Augment,
    inputs: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    epochs: int = 12,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, object]:
    """Train ``model`` with BCE on multi-hot labels (AdamW, one-cycle schedule
    to lr 3e-3); each batch goes through ``inputs`` then ``augment`` (which
    draws from the training generator). Returns the validation metrics.
    Bit for bit the same for a given seed and thread count."""
    x_tr, y_tr = train
    t0 = time.time()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    lossf = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=g)
        total = 0.0
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i : i + batch_size]
            loss = lossf(model(augment(inputs(x_tr[idx]), g)), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        score = evaluate(model, val[0][:500], val[1][:500], concepts, inputs)["mean_auroc"]
        log.info("epoch %d loss %.4f val auroc %.4f (%.0fs)", epoch + 1, total / len(x_tr), score,
                 time.time() - t0)
    return evaluate(model, *val, concepts, inputs)


def save_half_state(model: nn.Module, out: Path, metrics: dict[str, object]) -> None:
    """The float16 state_dict to ``out`` and ``metrics`` to ``metrics.json`` next to it, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    for path, data in ((out, buf.getvalue()), (out.with_name("metrics.json"),
                                               (json.dumps(metrics, indent=2) + "\n").encode())):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def shipped_weights(folder: str, name: str) -> Path:
    """Where a model's committed weights live: inside the installed
    ``dnd_atlas_data`` package, or the repo's ``data/`` folder."""
    try:
        from importlib.resources import files

        p = Path(str(files("dnd_atlas_data") / folder / name))
        if p.is_file():
            return p
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "data" / folder / name


def load_half_state(model: nn.Module, path: Path, module: str) -> nn.Module:
    """``model`` in eval mode with the float16 weights at ``path``; a missing
    file is a :class:`BackendError` saying how ``module`` retrains them."""
    if not path.is_file():
        raise BackendError(f"weights not found at {path}; train them with `python -m {module} --out {path}`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()})
    return model.eval()
