"""``marks-cnn``: a small CNN trained on the marks world to say which shapes,
colors (object colors and mark inks) and mark kinds are present in a scene
(multi-label).

Its 20 output units detect known concepts (``OUTPUT_CONCEPTS``), so the
final-layer protocol can check the atlas's labels on a second world. The
committed weights in ``data/marks_cnn/marks_cnn.pt`` are reproduced by::

    nice -n 10 python -m builder.synthetic.marks_cnn --out data/marks_cnn/marks_cnn.pt
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

from builder.synthetic import marks
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

log = logging.getLogger(__name__)

OUTPUT_CONCEPTS: list[str] = [*marks.SHAPES, *marks.COLORS, *marks.MARKS]
IMAGE_SIZE = marks.IMAGE_SIZE
WEIGHTS_NAME = "marks_cnn.pt"


class MarksCNN(nn.Module):
    """Four conv blocks (``conv1``..``conv4``: 12-32-64-96 channels, spatial
    32, 16, 8, 8 for a 128 px input; conv1 is a 5x5 stride-2 conv, the
    others 3x3; 2x2 max pools after conv1-conv3, which keep CPU training to
    minutes and 5-px marks alive), global mean and max pool
    concatenated (``pool``: the max keeps 5-px marks from being averaged
    away) and ``fc`` to one logit per ``OUTPUT_CONCEPTS`` entry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv_block(3, 12, pool=True, kernel=5, stride=2)
        self.conv2 = conv_block(12, 32, pool=True)
        self.conv3 = conv_block(32, 64, pool=True)
        self.conv4 = conv_block(64, 96, pool=False)
        self.pool = AvgMaxPool()
        self.fc = nn.Linear(192, len(OUTPUT_CONCEPTS))
        # output unit i detects OUTPUT_CONCEPTS[i] (marks world): for `dnd-atlas eval`
        self.ground_truth = {
            "fc": {
                "role": "output",
                "world": marks.WORLD_NAME,
                "concepts": [[c] for c in OUTPUT_CONCEPTS],
            }
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.fc(self.pool(x))


def preprocess(image: Image.Image) -> torch.Tensor:
    """PIL image -> normalized float tensor (3, 128, 128): resize to 128x128
    if needed, ToTensor, then (x - 0.5) / 0.25 per channel."""
    return image_input(image, IMAGE_SIZE)


def scene_labels(scene: marks.MarksScene, truth: marks.MarksTruth) -> np.ndarray:
    """Multi-hot float32 (20,) over ``OUTPUT_CONCEPTS``: shapes and colors of
    the objects with a visible pixel, inks and kinds of visible mark ink."""
    y = np.zeros(len(OUTPUT_CONCEPTS), dtype=np.float32)
    index = {c: i for i, c in enumerate(OUTPUT_CONCEPTS)}
    for obj, m in zip(scene.objects, truth.masks):
        if m.any():
            y[index[obj.shape]] = y[index[obj.color]] = 1.0
    inks = list(marks.INK_COLORS)
    for k in np.unique(truth.mark_kind[truth.mark_kind >= 0]):
        y[index[marks.MARKS[int(k)]]] = 1.0
    for i in np.unique(truth.mark_ink[truth.mark_ink >= 0]):
        y[index[inks[int(i)]]] = 1.0
    return y


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh random scenes -> (images uint8 (n, 3, 128, 128), labels (n, 20))."""
    rng = np.random.default_rng(seed)
    xs = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    ys = np.empty((n, len(OUTPUT_CONCEPTS)), dtype=np.float32)
    for i in range(n):
        scene = marks.sample_scene(rng, size=IMAGE_SIZE)
        r = marks.render_full(scene)
        xs[i] = r.image
        ys[i] = scene_labels(scene, r.truth)
    return torch.from_numpy(xs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ys)


def turns_and_flips(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One of the 8 rotations/flips of the square: they keep every label
    (objects are at random angles; a slash turned by 90 degrees is still called a slash)."""
    k = int(torch.randint(0, 4, (1,), generator=g).item())
    xb = torch.rot90(xb, k, dims=(2, 3))
    if torch.rand(1, generator=g).item() < 0.5:
        xb = xb.flip(3)
    return xb


def train_marks_cnn(
    out_path: str | Path,
    n_train: int = 8000,
    epochs: int = 24,
    seed: int = 0,
    n_val: int = 2000,
    batch_size: int = 128,
    threads: int = 2,
) -> dict[str, object]:
    """Train the marks CNN on freshly rendered scenes on the CPU, write its
    float16 state_dict to ``out_path`` and ``metrics.json`` next to it
    (atomically). Returns the validation metrics and timings."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0, cpu0 = time.time(), time.process_time()
    x_tr, y_tr = make_dataset(n_train, seed=seed * 1000 + 1)
    x_va, y_va = make_dataset(n_val, seed=seed * 1000 + 2)
    t_data = time.time() - t0
    log.info("rendered %d train + %d val scenes in %.1fs", n_train, n_val, t_data)
    model = MarksCNN()
    metrics = train_multilabel(model, (x_tr, y_tr), (x_va, y_va), OUTPUT_CONCEPTS, turns_and_flips,
                               inputs=batch_inputs, epochs=epochs, batch_size=batch_size, seed=seed)
    metrics.update(
        train_seconds=round(time.time() - t0, 1),
        cpu_seconds=round(time.process_time() - cpu0, 1),  # all threads: wall time on a busy machine says little
        data_seconds=round(t_data, 1), n_train=n_train, n_val=n_val, epochs=epochs, seed=seed,
        threads=threads,
    )
    save_half_state(model, Path(out_path), metrics)
    return metrics


def default_weights_path() -> Path:
    """Where the committed weights live (``data/marks_cnn/``, or the installed data package)."""
    return shipped_weights("marks_cnn", WEIGHTS_NAME)


def load_marks_cnn(weights: str | Path | None = None) -> MarksCNN:
    """The marks CNN in eval mode with weights from ``weights`` (default:
    the committed ones)."""
    path = Path(weights) if weights is not None else default_weights_path()
    return load_half_state(MarksCNN(), path, __name__)


def marks_cnn(
    weights: str | None = None,
) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """Target factory: (the marks CNN in eval mode with the committed
    weights, its preprocess PIL.Image -> (3, 128, 128) tensor)."""
    return load_marks_cnn(weights), preprocess


def main(argv: list[str] | None = None) -> None:
    """CLI: train the marks CNN and print its validation metrics as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/marks_cnn/marks_cnn.pt")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    metrics = train_marks_cnn(
        args.out, n_train=args.n_train, epochs=args.epochs, seed=args.seed, threads=args.threads
    )
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
