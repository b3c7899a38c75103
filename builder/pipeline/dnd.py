"""The Describe-and-Dissect labeler: steps 0-4 of DESIGN.md section 2.

Step 0 records a streaming top-M per neuron over the probe set and every
neuron's activation on the fidelity sample (cached as a whole). Then, for
each chunk of neurons (``chunk_size``: every model call is batched across
the chunk): attention crops (1), captions and candidate concepts, with the
caption phrases whose fidelity beats every candidate added (2), generated
images recorded and scored (3), labels chosen by fidelity and the dissect
score (4). The run loop writes each chunk (5).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from builder.backends.interfaces import Captioner, Generator, Similarity, Summarizer
from builder.backends.registry import (
    captioners,
    create_backend,
    generators,
    similarities,
    summarizers,
)
from builder.cache import ContentCache, pack_arrays, unpack_arrays
from builder.config import BuildConfig
from builder.pipeline.crops import chunk_evidence
from builder.pipeline.describe import (
    caption_evidence,
    caption_key,
    evidence_images,
    propose_candidates,
)
from builder.pipeline.dissect import (
    Generated,
    embed_images,
    generate_and_record,
    prompt_template,
    score_candidates,
    unit_column,
)
from builder.pipeline.fidelity import FidelitySample, build_sample, fidelity_candidates
from builder.pipeline.labeler import Labeler, Recording
from builder.pipeline.labels import Label, choose_by_fidelity, choose_labels, interpretability
from builder.pipeline.record import LayerRecord, changed_sources, record_key, record_topk
from builder.pipeline.records import Calls, ModelRun, ModelSummary, NeuronKey
from builder.pipeline.write import evidence_rows, generated_thumbnail
from query.embedder import get_embedder
from query.schema import COUNTED_STAGES
from query.writer import CandidateRow, NeuronResult


class TopKRecording(Recording):
    """Step 0 of DnD: each layer's streaming top-M and activation range."""

    def __init__(self, records: dict[str, LayerRecord], layers: Sequence[str], n_images: int, n_skipped: int,
                 images_per_s: float, sample: np.ndarray) -> None:
        self.records = records
        self.layers = [(lay, records[lay].kind, records[lay].n_units) for lay in layers]
        self.n_images, self.n_skipped, self.images_per_s = n_images, n_skipped, images_per_s
        self.sample = sample

    def extremes(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        return self.records[layer].max_act, self.records[layer].min_act

    def sample_acts(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        vals = {lay: r.sample_vals for lay, r in self.records.items() if r.sample_vals is not None}
        if not vals or not len(self.sample):
            return self.sample[:0], {}
        ok = ~np.isnan(next(iter(vals.values()))).any(axis=1)  # a sample image the model could read
        return self.sample[ok], {lay: v[ok] for lay, v in vals.items()}


class DnDLabeler(Labeler):
    """Describe-and-Dissect, with the backends the config names."""

    name = "dnd"
    write_stage = "score_write"

    def __init__(self, cfg: BuildConfig) -> None:
        self.cfg = cfg

    def open(self, cache: ContentCache) -> dict[str, Any]:
        cfg = self.cfg
        self.similarity: Similarity = create_backend(
            similarities, cfg.dissect.similarity, cfg.dissect.similarity_options, device=cfg.device)
        self.summarizer: Summarizer = create_backend(
            summarizers, cfg.describe.summarizer, cfg.describe.summarizer_options)
        self.generator: Generator | None = (
            create_backend(generators, cfg.dissect.generator, cfg.dissect.generator_options, device=cfg.device)
            if cfg.dissect.enabled else None)
        self.template = prompt_template(cfg.dissect.prompt_template)
        captioners.factory(cfg.describe.captioner)  # made per model later: a typo fails now, before any write
        describe = getattr(self.similarity, "describe", None)
        return {
            "similarity": describe() if describe else self.similarity.name,
            "similarity_config": self.similarity.config_key(),
            "summarizer_config": self.summarizer.config_key(),
            "generator_config": self.generator.config_key() if self.generator else None,
        }

    def record(self, run: ModelRun, stats: ModelSummary) -> TopKRecording:
        """Step 0: the streaming top-M recording, computed once per model,
        probe set, layers and summary."""
        cfg, m = run.cfg, run.model

        def compute(_: list[str]) -> list[bytes]:
            records, rs = record_topk(run.target, run.probe, m.layers, cfg.record.top_k * cfg.record.margin,
                                      run.summary, m.vit_tokens, cfg.record.batch_size, cfg.record.num_workers,
                                      run.sample)
            arrays: dict[str, np.ndarray] = {}
            for i, lay in enumerate(m.layers):
                arrays.update(records[lay].to_arrays(f"{i}_"))
            arrays["stats"] = np.array([rs.images, rs.skipped, rs.images_per_s], dtype=np.float64)
            return [pack_arrays(**arrays)]

        got, _ = run.cache.fetch("record", {"record": record_key(run)}, compute)
        arrays = unpack_arrays(got["record"])
        records = {lay: LayerRecord.from_arrays(lay, arrays, f"{i}_") for i, lay in enumerate(m.layers)}
        n_images, n_skipped, per_s = arrays["stats"][:3]
        return TopKRecording(records, m.layers, int(n_images), int(n_skipped), float(per_s), run.sample)

    def captioner(self, run: ModelRun) -> Captioner:
        """The model's captioner (it may read the probe folder), made once per model."""
        if getattr(self, "_captioner_for", None) != run.name:
            cfg = run.cfg
            self._captioner_obj = create_backend(captioners, cfg.describe.captioner, cfg.describe.captioner_options,
                                                 probe_dir=str(run.probe.root), device=cfg.device)
            self._captioner_for = run.name
        return self._captioner_obj

    def fidelity_sample(self, run: ModelRun, rec: Recording) -> FidelitySample | None:
        images, acts = rec.sample_acts()
        if not len(images):
            return None
        return build_sample(run, images, acts, self.captioner(run), self.similarity, get_embedder(run.cfg.embedder))

    def label(self, run: ModelRun, rec: Recording, neurons: list[NeuronKey], stats: ModelSummary,
              fid: FidelitySample | None = None) -> Iterator[list[NeuronResult]]:
        cfg = run.cfg
        for start in range(0, len(neurons), cfg.chunk_size):
            yield self._chunk(run, rec, self.captioner(run), neurons[start : start + cfg.chunk_size], stats, fid)

    def _chunk(self, run: ModelRun, rec: TopKRecording, captioner: Captioner, chunk: list[NeuronKey],
               stats: ModelSummary, fid: FidelitySample | None) -> list[NeuronResult]:
        """Steps 1-4 for one chunk of neurons, every model call batched across it."""
        calls = Calls(chunk, COUNTED_STAGES)
        all_neurons = chunk
        # a probe file that vanished or changed since recording fails the neurons showing it, not the build
        gone = changed_sources(run.probe, rec.records, chunk, run.cfg.record.top_k)
        chunk = [n for n in chunk if n not in gone]
        with stats.timed("crops"):
            ce = chunk_evidence(run, rec.records, chunk)
        evidence = ce.evidence
        for n in chunk:
            calls.counts[n]["target_forward_images"] = list(ce.forwards[n])
        images = evidence_images(run, chunk, evidence)
        with stats.timed("caption"):
            captions = caption_evidence(run, captioner, chunk, evidence, images, calls)
            stats.missing_captions += sum(c is None for n in chunk for c in captions[n])
        with stats.timed("summarize"):
            candidates, failures = propose_candidates(run, self.summarizer, chunk, captions, calls)
            failures.update(gone)
        sources = {n: ["summarizer"] * len(c) for n, c in candidates.items()}
        if fid is not None:
            with stats.timed("fidelity"):
                have = {n: [c for c in captions[n] if c is not None] for n in candidates}
                for n, extra in fidelity_candidates(fid, candidates, have, run.cfg).items():
                    candidates[n] += [p for p, _ in extra]
                    sources[n] += [src for _, src in extra]
        with stats.timed("embed"):
            ev_emb = embed_images(run, self.similarity, images)
        gen = None
        if self.generator is not None and candidates:
            gen = generate_and_record(run, self.generator, self.similarity, self.template, candidates, calls,
                                      stats.timed)
        with stats.timed("score_write"):
            texts = sorted({c for cands in candidates.values() for c in cands})
            text_emb = dict(zip(texts, self.similarity.embed_texts(texts))) if texts else {}
            results = []
            for n in all_neurons:
                max_act = float(rec.records[n[0]].max_act[n[1]])
                if n in failures:
                    results.append(NeuronResult(run.name, n[0], n[1], "failed", failures[n], max_act,
                                                calls=calls.of(n)))
                    continue
                probe_emb = np.stack([ev_emb[run.evidence_key(e)] for e in evidence[n]])
                with stats.timed("fidelity"):
                    labels, cand_rows = self._labels(run, rec, n, candidates[n], sources[n], gen, probe_emb,
                                                     text_emb, fid)
                keys = [caption_key(run.evidence_key(e), captioner) if c is not None else None
                        for e, c in zip(evidence[n], captions[n])]
                results.append(NeuronResult(
                    run.name, n[0], n[1], "ok", None, max_act, interpretability(probe_emb), labels, cand_rows,
                    evidence_rows(run, evidence[n], captions[n], keys, captioner.name, ce.heatmaps.get(n)),
                    calls.of(n), ce.dropped.get(n)))
        return results

    def _labels(self, run: ModelRun, rec: TopKRecording, n: NeuronKey, cands: list[str], sources: list[str],
                gen: Generated | None, probe_emb: np.ndarray, text_emb: dict[str, np.ndarray],
                fid: FidelitySample | None) -> tuple[tuple, tuple]:
        """Steps 3c-4 for one neuron: its candidates' scores, fidelity and rows, and its labels."""
        cfg = run.cfg.labels
        temb = np.stack([text_emb[c] for c in cands])
        scores = None
        if gen is not None:
            column = unit_column(run, {lay: k for lay, _, k in rec.layers}, n)
            scores = score_candidates(run, gen, self.template, cands, column, probe_emb)
        fids = fid.score(cands, *n) if fid is not None else None
        if fids is not None and cfg.selection == "fidelity":
            rank_of = choose_by_fidelity(
                cfg, cands, [f.correlation for f in fids], [s.score for s in scores] if scores else None, temb,
                lambda idx: fid.set_score([cands[i] for i in idx], *n).correlation,
                first_eligible=[src != "complement" for src in sources])
        else:  # the paper's selection (or, without generated images, the summarizer's order)
            rank_of = choose_labels(cfg, cands, scores, temb)
        rows = []
        for i, c in enumerate(cands):
            s = scores[i] if scores else None
            samples = tuple(generated_thumbnail(run, k, gen.images[k])
                            for k in gen.keys[self.template.format(concept=c)][:3]) if gen else ()
            rows.append(CandidateRow(
                i, c, s.topk_squared if s else None, s.image_products if s else None, s.score if s else None,
                rank_of.get(i), samples, fids[i].correlation if fids else None, fids[i].auprc if fids else None,
                sources[i]))
        labels = tuple(Label(r, cands[i], scores[i].score if scores else None,
                             fids[i].correlation if fids else None, fids[i].auprc if fids else None)
                       for i, r in sorted(rank_of.items(), key=lambda kv: kv[1]))
        return labels, tuple(rows)

