"""The demo target: a small CNN trained on the synthetic world to say which
shapes, colors and patterns are present in a scene (multi-label).

Its 18 output units are, by construction, detectors of known concepts
(``OUTPUT_CONCEPTS``), so the final-layer protocol can check that the atlas
labels each output unit with its class concept. The committed weights in
``data/demo_cnn/demo_cnn.pt`` are reproduced by::

    python -m builder.synthetic.demo_cnn --out data/demo_cnn/demo_cnn.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from builder.synthetic.small_cnn import (
    AvgMaxPool,
    batch_inputs,
    conv_block,
    image_input,
    load_half_state,
    save_half_state,
    shipped_weights,
    train_multilabel,
)
from builder.synthetic.world import COLORS, PATTERNS, SHAPES, Scene, render_full, sample_scene

log = logging.getLogger(__name__)

OUTPUT_CONCEPTS: list[str] = [*SHAPES, *COLORS, *PATTERNS]
IMAGE_SIZE = 64
WEIGHTS_NAME = "demo_cnn.pt"


class DemoCNN(nn.Module):
    """Four conv blocks (16-32-64-128 channels; ``conv1``..``conv4``; spatial
    size 32, 16, 8, 8 for a 64 px input: conv1 is a 5x5 stride-2 conv, which
    keeps CPU training to a few minutes), global average and max pool
    concatenated (``pool``; the max keeps small objects from being averaged
    away), and ``fc`` to one logit per ``OUTPUT_CONCEPTS`` entry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_block(3, 16, pool=False, kernel=5, stride=2)
        self.conv2 = conv_block(16, 32, pool=True)
        self.conv3 = conv_block(32, 64, pool=True)
        self.conv4 = conv_block(64, 128, pool=False)
        self.pool = AvgMaxPool()
        self.fc = nn.Linear(256, len(OUTPUT_CONCEPTS))
        # output unit i detects OUTPUT_CONCEPTS[i]: stored in the atlas meta for `dnd-atlas eval`
        self.ground_truth = {"fc": {"role": "output", "concepts": [[c] for c in OUTPUT_CONCEPTS]}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.fc(self.pool(x))


def preprocess(image: Image.Image) -> torch.Tensor:
    """PIL image -> normalized float tensor (3, 64, 64): resize to 64x64 if
    needed, ToTensor, then (x - 0.5) / 0.25 per channel."""
    return image_input(image, IMAGE_SIZE)


def scene_labels(scene: Scene, masks: np.ndarray) -> np.ndarray:
    """Multi-hot float32 (18,) over ``OUTPUT_CONCEPTS``: the shapes, colors
    and patterns of the objects that have at least one visible pixel."""
    y = np.zeros(len(OUTPUT_CONCEPTS), dtype=np.float32)
    index = {c: i for i, c in enumerate(OUTPUT_CONCEPTS)}
    for obj, m in zip(scene.objects, masks):
        if m.any():
            for c in (obj.shape, obj.color, obj.pattern):
                y[index[c]] = 1.0
    return y


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh random scenes -> (inputs (n,3,64,64) normalized, labels (n,18))."""
    rng = np.random.default_rng(seed)
    xs = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    ys = np.empty((n, len(OUTPUT_CONCEPTS)), dtype=np.float32)
    for i in range(n):
        scene = sample_scene(rng, size=IMAGE_SIZE)
        r = render_full(scene)
        xs[i] = r.image
        ys[i] = scene_labels(scene, r.masks)
    return batch_inputs(torch.from_numpy(xs).permute(0, 3, 1, 2)).contiguous(), torch.from_numpy(ys)


def flips(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Horizontal and vertical flips, each with probability 1/2: they keep every label."""
    if torch.rand(1, generator=g).item() < 0.5:
        xb = xb.flip(3)
    if torch.rand(1, generator=g).item() < 0.5:
        xb = xb.flip(2)
    return xb


def train_demo_cnn(
    out_path: str | Path,
    n_train: int = 15000,
    epochs: int = 12,
    seed: int = 0,
    n_val: int = 2000,
    batch_size: int = 128,
    threads: int = 2,
) -> dict[str, object]:
    """Train the demo CNN on freshly rendered scenes on the CPU and write its
    float16 state_dict to ``out_path`` (atomically). Returns the validation
    metrics and timings (also written next to the weights as JSON)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.time()
    x_tr, y_tr = make_dataset(n_train, seed=seed * 1000 + 1)
    x_va, y_va = make_dataset(n_val, seed=seed * 1000 + 2)
    t_data = time.time() - t0
    log.info("rendered %d train + %d val scenes in %.1fs", n_train, n_val, t_data)
    model = DemoCNN()
    metrics = train_multilabel(model, (x_tr, y_tr), (x_va, y_va), OUTPUT_CONCEPTS, flips,
                               epochs=epochs, batch_size=batch_size, seed=seed)
    metrics.update(train_seconds=round(time.time() - t0, 1), data_seconds=round(t_data, 1),
                   n_train=n_train, n_val=n_val, epochs=epochs, seed=seed, threads=threads)
    save_half_state(model, Path(out_path), metrics)
    return metrics


def default_weights_path() -> Path:
    """Where the committed weights live (``data/demo_cnn/``, or the installed data package)."""
    return shipped_weights("demo_cnn", WEIGHTS_NAME)


def load_demo_cnn(weights: str | Path | None = None) -> DemoCNN:
    """The demo CNN in eval mode with weights from ``weights`` (default: the
    committed ones)."""
    path = Path(weights) if weights is not None else default_weights_path()
    return load_half_state(DemoCNN(), path, __name__)


def demo_cnn(weights: str | None = None) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """Target factory: (the demo CNN in eval mode with the committed weights,
    its preprocess PIL.Image -> (3, 64, 64) tensor)."""
    return load_demo_cnn(weights), preprocess


def main(argv: list[str] | None = None) -> None:
    """CLI: train the demo CNN and print its validation metrics as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/demo_cnn/demo_cnn.pt")
    ap.add_argument("--n-train", type=int, default=15000)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    metrics = train_demo_cnn(
        args.out, n_train=args.n_train, epochs=args.epochs, seed=args.seed, threads=args.threads
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
