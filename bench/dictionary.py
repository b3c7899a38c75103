"""Dictionary latents at their scale: a ViT-Prisma-sized SAE on a ViT block.

A random-weight ViT-B/32 at 224 px (50 tokens) with a random 768 -> 49,152
ReLU dictionary (the width ViT-Prisma publishes for CLIP ViT-B/32) attached
to its last encoder block, over the same preloaded batches: a plain forward,
recording the block's 768 channels, and recording the 49,152 latents (each
with the streaming top-(3 x 10) over the cls token). Interleaved, fastest of
the repeats kept, so the three see the same machine state.
"""

from __future__ import annotations

import time

import torch
import torchvision

from builder.backends.sae import EncoderConfig, SparseAutoencoder, attach_dictionary
from builder.pipeline.record import TopK, hooked, summarize

HOST = "encoder.layers.encoder_layer_11"
D_SAE = 49_152


def _random_sae(d_in: int, d_sae: int) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    weights = {"W_enc": w, "b_enc": torch.zeros(d_sae), "W_dec": w.T, "b_dec": torch.zeros(d_in)}
    return SparseAutoencoder(EncoderConfig(d_in, d_sae), weights)


def run(n_images: int = 32, batch: int = 16, repeats: int = 2) -> dict[str, str]:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_32(weights=None).eval()
    latent = attach_dictionary(model, HOST, _random_sae(768, D_SAE))
    batches = [torch.rand(batch, 3, 224, 224) for _ in range(n_images // batch)]
    peak: dict[str, int] = {}

    def timed(layer: str | None) -> float:
        state = TopK(30)
        current: dict[str, torch.Tensor] = {}
        t = time.perf_counter()
        with hooked(model, [layer] if layer else [], current.__setitem__), torch.inference_mode():
            for i, b in enumerate(batches):
                model(b)
                if layer:
                    state.update(summarize(current[layer], "mean", "cls"), torch.arange(i * batch, (i + 1) * batch))
        if layer:
            peak[layer] = state.nbytes()
        return time.perf_counter() - t

    timed(None)  # warm up
    times: dict[str, list[float]] = {"plain": [], "host": [], "latents": []}
    for _ in range(repeats):
        times["plain"].append(timed(None))
        times["host"].append(timed(HOST))
        times["latents"].append(timed(latent))
    best = {k: min(v) for k, v in times.items()}
    return {
        "dictionary_latents": str(D_SAE),
        "dictionary_images": str(n_images),
        "dictionary_host_overhead_ratio": f"{best['host'] / best['plain']:.3f}",
        "dictionary_latents_overhead_ratio": f"{best['latents'] / best['plain']:.3f}",
        "dictionary_latents_images_per_s": f"{n_images / best['latents']:.1f}",
        "dictionary_plain_images_per_s": f"{n_images / best['plain']:.1f}",
        "dictionary_topk_state_mb": f"{peak[latent] / 2**20:.1f}",
        "dictionary_full_matrix_mb_per_100k_images": f"{100_000 * D_SAE * 4 / 2**20:.0f}",
    }
