"""The whole build: record, crop, describe, dissect, label, write.

Neurons are processed in chunks so every model call is batched across
neurons; expensive results go through the content cache, and each neuron is
written to the atlas in its own transaction as soon as it is scored. A
killed build, started again, skips the neurons already written and finds
everything it already paid for in the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from builder import plugins as _plugins  # noqa: F401  (registers the built-in backends)
from builder.backends import Captioner, CaptionItem, Generator, Similarity, Summarizer
from builder.cache import ContentCache, content_key, file_digest, pack_arrays, unpack_arrays
from builder.config import BuildConfig, ModelConfig
from builder.data_files import data_path
from builder.errors import BuildError
from builder.evidence import EvidenceItem, NeuronKey, crop_image, crop_stage, is_dead
from builder.labels import interpretability, select_labels
from builder.probe import ProbeSet
from builder.progress import progress
from builder.record import LayerRecord, forward_summaries, record_topk
from builder.registry import Registry, captioners, generators, similarities, summarizers
from builder.scoring import SCORERS, CandidateEvidence
from builder.summarize import normalize_concept
from builder.targets import Target, load_target, resolve_device, resolve_dtype
from query.embedder import get_embedder
from query.index import build_index
from query.schema import COUNTED_STAGES, FORMAT_VERSION
from query.writer import AtlasWriter, CandidateRow, EvidenceRow, LabelRow, NeuronResult

log = logging.getLogger(__name__)

THUMB_SIZE = 128


@dataclass
class ModelSummary:
    model: str
    neurons: int = 0
    ok: int = 0
    dead: int = 0
    failed: int = 0
    skipped_images: int = 0
    images_per_s: float = float("nan")
    calls: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


@dataclass
class BuildSummary:
    out: str
    models: list[ModelSummary]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "seconds": round(self.seconds, 2),
            "models": [
                {
                    "model": m.model, "neurons": m.neurons, "ok": m.ok, "dead": m.dead, "failed": m.failed,
                    "skipped_images": m.skipped_images, "record_images_per_s": round(m.images_per_s, 1),
                    "calls_per_neuron": {
                        s: {"calls": round(c / max(1, m.ok), 2), "cached": round(h / max(1, m.ok), 2)}
                        for s, (c, h) in sorted(m.calls.items())
                    },
                    "seconds": {k: round(v, 2) for k, v in m.seconds.items()},
                }
                for m in self.models
            ],
        }

    def text(self) -> str:
        """The human summary printed at the end of a build."""
        lines = [f"atlas written to {self.out} in {self.seconds:.1f} s"]
        for m in self.models:
            lines.append(
                f"  {m.model}: {m.neurons} neurons written this run: {m.ok} ok, {m.dead} dead, "
                f"{m.failed} failed; {m.skipped_images} probe images skipped; "
                f"recording {m.images_per_s:.1f} images/s"
            )
            for s, (c, h) in sorted(m.calls.items()):
                lines.append(f"    {s:<22} {c / max(1, m.ok):8.2f} calls/neuron  ({h / max(1, m.ok):.2f} from cache)")
            for k, v in m.seconds.items():
                lines.append(f"    time {k:<17} {v:8.1f} s")
        return "\n".join(lines)


def create_backend(registry: Registry, spec: str, options: dict[str, Any], **context: Any) -> Any:
    """Create a backend, passing context values (device, probe_dir) only to
    factories that take them."""
    factory = registry.factory(spec)
    try:
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        extra = {k: v for k, v in context.items() if (takes_any or k in params) and k not in options}
    except (TypeError, ValueError):
        extra = {}
    return registry.create(spec, **options, **extra)


def target_fingerprint(target: Target, spec: str, options: dict[str, Any]) -> str:
    """Hash of the target's spec, options and every weight: recordings are
    reused only for the very same model."""
    h = hashlib.sha256(json.dumps([spec, options], sort_keys=True, default=str).encode())
    for name, t in sorted(target.module.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def build(cfg: BuildConfig, cache_enabled: bool = True) -> BuildSummary:
    """Build (or resume) the atlas ``cfg.out`` for every model of ``cfg``
    (with the labeler the config names: DnD, or the CLIP-Dissect baseline)."""
    if cfg.labeler == "clip-dissect":
        from builder.clip_dissect import build_clip_dissect

        return build_clip_dissect(cfg, cache_enabled=cache_enabled)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    writer = AtlasWriter(out)
    try:
        check_resume(writer, cfg)
        embedder = get_embedder(cfg.embedder)
        device = resolve_device(cfg.device)
        # official-shaped: no result is shared between neurons or reused from earlier runs
        official = cfg.cost_mode == "official-shaped"
        cache = ContentCache(Path(cfg.cache_dir or out / "cache") / "cache.sqlite",
                             enabled=cache_enabled and not official)
        similarity: Similarity = create_backend(
            similarities, cfg.dissect.similarity, cfg.dissect.similarity_options, device=cfg.device
        )
        summarizer: Summarizer = create_backend(summarizers, cfg.describe.summarizer, cfg.describe.summarizer_options)
        generator: Generator | None = (
            create_backend(generators, cfg.dissect.generator, cfg.dissect.generator_options, device=cfg.device)
            if cfg.dissect.enabled else None
        )
        old_meta = writer.meta()
        writer.set_meta(
            labeler="dnd",
            shard=cfg.shard,
            # an atlas may hold models from earlier builds: its meta keeps every model
            build_config=_with_old_models(cfg.redacted(), old_meta.get("build_config")),
            build_fingerprint=_with_old_models(_redact_fingerprint(cfg), old_meta.get("build_fingerprint")),
            embedder=cfg.embedder,
            embedder_dim=int(embedder.dim),
            similarity=getattr(similarity, "describe", lambda: similarity.name)(),
            similarity_config=similarity.config_key(),
            summarizer_config=summarizer.config_key(),
            generator_config=generator.config_key() if generator else None,
            dnd_atlas_format=FORMAT_VERSION,
        )
        summaries = []
        for m in cfg.models:
            summaries.append(
                _build_model(cfg, m, writer, cache, device, summarizer, generator, similarity, embedder)
            )
        n = build_index(out)
        log.info("FAISS index over %d labels written", n)
        gt = writer.meta().get("ground_truth", {})
        writer.set_meta(ground_truth=gt)
        cache.close()
    finally:
        writer.close()
    return BuildSummary(str(out), summaries, time.perf_counter() - t_start)


def _redact_fingerprint(cfg: BuildConfig) -> dict[str, Any]:
    from builder.config import _redact

    return _redact(cfg.fingerprint())


def _with_old_models(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """``new`` with the models of ``old`` that ``new`` does not name, in
    their old order first (``check_resume`` made sure shared ones agree)."""
    if not old:
        return new
    names = {m["name"] for m in new.get("models", [])}
    kept = [m for m in old.get("models", []) if m["name"] not in names]
    return {**new, "models": kept + list(new.get("models", []))}


def check_resume(writer: AtlasWriter, cfg: BuildConfig) -> None:
    """Refuse to mix configs in one atlas: resuming needs the same settings."""
    meta = writer.meta()
    old = meta.get("build_fingerprint")
    if not old:
        return
    if meta.get("labeler", "dnd") != cfg.labeler:
        raise BuildError(
            f"the atlas at {cfg.out} was labelled by {meta.get('labeler', 'dnd')!r}, not {cfg.labeler!r}; "
            "use a new --out"
        )
    new = _redact_fingerprint(cfg)
    old_models = {m["name"]: m for m in old.get("models", [])}
    for m in new["models"]:
        if m["name"] in old_models and old_models[m["name"]] != m:
            raise BuildError(
                f"the atlas at {cfg.out} already holds model {m['name']!r} built with another config; "
                "use a new --out, or the same config to resume"
            )
    strip = lambda d: {k: v for k, v in d.items() if k != "models"}  # noqa: E731
    if strip(old) != strip(new):
        changed = sorted(k for k in set(strip(old)) | set(strip(new)) if strip(old).get(k) != strip(new).get(k))
        raise BuildError(
            f"the atlas at {cfg.out} was built with other settings ({', '.join(changed)}); "
            "use a new --out, or the same config to resume"
        )


def _build_model(
    cfg: BuildConfig, m: ModelConfig, writer: AtlasWriter, cache: ContentCache, device: torch.device,
    summarizer: Summarizer, generator: Generator | None, similarity: Similarity, embedder: Any,
) -> ModelSummary:
    ms = ModelSummary(m.name)
    t0 = time.perf_counter()
    target = load_target(m.name, m.target, m.target_options, device, resolve_dtype(cfg.dtype, device))
    target.check_layers(m.layers)
    probe = ProbeSet.scan(m.probe)
    tfp = target_fingerprint(target, m.target, m.target_options)
    summary = m.summary or cfg.record.summary
    top_m = cfg.record.top_k * cfg.record.margin
    ms.seconds["load"] += time.perf_counter() - t0

    # -- step 0: record (cached as a whole) ----------------------------------
    t0 = time.perf_counter()
    rkey = content_key("record", tfp, probe.fingerprint(), list(m.layers), summary, m.vit_tokens, top_m)
    raw = cache.get("record", rkey)
    if raw is not None:
        arrays = unpack_arrays(raw)
        records = {lay: LayerRecord.from_arrays(lay, arrays, f"{i}_") for i, lay in enumerate(m.layers)}
        n_images, n_skipped = (int(x) for x in arrays["stats"][:2])
        ms.images_per_s = float(arrays["stats"][2])
    else:
        records, stats = record_topk(
            target, probe, m.layers, top_m, summary, m.vit_tokens, cfg.record.batch_size, cfg.record.num_workers
        )
        n_images, n_skipped = stats.images, stats.skipped
        ms.images_per_s = stats.images_per_s
        arrays = {}
        for i, lay in enumerate(m.layers):
            arrays.update(records[lay].to_arrays(f"{i}_"))
        arrays["stats"] = np.array([n_images, n_skipped, stats.images_per_s], dtype=np.float64)
        cache.put("record", rkey, pack_arrays(**arrays))
    ms.skipped_images = n_skipped
    if n_skipped:
        log.warning("%s: %d probe files were not readable images and were skipped", m.name, n_skipped)
    writer.upsert_model(
        m.name, m.target, str(probe.root), n_images, n_skipped,
        {"target": m.target, "target_options": m.target_options, "layers": list(m.layers),
         "summary": summary, "vit_tokens": m.vit_tokens, "input_size": target.input_size},
        [(lay, records[lay].kind, records[lay].n_units) for lay in m.layers],
    )
    known = {lay: info for lay, info in target.ground_truth.items() if lay in m.layers}
    if known:
        gt = writer.meta().get("ground_truth", {})
        gt[m.name] = known
        writer.set_meta(ground_truth=gt)
    ms.seconds["record"] += time.perf_counter() - t0

    done = writer.done_units(m.name)
    mine = set(shard_neurons([(lay, u) for lay in m.layers for u in selected_units(m, records[lay].n_units)], cfg.shard))
    selected = {lay: [u for u in selected_units(m, records[lay].n_units) if (lay, u) in mine] for lay in m.layers}
    todo = [(lay, u) for lay in m.layers for u in selected[lay] if (lay, u) not in done]
    dead = [n for n in todo if is_dead(records[n[0]], n[1])]
    writer.write_neurons(
        NeuronResult(m.name, lay, u, "dead", "constant activation over the probe set",
                     float(records[lay].max_act[u]))
        for lay, u in dead
    )
    ms.dead += len(dead)
    ms.neurons += len(dead)
    live = [n for n in todo if not is_dead(records[n[0]], n[1])]
    if not live:
        return ms

    # -- step 1: attention crops (cached as a whole) ---------------------------
    t0 = time.perf_counter()
    all_live = [(lay, u) for lay in m.layers for u in selected[lay] if not is_dead(records[lay], u)]
    ckey = content_key("crops", rkey, cfg.crop.__dict__, cfg.record.top_k, all_live)
    cached = cache.get_json("crops", ckey)
    if cached is not None:
        evidence = {(lay, int(u)): [EvidenceItem(i, tuple(b) if b else None, a) for i, b, a in items]
                    for lay, u, items in cached["evidence"]}
        crop_calls = {(lay, int(u)): (c, h) for lay, u, c, h in cached["calls"]}
    elif cfg.cost_mode == "official-shaped":  # each neuron crops and records its own images
        evidence, crop_calls = {}, {}
        for n in all_live:
            ev, cc = crop_stage(target, probe, records, [n], cfg.record.top_k, cfg.crop, summary,
                                m.vit_tokens, cfg.record.batch_size)
            evidence.update(ev)
            crop_calls.update(cc)
    else:
        evidence, crop_calls = crop_stage(
            target, probe, records, all_live, cfg.record.top_k, cfg.crop, summary, m.vit_tokens,
            cfg.record.batch_size,
        )
        cache.put_json("crops", ckey, {
            "evidence": [[lay, u, [[e.image, list(e.box) if e.box else None, e.activation] for e in items]]
                         for (lay, u), items in evidence.items()],
            "calls": [[lay, u, c, h] for (lay, u), (c, h) in crop_calls.items()],
        })
    ms.seconds["crops"] += time.perf_counter() - t0

    captioner: Captioner = create_backend(
        captioners, cfg.describe.captioner, cfg.describe.captioner_options, probe_dir=str(probe.root), device=cfg.device
    )
    ctx = _Context(cfg, m, writer, cache, target, tfp, probe, summary, records, captioner, summarizer,
                   generator, similarity, embedder, ms)
    bar = progress(total=len(live), desc=f"describe+dissect {m.name}", unit="neuron")
    try:
        step = 1 if cfg.cost_mode == "official-shaped" else cfg.chunk_size  # one neuron at a time
        for start in range(0, len(live), step):
            chunk = live[start : start + step]
            ctx.process_chunk(chunk, {n: evidence[n] for n in chunk}, {n: crop_calls.get(n, (0, 0)) for n in chunk})
            bar.update(len(chunk))
            log.info("%s: wrote %d of %d neurons", m.name, min(start + len(chunk), len(live)), len(live))
    finally:
        bar.close()
        for stage, secs in ms.seconds.items():
            writer.add_stage_time(m.name, stage, secs)
    return ms


def selected_units(m: ModelConfig, n_units: int) -> list[int]:
    """The units of a layer to describe: ``m.units`` that exist, or all."""
    return [u for u in m.units if u < n_units] if m.units else list(range(n_units))


def shard_neurons(neurons: list[NeuronKey], shard: str) -> list[NeuronKey]:
    """The neurons of shard ``I/N``: every N-th neuron of the model's ordered
    list starting at I, so shards are balanced across layers and any
    process computes the same split."""
    if not shard:
        return neurons
    from builder.config import shard_of

    i, n = shard_of(shard)
    return neurons[i::n]


class _Context:
    """Per-model state for the chunked describe/dissect/label/write loop."""

    def __init__(self, cfg, m, writer, cache, target, tfp, probe, summary, records, captioner, summarizer,
                 generator, similarity, embedder, ms) -> None:
        self.cfg: BuildConfig = cfg
        self.m: ModelConfig = m
        self.writer: AtlasWriter = writer
        self.cache: ContentCache = cache
        self.target: Target = target
        self.tfp = tfp
        self.probe: ProbeSet = probe
        self.summary = summary
        self.records: dict[str, LayerRecord] = records
        self.captioner: Captioner = captioner
        self.summarizer: Summarizer = summarizer
        self.generator: Generator | None = generator
        self.similarity: Similarity = similarity
        self.embedder = embedder
        self.ms: ModelSummary = ms
        self.images_dir = writer.dir / "images"
        self._digests: dict[int, str] = {}
        self.template = _prompt_template(cfg.dissect.prompt_template)
        self.sim_key = similarity.config_key()
        self.gen_images: dict[str, Image.Image] = {}

    # -- helpers -----------------------------------------------------------------
    def digest(self, image: int) -> str:
        if image not in self._digests:
            self._digests[image] = file_digest(self.probe.path(image))
        return self._digests[image]

    def evidence_key(self, e: EvidenceItem) -> str:
        return content_key("probe-image", self.digest(e.image), list(e.box) if e.box else None, self.target.input_size)

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to the model's ``stage`` total."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.ms.seconds[stage] += time.perf_counter() - t

    # -- the chunk -----------------------------------------------------------------
    def process_chunk(self, chunk: Sequence[NeuronKey], evidence: dict[NeuronKey, list[EvidenceItem]],
                      crop_calls: dict[NeuronKey, tuple[int, int]]) -> None:
        cfg = self.cfg
        calls: dict[NeuronKey, dict[str, list[int]]] = {n: {s: [0, 0] for s in COUNTED_STAGES} for n in chunk}
        for n in chunk:
            calls[n]["target_forward_images"] = list(crop_calls[n])

        # evidence images (probe images and crops), loaded once per chunk
        ev_images: dict[str, Image.Image] = {}
        source_images: dict[int, Image.Image] = {}
        for n in chunk:
            for e in evidence[n]:
                k = self.evidence_key(e)
                if k not in ev_images:
                    if e.image not in source_images:
                        source_images[e.image] = self.probe.open(e.image)
                    ev_images[k] = crop_image(source_images[e.image], e.box, self.target.input_size)

        # step 2a: captions
        with self.timed("caption"):
            cap_key = {
                k: content_key("caption", k, self.captioner.config_key()) for k in ev_images
            }
            have = {k: v.decode() for k, v in self.cache.get_many("caption", list(cap_key.values())).items()}
            missing = [k for k in ev_images if cap_key[k] not in have]
            first_user: dict[str, NeuronKey] = {}
            for n in chunk:
                for e in evidence[n]:
                    first_user.setdefault(self.evidence_key(e), n)
            new: dict[str, bytes] = {}
            bs = cfg.describe.batch_size
            for i in range(0, len(missing), bs):
                part = missing[i : i + bs]
                items = []
                for k in part:
                    e = next(e for e in evidence[first_user[k]] if self.evidence_key(e) == k)
                    items.append(CaptionItem(ev_images[k], self.probe.files[e.image], e.box))
                texts = self.captioner.caption(items)
                if len(texts) != len(part):
                    raise BuildError(f"captioner {self.captioner.name!r} returned {len(texts)} captions for {len(part)} images")
                for k, t in zip(part, texts):
                    have[cap_key[k]] = str(t)
                    new[cap_key[k]] = str(t).encode()
            if new:
                self.cache.put_many("caption", new)
            charged: set[str] = set()
            for n in chunk:
                for e in evidence[n]:
                    k = self.evidence_key(e)
                    fresh = cap_key[k] in new and k not in charged
                    calls[n]["captioner_images"][0 if fresh else 1] += 1
                    charged.add(k)
        captions = {n: [have[cap_key[self.evidence_key(e)]] for e in evidence[n]] for n in chunk}

        # step 2b: candidate concepts
        with self.timed("summarize"):
            N = cfg.describe.n_candidates
            skeys = {n: content_key("summarize", captions[n], N, self.summarizer.config_key()) for n in chunk}
            got = {k: json.loads(v) for k, v in self.cache.get_many("summarize", list(set(skeys.values()))).items()}
            todo = []
            for n in chunk:
                if skeys[n] not in got and skeys[n] not in [skeys[t] for t in todo]:
                    todo.append(n)
            failures: dict[NeuronKey, str] = {}
            usage: dict[NeuronKey, dict[str, int]] = {}
            if todo:
                if cfg.cost_mode == "official-shaped":
                    answers = self._ask_one_by_one([captions[n] for n in todo], N, todo, usage)
                else:
                    answers = self.summarizer.summarize_many([captions[n] for n in todo], N)
                    for n, u in zip(todo, getattr(self.summarizer, "last_item_usage", None) or []):
                        usage[n] = dict(u)
                new_s: dict[str, bytes] = {}
                for n, ans in zip(todo, answers):
                    if isinstance(ans, Exception):
                        failures[n] = f"summarizer failed: {ans}"
                        continue
                    got[skeys[n]] = list(ans)
                    new_s[skeys[n]] = json.dumps(list(ans)).encode()
                if new_s:
                    self.cache.put_many("summarize", new_s)
            todo_set = set(todo)
            candidates: dict[NeuronKey, list[str]] = {}
            for n in chunk:
                if n in usage:  # a remote summarizer counted its HTTP requests (re-asks too) and tokens
                    calls[n]["summarizer_requests"][0] += usage[n]["requests"]
                    if "tokens" in usage[n]:
                        calls[n].setdefault("summarizer_tokens", [0, 0])[0] += usage[n]["tokens"]
                else:
                    calls[n]["summarizer_requests"][0 if n in todo_set else 1] += 1
                if n in failures or skeys[n] not in got:
                    failures.setdefault(n, "summarizer failed")
                    continue
                cands = []
                for c in got[skeys[n]]:
                    c = normalize_concept(c)
                    if c and c not in cands:
                        cands.append(c)
                if not cands:
                    failures[n] = "the summarizer proposed no concept"
                else:
                    candidates[n] = cands[:N]

        live = [n for n in chunk if n in candidates]
        # interpretability + image-products need image embeddings of the evidence
        with self.timed("embed"):
            ev_emb = self.embed_images(ev_images)

        gen_acts: dict[str, np.ndarray] = {}
        gen_emb: dict[str, np.ndarray] = {}
        gen_keys: dict[str, list[str]] = {}
        if self.generator is not None and live:
            Q = cfg.dissect.images_per_concept
            prompts = sorted({self.template.format(concept=c) for n in live for c in candidates[n]})
            gcfg = self.generator.config_key()
            for p in prompts:
                gen_keys[p] = [content_key("generate", p, gcfg, cfg.dissect.seed, i) for i in range(Q)]
            # step 3a: generate what no earlier neuron or build has generated
            with self.timed("generate"):
                all_keys = [k for p in prompts for k in gen_keys[p]]
                gen_images = {k: Image.open(io.BytesIO(v)).convert("RGB")
                              for k, v in self.cache.get_many("generate", all_keys).items()}
                missing_p = [p for p in prompts if any(k not in gen_images for k in gen_keys[p])]
                fresh_g = {k for p in missing_p for k in gen_keys[p]}
                bs = max(1, cfg.dissect.batch_size // Q)
                for i in range(0, len(missing_p), bs):
                    part = missing_p[i : i + bs]
                    imgs = self.generator.generate(part, Q, cfg.dissect.seed)
                    if len(imgs) != len(part) or any(len(x) != Q for x in imgs):
                        raise BuildError(f"generator {self.generator.name!r} returned the wrong number of images")
                    made = {gen_keys[p][j]: im.convert("RGB") for p, ims in zip(part, imgs) for j, im in enumerate(ims)}
                    self.cache.put_many("generate", {k: _png(im) for k, im in made.items()})
                    gen_images.update(made)
            self.gen_images = gen_images
            # step 3b: record the generated images once for every neuron of the model
            with self.timed("gen_record"):
                gen_acts, fresh_r = self.record_generated(gen_images)
            with self.timed("embed"):
                gen_emb = self.embed_images(gen_images)
            charged_g: set[str] = set()
            charged_r: set[str] = set()
            for n in live:
                for c in candidates[n]:
                    for k in gen_keys[self.template.format(concept=c)]:
                        calls[n]["generated_images"][0 if (k in fresh_g and k not in charged_g) else 1] += 1
                        calls[n]["target_forward_images"][0 if (k in fresh_r and k not in charged_r) else 1] += 1
                        charged_g.add(k)
                        charged_r.add(k)

        # steps 3c-5: score, label, write, one neuron at a time
        with self.timed("score_write"):
            cand_texts = sorted({c for n in live for c in candidates[n]})
            text_emb = dict(zip(cand_texts, self.similarity.embed_texts(cand_texts))) if cand_texts else {}
            results = []
            for n in chunk:
                calls_n = {s: (c, h) for s, (c, h) in calls[n].items()}
                self._tally(calls_n)
                if n in failures:
                    self.ms.failed += 1
                    results.append(NeuronResult(self.m.name, n[0], n[1], "failed", failures[n],
                                                float(self.records[n[0]].max_act[n[1]]), calls=calls_n))
                    continue
                results.append(self.score_neuron(n, evidence[n], captions[n], candidates[n], ev_emb,
                                                 gen_keys, gen_acts, gen_emb, text_emb, calls_n))
            label_texts = [lab.text for r in results for lab in r.labels]
            vecs = iter(self.embedder.embed(label_texts)) if label_texts else iter(())
            final = []
            for r in results:
                labels = tuple(LabelRow(lab.rank, lab.text, lab.concept_score, next(vecs)) for lab in r.labels)
                final.append(dataclasses.replace(r, labels=labels))
            self.writer.write_neurons(final)
        self.ms.neurons += len(chunk)
        self.ms.ok += sum(1 for r in final if r.status == "ok")

    def _ask_one_by_one(self, batches, n_candidates, todo, usage) -> list:
        """The official implementation's way: one request per candidate.
        Request i asks for i+1 concepts and keeps the one not yet proposed,
        so the candidates equal those of one request for N (equal quality,
        N times the requests)."""
        out: list[list[str] | Exception] = [[] for _ in batches]
        for n in todo:
            usage[n] = {"requests": 0}
        for i in range(n_candidates):
            answers = self.summarizer.summarize_many(batches, i + 1)
            per = getattr(self.summarizer, "last_item_usage", None)
            for j, ans in enumerate(answers):
                usage[todo[j]]["requests"] += per[j]["requests"] if per else 1
                if per:
                    usage[todo[j]]["tokens"] = usage[todo[j]].get("tokens", 0) + per[j]["tokens"]
                if isinstance(out[j], Exception):
                    continue
                if isinstance(ans, Exception):
                    out[j] = ans
                    continue
                fresh = [c for c in ans if c not in out[j]]
                if fresh:
                    out[j].append(fresh[-1] if len(ans) == i + 1 else fresh[0])
        return out

    def _tally(self, calls_n: dict[str, tuple[int, int]]) -> None:
        for s, (c, h) in calls_n.items():
            self.ms.calls[s][0] += c
            self.ms.calls[s][1] += h

    def embed_images(self, images: dict[str, Image.Image]) -> dict[str, np.ndarray]:
        keys = list(images)
        ekey = {k: content_key("embed-image", self.sim_key, k) for k in keys}
        got = self.cache.get_many("embed", list(ekey.values()))
        out = {k: np.frombuffer(got[ekey[k]], dtype=np.float32) for k in keys if ekey[k] in got}
        missing = [k for k in keys if k not in out]
        if missing:
            emb = self.similarity.embed_images([images[k] for k in missing])
            self.cache.put_many("embed", {ekey[k]: np.asarray(e, np.float32).tobytes() for k, e in zip(missing, emb)})
            out.update({k: np.asarray(e, np.float32) for k, e in zip(missing, emb)})
        return out

    def record_generated(self, images: dict[str, Image.Image]) -> tuple[dict[str, np.ndarray], set[str]]:
        """Activations of every neuron of every selected layer on each image
        (concatenated in layer order); recorded once per image and model."""
        layers = list(self.m.layers)
        rkey = {k: content_key("gen-record", self.tfp, k, layers, self.summary, self.m.vit_tokens) for k in images}
        got = self.cache.get_many("genrec", list(rkey.values()))
        out = {k: np.frombuffer(got[rkey[k]], dtype=np.float32) for k in images if rkey[k] in got}
        missing = sorted(k for k in images if k not in out)
        if missing:
            summ = forward_summaries(self.target, [images[k] for k in missing], layers, self.summary,
                                     self.m.vit_tokens, self.cfg.record.batch_size)
            flat = np.concatenate([summ[lay] for lay in layers], axis=1).astype(np.float32)
            self.cache.put_many("genrec", {rkey[k]: flat[i].tobytes() for i, k in enumerate(missing)})
            out.update({k: flat[i] for i, k in enumerate(missing)})
        return out, set(missing)

    def unit_offset(self, layer: str) -> int:
        off = 0
        for lay in self.m.layers:
            if lay == layer:
                return off
            off += self.records[lay].n_units
        raise KeyError(layer)

    def score_neuron(self, n, evidence, captions, cands, ev_emb, gen_keys, gen_acts, gen_emb, text_emb, calls_n):
        cfg = self.cfg
        layer, unit = n
        probe_emb = np.stack([ev_emb[self.evidence_key(e)] for e in evidence])
        interp = interpretability(probe_emb)
        cand_rows: list[CandidateRow] = []
        if self.generator is not None:
            col = self.unit_offset(layer) + unit
            ce = []
            for c in cands:
                keys = gen_keys[self.template.format(concept=c)]
                ce.append(CandidateEvidence(
                    c, np.array([gen_acts[k][col] for k in keys], dtype=np.float64),
                    np.stack([gen_emb[k] for k in keys]),
                ))
            scores = SCORERS[cfg.dissect.scoring](ce, probe_emb, cfg.dissect.beta, cfg.record.top_k)
            temb = np.stack([text_emb[c] for c in cands])
            kept = select_labels(scores, temb, cfg.labels.max_labels, cfg.labels.dedup_threshold,
                                 cfg.labels.extra_labels_need_positive_score, cfg.labels.drop_nested_labels)
            rank_of = {i: r + 1 for r, i in enumerate(kept)}
            for i, (c, s) in enumerate(zip(cands, scores)):
                samples = tuple(self.thumb_generated(k) for k in gen_keys[self.template.format(concept=c)][:3])
                cand_rows.append(CandidateRow(i, c, s.topk_squared, s.image_products, s.score, rank_of.get(i), samples))
            labels = tuple(_Label(rank_of[i], cands[i], scores[i].score) for i in kept)
        else:  # ablation: no concept selection, the summarizer's order decides
            temb = np.stack([text_emb[c] for c in cands])
            fake = [_NoScore(c) for c in cands]
            kept = select_labels(fake, temb, cfg.labels.max_labels, cfg.labels.dedup_threshold, False,
                                 cfg.labels.drop_nested_labels) \
                if not cfg.labels.extra_labels_need_positive_score else [0]
            rank_of = {i: r + 1 for r, i in enumerate(kept)}
            cand_rows = [CandidateRow(i, c, None, None, None, rank_of.get(i)) for i, c in enumerate(cands)]
            labels = tuple(_Label(rank_of[i], cands[i], None) for i in kept)
        ev_rows = []
        for r, (e, cap) in enumerate(zip(evidence, captions), 1):
            k = self.evidence_key(e)
            ev_rows.append(EvidenceRow(
                r, self.probe.files[e.image], e.box, e.activation, self.thumb_evidence(e),
                content_key("caption", k, self.captioner.config_key()), cap, self.captioner.name,
            ))
        return NeuronResult(
            self.m.name, layer, unit, "ok", None, float(self.records[layer].max_act[unit]), interp,
            labels, tuple(cand_rows), tuple(ev_rows), calls_n,
        )

    # -- thumbnails (content-addressed, written once) --------------------------
    def thumb_evidence(self, e: EvidenceItem) -> str:
        name = f"ev/{self.evidence_key(e)[:20]}.webp"
        path = self.images_dir / name
        if not path.exists():
            src = self.probe.open(e.image)
            im = fit_thumbnail(src)
            if e.box is not None:
                sx = im.width / src.width
                x0, y0, x1, y1 = (int(round(v * sx)) for v in e.box)
                ImageDraw.Draw(im).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 0, 0), width=2)
            save_image_atomic(im, path)
        return f"images/{name}"

    def thumb_generated(self, key: str) -> str:
        name = f"gen/{key[:20]}.webp"
        path = self.images_dir / name
        if not path.exists():
            save_image_atomic(fit_thumbnail(self.gen_images[key]), path)
        return f"images/{name}"


@dataclass(frozen=True)
class _Label:
    rank: int
    text: str
    concept_score: float | None


@dataclass(frozen=True)
class _NoScore:
    concept: str
    score: float = 0.0


def _prompt_template(name: str) -> str:
    p = Path(name)
    if not p.is_file():
        p = data_path("prompts", name)
    if not p.is_file():
        raise BuildError(f"prompt template {name!r} not found (a file in data/prompts or a path)")
    text = p.read_text().strip()
    if "{concept}" not in text:
        raise BuildError(f"prompt template {p} must contain {{concept}}")
    return text


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def fit_thumbnail(im: Image.Image, size: int = THUMB_SIZE) -> Image.Image:
    """``im`` scaled so its longer side is ``size`` (nearest-neighbour when
    enlarging, so small probe images stay crisp)."""
    scale = size / max(im.size)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)


def save_image_atomic(im: Image.Image, path: Path) -> None:
    """Write ``im`` as WebP through a temp name and a rename, so a killed
    build never leaves a half-written thumbnail under its final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    im.save(tmp, format="WEBP", quality=80)
    os.replace(tmp, path)
