"""Writing an atlas: the builder's only way into the format ``query`` owns.

Every neuron is written in one transaction (its row, labels, label vectors,
candidates, evidence, captions and call counts), after deleting whatever an
earlier, interrupted attempt left, so a crash loses at most the neuron in
flight and a rerun is idempotent.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from query.dberrors import connect_writable, deferred_interrupt
from query.errors import AtlasError
from query.index import insert_label_vectors
from query.schema import DB_FILE, IMAGES_DIR, label_id, migrate


@dataclass(frozen=True)
class LabelRow:
    rank: int
    text: str
    concept_score: float | None
    vector: np.ndarray  # L2-normalized embedding (meta.embedder)
    fidelity_correlation: float | None = None
    fidelity_auprc: float | None = None


@dataclass(frozen=True)
class CandidateRow:
    position: int
    concept: str
    topk_squared: float | None
    image_products: float | None
    score: float | None
    selected_rank: int | None
    samples: tuple[str, ...] = ()
    fidelity_correlation: float | None = None
    fidelity_auprc: float | None = None
    source: str | None = None  # summarizer | fidelity


@dataclass(frozen=True)
class EvidenceRow:
    rank: int
    source: str
    box: tuple[int, int, int, int] | None
    activation: float
    thumbnail: str
    caption_key: str | None = None
    caption: str | None = None
    captioner: str | None = None
    source_thumbnail: str | None = None
    source_size: tuple[int, int] | None = None  # (width, height) of the source image
    heatmap: str | None = None  # data: URL of the unit's activation map on the source image


@dataclass(frozen=True)
class NeuronResult:
    """Everything the atlas stores about one neuron."""

    model: str
    layer: str
    unit: int
    status: str  # ok | dead | failed
    reason: str | None = None
    max_activation: float | None = None
    interpretability: float | None = None
    labels: tuple[LabelRow, ...] = ()
    candidates: tuple[CandidateRow, ...] = ()
    evidence: tuple[EvidenceRow, ...] = ()
    calls: dict[str, tuple[int, int]] = field(default_factory=dict)  # stage -> (calls, cached)
    dropped_crops: int | None = None  # crops that were not evidence: too small, or over the per-image cap


log = logging.getLogger(__name__)

_NEURON_TABLES = ("neurons", "labels", "candidates", "evidence", "call_counts")


class AtlasWriter:
    """An atlas opened for writing (creating and migrating it if needed)."""

    def __init__(self, atlas_dir: str | Path) -> None:
        self.dir = Path(atlas_dir)
        # one-line errors and Ctrl-C held during every statement (query.dberrors)
        self.con = connect_writable(self.dir, self.dir / DB_FILE, self.dir / IMAGES_DIR)
        try:
            migrate(self.con)
        except BaseException:
            self.con.close()
            raise

    # -- meta, models, layers ------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.con.execute("SELECT key, value FROM meta").fetchall()}

    def set_meta(self, **values: Any) -> None:
        self._tx(
            lambda: [
                self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [k, json.dumps(v, sort_keys=True)])
                for k, v in values.items()
            ]
        )

    def upsert_model(
        self, model: str, target: str, probe: str, n_images: int, n_skipped: int, config: dict[str, Any],
        layers: Sequence[tuple[str, str, int]],
    ) -> None:
        """The model row and its layers (name, kind, n_units), in order."""

        def work() -> None:
            self.con.execute("DELETE FROM models WHERE model = ?", [model])
            self.con.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?)",
                [model, target, probe, n_images, n_skipped, json.dumps(config, sort_keys=True)],
            )
            self.con.execute("DELETE FROM layers WHERE model = ?", [model])
            for pos, (layer, kind, n_units) in enumerate(layers):
                self.con.execute("INSERT INTO layers VALUES (?, ?, ?, ?, ?)", [model, layer, pos, kind, n_units])

        self._tx(work)

    def done_units(self, model: str, include_failed: bool = False) -> set[tuple[str, int]]:
        """(layer, unit) of every neuron of ``model`` a resume skips: those
        written ``ok`` or ``dead``, and the ``failed`` ones only when
        ``include_failed``. A failed neuron is redone by the next build; its
        row (and reason) stays until the new result replaces it."""
        sql = "SELECT layer, unit FROM neurons WHERE model = ?"
        if not include_failed:
            sql += " AND status <> 'failed'"
        return {(layer, int(unit)) for layer, unit in self.con.execute(sql, [model]).fetchall()}

    def failed_units(self, model: str) -> dict[tuple[str, int], str]:
        """The reason of every neuron of ``model`` written as ``failed``, by
        (layer, unit), in (layer, unit) order so a report listing them is stable."""
        rows = self.con.execute(
            "SELECT layer, unit, reason FROM neurons WHERE model = ? AND status = 'failed' ORDER BY layer, unit",
            [model]
        ).fetchall()
        return {(layer, int(unit)): reason or "" for layer, unit, reason in rows}

    def set_stage_time(self, model: str, stage: str, seconds: float) -> None:
        self._tx(lambda: self.con.execute(
            "INSERT OR REPLACE INTO stage_times VALUES (?, ?, ?)", [model, stage, float(seconds)]
        ))

    def add_stage_time(self, model: str, stage: str, seconds: float) -> None:
        row = self.con.execute(
            "SELECT seconds FROM stage_times WHERE model = ? AND stage = ?", [model, stage]
        ).fetchone()
        self.set_stage_time(model, stage, (row[0] if row else 0.0) + seconds)

    def replace_layer_fidelity(self, model: str, layer: str, metrics: dict[str, float | None]) -> None:
        """Replace one layer's fidelity summary (label means and chance levels)."""

        def work() -> None:
            self.con.execute("DELETE FROM layer_fidelity WHERE model = ? AND layer = ?", [model, layer])
            self._insert("layer_fidelity", [[model, layer, k, _f(v)] for k, v in sorted(metrics.items())])

        self._tx(work)

    def label_texts(self, model: str) -> dict[tuple[str, int], list[str]]:
        """(layer, unit) -> label texts in rank order, of the model's 'ok' neurons."""
        rows = self.con.execute(
            "SELECT l.layer, l.unit, l.text FROM labels l JOIN neurons n USING (model, layer, unit) "
            "WHERE l.model = ? AND n.status = 'ok' ORDER BY l.layer, l.unit, l.rank", [model]).fetchall()
        out: dict[tuple[str, int], list[str]] = {}
        for layer, unit, text in rows:
            out.setdefault((layer, int(unit)), []).append(text)
        return out

    def replace_evaluations(self, protocol: str, rows: Sequence[Sequence[Any]]) -> None:
        """Replace every ``evaluations`` row of ``protocol`` with ``rows``
        (protocol, model, layer, metric, value, details, evaluated_at) in one
        transaction."""

        def work() -> None:
            self.con.execute("DELETE FROM evaluations WHERE protocol = ?", [protocol])
            if rows:
                self.con.executemany("INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?)", [list(r) for r in rows])

        self._tx(work)

    # -- neurons ---------------------------------------------------------------
    def write_neurons(self, results: Iterable[NeuronResult]) -> None:
        """Write each neuron in its own transaction."""
        for r in results:
            self._tx(lambda r=r: self._write(r))

    def _write(self, r: NeuronResult) -> None:
        key = [r.model, r.layer, r.unit]
        exists = self.con.execute(
            "SELECT count(*) FROM neurons WHERE model = ? AND layer = ? AND unit = ?", key
        ).fetchone()[0]
        if exists:  # rows of other tables exist only beside a neurons row (same transaction)
            for table in _NEURON_TABLES:
                self.con.execute(f"DELETE FROM {table} WHERE model = ? AND layer = ? AND unit = ?", key)
            self.con.execute(
                "DELETE FROM label_vectors WHERE label_id IN (SELECT label_id FROM labels "
                "WHERE model = ? AND layer = ? AND unit = ?)", key
            )
        ids = [label_id(r.model, r.layer, r.unit, lab.rank) for lab in r.labels]
        self._insert("neurons", [[*key, r.status, r.reason, _f(r.max_activation), _f(r.interpretability),
                                  r.dropped_crops]])
        self._insert("labels", [
            [lid, *key, lab.rank, lab.text, _f(lab.concept_score), _f(r.interpretability),
             _f(lab.fidelity_correlation), _f(lab.fidelity_auprc)]
            for lid, lab in zip(ids, r.labels)
        ])
        if r.labels:
            self._insert_vectors(ids, np.stack([lab.vector for lab in r.labels]))
        self._insert("candidates", [
            [*key, c.position, c.concept, _f(c.topk_squared), _f(c.image_products), _f(c.score),
             c.selected_rank, json.dumps(list(c.samples)), _f(c.fidelity_correlation), _f(c.fidelity_auprc), c.source]
            for c in r.candidates
        ])
        caps, evs = [], []
        for e in r.evidence:
            box = list(e.box) if e.box else [None] * 4
            if e.caption_key and e.caption is not None:
                caps.append([e.caption_key, e.source, *box, e.captioner or "", e.caption])
            size = list(e.source_size) if e.source_size else [None, None]
            evs.append([*key, e.rank, e.source, *box, float(e.activation), e.thumbnail, e.caption_key,
                        e.source_thumbnail, *size, e.heatmap])
        self._insert("captions", caps, or_ignore=True)
        self._insert("evidence", evs)
        self._insert("call_counts", [[*key, stage, c, h] for stage, (c, h) in sorted(r.calls.items())])

    def _insert(self, table: str, rows: list[list[Any]], or_ignore: bool = False) -> None:
        """All rows in one multi-row INSERT (one statement, not one per row)."""
        if not rows:
            return
        width = len(rows[0])
        one = "(" + ",".join("?" * width) + ")"
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        self.con.execute(f"{verb} INTO {table} VALUES {','.join([one] * len(rows))}",
                         [v for row in rows for v in row])

    def _insert_vectors(self, ids: list[int], vectors: np.ndarray) -> None:
        insert_label_vectors(self.con, ids, vectors)

    # -- what a failed earlier build left (builder.pipeline.resume) ---------------
    def models_with_neurons(self) -> set[str]:
        """The models that have at least one neuron row (ok, dead or failed)."""
        return {m for (m,) in self.con.execute("SELECT DISTINCT model FROM neurons").fetchall()}

    def model_names(self) -> set[str]:
        """Every model with a row in ``models``, written or not."""
        return {m for (m,) in self.con.execute("SELECT model FROM models").fetchall()}

    def forget_models(self, models: Sequence[str]) -> None:
        """Delete the model, layer, stage-time and layer-fidelity rows of
        ``models``, which have no neuron row (one transaction)."""

        def work() -> None:
            for table in ("models", "layers", "stage_times", "layer_fidelity"):
                self.con.execute(f"DELETE FROM {table} WHERE model IN (SELECT unnest(?))", [list(models)])

        if models:
            self._tx(work)

    def delete_meta(self, keep: Sequence[str] = ("format_version",)) -> None:
        """Delete every meta entry but ``keep`` (an atlas no build has written into)."""
        self._tx(lambda: self.con.execute("DELETE FROM meta WHERE NOT list_contains(?, key)", [list(keep)]))

    # -- plumbing --------------------------------------------------------------
    def _tx(self, work) -> None:
        """``work()`` in one transaction, committed or rolled back whole: a
        Ctrl-C is held until it is over, then raised (query.dberrors)."""
        with deferred_interrupt():
            self.con.execute("BEGIN TRANSACTION")
            try:
                work()
                self.con.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        try:
            self.con.execute("ROLLBACK")
        except AtlasError as exc:  # e.g. the failed COMMIT ended the transaction already
            log.debug("rollback after a failed write: %s", exc)

    def checkpoint(self) -> None:
        self.con.execute("CHECKPOINT")

    def close(self) -> None:
        """Checkpoint and close. The connection is closed even when the
        checkpoint fails (a full disk): the write-ahead log keeps every
        committed neuron for the next open. Closing while another error is
        on its way out (``finally``), a failed checkpoint is only logged, so
        that error is the one reported."""
        pending = sys.exc_info()[1]
        try:
            self.con.execute("CHECKPOINT")
        except AtlasError as exc:
            if pending is None:
                raise
            log.info("atlas checkpoint failed while stopping on an error: %s", exc)
        finally:
            self.con.close()

    def __enter__(self) -> AtlasWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _f(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None
