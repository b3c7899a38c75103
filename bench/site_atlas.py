"""Synthetic atlases for the site benchmark, written directly with SQL.

An atlas of ``n_layers x units`` neurons whose evidence is drawn from a probe
set of ``n_probe`` source images (each neuron's top-10 picked from it, so
images are shared between neurons as in a real atlas) and whose candidate
concepts come from a vocabulary of ``n_concepts`` (3 generated samples per
concept, shared by every neuron that proposes it, as the builder's cache
does). With ``photo=True`` every image is a distinct 128-px WebP of noisy,
natural-looking content at the weight of a real photograph (3-6 KB);
otherwise all image names are hard links to a few tiny files, so only the
site's own data is measured. Label vectors are random unit vectors
(embedding 750,000 labels would dominate the run and measures nothing about
the site).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ADJ = ("striped", "dotted", "red", "blue", "green", "furry", "shiny", "wooden", "metal", "round",
       "square", "wet", "snowy", "dark", "bright", "checkered", "curly", "spotted", "glass", "tiny")
NOUN = ("dog", "cat", "circle", "square", "sky", "grass", "brick wall", "wheel", "face", "text",
        "water", "tree", "cross", "ring", "star", "fur", "car", "bird", "window", "leaf")
PLACE = ("beach", "street", "field", "kitchen", "forest", "table", "road", "lake", "room", "wall")
STAGES = ("captioner_images", "summarizer_requests", "generated_images", "target_forward_images")
TOP_K = 10
N_CANDIDATES = 5
N_SAMPLES = 3
THUMB = 128


@dataclass(frozen=True)
class BenchAtlas:
    """The shape of a generated atlas (what the benchmark names and prints)."""

    n_layers: int
    units: int
    n_probe: int
    n_concepts: int
    photo: bool = False
    dim: int = 384
    seed: int = 0

    @property
    def n_units(self) -> int:
        return self.n_layers * self.units


def concept_text(c: int) -> str:
    """Concept ``c`` of the vocabulary: 'adjective noun', then 'adjective noun at a place'."""
    a, n, p = c % len(ADJ), (c // len(ADJ)) % len(NOUN), c // (len(ADJ) * len(NOUN))
    text = f"{ADJ[a]} {NOUN[n]}"
    return text if p == 0 else f"{text} at a {PLACE[(p - 1) % len(PLACE)]}"


def _name(kind: str, i: int) -> str:
    return hashlib.blake2b(f"{kind}{i}".encode(), digest_size=10).hexdigest()


def probe_thumb(i: int) -> str:
    """Atlas path of source image ``i``'s thumbnail (content-addressed like the builder's)."""
    return f"images/ev/{_name('probe', i)}.webp"


def sample_thumb(c: int, s: int) -> str:
    """Atlas path of generated sample ``s`` of concept ``c``."""
    return f"images/gen/{_name(f'gen{s}-', c)}.webp"


# -- images --------------------------------------------------------------------------


def _field(rng: np.random.Generator, w: int, h: int, octaves, detail: float = 1.0) -> np.ndarray:
    from PIL import Image

    out = np.zeros((h, w), np.float32)
    for s, amp in octaves:
        small = rng.normal(0, 1, (max(2, s * h // w), s)).astype(np.float32)
        up = np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BICUBIC))
        out += up * amp * (detail if s >= 24 else 1.0)
    return out


def photo_like(rng: np.random.Generator, w: int = THUMB, h: int = 96):
    """A PIL image that compresses like a photograph: 1/f luminance noise, a few soft-edged
    objects, low-saturation colour, sensor grain (128x96 WebP q80: ~3-5 KB)."""
    from PIL import Image, ImageDraw, ImageFilter

    lum = _field(rng, w, h, ((3, 45), (6, 28), (12, 20), (24, 17), (48, 15), (96, 12)),
                 rng.uniform(1.0, 1.6))
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 4))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 40)
        box = [x - r, y - r * rng.uniform(.5, 1.5), x + r, y + r * rng.uniform(.5, 1.5)]
        (draw.ellipse if rng.random() < .6 else draw.rectangle)(box, fill=int(rng.integers(60, 255)))
    soft = np.asarray(mask.filter(ImageFilter.GaussianBlur(rng.uniform(.5, 2))), np.float32)
    lum += (soft - 80) * rng.uniform(.4, .9)
    chroma = np.stack([_field(rng, w, h, ((3, 1), (8, .5))) for _ in range(2)], -1)
    rgb = (rng.uniform(70, 170) + lum[..., None] * (1 + .15 * np.array([1, 0, -1]))
           + chroma[..., :1] * 18 * np.array([1, -.5, -.5])
           + chroma[..., 1:] * 14 * np.array([-.3, .6, -.3]) + rng.normal(0, .25, 3) * 30
           + rng.normal(0, rng.uniform(5, 12), (h, w, 1)))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _write_photos(args: tuple[list[str], int]) -> int:
    paths, seed = args
    rng = np.random.default_rng(seed)
    total = 0
    for path in paths:
        h = int(rng.choice([85, 96, 128]))
        photo_like(rng, THUMB, h).save(path, "WEBP", quality=80)
        total += os.path.getsize(path)
    return total


def write_images(atlas_dir: Path, paths: list[str], photo: bool, seed: int) -> int:
    """Write every image of ``paths`` (atlas-relative); returns their total bytes."""
    from PIL import Image

    for sub in {Path(p).parent for p in paths}:
        (atlas_dir / sub).mkdir(parents=True, exist_ok=True)
    full = [str(atlas_dir / p) for p in paths]
    if photo:
        parts = [(full[i::8], seed * 100 + i) for i in range(8)]
        with ProcessPoolExecutor(max_workers=2) as pool:
            return sum(pool.map(_write_photos, parts))
    pool_dir = atlas_dir / "bench-pool"
    pool_dir.mkdir()
    rng = np.random.default_rng(seed)
    tiny = []
    for i in range(16):
        path = pool_dir / f"{i}.webp"
        Image.new("RGB", (16, 16), tuple(int(c) for c in rng.integers(0, 255, 3))).save(path)
        tiny.append(path)
    for i, path in enumerate(full):
        os.link(tiny[i % len(tiny)], path)
    return sum(os.path.getsize(p) for p in full)


# -- tables --------------------------------------------------------------------------


# A cheap deterministic hash of three integer columns, in SQL.
_MIX_SQL = "((((({a}::BIGINT * 7919) % 2147483647) * 1000003 + {b}::BIGINT * 7921) % 2147483647 " \
           "* 1000003 + {c}::BIGINT * 7923) % 2147483647 * 48271) % 2147483647"


def _insert_arrow(con, table: str, columns: dict) -> None:
    import pyarrow as pa

    name = f"_bench_{table}"
    con.register(name, pa.table(columns))
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {name}")  # columns added later stay NULL
    finally:
        con.unregister(name)


def make_atlas(atlas_dir: Path, shape: BenchAtlas) -> dict[str, float]:
    """Write the atlas of ``shape`` into ``atlas_dir``; returns image counts and bytes."""
    import duckdb
    import pyarrow as pa

    from query.index import insert_label_vectors
    from query.schema import DB_FILE, label_id, migrate

    rng = np.random.default_rng(shape.seed)
    n_layers, units = shape.n_layers, shape.units
    probe = [probe_thumb(i) for i in range(shape.n_probe)]
    samples = [sample_thumb(c, s) for c in range(shape.n_concepts) for s in range(N_SAMPLES)]
    image_bytes = write_images(atlas_dir, probe + samples, shape.photo, shape.seed)
    con = duckdb.connect(str(atlas_dir / DB_FILE))
    try:
        migrate(con)
        meta = {"embedder": "minilm", "embedder_dim": shape.dim,
                "build_config": {"bench": True, "layers": n_layers, "units": units}}
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [(k, json.dumps(v)) for k, v in meta.items()])
        con.execute(f"INSERT INTO models VALUES ('resnet', 'bench', 'probe', {shape.n_probe}, 0, "
                    "'{}')")
        for li in range(n_layers):
            con.execute("INSERT INTO layers VALUES ('resnet', ?, ?, 'conv', ?)",
                        [f"layer{li + 1}", li, units])
        con.execute("CREATE TEMP TABLE probe (sid INTEGER, source VARCHAR, thumb VARCHAR)")
        _insert_arrow(con, "probe", {
            "sid": pa.array(range(shape.n_probe), pa.int32()),
            "source": [f"n{1440764 + i % 1000:08d}/ILSVRC2012_val_{i + 1:08d}.JPEG"
                       for i in range(shape.n_probe)],
            "thumb": probe})
        con.execute("CREATE TEMP TABLE concepts (cid INTEGER, text VARCHAR, samples VARCHAR)")
        _insert_arrow(con, "concepts", {
            "cid": pa.array(range(shape.n_concepts), pa.int32()),
            "text": [concept_text(c) for c in range(shape.n_concepts)],
            "samples": [json.dumps(samples[c * N_SAMPLES:(c + 1) * N_SAMPLES])
                        for c in range(shape.n_concepts)]})
        _tables(con, shape)
        _labels(con, shape, rng, label_id, insert_label_vectors)
    finally:
        con.close()
    return {"probe_images": shape.n_probe, "sample_images": len(samples),
            "image_bytes": image_bytes}


def _tables(con, shape: BenchAtlas) -> None:
    grid = f"FROM range({shape.n_layers}) t(li), range({shape.units}) s(u)"
    layer = "'layer' || (li + 1)"
    live = "u % 97 <> 0"
    con.execute(f"INSERT INTO neurons (model, layer, unit, status, reason, max_activation, interpretability) SELECT 'resnet', {layer}, u, "
                f"CASE WHEN {live} THEN 'ok' ELSE 'dead' END, "
                f"CASE WHEN {live} THEN NULL ELSE 'constant activation' END, "
                f"random() * 10, random() {grid}")
    words = [f"a photo of a {concept_text(i)} next to a {NOUN[(i * 7) % len(NOUN)]} on a "
             f"{PLACE[(i * 3) % len(PLACE)]}" for i in range(97)]
    con.execute(f"INSERT INTO captions SELECT 'c' || sid, source, NULL, NULL, NULL, NULL, "
                f"'bench', {words!r}[1 + sid % 97] || ' (' || sid || ')' FROM probe")
    sid = _MIX_SQL.format(a="li", b="u", c="k") + f" % {shape.n_probe}"
    con.execute(f"""INSERT INTO evidence (model, layer, unit, rank, source, x0, y0, x1, y1, activation, thumbnail, caption_key) SELECT 'resnet', {layer}, u, k, p.source,
                    CASE WHEN k % 2 = 0 THEN 8 * k END, CASE WHEN k % 2 = 0 THEN 4 * k END,
                    CASE WHEN k % 2 = 0 THEN 8 * k + 120 END,
                    CASE WHEN k % 2 = 0 THEN 4 * k + 90 END,
                    10.0 / k, p.thumb, 'c' || p.sid
                    {grid}, range(1, {TOP_K + 1}) e(k) JOIN probe p ON p.sid = {sid}
                    WHERE {live}""")
    cid = _MIX_SQL.format(a="li", b="u", c="q + 100") + f" % {shape.n_concepts}"
    con.execute(f"""INSERT INTO candidates (model, layer, unit, position, concept, topk_squared, image_products, score, selected_rank, samples) SELECT 'resnet', {layer}, u, q, c.text,
                    random() * 100, random(), random() * 5, CASE WHEN q < 3 THEN q + 1 END,
                    c.samples
                    {grid}, range({N_CANDIDATES}) e(q) JOIN concepts c ON c.cid = {cid}
                    WHERE {live}""")
    stages = ", ".join(f"('{s}')" for s in STAGES)
    con.execute(f"""INSERT INTO call_counts SELECT 'resnet', {layer}, u, stage, 10, 2
                    {grid}, (VALUES {stages}) v(stage) WHERE {live}""")


def _labels(con, shape: BenchAtlas, rng, label_id, insert_label_vectors) -> None:
    """Labels 1-3 = the candidates at positions 0-2 (as selected_rank says), with their vectors."""
    import pyarrow as pa

    rows = con.execute("SELECT layer, unit, selected_rank, concept, score FROM candidates "
                       "WHERE selected_rank IS NOT NULL ORDER BY layer, unit, selected_rank"
                       ).fetchall()
    ids = [label_id("resnet", ly, u, r) for ly, u, r, _, _ in rows]
    _insert_arrow(con, "labels", {
        "label_id": pa.array(ids, pa.int64()), "model": ["resnet"] * len(ids),
        "layer": [r[0] for r in rows], "unit": pa.array([r[1] for r in rows], pa.int32()),
        "rank": pa.array([r[2] for r in rows], pa.int32()), "text": [r[3] for r in rows],
        "concept_score": [r[4] for r in rows], "interpretability": [r[4] for r in rows]})
    for start in range(0, len(ids), 50_000):
        chunk = ids[start:start + 50_000]
        insert_label_vectors(con, chunk, rng.standard_normal((len(chunk), shape.dim),
                                                             dtype=np.float32))
