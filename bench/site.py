"""Site build at scale: a 25,000-neuron atlas written directly with SQL, then
``build_site`` (page generation + ``mkdocs build``) timed end to end.

Label vectors are random unit vectors (embedding 75,000 labels would dominate
the run and measures nothing about the site); thumbnails are a pool of 64
small images shared by every neuron, so the atlas stays a few MB while the
site still has 10 evidence images and 15 samples per neuron page.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

N_LAYERS = 5
UNITS_PER_LAYER = 5000
N_IMAGES = 64
WORDS = ("dog", "cat", "striped", "dotted", "circle", "square", "sky", "grass", "brick wall",
         "red", "blue", "wheel", "face", "text", "water", "tree", "cross", "ring", "star", "fur")


def make_atlas(atlas_dir: Path, n_layers: int = N_LAYERS, units: int = UNITS_PER_LAYER,
               dim: int = 384, seed: int = 0) -> int:
    """Write a synthetic atlas of ``n_layers * units`` neurons; returns the neuron count."""
    import duckdb
    import pyarrow as pa
    from PIL import Image

    from query.index import build_index, insert_label_vectors
    from query.schema import DB_FILE, label_id, migrate

    rng = np.random.default_rng(seed)
    (atlas_dir / "images/ev").mkdir(parents=True)
    (atlas_dir / "images/gen").mkdir(parents=True)
    for i in range(N_IMAGES):
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        Image.new("RGB", (64, 64), color).save(atlas_dir / f"images/ev/{i:03d}.webp")
        Image.new("RGB", (64, 64), color[::-1]).save(atlas_dir / f"images/gen/{i:03d}.webp")

    con = duckdb.connect(str(atlas_dir / DB_FILE))
    try:
        migrate(con)
        meta = {"embedder": "minilm", "embedder_dim": dim,
                "build_config": {"bench": True, "layers": n_layers, "units": units}}
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [(k, json.dumps(v)) for k, v in meta.items()])
        con.execute("INSERT INTO models VALUES ('resnet', 'bench', 'probe', 1000, 0, '{}')")
        for li in range(n_layers):
            con.execute("INSERT INTO layers VALUES ('resnet', ?, ?, 'conv', ?)",
                        [f"layer{li + 1}", li, units])
        grid = f"FROM range({n_layers}) t(li), range({units}) s(u)"
        layer = "'layer' || (li + 1)"
        con.execute(f"INSERT INTO neurons SELECT 'resnet', {layer}, u, "
                    "CASE WHEN u % 97 = 0 THEN 'dead' ELSE 'ok' END, "
                    "CASE WHEN u % 97 = 0 THEN 'constant activation' END, "
                    f"random(), random() {grid}")
        con.execute(f"""INSERT INTO captions SELECT 'c' || i, 'images/' || i || '.png',
                        NULL, NULL, NULL, NULL, 'bench',
                        'a photo of a ' || {list(WORDS)!r}[1 + i % {len(WORDS)}] || ' on a ' ||
                        {list(WORDS)!r}[1 + (i * 7) % {len(WORDS)}]
                        FROM range({N_IMAGES}) r(i)""")
        con.execute(f"""INSERT INTO evidence SELECT 'resnet', {layer}, u, k,
                        'images/' || ((u + k) % {N_IMAGES}) || '.png',
                        CASE WHEN k % 2 = 0 THEN 4 END, CASE WHEN k % 2 = 0 THEN 4 END,
                        CASE WHEN k % 2 = 0 THEN 40 END, CASE WHEN k % 2 = 0 THEN 40 END,
                        1.0 / k, 'images/ev/' || lpad(((u * 3 + k) % {N_IMAGES})::VARCHAR, 3, '0')
                        || '.webp', 'c' || ((u + k) % {N_IMAGES})
                        {grid}, range(1, 11) e(k) WHERE u % 97 <> 0""")
        con.execute(f"""INSERT INTO candidates SELECT 'resnet', {layer}, u, p,
                        {list(WORDS)!r}[1 + (u + p * 3) % {len(WORDS)}], random() * 100,
                        random(), random() * 5, CASE WHEN p < 3 THEN p + 1 END,
                        '["images/gen/' || lpad(((u + p) % {N_IMAGES})::VARCHAR, 3, '0') ||
                        '.webp", "images/gen/' || lpad(((u + p + 1) % {N_IMAGES})::VARCHAR, 3, '0')
                        || '.webp", "images/gen/' || lpad(((u + p + 2) % {N_IMAGES})::VARCHAR, 3,
                        '0') || '.webp"]'
                        {grid}, range(5) c(p) WHERE u % 97 <> 0""")
        con.execute(f"""INSERT INTO call_counts SELECT 'resnet', {layer}, u, stage, 10, 2
                        {grid}, (VALUES ('captioner_images'), ('summarizer_requests'),
                        ('generated_images'), ('target_forward_images')) v(stage)
                        WHERE u % 97 <> 0""")
        # Labels: 3 per live neuron, ids from the schema's hash; bulk-inserted through Arrow.
        keys = [(f"layer{li + 1}", u) for li in range(n_layers) for u in range(units) if u % 97]
        ids, layers_, units_, ranks, texts, scores = [], [], [], [], [], []
        for layer_name, u in keys:
            for rank in (1, 2, 3):
                ids.append(label_id("resnet", layer_name, u, rank))
                layers_.append(layer_name)
                units_.append(u)
                ranks.append(rank)
                texts.append(f"{WORDS[(u + rank) % len(WORDS)]} {WORDS[(u * rank) % len(WORDS)]}")
                scores.append(float(rng.random() * 5))
        table = pa.table({"label_id": pa.array(ids, pa.int64()), "model": ["resnet"] * len(ids),
                          "layer": layers_, "unit": pa.array(units_, pa.int32()),
                          "rank": pa.array(ranks, pa.int32()), "text": texts,
                          "concept_score": scores, "interpretability": scores})
        con.register("bench_labels", table)
        con.execute("INSERT INTO labels SELECT * FROM bench_labels")
        con.unregister("bench_labels")
        insert_label_vectors(con, ids, rng.standard_normal((len(ids), dim)).astype(np.float32))
        build_index(atlas_dir, con=con)
    finally:
        con.close()
    return n_layers * units


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run(n_layers: int = N_LAYERS, units: int = UNITS_PER_LAYER) -> dict[str, str]:
    """Build the site of a ``n_layers x units`` atlas; returns time, size and page count."""
    from atlas_site.build import build_site

    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
    os.environ.setdefault("DND_ATLAS_PROGRESS", "0")
    tmp = Path(tempfile.mkdtemp(prefix="dnd-site-bench-"))
    try:
        n = make_atlas(tmp / "atlas", n_layers, units)
        t = time.perf_counter()
        build_site(tmp / "atlas", tmp / "out")
        t_build = time.perf_counter() - t
        site = tmp / "out/site"
        pages = sum(1 for _ in site.rglob("*.html"))
        tag = f"{n // 1000}k"
        return {
            f"site_build_s_{tag}": f"{t_build:.1f}",
            f"site_size_mb_{tag}": f"{_size_mb(site):.0f}",
            f"site_pages_{tag}": str(pages),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key}: {value}")
