"""The CLIP-Dissect baseline labeler: the same atlas, labelled by SoftWPMI.

CLIP-Dissect (Oikarinen & Weng, ICLR 2023) labels a neuron with the concept
of a fixed concept set whose image-text similarity profile over the probe
set best matches the neuron's most activating images. It needs no captioner,
LLM or generator: one CLIP pass over the probe images, one over the concept
words, and every neuron's activation on every probe image.

What this module writes is an ordinary atlas (same tables, label vectors,
evidence thumbnails, FAISS index) with ``meta.labeler = "clip-dissect"``, so
search, classifier finding, the site and ``dnd-atlas eval`` work on it and a
DnD atlas and a CLIP-Dissect atlas of one model can be compared side by side.

Steps per model:

1. **Activations.** One pass over the probe set with hooks on the selected
   layers writes every image's summary (spatial mean or max, as for DnD) of
   every neuron into a float32 ``.npy`` file in the cache folder (memory
   mapped; 50k images x 10k neurons is 2 GB on disk, never in RAM at once).
   The file is keyed by the model's weights, the probe set, the layers and
   the summary, so a resumed or repeated build reads it back.
2. **Image-text similarity.** The probe images and the concepts are embedded
   in one joint space and ``P[i, m] = cos(image_i, concept_m)``; P is never
   materialized whole: ``softmax(a * P)`` is computed in blocks of images
   into one float32 (images x concepts) array (50k x 3k = 600 MB).
   Joint spaces: CLIP (``dissect.similarity = "clip"``, its image and text
   towers), or, where there are no CLIP weights (the synthetic world), the
   *caption stand-in*: each probe image is represented by the atlas
   embedder's embedding of its caption in ``captions.jsonl`` (the oracle
   captions of a synthetic probe set) and concepts by the same embedder.
3. **SoftWPMI** (``soft_wpmi``) scores every concept for every neuron of the
   layer; label 1 is the best concept, labels 2-3 the next best ones that
   pass the DnD label rule (text similarity <= ``labels.dedup_threshold`` to
   every kept label, not nested in one, and a positive score when
   ``labels.extra_labels_need_positive_score``).
4. **Write** each chunk of neurons in per-neuron transactions; a rerun skips
   the neurons already written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder import plugins as _plugins  # noqa: F401  (registers the built-in backends)
from builder.build import (
    BuildSummary,
    ModelSummary,
    _redact_fingerprint,
    check_resume,
    create_backend,
    fit_thumbnail,
    save_image_atomic,
    selected_units,
    target_fingerprint,
)
from builder.cache import content_key, file_digest
from builder.config import BuildConfig, ModelConfig
from builder.data_files import data_path
from builder.errors import BuildError
from builder.labels import interpretability, select_labels
from builder.probe import ProbeSet
from builder.progress import progress
from builder.record import hooked, layer_kind, probe_loader, summarize
from builder.registry import similarities
from builder.targets import Target, load_target, resolve_device, resolve_dtype
from query.embedder import get_embedder
from query.index import build_index
from query.schema import FORMAT_VERSION
from query.writer import AtlasWriter, CandidateRow, EvidenceRow, LabelRow, NeuronResult

log = logging.getLogger(__name__)

LABELER = "clip-dissect"
DEFAULT_CONCEPTS = "common-visual.txt"  # in data/concepts
N_CANDIDATES = 5  # concepts stored per neuron in the candidates table
_LABEL_POOL = 64  # best concepts searched for labels 2-3


# -- SoftWPMI ---------------------------------------------------------------------


@dataclass(frozen=True)
class SoftWPMIParams:
    """CLIP-Dissect's published SoftWPMI defaults.

    ``top_k``: size of the soft set of most activating images; ``a``: softmax
    temperature on the image-concept similarities; ``lam``: weight of the
    concept prior; ``p_start``/``p_end``: membership of the best and (about)
    the k-th best image; ``eps``: floor inside the log that keeps one image
    with a near-zero concept probability from dominating (the published
    implementation's 7e-4)."""

    top_k: int = 100
    a: float = 10.0
    lam: float = 1.0
    p_start: float = 0.998
    p_end: float = 0.97
    eps: float = 7e-4

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise BuildError("SoftWPMI top_k must be >= 1")
        if not 0.0 <= self.p_end <= self.p_start <= 1.0:
            raise BuildError("SoftWPMI needs 0 <= p_end <= p_start <= 1")


def soft_membership(k: int, p_start: float = 0.998, p_end: float = 0.97) -> np.ndarray:
    """Probabilities that the j-th most activating image (j = 0..k-1) is in
    the neuron's soft set: ``p_j = p_start - (j / k) (p_start - p_end)``,
    linear from ``p_start``; every other image has membership 0."""
    j = np.arange(k, dtype=np.float64)
    return p_start - (j / k) * (p_start - p_end)


def top_images(acts: np.ndarray, k: int) -> np.ndarray:
    """(units, k) indices of each unit's k most activating images, best
    first; ties go to the lower image index, so the order is reproducible."""
    a = np.asarray(acts)
    k = min(k, a.shape[0])
    out = np.empty((a.shape[1], k), dtype=np.int64)
    for u in range(a.shape[1]):
        out[u] = np.lexsort((np.arange(a.shape[0]), -a[:, u].astype(np.float64)))[:k]
    return out


def concept_probabilities(p: np.ndarray, a: float) -> np.ndarray:
    """p(concept | image) = softmax over concepts of ``a * P[image]``, float64."""
    z = a * np.asarray(p, dtype=np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def soft_wpmi_from_probs(
    probs: np.ndarray, acts: np.ndarray, params: SoftWPMIParams = SoftWPMIParams(), chunk: int = 0
) -> np.ndarray:
    """SoftWPMI scores (units, concepts) from p(concept | image) (images,
    concepts) and activations (images, units); see ``soft_wpmi``."""
    n = probs.shape[0]
    if acts.shape[0] != n:
        raise BuildError(f"{acts.shape[0]} activation rows for {n} images")
    k = min(params.top_k, n)
    w = soft_membership(k, params.p_start, params.p_end)[None, :, None]  # (1, k, 1)
    idx = top_images(acts, k)
    units = acts.shape[1]
    log_cond = np.empty((units, probs.shape[1]), dtype=np.float64)
    # units per step: the gathered (units, k, concepts) float64 block stays near 128 MB
    chunk = chunk or max(1, int(128e6 // (8 * k * max(1, probs.shape[1]))))
    for s in range(0, units, chunk):
        sel = np.asarray(probs[idx[s : s + chunk]], dtype=np.float64)  # (c, k, concepts)
        log_cond[s : s + chunk] = np.log(1.0 + w * (sel - 1.0) + params.eps).sum(axis=1)
    # log p(t) = log mean_u p(t | D_u), with the log-sum-exp trick (p(t | D_u) underflows)
    hi = log_cond.max(axis=0, keepdims=True)
    log_prior = hi + np.log(np.exp(log_cond - hi).sum(axis=0, keepdims=True)) - np.log(units)
    return log_cond - params.lam * log_prior


def soft_wpmi(
    p: np.ndarray, acts: np.ndarray, params: SoftWPMIParams = SoftWPMIParams()
) -> np.ndarray:
    """CLIP-Dissect's SoftWPMI score of every concept for every unit.

    Inputs: ``p`` (images, concepts), the cosine similarity of each probe
    image's embedding to each concept's text embedding in a joint space;
    ``acts`` (images, units), every unit's activation summary on every image
    (one layer: the prior averages over its units). Returns (units, concepts)
    float64; the best concept of unit u is ``argmax(scores[u])``.

    With ``x_1..x_k`` the unit's k most activating images (best first)::

        p(t | x)        = softmax_t(a * P[x, t])                 (over concepts)
        p(x_j in D_u)   = p_start - (j / k) (p_start - p_end)     (0 elsewhere)
        log p(t | D_u)  = sum_j log(1 + p(x_j in D_u) (p(t | x_j) - 1) + eps)
        log p(t)        = log( mean_over_units_v p(t | D_v) )
        SoftWPMI(u, t)  = log p(t | D_u) - lam * log p(t)

    p(t | D_u) is the probability that concept t describes *every* image of
    the soft set (each image in it with probability p(x in D_u)); the prior
    term removes concepts that are likely for any unit's images (generic
    words). Images outside the top k contribute log 1 = 0.
    """
    return soft_wpmi_from_probs(concept_probabilities(p, params.a), acts, params)


# -- concept sets -----------------------------------------------------------------


@dataclass(frozen=True)
class ConceptSet:
    """A concept word list: its name (file name or path), the concepts in
    file order (blank lines, ``#`` comments and repeats dropped) and the
    sha256 of that list."""

    name: str
    concepts: tuple[str, ...]
    sha256: str


def load_concepts(spec: str | os.PathLike[str] | None = None) -> ConceptSet:
    """The concept set ``spec``: a file path, or the name of a list shipped
    in ``data/concepts`` (``None`` = the default, common-visual.txt)."""
    spec = str(spec or DEFAULT_CONCEPTS)
    p = Path(spec).expanduser()
    if not p.is_file():
        shipped = data_path("concepts", spec if spec.endswith(".txt") else spec + ".txt")
        if not shipped.is_file():
            names = sorted(f.name for f in data_path("concepts").glob("*.txt"))
            raise BuildError(
                f"concept set {spec!r} not found (a word list file, one concept a line, "
                f"or one of data/concepts: {', '.join(names)})"
            )
        p, name = shipped, shipped.name
    else:
        name = str(p)
    seen: dict[str, str] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        c = " ".join(line.split("#", 1)[0].split())
        if c and c.lower() not in seen:
            seen[c.lower()] = c
    concepts = tuple(seen.values())
    if not concepts:
        raise BuildError(f"concept set {p} holds no concept")
    digest = hashlib.sha256("\n".join(concepts).encode()).hexdigest()
    return ConceptSet(name, concepts, digest)


# -- image-text space ----------------------------------------------------------------


class _JointSpace:
    """Image and concept embeddings in one space, and what to call it."""

    key: dict[str, Any]
    describe: str

    def embed_probe(self, probe: ProbeSet, valid: np.ndarray, batch_size: int) -> np.ndarray:
        raise NotImplementedError

    def embed_concepts(self, concepts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class _ClipSpace(_JointSpace):
    def __init__(self, sim: Any) -> None:
        if getattr(sim, "text_embedder", "clip") != "clip":
            raise BuildError(
                "clip-dissect needs CLIP's text tower for concepts: drop "
                'dissect.similarity_options.text_embedder (or set it to "clip")'
            )
        self.sim = sim
        self.key = {"space": "clip", **sim.config_key()}
        self.describe = f"clip-dissect image-concept similarity from {sim.describe()}"

    def embed_probe(self, probe: ProbeSet, valid: np.ndarray, batch_size: int) -> np.ndarray:
        out = []
        bar = progress(total=len(valid), desc="clip-dissect: embed probe images", unit="img")
        try:
            for s in range(0, len(valid), batch_size):
                ims = [probe.open(int(i)) for i in valid[s : s + batch_size]]
                out.append(self.sim.embed_images(ims))
                bar.update(len(ims))
        finally:
            bar.close()
        return np.concatenate(out).astype(np.float32)

    def embed_concepts(self, concepts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.sim.embed_texts(list(concepts)), dtype=np.float32)


class _CaptionSpace(_JointSpace):
    """The stand-in where no CLIP weights exist: an image is the embedding of
    its caption in captions.jsonl (the oracle captions of a synthetic probe
    set), a concept the embedding of its text, both by the atlas embedder."""

    def __init__(self, embedder_name: str) -> None:
        self.embedder_name = embedder_name
        self.embedder = get_embedder(embedder_name)
        self.key = {"space": "captions", "embedder": embedder_name}
        self.describe = (
            f"clip-dissect caption stand-in for CLIP: images are represented by the {embedder_name!r} "
            "embedding of their caption in the probe set's captions.jsonl, concepts by the same embedder"
        )

    def embed_probe(self, probe: ProbeSet, valid: np.ndarray, batch_size: int) -> np.ndarray:
        caps = probe.captions()
        files = [probe.files[int(i)] for i in valid]
        missing = [f for f in files if f not in caps]
        if missing:
            raise BuildError(
                f"clip-dissect caption stand-in: {len(missing)} probe images have no caption in "
                f"{probe.root / 'captions.jsonl'} (first: {missing[0]})"
            )
        return np.asarray(self.embedder.embed([caps[f] for f in files]), dtype=np.float32)

    def embed_concepts(self, concepts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.embedder.embed(list(concepts)), dtype=np.float32)


def _joint_space(cfg: BuildConfig) -> _JointSpace:
    """CLIP when the configured similarity is ``clip``; else the caption
    stand-in when every model's probe folder has a captions.jsonl."""
    if cfg.dissect.similarity == "clip":
        return _ClipSpace(
            create_backend(similarities, "clip", cfg.dissect.similarity_options, device=cfg.device)
        )
    no_caps = [
        m.name for m in cfg.models if not (ProbeSet.scan(m.probe).root / "captions.jsonl").is_file()
    ]
    if no_caps:
        raise BuildError(
            f'clip-dissect needs an image-text space: set dissect.similarity = "clip" (a CLIP model in '
            f"dissect.similarity_options.model), or give every probe folder a captions.jsonl for the caption "
            f"stand-in (missing for model {no_caps[0]!r}); the {cfg.dissect.similarity!r} similarity is not "
            "a joint image-text space"
        )
    return _CaptionSpace(cfg.embedder)


# -- activations over the whole probe set -----------------------------------------


def record_all(
    target: Target,
    probe: ProbeSet,
    layers: Sequence[str],
    path: Path,
    summary: str = "mean",
    vit_tokens: str = "cls",
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[np.ndarray, dict[str, tuple[str, int]], np.ndarray]:
    """Every image's summary of every unit of ``layers``, written to the
    float32 ``.npy`` file ``path`` (temp name, then renamed; reused when it
    exists). Returns (memory-mapped (images, units) array with the layers'
    units side by side in ``layers`` order, {layer: (kind, n_units)}, bool
    mask of the probe images that were readable)."""
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        acts = np.load(path, mmap_mode="r")
        return (
            acts,
            {k: (v[0], int(v[1])) for k, v in info["layers"].items()},
            np.array(info["valid"], bool),
        )
    target.check_layers(layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    loader = probe_loader(target, probe, batch_size, num_workers)
    valid = np.zeros(len(probe), dtype=bool)
    kinds: dict[str, tuple[str, int]] = {}
    current: dict[str, torch.Tensor] = {}
    out: np.ndarray | None = None
    bar = progress(total=len(probe), desc=f"clip-dissect: record {target.name}", unit="img")
    try:
        with hooked(target.module, layers, current.__setitem__), torch.inference_mode():
            for indices, batch, n_skipped in loader:
                bar.update(len(indices) + n_skipped)
                if batch is None:
                    continue
                current.clear()
                target.module(batch.to(target.device, target.dtype))
                cols = []
                for name in layers:
                    s = summarize(current[name], summary, vit_tokens).float().cpu().numpy()
                    kinds.setdefault(name, (layer_kind(current[name]), s.shape[1]))
                    cols.append(s)
                flat = np.concatenate(cols, axis=1)
                if out is None:
                    out = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=np.float32, shape=(len(probe), flat.shape[1])
                    )
                    out[:] = 0.0
                ix = indices.numpy()
                out[ix] = flat
                valid[ix] = True
    finally:
        bar.close()
    if out is None:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"no readable image in the probe folder {probe.root}")
    out.flush()
    del out
    os.replace(tmp, path)
    info_tmp = info_path.with_name(f".{info_path.name}.{os.getpid()}.tmp")
    info_tmp.write_text(
        json.dumps({"layers": {k: list(v) for k, v in kinds.items()}, "valid": valid.tolist()})
    )
    os.replace(info_tmp, info_path)
    return np.load(path, mmap_mode="r"), kinds, valid


def _cached_array(path: Path, make: Any) -> np.ndarray:
    """``np.load(path)``, or ``make()`` saved there atomically first."""
    if path.is_file():
        return np.load(path)
    arr = np.asarray(make(), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


# -- the build ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scored:
    concept: str
    score: float


def build_clip_dissect(
    cfg: BuildConfig,
    *,
    concepts_file: str | os.PathLike[str] | None = None,
    cache_enabled: bool = True,
    params: SoftWPMIParams | None = None,
) -> BuildSummary:
    """Build (or resume) the atlas ``cfg.out`` with CLIP-Dissect labels.

    Same atlas format as ``builder.build.build``: neurons (ok / dead), labels
    ranked 1..3 with ``concept_score`` = SoftWPMI, label vectors by the atlas
    embedder, the top ``record.top_k`` probe images as evidence (thumbnails,
    no crops), the best ``N_CANDIDATES`` concepts with their scores as
    candidates, and the FAISS index. ``concepts_file`` is a word list path or
    the name of one in data/concepts (default: ``cfg.clip_dissect.concepts``
    when the config has that table, else common-visual.txt); ``params``
    default to the fields of ``cfg.clip_dissect`` named like
    ``SoftWPMIParams``'s, else the published defaults. With
    ``cache_enabled=False`` activations and embeddings are recomputed (in a
    temporary folder removed at the end)."""
    t_start = time.perf_counter()
    cfg = dataclasses.replace(cfg, labeler=LABELER)  # what the atlas records and resumes with
    out = Path(cfg.out)
    section = getattr(
        cfg, "clip_dissect", None
    )  # the config's [clip_dissect] table, once it has one
    concepts = load_concepts(concepts_file or getattr(section, "concepts", None) or None)
    if params is None:
        names = [f.name for f in dataclasses.fields(SoftWPMIParams)]
        params = SoftWPMIParams(**{n: getattr(section, n) for n in names if hasattr(section, n)})
    writer = AtlasWriter(out)
    try:
        check_resume(writer, cfg)
        old = writer.meta()
        if old.get("build_fingerprint") and (
            old.get("labeler", "dnd") != LABELER
            or old.get("concept_set", {}).get("sha256") != concepts.sha256
        ):
            raise BuildError(
                f"the atlas at {cfg.out} was built with another labeler or concept set "
                f"({old.get('labeler', 'dnd')}); use a new --out, or the same settings to resume"
            )
        embedder = get_embedder(cfg.embedder)
        space = _joint_space(cfg)
        cache_dir = Path(cfg.cache_dir or out / "cache") / "clip-dissect"
        if not cache_enabled:
            import tempfile

            cache_dir = Path(tempfile.mkdtemp(prefix="clip-dissect-", dir=out))
        writer.set_meta(
            build_config=cfg.redacted(),
            build_fingerprint=_redact_fingerprint(cfg),
            embedder=cfg.embedder,
            embedder_dim=int(embedder.dim),
            similarity=space.describe,
            similarity_config=space.key,
            labeler=LABELER,
            concept_set={
                "name": concepts.name,
                "sha256": concepts.sha256,
                "n": len(concepts.concepts),
            },
            softwpmi=asdict(params),
            dnd_atlas_format=FORMAT_VERSION,
        )
        t0 = time.perf_counter()
        ckey = content_key("clip-dissect-concepts", space.key, concepts.sha256)
        concept_emb = _cached_array(
            cache_dir / f"concepts-{ckey[:32]}.npy", lambda: space.embed_concepts(concepts.concepts)
        )
        concept_secs = time.perf_counter() - t0
        summaries = []
        for m in cfg.models:
            summaries.append(
                _build_model(
                    cfg, m, writer, space, concepts, concept_emb, embedder, params, cache_dir
                )
            )
            summaries[-1].seconds["embed_concepts"] += concept_secs
        n = build_index(out)
        log.info("FAISS index over %d labels written", n)
        if not cache_enabled:
            import shutil

            shutil.rmtree(cache_dir, ignore_errors=True)
    finally:
        writer.close()
    return BuildSummary(str(out), summaries, time.perf_counter() - t_start)


class _Timer:
    def __init__(self, ms: ModelSummary, stage: str) -> None:
        self.ms, self.stage = ms, stage

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.ms.seconds[self.stage] += time.perf_counter() - self.t


def _build_model(
    cfg: BuildConfig,
    m: ModelConfig,
    writer: AtlasWriter,
    space: _JointSpace,
    concepts: ConceptSet,
    concept_emb: np.ndarray,
    embedder: Any,
    params: SoftWPMIParams,
    cache_dir: Path,
) -> ModelSummary:
    ms = ModelSummary(m.name)
    with _Timer(ms, "load"):
        target = load_target(
            m.name,
            m.target,
            m.target_options,
            resolve_device(cfg.device),
            resolve_dtype(cfg.dtype, resolve_device(cfg.device)),
        )
        target.check_layers(m.layers)
        probe = ProbeSet.scan(m.probe)
        tfp = target_fingerprint(target, m.target, m.target_options)
    summary = m.summary or cfg.record.summary

    with _Timer(ms, "record"):
        t0 = time.perf_counter()
        akey = content_key(
            "clip-dissect-acts", tfp, probe.fingerprint(), list(m.layers), summary, m.vit_tokens
        )
        acts, kinds, valid = record_all(
            target,
            probe,
            m.layers,
            cache_dir / f"acts-{akey[:32]}.npy",
            summary,
            m.vit_tokens,
            cfg.record.batch_size,
            cfg.record.num_workers,
        )
        n_valid = int(valid.sum())
        ms.images_per_s = n_valid / max(1e-9, time.perf_counter() - t0)
    ms.skipped_images = len(probe) - n_valid
    if ms.skipped_images:
        log.warning(
            "%s: %d probe files were not readable images and were skipped",
            m.name,
            ms.skipped_images,
        )
    writer.upsert_model(
        m.name,
        m.target,
        str(probe.root),
        n_valid,
        ms.skipped_images,
        {
            "target": m.target,
            "target_options": m.target_options,
            "layers": list(m.layers),
            "summary": summary,
            "vit_tokens": m.vit_tokens,
            "input_size": target.input_size,
            "labeler": LABELER,
        },
        [(lay, kinds[lay][0], kinds[lay][1]) for lay in m.layers],
    )
    known = {lay: info for lay, info in target.ground_truth.items() if lay in m.layers}
    if known:
        gt = writer.meta().get("ground_truth", {})
        gt[m.name] = known
        writer.set_meta(ground_truth=gt)

    rows = np.flatnonzero(valid)  # probe index of each row of the P / probability matrix
    with _Timer(ms, "embed_images"):
        ikey = content_key("clip-dissect-images", space.key, probe.fingerprint())
        img_emb = _cached_array(
            cache_dir / f"images-{ikey[:32]}.npy",
            lambda: space.embed_probe(probe, rows, cfg.record.batch_size),
        )
    with _Timer(ms, "similarity"):
        probs = np.empty((len(rows), len(concepts.concepts)), dtype=np.float32)
        for s in range(0, len(rows), 1024):
            probs[s : s + 1024] = concept_probabilities(
                img_emb[s : s + 1024] @ concept_emb.T, params.a
            )

    done = writer.done_units(m.name)
    images_dir = writer.dir / "images"
    digests: dict[int, str] = {}
    captions = probe.captions() if isinstance(space, _CaptionSpace) else {}
    offset = 0
    for lay in m.layers:
        _kind, n_units = kinds[lay]
        layer_acts = np.asarray(acts[rows, offset : offset + n_units], dtype=np.float32)
        offset += n_units
        todo = [u for u in selected_units(m, n_units) if (lay, u) not in done]
        if not todo:
            continue
        hi, lo = layer_acts.max(axis=0), layer_acts.min(axis=0)
        dead = {
            u
            for u in todo
            if not np.isfinite(hi[u]) or hi[u] - lo[u] <= 1e-6 * max(1.0, abs(float(hi[u])))
        }
        writer.write_neurons(
            NeuronResult(
                m.name, lay, u, "dead", "constant activation over the probe set", float(hi[u])
            )
            for u in sorted(dead)
        )
        ms.dead += len(dead)
        ms.neurons += len(dead)
        live = [u for u in todo if u not in dead]
        if not live:
            continue
        with _Timer(ms, "softwpmi"):
            # the prior averages over every unit of the layer, whatever this run writes
            scores = soft_wpmi_from_probs(probs, layer_acts, params)
        top_ev = top_images(layer_acts, cfg.record.top_k)
        bar = progress(total=len(live), desc=f"clip-dissect {m.name}/{lay}", unit="neuron")
        try:
            for start in range(0, len(live), cfg.chunk_size):
                chunk = live[start : start + cfg.chunk_size]
                with _Timer(ms, "label_write"):
                    results = [
                        _neuron(
                            cfg,
                            m,
                            lay,
                            u,
                            scores[u],
                            layer_acts[:, u],
                            top_ev[u],
                            rows,
                            concepts,
                            concept_emb,
                            img_emb,
                            probe,
                            target,
                            images_dir,
                            digests,
                            captions,
                            float(hi[u]),
                        )
                        for u in chunk
                    ]
                    texts = [lab.text for r in results for lab in r.labels]
                    vecs = iter(embedder.embed(texts)) if texts else iter(())
                    final = []
                    for r in results:
                        labels = tuple(
                            LabelRow(lab.rank, lab.text, lab.concept_score, next(vecs))
                            for lab in r.labels
                        )
                        final.append(dataclasses.replace(r, labels=labels))
                    writer.write_neurons(final)
                ms.neurons += len(chunk)
                ms.ok += len(chunk)
                bar.update(len(chunk))
                log.info(
                    "%s: wrote %d of %d neurons of %s",
                    m.name,
                    min(start + len(chunk), len(live)),
                    len(live),
                    lay,
                )
        finally:
            bar.close()
    for stage, secs in ms.seconds.items():
        writer.add_stage_time(m.name, stage, secs)
    return ms


def _neuron(
    cfg: BuildConfig,
    m: ModelConfig,
    layer: str,
    unit: int,
    scores: np.ndarray,
    unit_acts: np.ndarray,
    top: np.ndarray,
    rows: np.ndarray,
    concepts: ConceptSet,
    concept_emb: np.ndarray,
    img_emb: np.ndarray,
    probe: ProbeSet,
    target: Target,
    images_dir: Path,
    digests: dict[int, str],
    captions: dict[str, str],
    max_act: float,
) -> NeuronResult:
    """One live neuron's labels, candidates and evidence (label vectors are
    filled in by the caller, batched)."""
    pool = np.argsort(-scores, kind="stable")[:_LABEL_POOL]
    scored = [_Scored(concepts.concepts[i], float(scores[i])) for i in pool]
    lab_cfg = cfg.labels
    kept = select_labels(
        scored,
        concept_emb[pool],
        lab_cfg.max_labels,
        lab_cfg.dedup_threshold,
        lab_cfg.extra_labels_need_positive_score,
        lab_cfg.drop_nested_labels,
    )
    rank_of = {i: r + 1 for r, i in enumerate(kept)}
    labels = tuple(
        LabelRow(rank_of[i], scored[i].concept, scored[i].score, np.zeros(0, np.float32))
        for i in kept
    )
    cands = tuple(
        CandidateRow(i, s.concept, None, None, s.score, rank_of.get(i))
        for i, s in enumerate(scored[:N_CANDIDATES])
    )
    evidence = []
    for r, row in enumerate(top, 1):
        image = int(rows[row])
        if image not in digests:
            digests[image] = file_digest(probe.path(image))
        key = content_key("probe-image", digests[image], None, target.input_size)
        name = f"ev/{key[:20]}.webp"
        if not (images_dir / name).exists():
            save_image_atomic(fit_thumbnail(probe.open(image)), images_dir / name)
        cap = captions.get(probe.files[image])
        evidence.append(
            EvidenceRow(
                r,
                probe.files[image],
                None,
                float(unit_acts[row]),
                f"images/{name}",
                content_key("caption", key, "captions.jsonl") if cap is not None else None,
                cap,
                "precomputed" if cap is not None else None,
            )
        )
    return NeuronResult(
        m.name,
        layer,
        unit,
        "ok",
        None,
        max_act,
        interpretability(img_emb[top]),
        labels,
        cands,
        tuple(evidence),
        {},
    )
