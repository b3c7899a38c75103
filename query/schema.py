"""The atlas format: ordered migrations over one DuckDB file.

An atlas directory holds ``atlas.duckdb`` (this schema), ``descriptions.faiss``
(cosine index over label embeddings, FAISS ids are ``labels.label_id``) and
``images/`` (thumbnails, crops with boxes drawn, generated samples; paths in
the tables are relative to the atlas directory).

Schema changes are appended to ``MIGRATIONS``, never edited in place: the
format version of an atlas is the number of migrations applied to it.
"""

from __future__ import annotations

import hashlib

import duckdb

from query.errors import FormatVersionError

DB_FILE = "atlas.duckdb"
INDEX_FILE = "descriptions.faiss"
IMAGES_DIR = "images"

NEURON_STATUSES = ("ok", "dead", "failed")
# Stages whose calls are counted per neuron (DESIGN.md, cost model).
COUNTED_STAGES = ("captioner_images", "summarizer_requests", "generated_images", "target_forward_images")

_V1 = [
    """CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)""",
    """CREATE TABLE models (
        model VARCHAR PRIMARY KEY,
        target VARCHAR NOT NULL,          -- backend spec the model was loaded from
        probe VARCHAR NOT NULL,           -- probe set path or spec
        n_probe_images INTEGER NOT NULL,
        n_skipped_images INTEGER NOT NULL,
        config VARCHAR NOT NULL           -- JSON of this model's resolved config
    )""",
    """CREATE TABLE layers (
        model VARCHAR NOT NULL,
        layer VARCHAR NOT NULL,
        position INTEGER NOT NULL,        -- order of the layer in the model
        kind VARCHAR NOT NULL,            -- conv / linear / vit
        n_units INTEGER NOT NULL,
        PRIMARY KEY (model, layer)
    )""",
    """CREATE TABLE neurons (
        model VARCHAR NOT NULL,
        layer VARCHAR NOT NULL,
        unit INTEGER NOT NULL,
        status VARCHAR NOT NULL CHECK (status IN ('ok', 'dead', 'failed')),
        reason VARCHAR,                   -- why dead / failed
        max_activation DOUBLE,
        interpretability DOUBLE,          -- mean pairwise image similarity of top-K
        PRIMARY KEY (model, layer, unit)
    )""",
    """CREATE TABLE labels (
        label_id BIGINT PRIMARY KEY,      -- also the id in descriptions.faiss
        model VARCHAR NOT NULL,
        layer VARCHAR NOT NULL,
        unit INTEGER NOT NULL,
        rank INTEGER NOT NULL CHECK (rank BETWEEN 1 AND 3),
        text VARCHAR NOT NULL,
        concept_score DOUBLE,
        interpretability DOUBLE,
        UNIQUE (model, layer, unit, rank)
    )""",
    """CREATE TABLE label_vectors (
        label_id BIGINT PRIMARY KEY,
        vec FLOAT[] NOT NULL              -- L2-normalized embedding, meta.embedder
    )""",
    """CREATE TABLE candidates (
        model VARCHAR NOT NULL,
        layer VARCHAR NOT NULL,
        unit INTEGER NOT NULL,
        position INTEGER NOT NULL,        -- order proposed by the summarizer
        concept VARCHAR NOT NULL,
        topk_squared DOUBLE,              -- lower is better
        image_products DOUBLE,            -- -1 when no generated image reached the top-K
        score DOUBLE,                     -- final score, higher is better
        selected_rank INTEGER,            -- label rank when kept as a label
        samples VARCHAR,                  -- JSON list of generated sample thumbnails
        PRIMARY KEY (model, layer, unit, position)
    )""",
    """CREATE TABLE evidence (
        model VARCHAR NOT NULL,
        layer VARCHAR NOT NULL,
        unit INTEGER NOT NULL,
        rank INTEGER NOT NULL,            -- 1 = highest activation
        source VARCHAR NOT NULL,          -- probe image path, relative to the probe root
        x0 INTEGER, y0 INTEGER, x1 INTEGER, y1 INTEGER,  -- crop box, NULL for the whole image
        activation DOUBLE NOT NULL,
        thumbnail VARCHAR NOT NULL,       -- path under images/, box drawn for crops
        caption_key VARCHAR,
        PRIMARY KEY (model, layer, unit, rank)
    )""",
    """CREATE TABLE captions (
        caption_key VARCHAR PRIMARY KEY,  -- content hash of (image, box, captioner)
        source VARCHAR NOT NULL,
        x0 INTEGER, y0 INTEGER, x1 INTEGER, y1 INTEGER,
        captioner VARCHAR NOT NULL,
        text VARCHAR NOT NULL
    )""",
    """CREATE TABLE call_counts (
        model VARCHAR NOT NULL,
        layer VARCHAR NOT NULL,
        unit INTEGER NOT NULL,
        stage VARCHAR NOT NULL,
        calls BIGINT NOT NULL,            -- calls made for this neuron
        cached BIGINT NOT NULL,           -- calls answered from the content cache
        PRIMARY KEY (model, layer, unit, stage)
    )""",
    """CREATE TABLE stage_times (
        model VARCHAR NOT NULL,
        stage VARCHAR NOT NULL,
        seconds DOUBLE NOT NULL,
        PRIMARY KEY (model, stage)
    )""",
]

# v2: evaluation results (`dnd-atlas eval`), shown on the site's home page.
_V2 = [
    """CREATE TABLE evaluations (
        protocol VARCHAR NOT NULL,        -- final-layer | cosy | classifier | synthetic
        model VARCHAR NOT NULL,           -- '' = the whole atlas
        layer VARCHAR NOT NULL,           -- '' = all layers of the model
        metric VARCHAR NOT NULL,
        value DOUBLE,
        details VARCHAR,                  -- JSON: per-unit results, parameters
        evaluated_at TIMESTAMP NOT NULL,
        PRIMARY KEY (protocol, model, layer, metric)
    )""",
]

# v3: how true each label is (fidelity over a sample spanning the activation
# range), the chance level per layer, the evidence a neuron dropped, and per
# evidence item its whole source thumbnail, size and activation heatmap.
_V3 = [
    "ALTER TABLE labels ADD COLUMN fidelity_correlation DOUBLE",  # simulation correlation
    "ALTER TABLE labels ADD COLUMN fidelity_auprc DOUBLE",  # presence ranking the most active images
    "ALTER TABLE candidates ADD COLUMN fidelity_correlation DOUBLE",
    "ALTER TABLE candidates ADD COLUMN fidelity_auprc DOUBLE",
    "ALTER TABLE candidates ADD COLUMN source VARCHAR",  # summarizer | fidelity (a caption phrase it added)
    "ALTER TABLE neurons ADD COLUMN dropped_crops INTEGER",  # crops too small or over the per-image cap
    "ALTER TABLE evidence ADD COLUMN source_thumbnail VARCHAR",  # the whole source image (boxes drawn by readers)
    "ALTER TABLE evidence ADD COLUMN source_width INTEGER",  # source image size, for the crop box
    "ALTER TABLE evidence ADD COLUMN source_height INTEGER",
    "ALTER TABLE evidence ADD COLUMN heatmap VARCHAR",  # data: URL of the unit's activation map on the source (PNG)
    """CREATE TABLE layer_fidelity (
        model VARCHAR NOT NULL,
        layer VARCHAR NOT NULL,
        metric VARCHAR NOT NULL,          -- label_correlation, shuffled_correlation, ...
        value DOUBLE,
        PRIMARY KEY (model, layer, metric)
    )""",
]

MIGRATIONS: list[list[str]] = [_V1, _V2, _V3]
FORMAT_VERSION = len(MIGRATIONS)


def current_version(con: duckdb.DuckDBPyConnection) -> int:
    """The format version stored in the atlas, 0 for an empty database."""
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
    ).fetchone()[0]
    if not exists:
        return 0
    row = con.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Apply every migration the atlas lacks, in order, each in a transaction.

    Returns the resulting format version. Refuses an atlas newer than this
    code, so an old dnd-atlas never damages a newer atlas.
    """
    version = current_version(con)
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"atlas format version {version} is newer than this dnd-atlas supports "
            f"({FORMAT_VERSION}); upgrade dnd-atlas"
        )
    for target in range(version + 1, FORMAT_VERSION + 1):
        con.execute("BEGIN TRANSACTION")
        try:
            for stmt in MIGRATIONS[target - 1]:
                con.execute(stmt)
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('format_version', ?)", [str(target)]
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    return FORMAT_VERSION


def label_id(model: str, layer: str, unit: int, rank: int) -> int:
    """A stable 63-bit id for a label, the same in every build and every shard,
    so a resumed or merged atlas gets identical ids (FAISS ids included)."""
    digest = hashlib.blake2b(f"{model}\x00{layer}\x00{unit}\x00{rank}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") & 0x7FFF_FFFF_FFFF_FFFF
