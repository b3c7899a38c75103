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

The run loop (``builder.pipeline.run``) writes each chunk of neurons in
per-neuron transactions; a rerun skips the neurons already written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.backends.registry import captioners, create_backend, similarities
from builder.cache import ContentCache, content_key
from builder.config import BuildConfig, ClipDissectConfig
from builder.data_files import data_path
from builder.errors import BuildError
from builder.pipeline.fidelity import FidelitySample, build_sample, presence_mode, with_fidelity
from builder.pipeline.labeler import Labeler, Recording
from builder.pipeline.labels import Label, ScoredConcept, interpretability, select_labels
from builder.pipeline.record import record_all
from builder.pipeline.records import EvidenceItem, ModelRun, ModelSummary, NeuronKey
from builder.pipeline.write import evidence_rows
from builder.probe import ProbeSet
from builder.progress import progress
from query.embedder import get_embedder
from query.writer import CandidateRow, NeuronResult

log = logging.getLogger(__name__)

LABELER = "clip-dissect"
DEFAULT_CONCEPTS = "common-visual.txt"  # in data/concepts
N_CANDIDATES = 5  # concepts stored per neuron in the candidates table
_LABEL_POOL = 64  # best concepts searched for labels 2-3


# -- SoftWPMI ---------------------------------------------------------------------


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
    probs: np.ndarray, acts: np.ndarray, params: ClipDissectConfig = ClipDissectConfig(), chunk: int = 0
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
    p: np.ndarray, acts: np.ndarray, params: ClipDissectConfig = ClipDissectConfig()
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
                f"{probe.root}'s captions.jsonl or metadata.jsonl (first: {missing[0]!r})"
            )
        return np.asarray(self.embedder.embed([caps[f] for f in files]), dtype=np.float32)

    def embed_concepts(self, concepts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.embedder.embed(list(concepts)), dtype=np.float32)


def joint_space(cfg: BuildConfig) -> _JointSpace:
    """CLIP when the configured similarity is ``clip``; else the caption
    stand-in when every model's probe folder has a captions.jsonl."""
    if cfg.dissect.similarity == "clip":
        return _ClipSpace(
            create_backend(similarities, "clip", cfg.dissect.similarity_options, device=cfg.device)
        )
    no_caps = [m.name for m in cfg.models if not ProbeSet.scan(m.probe).has_captions()]
    if no_caps:
        raise BuildError(
            f'clip-dissect needs an image-text space: set dissect.similarity = "clip" (a CLIP model in '
            f"dissect.similarity_options.model), or give every probe folder a captions.jsonl or metadata.jsonl "
            f"for the caption stand-in (missing for model {no_caps[0]!r}); the {cfg.dissect.similarity!r} "
            "similarity is not "
            "a joint image-text space"
        )
    return _CaptionSpace(cfg.embedder)


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


# -- the labeler -----------------------------------------------------------------------


class FullRecording(Recording):
    """Step 0 of CLIP-Dissect: every readable probe image's summary of every
    unit (a memory-mapped array, layers side by side)."""

    def __init__(self, acts: np.ndarray, kinds: dict[str, tuple[str, int]], valid: np.ndarray,
                 layers: Sequence[str], images_per_s: float, sample: np.ndarray) -> None:
        self.acts, self.valid, self.sample = acts, valid, sample
        self.rows = np.flatnonzero(valid)  # probe index of each row of the image-concept matrices
        self.layers = [(lay, kinds[lay][0], kinds[lay][1]) for lay in layers]
        self.n_images = int(valid.sum())
        self.n_skipped = len(valid) - self.n_images
        self.images_per_s = images_per_s
        self._offsets = dict(zip(layers, np.cumsum([0] + [kinds[lay][1] for lay in layers])[:-1].tolist()))
        self._extremes: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def layer_acts(self, layer: str) -> np.ndarray:
        """(readable images, units) float32 activations of one layer."""
        off = self._offsets[layer]
        n = next(k for lay, _, k in self.layers if lay == layer)
        return np.asarray(self.acts[self.rows, off : off + n], dtype=np.float32)

    def sample_acts(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if not len(self.sample):
            return self.sample, {}
        images = self.sample[self.valid[self.sample]]
        out = {}
        for lay, _, n in self.layers:
            off = self._offsets[lay]
            out[lay] = np.asarray(self.acts[images, off : off + n], dtype=np.float32)
        return images, out

    def extremes(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        if layer not in self._extremes:
            a = self.layer_acts(layer)
            self._extremes[layer] = (a.max(axis=0), a.min(axis=0))
        return self._extremes[layer]


SOFTWPMI_KEYS = ("top_k", "a", "lam", "p_start", "p_end", "eps")


class ClipDissectLabeler(Labeler):
    """CLIP-Dissect (SoftWPMI over a concept set) in the same atlas format."""

    name = LABELER
    write_stage = "label_write"

    def __init__(self, cfg: BuildConfig) -> None:
        self.cfg = cfg
        self.params = cfg.clip_dissect
        self.concepts = load_concepts(cfg.clip_dissect.concepts or None)
        self._temp: Path | None = None

    def check_resume(self, meta: dict[str, Any]) -> None:
        if meta.get("build_fingerprint") and meta.get("concept_set", {}).get("sha256") != self.concepts.sha256:
            raise BuildError(
                f"the atlas at {self.cfg.out} was built with another concept set "
                f"({meta.get('concept_set', {}).get('name')}); use a new --out, or the same settings to resume"
            )

    def open(self, cache: ContentCache) -> dict[str, Any]:
        self.space = joint_space(self.cfg)
        if cache.enabled:
            self.cache_dir = cache.path.parent / "clip-dissect"
        else:  # nothing reused: a temporary folder, removed at the end
            self.cache_dir = self._temp = Path(tempfile.mkdtemp(prefix="clip-dissect-", dir=cache.path.parent))
        t0 = time.perf_counter()
        ckey = content_key("clip-dissect-concepts", self.space.key, self.concepts.sha256)
        self.concept_emb = _cached_array(self.cache_dir / f"concepts-{ckey[:32]}.npy",
                                         lambda: self.space.embed_concepts(self.concepts.concepts))
        self.concept_seconds = time.perf_counter() - t0
        return {
            "similarity": self.space.describe,
            "similarity_config": self.space.key,
            "concept_set": {"name": self.concepts.name, "sha256": self.concepts.sha256,
                            "n": len(self.concepts.concepts)},
            "softwpmi": {k: getattr(self.params, k) for k in SOFTWPMI_KEYS},
        }

    def model_config(self) -> dict[str, Any]:
        return {"labeler": LABELER}

    def record(self, run: ModelRun, stats: ModelSummary) -> FullRecording:
        m = run.model
        stats.seconds["embed_concepts"] += self.concept_seconds
        t0 = time.perf_counter()
        key = content_key("clip-dissect-acts", run.fingerprint, run.probe.fingerprint(), list(m.layers),
                          run.summary, m.vit_tokens)
        acts, kinds, valid = record_all(run.target, run.probe, m.layers, self.cache_dir / f"acts-{key[:32]}.npy",
                                        run.summary, m.vit_tokens, run.cfg.record.batch_size,
                                        run.cfg.record.num_workers)
        rec = FullRecording(acts, kinds, valid, m.layers,
                            int(valid.sum()) / max(1e-9, time.perf_counter() - t0), run.sample)
        rec.n_skipped += len(run.probe.rejected)  # entries the scan skipped (FIFOs, broken links) count too
        return rec

    def fidelity_sample(self, run: ModelRun, rec: Recording) -> FidelitySample | None:
        """Presence from CLIP when the joint space is CLIP, else from the
        configured captioner's captions (the same presence a DnD atlas of the
        config gets, so the two compare)."""
        images, acts = rec.sample_acts()
        if not len(images):
            return None
        sim = self.space.sim if isinstance(self.space, _ClipSpace) else None
        cfg = run.cfg
        captioner = None
        if presence_mode(cfg.fidelity.presence, sim) != "joint":
            captioner = create_backend(captioners, cfg.describe.captioner, cfg.describe.captioner_options,
                                       probe_dir=str(run.probe.root), device=cfg.device)
        return build_sample(run, images, acts, captioner, sim, get_embedder(cfg.embedder))

    def label(self, run: ModelRun, rec: Recording, neurons: list[NeuronKey], stats: ModelSummary,
              fid: FidelitySample | None = None) -> Iterator[list[NeuronResult]]:
        assert isinstance(rec, FullRecording)
        with stats.timed("embed_images"):
            key = content_key("clip-dissect-images", self.space.key, run.probe.fingerprint())
            img_emb = _cached_array(self.cache_dir / f"images-{key[:32]}.npy",
                                    lambda: self.space.embed_probe(run.probe, rec.rows, run.cfg.record.batch_size))
        with stats.timed("similarity"):
            probs = np.empty((len(rec.rows), len(self.concepts.concepts)), dtype=np.float32)
            for s in range(0, len(rec.rows), 1024):
                probs[s : s + 1024] = concept_probabilities(img_emb[s : s + 1024] @ self.concept_emb.T, self.params.a)
        captions = run.probe.captions() if isinstance(self.space, _CaptionSpace) else {}
        for layer in dict.fromkeys(lay for lay, _ in neurons):
            units = [u for lay, u in neurons if lay == layer]
            acts = rec.layer_acts(layer)
            with stats.timed("softwpmi"):
                # the prior averages over every unit of the layer, whatever this run writes
                scores = soft_wpmi_from_probs(probs, acts, self.params)
            top = top_images(acts, run.cfg.record.top_k)
            hi = acts.max(axis=0)
            for start in range(0, len(units), run.cfg.chunk_size):
                with stats.timed("label_write"):
                    results = [self._neuron(run, layer, u, scores[u], acts[:, u], top[u], rec.rows, img_emb,
                                            captions, float(hi[u]))
                               for u in units[start : start + run.cfg.chunk_size]]
                if fid is not None:
                    with stats.timed("fidelity"):
                        results = with_fidelity(results, fid)
                yield results

    def close(self) -> None:
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)

    def _neuron(self, run: ModelRun, layer: str, unit: int, scores: np.ndarray, unit_acts: np.ndarray,
                top: np.ndarray, rows: np.ndarray, img_emb: np.ndarray, captions: dict[str, str],
                max_act: float) -> NeuronResult:
        """One live neuron's labels, candidates and evidence."""
        pool = np.argsort(-scores, kind="stable")[:_LABEL_POOL]
        scored = [ScoredConcept(self.concepts.concepts[i], float(scores[i])) for i in pool]
        lab = run.cfg.labels
        kept = select_labels(scored, self.concept_emb[pool], lab.max_labels, lab.dedup_threshold,
                             lab.extra_labels_need_positive_score, lab.drop_nested_labels)
        rank_of = {i: r + 1 for r, i in enumerate(kept)}
        labels = tuple(Label(rank_of[i], scored[i].concept, scored[i].score) for i in kept)
        cands = tuple(CandidateRow(i, s.concept, None, None, s.score, rank_of.get(i))
                      for i, s in enumerate(scored[:N_CANDIDATES]))
        items = [EvidenceItem(int(rows[r]), None, float(unit_acts[r])) for r in top]
        caps = [captions.get(run.probe.files[e.image]) for e in items]
        keys = [content_key("caption", run.evidence_key(e), "captions.jsonl") if c is not None else None
                for e, c in zip(items, caps)]
        return NeuronResult(run.name, layer, unit, "ok", None, max_act, interpretability(img_emb[top]), labels,
                            cands, evidence_rows(run, items, caps, keys, "precomputed"), {})
