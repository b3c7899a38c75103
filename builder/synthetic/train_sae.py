"""Train the demo dictionary: a small TopK sparse autoencoder on the demo
CNN's ``conv4`` activations, at every spatial position, over synthetic scenes.

The committed SAELens folder ``data/sae/demo-cnn-conv4`` is reproduced (on
the CPU, in well under a minute, deterministic by seed for a given thread
count and kind of CPU: another instruction set rounds differently) by::

    python -m builder.synthetic.train_sae --out data/sae/demo-cnn-conv4

Attached with ``dictionaries = [{layer = "conv4", path = "demo-cnn-conv4"}]``
its latents are the layer ``sae.conv4`` of ``demo-cnn``.

Training: inputs are scaled by one constant so their mean squared norm is
d_in, the decoder rows are kept at unit norm, dead latents (no firing for
``dead_steps`` steps) get the AuxK loss (they learn to reconstruct the
residual of the live ones), and the scale is folded into the weights before
saving, so the SAE takes raw ``conv4`` activations.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from builder.backends.sae import EncoderConfig, SparseAutoencoder, save_saelens
from builder.synthetic.demo_cnn import load_demo_cnn, make_dataset

log = logging.getLogger(__name__)

NAME = "demo-cnn-conv4"
HOST_LAYER = "conv4"


@dataclass(frozen=True)
class TrainConfig:
    """What the demo dictionary is trained with."""

    d_sae: int = 256
    k: int = 8  # TopK: latents active per position
    n_train: int = 2500  # scenes (64 positions each)
    n_val: int = 400
    epochs: int = 6
    batch_size: int = 4096
    lr: float = 3e-3
    aux_k: int = 64  # AuxK: dead latents used to model the residual
    aux_coef: float = 1 / 32
    dead_steps: int = 40  # a latent silent for this many steps counts as dead while training
    seed: int = 0
    threads: int = 1  # one thread: fastest on a busy machine, and the reference for determinism


def conv4_positions(n_scenes: int, seed: int, batch_size: int = 250) -> torch.Tensor:
    """The demo CNN's conv4 activations at every spatial position of
    ``n_scenes`` fresh scenes: (n_scenes * 64, 128)."""
    model = load_demo_cnn()
    x, _ = make_dataset(n_scenes, seed=seed)
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            a = model.conv4(model.conv3(model.conv2(model.conv1(x[i : i + batch_size]))))
            out.append(a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]))
    return torch.cat(out)


class _TrainingSAE(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, b_dec: torch.Tensor, gen: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(d_sae, d_in, generator=gen)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(b_dec.clone())

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc


def _topk(h: torch.Tensor, k: int) -> torch.Tensor:
    top = torch.topk(h, k, dim=-1)
    return torch.zeros_like(h).scatter_(-1, top.indices, torch.relu(top.values))


def _step(sae: _TrainingSAE, x: torch.Tensor, cfg: TrainConfig, dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = sae.pre(x)
    z = _topk(h, cfg.k)
    recon = z @ sae.W_dec + sae.b_dec
    loss = (recon - x).pow(2).sum(dim=1).mean()
    n_dead = int(dead.sum())
    if n_dead:  # AuxK: the top dead latents reconstruct what the live ones missed
        k_aux = min(cfg.aux_k, n_dead)
        za = _topk(h.masked_fill(~dead, float("-inf")), k_aux)
        residual = (x - recon).detach()
        loss = loss + cfg.aux_coef * (za @ sae.W_dec - residual).pow(2).sum(dim=1).mean()
    return loss, z


def train_sae(cfg: TrainConfig = TrainConfig()) -> tuple[SparseAutoencoder, dict[str, float]]:
    """Train the TopK SAE on conv4 and return it (taking raw activations)
    with its validation metrics."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig) -> tuple[SparseAutoencoder, dict[str, float]]:
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    x_tr = conv4_positions(cfg.n_train, seed=cfg.seed * 1000 + 11)
    x_va = conv4_positions(cfg.n_val, seed=cfg.seed * 1000 + 12)
    t_data = time.perf_counter() - t0
    scale = float((x_tr.shape[1] / x_tr.pow(2).sum(dim=1).mean()).sqrt())  # mean ||scale x||^2 = d_in
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = _TrainingSAE(x_tr.shape[1], cfg.d_sae, (x_tr * scale).mean(dim=0), gen)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    steps_per_epoch = (len(x_tr) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, 2.0 * (1.0 - s / (cfg.epochs * steps_per_epoch)) + 0.05))
    last_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    step = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), cfg.batch_size):
            xb = x_tr[perm[i : i + cfg.batch_size]] * scale
            loss, z = _step(sae, xb, cfg, step - last_fired > cfg.dead_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
            step += 1
            last_fired[(z > 0).any(dim=0)] = step
    train_s = time.perf_counter() - t0 - t_data
    with torch.no_grad():  # fold the input scale in: the saved SAE takes raw activations
        weights = {"W_enc": sae.W_enc * scale, "b_enc": sae.b_enc,
                   "W_dec": sae.W_dec / scale, "b_dec": sae.b_dec / scale}
    out = SparseAutoencoder(EncoderConfig(x_tr.shape[1], cfg.d_sae, "topk", cfg.k), weights)
    metrics = evaluate_sae(out, x_va)
    metrics.update(train_dead_latents=int(evaluate_sae(out, x_tr)["dead_latents"]),
                   data_seconds=round(t_data, 1), train_seconds=round(train_s, 1), steps=step)
    return out, metrics


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, x: torch.Tensor, batch_size: int = 8192) -> dict[str, float]:
    """Reconstruction MSE (per element), explained variance, L0 (mean active
    latents per position) and dead latents (never active) of ``sae`` on ``x``."""
    sq_err = l0 = 0.0
    fired = torch.zeros(sae.config.d_sae, dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        z = sae.encode(xb)
        sq_err += float((sae.decode(z) - xb).pow(2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(dim=0)
    total_var = float((x - x.mean(dim=0)).pow(2).sum())
    return {
        "mse": sq_err / x.numel(),
        "explained_variance": 1.0 - sq_err / total_var,
        "l0": l0 / len(x),
        "dead_latents": int((~fired).sum()),
        "positions": len(x),
    }


def write_demo_sae(out: str | Path, cfg: TrainConfig = TrainConfig()) -> dict[str, float]:
    """Train the demo dictionary and write it as a SAELens folder at ``out``
    (cfg.json + sae_weights.safetensors, float32) with ``metrics.json``."""
    sae, metrics = train_sae(cfg)
    out = Path(out)
    save_saelens(sae, out, extra={
        "metadata": {"model_name": "demo-cnn", "hook_name": HOST_LAYER},
        "training": asdict(cfg),
        "notes": "python -m builder.synthetic.train_sae (TopK SAE on every spatial position of conv4)",
    })
    tmp = out / f".metrics.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**metrics, "config": asdict(cfg)}, indent=2) + "\n")
    os.replace(tmp, out / "metrics.json")
    return metrics


def main(argv: list[str] | None = None) -> None:
    """CLI: train the demo dictionary, write it, print its metrics as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"data/sae/{NAME}")
    ap.add_argument("--d-sae", type=int, default=TrainConfig.d_sae)
    ap.add_argument("--k", type=int, default=TrainConfig.k)
    ap.add_argument("--n-train", type=int, default=TrainConfig.n_train)
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = TrainConfig(d_sae=args.d_sae, k=args.k, n_train=args.n_train, epochs=args.epochs,
                      seed=args.seed, threads=args.threads)
    print(json.dumps(write_demo_sae(args.out, cfg), indent=2))


if __name__ == "__main__":
    main()
