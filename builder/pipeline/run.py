"""The run loop every labeler uses: one build, model by model.

For each model of the config: load it (step "load"), record it over its
probe set (step 0, the labeler's ``record``), write its row and layers,
mark its dead neurons, then label its live neurons chunk by chunk (steps
1-4, the labeler's ``label``) and write each chunk as it comes (step 5:
label vectors embedded in one batch, each neuron in its own transaction).
A killed build, started again, skips the neurons already written and finds
everything it already paid for in the content cache.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from builder.atlas_embedder import carried_embedder_meta
from builder.backends.targets import (
    fit_to_probe,
    load_target,
    resolve_device,
    resolve_dtype,
    target_fingerprint,
)
from builder.cache import ContentCache
from builder.config import BuildConfig, ModelConfig
from builder.errors import ConfigError
from builder.pipeline.clip_dissect import ClipDissectLabeler
from builder.pipeline.dnd import DnDLabeler
from builder.pipeline.fidelity import FidelitySample, choose_sample, layer_summary
from builder.pipeline.labeler import Labeler, Recording
from builder.pipeline.neurons import check_units, is_dead, todo_neurons
from builder.pipeline.plan import unit_counts
from builder.pipeline.records import BuildSummary, ModelRun, ModelSummary, NeuronKey
from builder.pipeline.resume import build_meta, check_probe, check_resume
from builder.pipeline.write import remove_stale_temp_files, with_label_vectors
from builder.probe import ProbeSet
from builder.progress import progress
from query.embedder import get_embedder
from query.index import build_index
from query.writer import AtlasWriter, NeuronResult

log = logging.getLogger(__name__)

LABELERS: dict[str, type[Labeler]] = {"dnd": DnDLabeler, "clip-dissect": ClipDissectLabeler}
DEAD_REASON = "constant activation over the probe set"
FIDELITY_STAGE = "fidelity_captioner_images"  # the fidelity sample's captions, in call_counts


def build(cfg: BuildConfig, cache_enabled: bool = True, labeler: Labeler | None = None) -> BuildSummary:
    """Build (or resume) the atlas ``cfg.out`` for every model of ``cfg``,
    labelled by ``labeler`` (default: the one the config names, DnD or the
    CLIP-Dissect baseline). ``cache_enabled=False`` recomputes every result
    (and still stores it)."""
    t_start = time.perf_counter()
    if labeler is None:
        if cfg.labeler not in LABELERS:
            raise ConfigError(f"unknown labeler {cfg.labeler!r}; choose one of {', '.join(LABELERS)}")
        labeler = LABELERS[cfg.labeler](cfg)
    out = Path(cfg.out)
    writer = AtlasWriter(out)
    try:
        if n_stale := remove_stale_temp_files(writer.dir / "images"):  # left by a build killed mid-write
            log.info("removed %d temp files of an earlier, killed build", n_stale)
        check_resume(writer, cfg)
        labeler.check_resume(writer.meta())
        embedder = get_embedder(cfg.embedder)
        cache = ContentCache(Path(cfg.cache_dir or out / "cache") / "cache.sqlite", enabled=cache_enabled)
        try:
            extra = labeler.open(cache)
            writer.set_meta(**build_meta(cfg, writer.meta(), embedder), **extra)
            writer.set_meta(**carried_embedder_meta(out, cfg.embedder, cfg.embedder_quantize))
            summaries = [_build_model(cfg, m, labeler, writer, cache, embedder) for m in cfg.models]
            log.info("FAISS index over %d labels written", build_index(out))
            writer.set_meta(ground_truth=writer.meta().get("ground_truth", {}))
        finally:
            labeler.close()
            cache.close()
    finally:
        writer.close()
    return BuildSummary(str(out), summaries, time.perf_counter() - t_start)


def load_model(cfg: BuildConfig, m: ModelConfig, cache: ContentCache, images_dir: Path) -> ModelRun:
    """Load model ``m``'s target (layers checked), scan its probe set and
    fingerprint its weights."""
    device = resolve_device(cfg.device)
    target = load_target(m.name, m.target, m.target_options, device, resolve_dtype(cfg.dtype, device))
    target.check_layers(m.layers)
    if m.units:  # before recording: units that select nothing are a config error, not an empty build
        check_units(m, unit_counts(target, m.layers))
    probe = ProbeSet.scan(m.probe, max_pixels=cfg.record.max_image_pixels)
    target = fit_to_probe(target, probe)  # a preprocess that keeps sizes gets one size for every image
    sample = (choose_sample(len(probe), cfg.fidelity.sample_size, cfg.fidelity.seed) if cfg.fidelity.enabled
              else np.zeros(0, np.int64))
    return ModelRun(cfg, m, target, probe, target_fingerprint(target, m.target, m.target_options),
                    m.summary or cfg.record.summary, cache, images_dir, sample)


def _build_model(
    cfg: BuildConfig, m: ModelConfig, labeler: Labeler, writer: AtlasWriter, cache: ContentCache, embedder,
) -> ModelSummary:
    stats = ModelSummary(m.name)
    writer.release()  # loading and recording take long: let other processes read meanwhile
    with stats.timed("load"):
        run = load_model(cfg, m, cache, writer.dir / "images")
        check_probe(writer, run)  # a resume whose probe folder changed is refused, naming the changes
    with stats.timed("record"):
        rec = labeler.record(run, stats)
        _write_model(run, rec, labeler, writer)
    stats.skipped_images, stats.images_per_s = rec.n_skipped, rec.images_per_s
    if rec.n_skipped:
        log.warning("%s: %d probe files were not readable images and were skipped", m.name, rec.n_skipped)
    # failed neurons are not done: a resume asks again for them (their rows stay until replaced)
    failed_before = set(writer.failed_units(m.name))
    todo = todo_neurons(m, [(lay, n) for lay, _, n in rec.layers], cfg.shard, writer.done_units(m.name))
    stats.retried = sum(n in failed_before for n in todo)
    extremes = {lay: rec.extremes(lay) for lay, _, _ in rec.layers}
    dead = {n for n in todo if is_dead(extremes[n[0]][0][n[1]], extremes[n[0]][1][n[1]])}
    writer.write_neurons(NeuronResult(m.name, lay, u, "dead", DEAD_REASON, float(extremes[lay][0][u]))
                         for lay, u in todo if (lay, u) in dead)
    stats.dead += len(dead)
    stats.neurons += len(dead)
    live = [n for n in todo if n not in dead]
    try:
        fid = None
        if live and cfg.fidelity.enabled:
            writer.release()  # the sample is captioned first: readers get in meanwhile
            with stats.timed("fidelity"):
                fid = labeler.fidelity_sample(run, rec)
        if live:
            _label(run, rec, live, labeler, writer, embedder, stats, fid)
        stats.still_failed = len(failed_before & set(writer.failed_units(m.name)) & set(todo))
        if fid is not None:
            with stats.timed("fidelity"):
                _write_layer_fidelity(run, writer, fid)
    finally:
        for stage, secs in stats.seconds.items():
            writer.add_stage_time(m.name, stage, secs)
    return stats


def _write_model(run: ModelRun, rec: Recording, labeler: Labeler, writer: AtlasWriter) -> None:
    """The model's row, its layers and the ground truth its target declares."""
    m = run.model
    config = {"target": m.target, "target_options": m.target_options, "layers": list(m.layers),
              "summary": run.summary, "vit_tokens": m.vit_tokens, "input_size": run.target.input_size,
              **labeler.model_config()}
    writer.upsert_model(m.name, m.target, str(run.probe.root), rec.n_images, rec.n_skipped, config, rec.layers)
    known = {lay: info for lay, info in run.target.ground_truth.items() if lay in m.layers}
    if known:
        gt = writer.meta().get("ground_truth", {})
        gt[m.name] = known
        writer.set_meta(ground_truth=gt)


def _label(
    run: ModelRun, rec: Recording, live: list[NeuronKey], labeler: Labeler, writer: AtlasWriter, embedder,
    stats: ModelSummary, fid: FidelitySample | None,
) -> None:
    bar = progress(total=len(live), desc=f"{labeler.name} {run.name}", unit="neuron")
    sample_calls = fid.calls if fid is not None else None
    try:
        writer.release()  # the labeler computes a chunk before it yields it: readers get in then
        for results in labeler.label(run, rec, live, stats, fid):
            if sample_calls is not None and results:  # the sample's captions, charged to the first neuron
                results[0].calls[FIDELITY_STAGE] = sample_calls
                sample_calls = None
            with stats.timed(labeler.write_stage):
                writer.write_neurons(with_label_vectors(results, embedder))
                writer.release()
            for r in results:
                stats.tally(r.calls)
            stats.neurons += len(results)
            stats.ok += sum(r.status == "ok" for r in results)
            stats.failed += sum(r.status == "failed" for r in results)
            bar.update(len(results))
            log.info("%s: wrote %d of %d neurons", run.name, stats.ok + stats.failed, len(live))
    finally:
        bar.close()


def _write_layer_fidelity(run: ModelRun, writer: AtlasWriter, fid: FidelitySample) -> None:
    """Each layer's mean label fidelity and its chance level (shuffled labels),
    over every 'ok' neuron the atlas holds for the model (earlier runs too)."""
    texts = writer.label_texts(run.name)
    for layer in run.layers:
        if layer not in fid.acts:
            continue
        labels = {u: t[0] for (lay, u), t in texts.items() if lay == layer and t}
        writer.replace_layer_fidelity(run.name, layer, layer_summary(fid, layer, labels, run.cfg.fidelity.shuffles,
                                                                     run.cfg.fidelity.seed))
