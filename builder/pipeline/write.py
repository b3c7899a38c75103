"""Step 5: write. What the atlas stores about a neuron, assembled from the
stages' results: thumbnails of its evidence (crop boxes drawn) and of its
candidates' generated images, content-addressed and written once; its
evidence and candidate rows; and the vectors of its labels, embedded in one
batch per chunk just before the chunk's neurons are written, each in its
own transaction (``query.writer.AtlasWriter``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from builder.pipeline.records import EvidenceItem, ModelRun
from query.writer import EvidenceRow, LabelRow, NeuronResult

THUMB_SIZE = 128


def fit_thumbnail(im: Image.Image, size: int = THUMB_SIZE) -> Image.Image:
    """``im`` scaled so its longer side is ``size`` (nearest-neighbour when
    enlarging, so small probe images stay crisp)."""
    scale = size / max(im.size)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(new, Image.NEAREST if scale > 1 else Image.LANCZOS)


TEMP_GLOB = ".*.tmp"  # the temp names of save_image_atomic: .NAME.PID.tmp


def save_image_atomic(im: Image.Image, path: Path) -> None:
    """Write ``im`` as WebP through a temp name and a rename, so a killed
    build never leaves a half-written thumbnail under its final name; a
    failed write (a full disk, Ctrl-C) removes its temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        im.save(tmp, format="WEBP", quality=80)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temp_files(images_dir: Path) -> int:
    """Delete the temp files that builds killed mid-write (``kill -9``, a
    power cut) left under ``images_dir``; returns how many. Call it only
    while holding the atlas for writing, so no live build owns them."""
    removed = 0
    if not images_dir.is_dir():
        return 0
    for tmp in images_dir.rglob(TEMP_GLOB):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def evidence_thumbnail(run: ModelRun, e: EvidenceItem) -> str:
    """The atlas path of an evidence image's thumbnail (its crop box drawn),
    written the first time any neuron needs it."""
    name = f"ev/{run.evidence_key(e)[:20]}.webp"
    path = run.images_dir / name
    if not path.exists():
        src = run.probe.open(e.image)
        im = fit_thumbnail(src)
        if e.box is not None:
            sx = im.width / src.width
            x0, y0, x1, y1 = (int(round(v * sx)) for v in e.box)
            ImageDraw.Draw(im).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 0, 0), width=2)
        save_image_atomic(im, path)
    return f"images/{name}"


def generated_thumbnail(run: ModelRun, key: str, image: Image.Image) -> str:
    """The atlas path of a generated image's thumbnail, written once."""
    name = f"gen/{key[:20]}.webp"
    path = run.images_dir / name
    if not path.exists():
        save_image_atomic(fit_thumbnail(image), path)
    return f"images/{name}"


def evidence_rows(
    run: ModelRun, evidence: Sequence[EvidenceItem], captions: Sequence[str | None],
    caption_keys: Sequence[str | None], captioner: str | None, heatmaps: dict[int, str] | None = None,
) -> tuple[EvidenceRow, ...]:
    """A neuron's evidence rows, rank 1 first: thumbnails (the crop's, boxed,
    and its whole source image's), the source's size, captions and heatmaps."""
    heatmaps = heatmaps or {}
    return tuple(
        EvidenceRow(r, run.probe.files[e.image], e.box, e.activation, evidence_thumbnail(run, e),
                    key, cap, captioner if key is not None else None,
                    source_thumbnail=evidence_thumbnail(run, EvidenceItem(e.image, None, e.activation)),
                    source_size=run.image_size(e.image), heatmap=heatmaps.get(e.image))
        for r, (e, cap, key) in enumerate(zip(evidence, captions, caption_keys), 1)
    )


def with_label_vectors(results: Sequence[NeuronResult], embedder: Any) -> list[NeuronResult]:
    """The results with every label's vector (one embedding batch for all)."""
    texts = [lab.text for r in results for lab in r.labels]
    vecs = iter(embedder.embed(texts)) if texts else iter(())
    return [
        dataclasses.replace(r, labels=tuple(
            LabelRow(lab.rank, lab.text, lab.concept_score, next(vecs), getattr(lab, "fidelity_correlation", None),
                     getattr(lab, "fidelity_auprc", None))
            for lab in r.labels))
        for r in results
    ]

