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
from builder.synthetic import marks
from builder.synthetic.demo_cnn import AvgMaxPool

log = logging.getLogger(__name__)

OUTPUT_CONCEPTS: list[str] = [*marks.SHAPES, *marks.COLORS, *marks.MARKS]
IMAGE_SIZE = marks.IMAGE_SIZE
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
WEIGHTS_NAME = "marks_cnn.pt"


def _block(cin: int, cout: int, pool: bool, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class MarksCNN(nn.Module):
    """Four conv blocks (``conv1``..``conv4``: 12-32-64-96 channels, spatial
    32, 16, 8, 8 for a 128 px input; conv1 is a 5x5 stride-2 conv, the
    others 3x3; 2x2 max pools after conv1-conv3, which keep CPU training to
    minutes and 5-px marks alive), global mean and max pool
    concatenated (``pool``: the max keeps 5-px marks from being averaged
    away) and ``fc`` to one logit per ``OUTPUT_CONCEPTS`` entry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _block(3, 12, pool=True, kernel=5, stride=2)
        self.conv2 = _block(12, 32, pool=True)
        self.conv3 = _block(32, 64, pool=True)
        self.conv4 = _block(64, 96, pool=False)
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
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    t = torch.from_numpy(np.ascontiguousarray(np.array(image))).permute(2, 0, 1).float() / 255.0
    return _normalize(t)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> (x - MEAN) / STD."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


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


def _inputs(x_uint8: torch.Tensor) -> torch.Tensor:
    return _normalize(x_uint8.float().div_(255.0))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties
    count half), from the rank-sum statistic."""
    from scipy.stats import rankdata

    pos = labels >= 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    """Per-label accuracy (threshold 0.5) and AUROC, and their means."""
    model.eval()
    probs = torch.cat(
        [torch.sigmoid(model(_inputs(x[i : i + 256]))) for i in range(0, len(x), 256)]
    )
    p, t = probs.numpy(), y.numpy()
    acc = ((p >= 0.5) == (t >= 0.5)).mean(axis=0)
    aucs = [auroc(p[:, j], t[:, j]) for j in range(t.shape[1])]
    return {
        "per_label_accuracy": {c: round(float(a), 4) for c, a in zip(OUTPUT_CONCEPTS, acc)},
        "per_label_auroc": {c: round(float(a), 4) for c, a in zip(OUTPUT_CONCEPTS, aucs)},
        "per_label_positive_rate": {
            c: round(float(r), 4) for c, r in zip(OUTPUT_CONCEPTS, t.mean(0))
        },
        "mean_accuracy": float(acc.mean()),
        "mean_auroc": float(np.nanmean(aucs)),
    }


def _train_epoch(model, opt, sched, x_tr, y_tr, batch_size, g) -> float:
    lossf = nn.BCEWithLogitsLoss()
    model.train()
    perm = torch.randperm(len(x_tr), generator=g)
    total = 0.0
    for i in range(0, len(x_tr), batch_size):
        idx = perm[i : i + batch_size]
        xb, yb = _inputs(x_tr[idx]), y_tr[idx]
        # the 8 rotations/flips of the square keep every label (objects are at
        # random angles; a slash turned by 90 degrees is still called a slash)
        k = int(torch.randint(0, 4, (1,), generator=g).item())
        xb = torch.rot90(xb, k, dims=(2, 3))
        if torch.rand(1, generator=g).item() < 0.5:
            xb = xb.flip(3)
        loss = lossf(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
    return total / len(x_tr)


def _save_state(model: nn.Module, out: Path) -> None:
    """Float16 state_dict, written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)


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
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((n_train + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        loss = _train_epoch(model, opt, sched, x_tr, y_tr, batch_size, g)
        val = evaluate(model, x_va[:500], y_va[:500])["mean_auroc"]
        log.info(
            "epoch %d loss %.4f val auroc %.4f (%.0fs)", epoch + 1, loss, val, time.time() - t0
        )
    metrics = evaluate(model, x_va, y_va)
    metrics.update(
        train_seconds=round(time.time() - t0, 1),
        cpu_seconds=round(time.process_time() - cpu0, 1),  # all threads: wall time on a busy machine says little
        data_seconds=round(t_data, 1),
        n_train=n_train,
        n_val=n_val,
        epochs=epochs,
        seed=seed,
        threads=threads,
    )
    out = Path(out_path)
    _save_state(model, out)
    metrics_path = out.with_name("metrics.json")
    tmp = metrics_path.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, metrics_path)
    return metrics


def default_weights_path() -> Path:
    """Where the committed weights live: inside the installed
    ``dnd_atlas_data`` package, or the repo's ``data/`` folder."""
    try:
        from importlib.resources import files

        p = Path(str(files("dnd_atlas_data") / "marks_cnn" / WEIGHTS_NAME))
        if p.is_file():
            return p
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "data" / "marks_cnn" / WEIGHTS_NAME


def load_marks_cnn(weights: str | Path | None = None) -> MarksCNN:
    """The marks CNN in eval mode with weights from ``weights`` (default:
    the committed ones)."""
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise BackendError(
            f"marks CNN weights not found at {path}; train them with "
            "`python -m builder.synthetic.marks_cnn --out data/marks_cnn/marks_cnn.pt`"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MarksCNN()
    model.load_state_dict(
        {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    )
    return model.eval()


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
