"""Step 3: dissect. Generate Q images per candidate concept (3a), record the
model on them (3b), and score each neuron's candidates (3c): TopK-Squared
and Image-Products over the generated images (``scoring``).

A prompt is generated once per build, whatever the number of neurons that
propose it, and each generated image is recorded once per model for every
neuron of every selected layer; image embeddings (for Image-Products and the
interpretability score) are cached per (image, similarity backend).
"""

from __future__ import annotations

import io
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from builder.backends.interfaces import Generator, Similarity
from builder.backends.targets import Target
from builder.cache import ContentCache, content_key
from builder.data_files import data_path
from builder.errors import BuildError
from builder.pipeline.record import forward_summaries
from builder.pipeline.records import Calls, ModelRun, NeuronKey
from builder.pipeline.scoring import SCORERS, CandidateEvidence, CandidateScore


def prompt_template(name: str) -> str:
    """The generator's prompt template (a file in data/prompts, or a path); it must hold ``{concept}``."""
    p = Path(name)
    if not p.is_file():
        p = data_path("prompts", name)
    if not p.is_file():
        raise BuildError(f"prompt template {name!r} not found (a file in data/prompts or a path)")
    try:
        text = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"prompt template {p} cannot be read as UTF-8 text: {exc}") from None
    if "{concept}" not in text:
        raise BuildError(f"prompt template {p} must contain {{concept}}")
    check_template_fields(text, str(p))
    return text


def check_template_fields(text: str, where: str) -> None:
    """Raise BuildError unless ``text`` formats with ``concept`` alone (an
    unknown ``{field}``, a ``{0}`` or a stray brace would fail mid-build)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise BuildError(f"prompt template {where}: {exc} (write {{{{ or }}}} for a literal brace)") from None
    bad = next((f for f in fields if f != "concept"), None)
    if bad is not None:
        raise BuildError(f"prompt template {where} has an unknown field {{{bad}}}; it may use only {{concept}}")
    try:
        text.format(concept="concept")
    except (ValueError, KeyError, IndexError) as exc:
        raise BuildError(f"prompt template {where}: {{concept}} cannot be filled in "
                         f"({type(exc).__name__}: {exc})") from None


def png_bytes(im: Image.Image) -> bytes:
    """``im`` as PNG bytes (how generated images are cached)."""
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def png_image(raw: bytes) -> Image.Image:
    """Inverse of :func:`png_bytes`."""
    return Image.open(io.BytesIO(raw)).convert("RGB")


def embed_images(run: ModelRun, similarity: Similarity, images: dict[str, Image.Image]) -> dict[str, np.ndarray]:
    """Similarity-space embedding of each image (keyed by content key)."""
    sim_key = similarity.config_key()
    keys = {k: content_key("embed-image", sim_key, k) for k in images}

    def compute(missing: list[str]) -> list[np.ndarray]:
        return [np.asarray(e, np.float32) for e in similarity.embed_images([images[k] for k in missing])]

    out, _ = run.cache.fetch("embed", keys, compute, encode=lambda v: np.asarray(v, np.float32).tobytes(),
                             decode=lambda b: np.frombuffer(b, dtype=np.float32))
    return out


@dataclass(frozen=True)
class Generated:
    """The images of a chunk's candidate prompts and what they cost: image
    keys per prompt, the images, the model's activations on each (every
    selected layer's units side by side) and their embeddings."""

    keys: dict[str, list[str]]  # prompt -> Q image keys
    images: dict[str, Image.Image]
    acts: dict[str, np.ndarray]
    embeddings: dict[str, np.ndarray]
    fresh_images: frozenset[str]  # generated in this chunk
    fresh_recordings: frozenset[str]  # recorded in this chunk


def generate_images(
    cache: ContentCache, generator: Generator, prompts: Sequence[str], q: int, seed: int, batch_size: int,
) -> tuple[dict[str, list[str]], dict[str, Image.Image], set[str]]:
    """Step 3a: ``q`` images per prompt, generated only where no earlier neuron
    or build made them; returns image keys per prompt, the images by key and
    the keys made now. Image i of a prompt depends only on (prompt, i, seed,
    generator config), so it is shared by every neuron proposing the prompt."""
    gcfg = generator.config_key()
    keys = {p: [content_key("generate", p, gcfg, seed, i) for i in range(q)] for p in prompts}
    items = {(p, i): keys[p][i] for p in prompts for i in range(q)}
    bs = max(1, batch_size // q)

    def compute(missing: list[tuple[str, int]]) -> list[Image.Image]:
        todo = list(dict.fromkeys(p for p, _ in missing))
        made: dict[tuple[str, int], Image.Image] = {}
        for s in range(0, len(todo), bs):
            part = todo[s : s + bs]
            imgs = generator.generate(part, q, seed)
            if len(imgs) != len(part) or any(len(x) != q for x in imgs):
                raise BuildError(f"generator {generator.name!r} returned the wrong number of images")
            made.update({(p, j): im.convert("RGB") for p, ims in zip(part, imgs) for j, im in enumerate(ims)})
        return [made[it] for it in missing]

    got, fresh = cache.fetch("generate", items, compute, encode=png_bytes, decode=png_image)
    return keys, {items[it]: im for it, im in got.items()}, fresh


def record_images(
    cache: ContentCache, target: Target, fingerprint: str, layers: Sequence[str], summary: str, vit_tokens: str,
    batch_size: int, images: dict[str, Image.Image],
) -> tuple[dict[str, np.ndarray], set[str]]:
    """Step 3b: activations of every unit of ``layers`` on each image (layers
    side by side in order); one forward per image and model, shared by all
    its neurons. Returns (activations by image key, keys recorded now)."""
    keys = {k: content_key("gen-record", fingerprint, k, list(layers), summary, vit_tokens) for k in sorted(images)}

    def compute(missing: list[str]) -> list[np.ndarray]:
        summ = forward_summaries(target, [images[k] for k in missing], layers, summary, vit_tokens, batch_size)
        return list(np.concatenate([summ[lay] for lay in layers], axis=1).astype(np.float32))

    return cache.fetch("genrec", keys, compute, encode=lambda v: np.asarray(v, np.float32).tobytes(),
                       decode=lambda b: np.frombuffer(b, dtype=np.float32))


def generate_and_record(
    run: ModelRun, generator: Generator, similarity: Similarity, template: str,
    candidates: dict[NeuronKey, list[str]], calls: Calls, timed,
) -> Generated:
    """Steps 3a-3b for a chunk: its candidates' images, recorded and
    embedded; each neuron is charged for the images of its candidates (made
    now by the first neuron that needed them, else cached)."""
    prompts = sorted({template.format(concept=c) for cands in candidates.values() for c in cands})
    d = run.cfg.dissect
    with timed("generate"):
        keys, images, fresh_g = generate_images(run.cache, generator, prompts, d.images_per_concept, d.seed,
                                                d.batch_size)
    with timed("gen_record"):
        acts, fresh_r = record_images(run.cache, run.target, run.fingerprint, run.layers, run.summary,
                                      run.model.vit_tokens, run.cfg.record.batch_size, images)
    with timed("embed"):
        emb = embed_images(run, similarity, images)
    charged_g: set[str] = set()
    charged_r: set[str] = set()
    for n, cands in candidates.items():
        for c in cands:
            for k in keys[template.format(concept=c)]:
                calls.charge(n, "generated_images", k in fresh_g and k not in charged_g)
                calls.charge(n, "target_forward_images", k in fresh_r and k not in charged_r)
                charged_g.add(k)
                charged_r.add(k)
    return Generated(keys, images, acts, emb, frozenset(fresh_g), frozenset(fresh_r))


def unit_column(run: ModelRun, layer_units: dict[str, int], n: NeuronKey) -> int:
    """Column of neuron ``n`` in the side-by-side activations of the model's layers."""
    off = 0
    for lay in run.layers:
        if lay == n[0]:
            return off + n[1]
        off += layer_units[lay]
    raise KeyError(n[0])


def score_candidates(
    run: ModelRun, gen: Generated, template: str, cands: Sequence[str], column: int, probe_emb: np.ndarray
) -> list[CandidateScore]:
    """Step 3c: every candidate's scores for one neuron, by the configured
    scoring function over all its candidates' generated images."""
    cfg = run.cfg
    evidence = []
    for c in cands:
        keys = gen.keys[template.format(concept=c)]
        evidence.append(CandidateEvidence(
            c, np.array([gen.acts[k][column] for k in keys], dtype=np.float64),
            np.stack([gen.embeddings[k] for k in keys]),
        ))
    return SCORERS[cfg.dissect.scoring](evidence, probe_emb, cfg.dissect.beta, cfg.record.top_k)
