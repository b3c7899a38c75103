"""Recording cost: hooks + streaming top-K against a plain forward pass.

A random-weight ResNet-18 (compute does not depend on the weights) at
112 px, every block output of layer1-4 plus fc (1,960 neurons), over the
same preloaded batches: plain forward vs forward with hooks, per-channel
spatial means and the streaming top-(3 x 10) update. The two are
interleaved and the fastest of the repeats kept for each, so both see the
same machine state.
"""

from __future__ import annotations

import time

import torch
import torchvision

from builder.backends.layers import hooked, summarize
from builder.pipeline.record import TopK

LAYERS = ["layer1", "layer2", "layer3", "layer4", "fc"]


def run(n_images: int = 512, batch: int = 32, repeats: int = 3, size: int = 112) -> dict[str, str]:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = torchvision.models.resnet18(weights=None).eval()
    batches = [torch.rand(batch, 3, size, size) for _ in range(n_images // batch)]

    def plain() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(b)
        return time.perf_counter() - t

    state: dict[str, TopK] = {}
    peak = 0

    def recorded() -> float:
        nonlocal peak
        state.clear()
        state.update({name: TopK(30) for name in LAYERS})
        current: dict[str, torch.Tensor] = {}
        t = time.perf_counter()
        with hooked(model, LAYERS, current.__setitem__), torch.inference_mode():
            for i, b in enumerate(batches):
                model(b)
                idx = torch.arange(i * batch, (i + 1) * batch)
                for name in LAYERS:
                    state[name].update(summarize(current[name], "mean"), idx)
                peak = max(peak, sum(s.nbytes() for s in state.values()))
        return time.perf_counter() - t

    plain()  # warm up
    t_plain, t_rec = [], []
    for _ in range(repeats):
        t_plain.append(plain())
        t_rec.append(recorded())
    neurons = sum(s.vals.shape[0] for s in state.values())
    # what a full images x neurons float32 matrix of the same recording takes
    full = n_images * neurons * 4
    return {
        "recording_neurons": str(neurons),
        "recording_images": str(n_images),
        "recording_overhead_ratio": f"{min(t_rec) / min(t_plain):.3f}",
        "recording_images_per_s": f"{n_images / min(t_rec):.1f}",
        "recording_peak_mem_mb": f"{peak / 2**20:.3f}",
        "full_matrix_mb": f"{full / 2**20:.3f}",
        "full_matrix_mb_per_100k_images": f"{100_000 * neurons * 4 / 2**20:.1f}",
    }
