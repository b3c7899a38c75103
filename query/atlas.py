"""Reading an atlas: the Python API behind the CLI, the site and the HTTP API.

>>> with Atlas.open("demo/atlas") as atlas:          # doctest: +SKIP
...     hits = atlas.search("striped circle", k=5)
...     record = atlas.neuron(None, "layer4", 12)

Every failure a user can cause raises a subclass of
:class:`query.errors.AtlasError` with a one-line message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from query.dberrors import GuardedConnection, db_error
from query.errors import AtlasError, AtlasNotFound, FormatVersionError, QueryError
from query.index import load_index, read_label_vectors
from query.ranking import rank_neurons, ranking_complete, text_similarities
from query.records import (
    LayerInfo,
    ModelInfo,
    NeuronRecord,
    SearchHit,
    candidate_from_row,
    evidence_from_row,
    label_from_row,
)
from query.schema import (
    COUNTED_STAGES,
    DB_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    NEURON_STATUSES,
    current_version,
    migrate,
)

log = logging.getLogger(__name__)

# How many valid choices an error message lists before "... (N more)".
MAX_CHOICES = 20


def _choices(values: Iterable[object]) -> str:
    values = [str(v) for v in values]
    if not values:
        return "(none)"
    shown = ", ".join(values[:MAX_CHOICES])
    if len(values) > MAX_CHOICES:
        shown += f", ... ({len(values) - MAX_CHOICES} more)"
    return shown


class _faiss_threads:
    """Run FAISS on ``n`` OpenMP threads inside the block (restored on exit).

    One query over a flat index gains nothing from threads, and on a shared
    2-core machine they cost ~18 ms per search instead of ~2 ms.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.old = 0

    def __enter__(self) -> None:
        import faiss

        self.old = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        import faiss

        faiss.omp_set_num_threads(self.old)


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def resolve_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(atlas_dir, db_file)`` for a path naming either the directory or its DuckDB file."""
    path = Path(path).expanduser()
    if path.suffix == ".duckdb" or path.is_file():
        return path.parent, path
    return path, path / DB_FILE



def ok_labels_filter(
    model: str | None, layer: str | None, min_fidelity: float | None = None
) -> tuple[str, list[object]]:
    """SQL condition and parameters selecting the labels of ``ok`` neurons,
    optionally of one model and layer and with a fidelity correlation of at
    least ``min_fidelity`` (over ``labels l`` joined with ``neurons n``, as
    ``query.index.read_label_vectors`` takes it)."""
    where, params = ["n.status = 'ok'"], []
    if min_fidelity is not None:
        where.append("l.fidelity_correlation >= ?")
        params.append(float(min_fidelity))
    if model is not None:
        where.append("l.model = ?")
        params.append(model)
    if layer is not None:
        where.append("l.layer = ?")
        params.append(layer)
    return " AND ".join(where), params

class Atlas:
    """An open atlas. Use :meth:`open`; close it (or use ``with``) when done."""

    def __init__(self, atlas_dir: Path, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        self.path = atlas_dir
        self.con = con
        self.read_only = read_only
        self._meta: dict[str, Any] | None = None
        self._index: Any = None
        self._index_checked = False
        self._embedder: Any = None

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], read_only: bool = True, create: bool = False,
        allow_older: bool = False,
    ) -> Atlas:
        """Open the atlas at ``path`` (its directory or its ``atlas.duckdb``).

        Read-only (the default) never creates or changes a file and refuses an
        atlas of another format version, unless ``allow_older`` (for readers
        that only read what every version has). Writable, an older atlas is
        migrated in place; ``create=True`` makes a new empty atlas when none
        exists. Raises :class:`AtlasNotFound` or :class:`FormatVersionError`.
        """
        atlas_dir, db = resolve_paths(path)
        if not db.is_file():
            if read_only or not create:
                raise AtlasNotFound(f"no atlas at {path} (missing {db})")
            atlas_dir.mkdir(parents=True, exist_ok=True)
        try:
            raw = duckdb.connect(str(db), read_only=read_only)
        except duckdb.Error as exc:
            raise db_error(exc, db, "open") from None
        # a truncated or damaged file fails on some later read: one line then too
        con = GuardedConnection(raw, db, "read" if read_only else "write", hold_interrupts=not read_only)
        try:
            version = current_version(con)
            if version == 0 and not create:
                raise AtlasNotFound(f"{db} is not a dnd-atlas database (no format version)")
            if version > FORMAT_VERSION:
                raise FormatVersionError(
                    f"atlas format version {version} is newer than this dnd-atlas supports "
                    f"({FORMAT_VERSION}); upgrade dnd-atlas"
                )
            if version < FORMAT_VERSION and not read_only:
                migrate(con)
            elif version < FORMAT_VERSION and not allow_older:
                raise FormatVersionError(
                    f"atlas format version {version} is older than this dnd-atlas "
                    f"({FORMAT_VERSION}); rebuild the atlas, or open it writable "
                    "(Atlas.open(path, read_only=False)) to migrate it"
                )
        except BaseException:
            con.close()
            raise
        return cls(atlas_dir, con, read_only)

    def close(self) -> None:
        """Close the database connection (idempotent)."""
        if self.con is not None:
            self.con.close()
            self.con = None  # type: ignore[assignment]
        self._index = None

    def __enter__(self) -> Atlas:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Atlas({str(self.path)!r}, read_only={self.read_only})"

    def sql(self, sql: str, params: Iterable[object] = ()) -> list[dict[str, Any]]:
        """Run a read query on the atlas's DuckDB file; rows as dicts.

        >>> atlas.sql("SELECT layer, unit, text FROM labels WHERE rank = 1 LIMIT 5")  # doctest: +SKIP
        """
        if self.con is None:
            raise AtlasError("the atlas is closed")
        cur = self.con.execute(sql, list(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    # -- metadata ----------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """The meta table, values JSON-decoded (plain strings stay strings)."""
        if self._meta is None:
            rows = self.sql("SELECT key, value FROM meta ORDER BY key")
            self._meta = {r["key"]: _decode(r["value"]) for r in rows}
        return dict(self._meta)

    def models(self) -> list[ModelInfo]:
        """The target models in the atlas, by name."""
        return [
            ModelInfo(
                model=r["model"], target=r["target"], probe=r["probe"],
                n_probe_images=r["n_probe_images"], n_skipped_images=r["n_skipped_images"],
                config=_decode(r["config"]) if r["config"] else {},
            )
            for r in self.sql("SELECT * FROM models ORDER BY model")
        ]

    def layers(self, model: str | None = None) -> list[LayerInfo]:
        """The layers (of ``model``, or of every model) in model order, with status counts."""
        if model is not None:
            self._check_model(model)
        rows = self.sql(
            """
            SELECT l.model, l.layer, l.position, l.kind, l.n_units,
                   count(*) FILTER (WHERE n.status = 'ok') AS n_ok,
                   count(*) FILTER (WHERE n.status = 'dead') AS n_dead,
                   count(*) FILTER (WHERE n.status = 'failed') AS n_failed
            FROM layers l
            LEFT JOIN neurons n ON n.model = l.model AND n.layer = l.layer
            WHERE ?::VARCHAR IS NULL OR l.model = ?
            GROUP BY ALL
            ORDER BY l.model, l.position, l.layer
            """,
            [model, model],
        )
        return [LayerInfo(**r) for r in rows]

    def _model_names(self) -> list[str]:
        return [r["model"] for r in self.sql(
            "SELECT model FROM models UNION SELECT model FROM layers ORDER BY model")]

    def _check_model(self, model: str) -> None:
        names = self._model_names()
        if model not in names:
            raise QueryError(f"unknown model {model!r}; valid models: {_choices(names)}")

    def _resolve_layer(self, model: str | None, layer: str) -> str:
        """The model owning ``layer``: ``model`` itself when given, else the only one."""
        if model is not None:
            self._check_model(model)
            layers = [r["layer"] for r in self.sql(
                "SELECT layer FROM layers WHERE model = ? ORDER BY position, layer", [model])]
            if layer not in layers:
                raise QueryError(
                    f"unknown layer {layer!r} in model {model!r}; valid layers: {_choices(layers)}"
                )
            return model
        owners = [r["model"] for r in self.sql(
            "SELECT model FROM layers WHERE layer = ? ORDER BY model", [layer])]
        if len(owners) == 1:
            return owners[0]
        if owners:
            raise QueryError(
                f"layer {layer!r} exists in several models ({_choices(owners)}); pass a model"
            )
        layers = [r["layer"] for r in self.sql(
            "SELECT DISTINCT layer, min(position) AS p FROM layers GROUP BY layer ORDER BY p, layer")]
        raise QueryError(f"unknown layer {layer!r}; valid layers: {_choices(layers)}")

    # -- one neuron --------------------------------------------------------------

    def neuron(self, model: str | None, layer: str, unit: int) -> NeuronRecord:
        """The full record of one neuron: labels, candidates, evidence and call counts.

        ``model`` may be ``None`` when ``layer`` names a layer of one model only.
        Raises :class:`QueryError` naming the valid choices for an unknown model,
        layer or unit.
        """
        model = self._resolve_layer(model, layer)
        row = self.sql(
            "SELECT * FROM neurons WHERE model = ? AND layer = ? AND unit = ?",
            [model, layer, int(unit)],
        )
        if not row:
            n_units = self.sql(
                "SELECT n_units FROM layers WHERE model = ? AND layer = ?", [model, layer]
            )[0]["n_units"]
            if not 0 <= int(unit) < n_units:
                raise QueryError(
                    f"unit {unit} out of range for {model}/{layer}; valid units: 0..{n_units - 1}"
                )
            raise QueryError(f"neuron {model}/{layer}/{unit} is not in the atlas (not built yet?)")
        n = row[0]
        key = [model, layer, int(unit)]
        labels = [label_from_row(r) for r in self.sql(
            "SELECT * FROM labels WHERE model = ? AND layer = ? AND unit = ? ORDER BY rank", key)]
        candidates = [candidate_from_row(r) for r in self.sql(
            "SELECT * FROM candidates WHERE model = ? AND layer = ? AND unit = ? ORDER BY position", key)]
        evidence = [evidence_from_row(r) for r in self.sql(
            "SELECT e.*, c.text AS caption FROM evidence e "
            "LEFT JOIN captions c ON c.caption_key = e.caption_key "
            "WHERE e.model = ? AND e.layer = ? AND e.unit = ? ORDER BY e.rank", key)]
        calls = {
            r["stage"]: (int(r["calls"]), int(r["cached"]))
            for r in self.sql(
                "SELECT stage, calls, cached FROM call_counts "
                "WHERE model = ? AND layer = ? AND unit = ? ORDER BY stage", key)
        }
        return NeuronRecord(
            model=model, layer=layer, unit=int(unit), status=n["status"], reason=n["reason"],
            max_activation=n["max_activation"], interpretability=n["interpretability"],
            labels=labels, candidates=candidates, evidence=evidence, calls=calls,
            dropped_crops=n.get("dropped_crops"),
        )

    # -- search ------------------------------------------------------------------

    def search(
        self, text: str, k: int = 10, model: str | None = None, layer: str | None = None,
        min_fidelity: float | None = None,
    ) -> list[SearchHit]:
        """The ``k`` neurons whose labels are closest to ``text`` (cosine), best first.

        One hit per neuron (its best-matching label wins); only neurons with
        status 'ok'; optionally restricted to a model and/or a layer, and to
        labels whose fidelity correlation is at least ``min_fidelity``. Uses
        ``descriptions.faiss`` and falls back to exact search over
        ``label_vectors`` when the index is missing or stale.
        """
        if not isinstance(text, str) or not text.strip():
            raise QueryError("empty search query")
        if not isinstance(k, int) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        if model is not None and layer is not None:
            self._resolve_layer(model, layer)
        elif model is not None:
            self._check_model(model)
        elif layer is not None:
            known = self.sql("SELECT 1 FROM layers WHERE layer = ? LIMIT 1", [layer])
            if not known:
                self._resolve_layer(None, layer)  # raises, listing the valid layers

        query = self._embed_query(text.strip())
        index = self._search_index()
        if index is not None:
            if index.d != query.shape[0]:
                raise AtlasError(
                    f"{INDEX_FILE} has {index.d} dimensions but embedder "
                    f"{self.meta.get('embedder')!r} gives {query.shape[0]}; rebuild the index"
                )
            total = index.ntotal

            def nearest(n: int) -> tuple[np.ndarray, np.ndarray]:
                with _faiss_threads(1):
                    sims, ids = index.search(query[None, :], n)
                keep = ids[0] >= 0
                return ids[0][keep], sims[0][keep]
        else:
            # Filter before ranking: exact search over the neurons that qualify.
            ids, vecs = read_label_vectors(self.con, *ok_labels_filter(model, layer, min_fidelity))
            if len(ids) and vecs.shape[1] != query.shape[0]:
                raise AtlasError(
                    f"label vectors have {vecs.shape[1]} dimensions but embedder "
                    f"{self.meta.get('embedder')!r} gives {query.shape[0]}; rebuild the atlas"
                )
            all_sims = vecs @ query if len(ids) else np.zeros(0, dtype=np.float32)
            order = np.argsort(-all_sims, kind="stable")
            total = len(ids)

            def nearest(n: int) -> tuple[np.ndarray, np.ndarray]:
                top = order[:n]
                return ids[top], all_sims[top]

        return self._rank(nearest, total, k, model, layer, min_fidelity)

    @property
    def embedder(self) -> Any:
        """The query embedder of :meth:`search`, loaded on first use.

        The atlas's own ONNX embedder when it carries one (onnxruntime, no
        torch), else the sentence-transformers model its meta names
        (:func:`query.onnx_embedder.query_embedder`). Assign any object with
        ``embed(texts)`` and ``dim`` to search through another one.
        """
        if self._embedder is None:
            from query.onnx_embedder import query_embedder

            name = self.meta.get("embedder")
            if not name:
                raise AtlasError("the atlas meta has no 'embedder'; rebuild the atlas")
            self._embedder = query_embedder(self.path, str(name))
        return self._embedder

    @embedder.setter
    def embedder(self, value: Any) -> None:
        self._embedder = value

    def _embed_query(self, text: str) -> np.ndarray:
        return self.embedder.embed([text])[0]

    def _search_index(self) -> Any:
        """The FAISS index when it is present and current, else ``None`` (logged once)."""
        if self._index_checked:
            return self._index
        self._index_checked = True
        n_labels = self.sql("SELECT count(*) AS n FROM labels")[0]["n"]
        if not (self.path / INDEX_FILE).is_file():
            log.warning("%s is missing; using exact search over label_vectors", INDEX_FILE)
            return None
        index = load_index(self.path)
        if index.ntotal != n_labels:
            log.warning(
                "%s holds %d vectors but the atlas has %d labels (stale index); "
                "using exact search over label_vectors", INDEX_FILE, index.ntotal, n_labels,
            )
            return None
        self._index = index
        return index

    def _rank(
        self,
        nearest: Callable[[int], tuple[np.ndarray, np.ndarray]],
        total: int,
        k: int,
        model: str | None,
        layer: str | None,
        min_fidelity: float | None = None,
    ) -> list[SearchHit]:
        """The ``k`` best neurons from the nearest labels, by :mod:`query.ranking`'s rules
        (copies of a text tie, ties go to the smaller key), over-fetching until
        the ranking cannot change."""
        if total == 0:
            return []
        where, params = ok_labels_filter(model, layer, min_fidelity)
        n = min(total, max(3 * k, 32))  # up to 3 labels per neuron
        while True:
            ids, sims = nearest(n)
            text_of = {r["label_id"]: r["text"] for r in self.sql(
                "SELECT l.label_id, l.text FROM labels l "
                "JOIN neurons n ON n.model = l.model AND n.layer = l.layer AND n.unit = l.unit "
                f"WHERE l.label_id IN (SELECT unnest(?::BIGINT[])) AND {where}",
                [ids.tolist(), *params],
            )}
            fetched = [(text_of[i], s) for i, s in zip(ids.tolist(), sims.tolist()) if i in text_of]
            text_sim = text_similarities([t for t, _ in fetched], [s for _, s in fetched])
            carriers = self._carriers(list(text_sim), where, params)
            top = rank_neurons(text_sim, [c[:3] for c in carriers], k)
            last = float(sims[-1]) if len(sims) else float("-inf")
            if ranking_complete(top, k, last, n >= total):
                break
            n = min(total, n * 2)
        matched: dict[tuple[tuple[str, str, int], str], tuple[int, dict[str, Any]]] = {}
        for key, rank, text, row in carriers:  # the neuron's label that gave its score
            if (key, text) not in matched or rank < matched[key, text][0]:
                matched[key, text] = (rank, row)
        return self._hits([(r.key, (r.similarity, matched[r.key, r.text][1])) for r in top])

    def _carriers(self, texts: list[str], where: str, params: list[object]
                  ) -> list[tuple[tuple[str, str, int], int, str, dict[str, Any]]]:
        """``(key, rank, text, row)`` of every qualifying label whose text is one of
        ``texts`` (``row``: its text and fidelity, for the hit)."""
        if not texts:
            return []
        rows = self.sql(
            "SELECT l.model, l.layer, l.unit, l.rank, l.text, l.fidelity_correlation, l.fidelity_auprc "
            "FROM labels l "
            "JOIN neurons n ON n.model = l.model AND n.layer = l.layer AND n.unit = l.unit "
            f"WHERE l.text IN (SELECT unnest(?::VARCHAR[])) AND {where}",
            [texts, *params],
        )
        return [((r["model"], r["layer"], int(r["unit"])), int(r["rank"]), r["text"], r) for r in rows]

    def _hits(self, top: list[tuple[tuple[str, str, int], tuple[float, dict[str, Any]]]]) -> list[SearchHit]:
        if not top:
            return []
        keys = [f"{m}\x00{l}\x00{u}" for (m, l, u), _ in top]
        rows = self.sql(
            "SELECT model, layer, unit, rank, text, concept_score FROM labels "
            "WHERE model || chr(0) || layer || chr(0) || unit::VARCHAR IN (SELECT unnest(?::VARCHAR[])) "
            "ORDER BY model, layer, unit, rank",
            [keys],
        )
        labels: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for r in rows:
            labels.setdefault((r["model"], r["layer"], r["unit"]), []).append(r)
        hits = []
        for key, (sim, matched) in top:
            own = labels.get(key, [])
            first = next((r for r in own if r["rank"] == 1), None)
            hits.append(SearchHit(
                model=key[0], layer=key[1], unit=key[2],
                labels=[r["text"] for r in own],
                score=first["concept_score"] if first else None,
                similarity=sim, matched_label=matched["text"],
                fidelity_correlation=matched.get("fidelity_correlation"),
                fidelity_auprc=matched.get("fidelity_auprc"),
            ))
        return hits

    # -- overview ----------------------------------------------------------------

    def layer_fidelity(self, model: str | None = None) -> dict[tuple[str, str], dict[str, float | None]]:
        """(model, layer) -> the layer's fidelity summary written by the build:
        its labels' mean correlation and AUPRC and the chance levels (shuffled
        labels); ``{}`` for an atlas older than fidelity."""
        has = self.sql("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'layer_fidelity'")
        if not has[0]["n"]:
            return {}
        out: dict[tuple[str, str], dict[str, float | None]] = {}
        for r in self.sql("SELECT * FROM layer_fidelity WHERE ?::VARCHAR IS NULL OR model = ? "
                          "ORDER BY model, layer, metric", [model, model]):
            out.setdefault((r["model"], r["layer"]), {})[r["metric"]] = r["value"]
        return out

    def summary(self) -> dict[str, Any]:
        """An overview for ``dnd-atlas info``: per model and layer neuron counts by
        status, totals, mean calls per neuron per stage, stage times and meta highlights.
        Returns plain JSON-serializable data."""
        meta = self.meta
        highlights = {k: v for k, v in meta.items() if k != "build_config"}
        models = []
        for m in self._model_names():
            layers = self.layers(m)
            totals = {s: sum(getattr(li, f"n_{s}") for li in layers) for s in NEURON_STATUSES}
            totals["units"] = sum(li.n_units for li in layers)
            calls = self.sql(
                """
                SELECT stage, sum(calls) AS calls, sum(cached) AS cached,
                       count(DISTINCT (layer, unit)) AS neurons
                FROM call_counts WHERE model = ? GROUP BY stage ORDER BY stage
                """,
                [m],
            )
            n_neurons = sum(totals[s] for s in NEURON_STATUSES)
            per_neuron = {
                r["stage"]: {
                    "calls": int(r["calls"]), "cached": int(r["cached"]),
                    "calls_per_neuron": r["calls"] / n_neurons if n_neurons else 0.0,
                    "cached_per_neuron": r["cached"] / n_neurons if n_neurons else 0.0,
                }
                for r in calls
            }
            for stage in COUNTED_STAGES:
                per_neuron.setdefault(stage, {"calls": 0, "cached": 0,
                                              "calls_per_neuron": 0.0, "cached_per_neuron": 0.0})
            times = {r["stage"]: r["seconds"] for r in self.sql(
                "SELECT stage, seconds FROM stage_times WHERE model = ? ORDER BY stage", [m])}
            fidelity = self.layer_fidelity(m)
            models.append({
                "model": m,
                "layers": [{**li.to_dict(), "fidelity": fidelity.get((m, li.layer), {})} for li in layers],
                "totals": totals,
                "calls": per_neuron,
                "stage_seconds": times,
            })
        grand = {s: sum(mo["totals"][s] for mo in models) for s in (*NEURON_STATUSES, "units")}
        n_labels = self.sql("SELECT count(*) AS n FROM labels")[0]["n"]
        n_vectors = self.sql("SELECT count(*) AS n FROM label_vectors")[0]["n"]
        index_file = self.path / INDEX_FILE
        return {
            "path": str(self.path),
            "meta": highlights,
            "models": models,
            "totals": {**grand, "labels": n_labels, "label_vectors": n_vectors},
            "index": {
                "present": index_file.is_file(),
                "count": meta.get("index_count"),
                "current": index_file.is_file() and meta.get("index_count") == n_labels,
            },
        }
