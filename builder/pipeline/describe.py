"""Step 2: describe. Caption each neuron's top-K images and crops (2a), then
ask the summarizer for N distinct candidate concepts covering most of the
captions (2b).

Captions are cached per (image content, box, captioner) and summaries per
(captions, N, summarizer), so a caption shared by several neurons, or a
neuron whose captions repeat another's, costs one call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from builder.backends.extractive import normalize_concept
from builder.backends.interfaces import Captioner, CaptionItem, Summarizer
from builder.cache import content_key
from builder.errors import BackendError, BuildError
from builder.pipeline.crops import crop_image
from builder.pipeline.records import Calls, EvidenceItem, ModelRun, NeuronKey


def evidence_images(
    run: ModelRun, chunk: Sequence[NeuronKey], evidence: dict[NeuronKey, list[EvidenceItem]]
) -> dict[str, Image.Image]:
    """The chunk's evidence images (probe images and crops resized to the
    model's input) by evidence key; each probe file is read once."""
    images: dict[str, Image.Image] = {}
    sources: dict[int, Image.Image] = {}
    for n in chunk:
        for e in evidence[n]:
            k = run.evidence_key(e)
            if k not in images:
                if e.image not in sources:
                    sources[e.image] = run.probe.open(e.image)
                images[k] = crop_image(sources[e.image], e.box, run.target.input_size)
    return images


def caption_key(evidence_key: str, captioner: Captioner) -> str:
    """Content key of an evidence image's caption by ``captioner``."""
    return content_key("caption", evidence_key, captioner.config_key())


class NoCaption(Exception):
    """What the cache hands back for an image the captioner has no caption
    for (an Exception value is returned but never stored: asked again next build)."""


def caption_items(
    run: ModelRun, captioner: Captioner, items: dict[str, CaptionItem | Callable[[], CaptionItem]]
) -> tuple[dict[str, str | None], set[str]]:
    """One caption per evidence key (cached per image content, box and
    captioner; an item may be a function making it, called only when the
    caption must be made), None where the captioner has none; returns the
    captions and the keys made now."""
    keys = {k: caption_key(k, captioner) for k in items}
    bs = run.cfg.describe.batch_size

    def compute(missing: list[str]) -> list[Any]:
        texts: list[Any] = []
        for i in range(0, len(missing), bs):
            part = missing[i : i + bs]
            got = captioner.caption([it() if callable(it) else it for it in (items[k] for k in part)])
            if len(got) != len(part):
                raise BuildError(f"captioner {captioner.name!r} returned {len(got)} captions for {len(part)} images")
            texts += [NoCaption() if t is None else str(t) for t in got]
        return texts

    caps, fresh = run.cache.fetch("caption", keys, compute, encode=str.encode, decode=bytes.decode)
    return ({k: None if isinstance(c, NoCaption) else c for k, c in caps.items()},
            {k for k in items if keys[k] in fresh})


def caption_evidence(
    run: ModelRun, captioner: Captioner, chunk: Sequence[NeuronKey],
    evidence: dict[NeuronKey, list[EvidenceItem]], images: dict[str, Image.Image], calls: Calls,
) -> dict[NeuronKey, list[str | None]]:
    """Step 2a: one caption per evidence item of every neuron of the chunk,
    in evidence order; each distinct image is captioned once. None where the
    captioner has no caption (an image missing from ``captions.jsonl``): the
    neuron is described from its other images."""
    item_of: dict[str, CaptionItem] = {}
    for n in chunk:
        for e in evidence[n]:
            k = run.evidence_key(e)
            item_of.setdefault(k, CaptionItem(images[k], run.probe.files[e.image], e.box))
    caps, fresh = caption_items(run, captioner, {k: item_of[k] for k in images})
    charged: set[str] = set()
    for n in chunk:
        for e in evidence[n]:
            k = run.evidence_key(e)
            calls.charge(n, "captioner_images", k in fresh and k not in charged)
            charged.add(k)
    return {n: [caps[run.evidence_key(e)] for e in evidence[n]] for n in chunk}


def caption_probe_images(
    run: ModelRun, captioner: Captioner, items: Sequence[EvidenceItem]
) -> tuple[list[str | None], tuple[int, int]]:
    """Captions of whole probe images (the fidelity sample; None where the
    captioner has none), with the (made, cached) captioner calls; shared with
    evidence captions by key."""
    keyed = {run.evidence_key(e): e for e in items}
    caps, fresh = caption_items(run, captioner, {
        k: (lambda e=e: CaptionItem(run.probe.open(e.image), run.probe.files[e.image], None))
        for k, e in keyed.items()})
    return [caps[run.evidence_key(e)] for e in items], (len(fresh), len(keyed) - len(fresh))


def propose_candidates(
    run: ModelRun, summarizer: Summarizer, chunk: Sequence[NeuronKey],
    captions: dict[NeuronKey, list[str | None]], calls: Calls,
) -> tuple[dict[NeuronKey, list[str]], dict[NeuronKey, str]]:
    """Step 2b: up to N normalized, distinct candidate concepts per neuron
    (from the captions there are: None marks an image without one), and the
    reason of every neuron the summarizer failed or that has no caption."""
    n_cand = run.cfg.describe.n_candidates
    failures: dict[NeuronKey, str] = {}
    for n in chunk:
        if all(c is None for c in captions[n]):
            failures[n] = f"the captioner has no caption for any of the neuron's {len(captions[n])} top images"
    chunk = [n for n in chunk if n not in failures]
    captions = {n: [c for c in captions[n] if c is not None] for n in chunk}
    keys = {n: content_key("summarize", captions[n], n_cand, summarizer.config_key()) for n in chunk}
    usage: dict[NeuronKey, dict[str, int]] = {}

    def compute(todo: list[NeuronKey]) -> list[Any]:
        answers = summarizer.summarize_many([captions[n] for n in todo], n_cand)
        for n, u in zip(todo, getattr(summarizer, "last_item_usage", None) or []):
            usage[n] = dict(u)
        # an answer with no concept is a failure too: an Exception, which the cache never stores
        return [a if isinstance(a, Exception) or _concepts(a, n_cand) else _NoConcept() for a in answers]

    got, fresh = run.cache.fetch("summarize", keys, compute, encode=lambda v: json.dumps(v).encode(),
                                 decode=json.loads)
    candidates: dict[NeuronKey, list[str]] = {}
    asked: set[str] = set()
    for n in chunk:
        if n in usage:  # a remote summarizer counted its HTTP requests (re-asks too) and tokens
            calls.charge(n, "summarizer_requests", True, usage[n]["requests"])
            if "tokens" in usage[n]:
                calls.charge(n, "summarizer_tokens", True, usage[n]["tokens"])
        else:
            calls.charge(n, "summarizer_requests", keys[n] in fresh and keys[n] not in asked)
        asked.add(keys[n])
        answer = got[n]
        if isinstance(answer, Exception) and not isinstance(answer, _NoConcept):
            failures[n] = f"summarizer failed: {failure_text(answer)}"
        elif not isinstance(answer, Exception) and (cands := _concepts(answer, n_cand)):
            candidates[n] = cands
        else:  # no concept (a cached answer of an earlier version may hold none)
            failures[n] = "the summarizer proposed no concept"
    return candidates, failures


class _NoConcept(Exception):
    """The summarizer's answer held no concept (never cached, so a resume asks again)."""


def _concepts(answer: Sequence[str], n_cand: int) -> list[str]:
    """The first ``n_cand`` distinct normalized concepts of an answer."""
    return list(dict.fromkeys(c for c in (normalize_concept(str(a)) for a in answer) if c))[:n_cand]


REASON_CHARS = 500


def failure_text(exc: BaseException) -> str:
    """One line, at most ``REASON_CHARS`` long, saying what a failure was: the
    exception's message (its type when it has none, or when it is not a
    ``BackendError``, whose messages are written for users)."""
    text = " ".join(str(exc)[: 4 * REASON_CHARS].split())
    if not isinstance(exc, BackendError) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."
