"""A planted dictionary: polysemantic channels whose SAE latents are exact
concept detectors, so latent labels can be checked against ground truth.

The target ``planted-mixed`` has three layers:

* ``detectors`` -> (B, U, H, W): the planted model's exact pixel detectors
  (``builder.synthetic.planted``), one per ``PLANTED_CONCEPTS`` entry;
* ``mixed`` -> (B, U, H, W): a fixed random orthogonal mixing Q (U x U,
  seeded) of the detector channels, as a 1x1 convolution: every channel is a
  signed superposition of all the concepts (polysemantic by construction);
* ``pooled`` -> (B, U): spatial max of ``mixed``.

Its dictionary (the SAELens folder ``data/sae/planted-mixed``, written by
``python -m builder.synthetic.planted_dictionary``) is a JumpReLU SAE on
``mixed`` whose encoder is Q itself: latent i = relu(h_i) * (h_i > 0.5) with
h = Q^T (Q d) = d, i.e. exactly detector i's map (detector values are 0 or
>= 1). ``N_DEAD`` extra latents encode -d_i, never exceed the threshold and
are dead. Attached with ``dictionaries = [{layer = "mixed", path =
"planted-mixed"}]`` the latents are layer ``sae.mixed``, whose ground truth
(role ``planted``) the target declares for its first U latents.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from builder.backends.sae import EncoderConfig, SparseAutoencoder, save_saelens
from builder.synthetic.planted import PLANTED_CONCEPTS, ExactDetectors, SpatialMax, to_tensor

log = logging.getLogger(__name__)

NAME = "planted-mixed"  # the target's registry name and its dictionary's folder in data/sae/
LATENT_LAYER = "sae.mixed"
MIXING_SEED = 0
N_DEAD = 2
THRESHOLD = 0.5  # detector values are 0 or >= 1: the JumpReLU keeps them exactly, drops rounding noise


def mixing_matrix(n: int, seed: int = MIXING_SEED) -> np.ndarray:
    """A fixed random orthogonal (n, n) float64 matrix: Q of the QR of a
    seeded Gaussian, with the signs made unique (R's diagonal positive)."""
    g = np.random.default_rng(seed).standard_normal((n, n))
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))[None, :]


class PlantedMixedModel(nn.Module):
    """Exact detectors, then a fixed orthogonal mixing of them (``mixed``),
    then a spatial max (``pooled``)."""

    def __init__(self, concepts: list[tuple[str, ...]] | None = None, seed: int = MIXING_SEED) -> None:
        super().__init__()
        self.planted_concepts: list[tuple[str, ...]] = list(concepts or PLANTED_CONCEPTS)
        u = len(self.planted_concepts)
        self.detectors = ExactDetectors(self.planted_concepts)
        self.mixed = nn.Conv2d(u, u, 1, bias=False)
        with torch.no_grad():
            self.mixed.weight.copy_(torch.from_numpy(mixing_matrix(u, seed)).float().view(u, u, 1, 1))
        self.mixed.weight.requires_grad_(False)
        self.pooled = SpatialMax()
        truth = {"role": "planted", "concepts": [list(c) for c in self.planted_concepts]}
        # the latents of its dictionary (first U of them; the dead ones have no concept)
        self.ground_truth = {"detectors": truth, LATENT_LAYER: truth}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.mixed(self.detectors(x)))


def planted_dictionary(concepts: list[tuple[str, ...]] | None = None, seed: int = MIXING_SEED,
                       n_dead: int = N_DEAD) -> SparseAutoencoder:
    """The SAE on ``mixed`` whose first U latents are the detectors and whose
    last ``n_dead`` latents never fire."""
    u = len(concepts or PLANTED_CONCEPTS)
    if not 0 <= n_dead <= u:
        raise ValueError(f"n_dead must be in [0, {u}]")
    q = mixing_matrix(u, seed)
    w_enc = np.concatenate([q, -q[:, :n_dead]], axis=1)  # h_i = (Q^T Q d)_i = d_i; dead: -d_i
    w_dec = np.concatenate([q.T, np.zeros((n_dead, u))], axis=0)  # reconstruction Q d
    weights = {
        "W_enc": torch.from_numpy(w_enc).float(),
        "b_enc": torch.zeros(u + n_dead),
        "W_dec": torch.from_numpy(w_dec).float(),
        "b_dec": torch.zeros(u),
        "threshold": torch.full((u + n_dead,), THRESHOLD),
    }
    config = EncoderConfig(d_in=u, d_sae=u + n_dead, activation="jumprelu", apply_b_dec_to_input=False)
    return SparseAutoencoder(config, weights)


def write_planted_dictionary(out: str | Path) -> Path:
    """Write the planted dictionary as a SAELens folder at ``out``."""
    sae = planted_dictionary()
    return save_saelens(sae, out, extra={
        "metadata": {"model_name": NAME, "hook_name": "mixed"},
        "notes": "planted: latent i is exactly detector i of PLANTED_CONCEPTS; the last "
                 f"{N_DEAD} latents never fire (python -m builder.synthetic.planted_dictionary)",
    })


def planted_mixed_model() -> tuple[PlantedMixedModel, Callable[[Image.Image], torch.Tensor]]:
    """Target factory: (the planted mixing model in eval mode, ToTensor preprocess)."""
    return PlantedMixedModel().eval(), to_tensor


def main(argv: list[str] | None = None) -> None:
    """CLI: write the planted dictionary's SAELens folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=f"data/sae/{NAME}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info("planted dictionary written to %s", write_planted_dictionary(args.out))


if __name__ == "__main__":
    main()
