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
from builder.synthetic.world import COLORS, PATTERNS, SHAPES, Scene, render_full, sample_scene

log = logging.getLogger(__name__)

OUTPUT_CONCEPTS: list[str] = [*SHAPES, *COLORS, *PATTERNS]
IMAGE_SIZE = 64
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
WEIGHTS_NAME = "demo_cnn.pt"


def _block(cin: int, cout: int, pool: bool, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class DemoCNN(nn.Module):
    """Four conv blocks (16-32-64-128 channels; ``conv1``..``conv4``; spatial
    size 32, 16, 8, 8 for a 64 px input: conv1 is a 5x5 stride-2 conv, which
    keeps CPU training to a few minutes), global average and max pool
    concatenated (``pool``; the max keeps small objects from being averaged
    away), and ``fc`` to one logit per ``OUTPUT_CONCEPTS`` entry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _block(3, 16, pool=False, kernel=5, stride=2)
        self.conv2 = _block(16, 32, pool=True)
        self.conv3 = _block(32, 64, pool=True)
        self.conv4 = _block(64, 128, pool=False)
        self.pool = AvgMaxPool()
        self.fc = nn.Linear(256, len(OUTPUT_CONCEPTS))
        # output unit i detects OUTPUT_CONCEPTS[i]: stored in the atlas meta for `dnd-atlas eval`
        self.ground_truth = {"fc": {"role": "output", "concepts": [[c] for c in OUTPUT_CONCEPTS]}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.fc(self.pool(x))


class AvgMaxPool(nn.Module):
    """(B, C, H, W) -> (B, 2C): spatial mean and spatial max, concatenated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def preprocess(image: Image.Image) -> torch.Tensor:
    """PIL image -> normalized float tensor (3, 64, 64): resize to 64x64 if
    needed, ToTensor, then (x - 0.5) / 0.25 per channel."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return _to_input(np.array(image))


def _to_input(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (t - mean) / std


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
    x = torch.from_numpy(xs).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous(), torch.from_numpy(ys)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    """Per-label accuracy (threshold 0.5), mean accuracy and mean AUROC."""
    from sklearn.metrics import roc_auc_score

    model.eval()
    probs = torch.cat([torch.sigmoid(model(x[i : i + 512])) for i in range(0, len(x), 512)])
    p, t = probs.numpy(), y.numpy()
    acc = ((p >= 0.5) == (t >= 0.5)).mean(axis=0)
    aucs = [
        roc_auc_score(t[:, j], p[:, j]) for j in range(t.shape[1]) if 0 < t[:, j].sum() < len(t)
    ]
    return {
        "per_label_accuracy": {c: round(float(a), 4) for c, a in zip(OUTPUT_CONCEPTS, acc)},
        "mean_accuracy": float(acc.mean()),
        "mean_auroc": float(np.mean(aucs)),
    }


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
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((n_train + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    lossf = nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)
        total = 0.0
        for i in range(0, n_train, batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            # Flips keep every label: free augmentation.
            if torch.rand(1, generator=g).item() < 0.5:
                xb = xb.flip(3)
            if torch.rand(1, generator=g).item() < 0.5:
                xb = xb.flip(2)
            loss = lossf(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        val = evaluate(model, x_va[:500], y_va[:500])["mean_accuracy"]
        log.info(
            "epoch %d loss %.4f val acc %.4f (%.0fs)",
            epoch + 1,
            total / n_train,
            val,
            time.time() - t0,
        )
    metrics = evaluate(model, x_va, y_va)
    metrics.update(
        train_seconds=round(time.time() - t0, 1),
        data_seconds=round(t_data, 1),
        n_train=n_train,
        n_val=n_val,
        epochs=epochs,
        seed=seed,
        threads=threads,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
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

        p = Path(str(files("dnd_atlas_data") / "demo_cnn" / WEIGHTS_NAME))
        if p.is_file():
            return p
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "data" / "demo_cnn" / WEIGHTS_NAME


def load_demo_cnn(weights: str | Path | None = None) -> DemoCNN:
    """The demo CNN in eval mode with weights from ``weights`` (default: the
    committed ones)."""
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise BackendError(
            f"demo CNN weights not found at {path}; train them with "
            "`python -m builder.synthetic.demo_cnn --out data/demo_cnn/demo_cnn.pt`"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = DemoCNN()
    model.load_state_dict(
        {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    )
    return model.eval()


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
