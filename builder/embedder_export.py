"""Export the atlas's text embedder to ONNX, so that reading an atlas needs no torch.

:func:`export_embedder` turns a local sentence-transformers model (an
embedder name, ``minilm``, ``mpnet``, ``sentence:<path>``, or a folder) into
the self-contained folder :mod:`query.onnx_embedder` reads: the transformer
as ONNX (dynamic batch and sequence axes), its ``tokenizer.json`` and a
manifest ``embedder.json`` (pooling, normalization, truncation, padding,
files with sha256, versions). Optionally int8 (dynamic quantization of the
weights with onnxruntime). Every export checks itself against
sentence-transformers before it is published, and is published atomically
(temp folder, then rename). A folder already exported from the same model
files with the same settings is reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from builder.embedder_quantize import QUANTIZATIONS, quantize_model
from builder.errors import BuildError
from query.embedder import model_path
from query.onnx_embedder import (
    FORMAT_VERSION,
    INPUT_NAMES,
    MANIFEST_FILE,
    MODEL_FILE,
    POOLING_MODES,
    TOKENIZER_FILE,
    EmbedderError,
    EmbedderFile,
    EmbedderManifest,
    OnnxEmbedder,
    read_manifest,
    sha256_file,
)

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # the lowest the dynamo exporter writes; onnxruntime-web 1.30 runs it
# The TorchScript ("legacy") exporter first: on minilm it exported in 13 s where
# torch.export ("dynamo") took 87 s (same run, 2 busy cores), and both graphs
# reproduce sentence-transformers to a cosine of 1 - 1e-7. Each falls back on the other.
EXPORTERS = ("legacy", "dynamo")
DEFAULT_EXPORTER = "legacy"
# An export is published only if it reproduces sentence-transformers on these
# (one padded batch: short, long, punctuation, unicode, a single character).
CHECK_TEXTS = (
    "red circle", "dog faces", "a striped blue square on a grass background", "x", "",
    "Café, naïve & résumé!", "日本の寺", "emoji 🐶", "(red) [circle] {50%}",
    " ".join(["the texture of wood grain"] * 80),  # longer than any max_seq_length: truncation
)
# fp32, int8 modes; measured on minilm over 200 labels: min 0.99999+, 0.970, 0.995
CHECK_MIN_COSINE = {"": 0.9999, "dynamic": 0.95, "weights": 0.99}
Reference = Callable[[list[str]], np.ndarray]  # texts -> unit rows to check an export against
_VERSIONS = ("sentence-transformers", "transformers", "torch", "onnx", "onnxruntime", "tokenizers")


class ExportError(BuildError):
    """The embedder cannot be exported to ONNX (unsupported modules, failed self-check)."""


@dataclass(frozen=True)
class SentenceConfig:
    """What a sentence-transformers folder says about pooling, normalization and truncation."""

    pooling: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None
    lowercase: bool


def read_sentence_config(folder: str | os.PathLike[str]) -> SentenceConfig:
    """Parse ``modules.json``, the pooling config and ``sentence_bert_config.json`` of ``folder``.

    Only Transformer -> Pooling -> optional Normalize pipelines export;
    anything else (Dense layers, weighted-mean or last-token pooling,
    default prompts) raises :class:`ExportError`.
    """
    folder = Path(folder)
    modules = _read_json(folder / "modules.json", default=None)
    pooling: tuple[str, ...] = ("mean",)  # what sentence-transformers adds to a bare transformer
    normalize = False
    if modules is not None:
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            raise ExportError(f"{folder}: modules {kinds} do not export; supported: Transformer, Pooling[, Normalize]")
        pooling = _pooling_modes(_read_json(folder / modules[1].get("path", "") / "config.json", default={}))
        normalize = len(kinds) == 3
    bert = _read_json(folder / "sentence_bert_config.json", default={})
    st_config = _read_json(folder / "config_sentence_transformers.json", default={})
    if st_config.get("default_prompt_name"):
        raise ExportError(f"{folder}: a default prompt ({st_config['default_prompt_name']!r}) does not export")
    max_len = bert.get("max_seq_length")
    return SentenceConfig(pooling, normalize, int(max_len) if max_len else None,
                          bool(bert.get("do_lower_case", False)))


def _pooling_modes(cfg: dict[str, Any]) -> tuple[str, ...]:
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:  # legacy booleans, in sentence-transformers' concatenation order
        legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                  "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
        modes = tuple(mode for key, mode in legacy.items() if cfg.get(key)) or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise ExportError(f"pooling {bad} does not export; supported: {', '.join(POOLING_MODES)}")
    return modes


def _read_json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from None


def resolve_embedder(name_or_folder: str | os.PathLike[str]) -> tuple[str, Path]:
    """The embedder name an atlas records and the folder of its model.

    A folder becomes ``sentence:<folder>``; names go through
    :func:`query.embedder.model_path` (which raises for unknown ones).
    """
    name = str(name_or_folder)
    if Path(name).expanduser().is_dir() and not name.startswith("sentence:"):
        name = f"sentence:{Path(name).expanduser()}"
    return name, model_path(name)


def source_digest(folder: str | os.PathLike[str]) -> str:
    """sha256 over every file of a model folder (relative paths and contents), for reuse checks."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def quantization_mode(quantize: bool | str) -> str:
    """``""`` for fp32, else the int8 mode: ``True`` means ``"dynamic"``; ``"weights"`` is the other."""
    if quantize is False or quantize is None or quantize == "":
        return ""
    mode = "dynamic" if quantize is True else str(quantize)
    if mode not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}; valid: {', '.join(QUANTIZATIONS)}")
    return mode


def export_embedder(
    name_or_folder: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    quantize: bool | str = False,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = DEFAULT_EXPORTER,
    force: bool = False,
) -> dict[str, Any]:
    """Export a sentence-transformers embedder into ``out_dir``; returns its manifest as a dict.

    ``quantize``: ``False`` (fp32), ``True`` or ``"dynamic"`` (onnxruntime
    dynamic int8), ``"weights"`` (int8 weights, float compute; closer to
    fp32, see :mod:`builder.embedder_quantize`). ``exporter`` is
    ``"legacy"`` (the TorchScript exporter, 6x faster here) or ``"dynamo"``
    (torch.export); either falls back on the other if it fails. An ``out_dir`` already exported
    from the same model files with the same settings is returned as it is
    unless ``force``; otherwise it is replaced atomically. Raises
    :class:`ExportError` when the model cannot be exported or the export does
    not reproduce sentence-transformers.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    mode = quantization_mode(quantize)
    name, folder = resolve_embedder(name_or_folder)
    config = read_sentence_config(folder)
    out_dir = Path(out_dir)
    source = {"sha256": source_digest(folder)}
    if not force and (reused := _reusable(out_dir, source, mode, opset)) is not None:
        log.info("ONNX embedder %s in %s is up to date", name, out_dir)
        return reused.to_dict()
    start = time.perf_counter()
    st = _load_sentence_transformer(folder)

    def reference(texts: list[str]) -> np.ndarray:
        return np.asarray(st.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False), np.float32)

    with _staged(out_dir) as tmp:
        manifest = _export_into(tmp, name, st, config, opset, exporter, source, reference)
        if mode:
            fp32 = tmp / f"fp32-{MODEL_FILE}"
            os.replace(tmp / MODEL_FILE, fp32)
            manifest = _quantize_into(tmp, fp32, manifest, mode, reference)
            fp32.unlink()
            manifest = replace(manifest, files=_files(tmp))
            _write_manifest(tmp, manifest)
    log.info("exported ONNX embedder %s (%s) to %s in %.1f s", name, mode or "fp32", out_dir,
             time.perf_counter() - start)
    return manifest.to_dict()


def current_export(out_dir: str | os.PathLike[str], name_or_folder: str | os.PathLike[str],
                   quantize: bool | str = False, *, opset: int = DEFAULT_OPSET) -> dict[str, Any] | None:
    """The manifest of ``out_dir`` when it holds an intact export of exactly this model
    (its files' sha256), name and settings, else ``None``: what
    :func:`export_embedder` would reuse, without loading torch."""
    mode = quantization_mode(quantize)
    name, folder = resolve_embedder(name_or_folder)
    manifest = _reusable(Path(out_dir), {"sha256": source_digest(folder)}, mode, opset)
    return manifest.to_dict() if manifest is not None and manifest.name == name else None


def quantize_embedder(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                      mode: str = "dynamic") -> dict[str, Any]:
    """An int8 copy of the fp32 ONNX embedder in ``src_dir``, written to ``out_dir``; returns its manifest.

    Needs no torch: the copy is checked against the fp32 folder (itself
    checked against sentence-transformers when it was exported).
    """
    mode = quantization_mode(mode) or "dynamic"
    src = OnnxEmbedder(src_dir)
    if src.manifest.quantized:
        raise ExportError(f"{src_dir} is already quantized ({src.manifest.quantization}); quantize an fp32 export")
    out_dir = Path(out_dir)
    with _staged(out_dir) as tmp:
        shutil.copy2(src.path / src.manifest.tokenizer_file, tmp / src.manifest.tokenizer_file)
        manifest = _quantize_into(tmp, src.path / src.manifest.model_file, src.manifest, mode, src.embed)
    log.info("quantized ONNX embedder %s (%s) into %s", src.name, mode, out_dir)
    return manifest.to_dict()


@contextlib.contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A temp folder next to ``out_dir``, published as ``out_dir`` when the block succeeds."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; an atlas is shared like any folder
        _publish(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _reusable(out_dir: Path, source: dict[str, Any], mode: str, opset: int) -> EmbedderManifest | None:
    try:
        manifest = read_manifest(out_dir, verify=True)
    except EmbedderError:  # FormatVersionError included: absent, stale or broken means re-export
        return None
    same = (dict(manifest.source) == source and manifest.quantization == mode
            and manifest.opset == opset and manifest.version == FORMAT_VERSION)
    return manifest if same else None


def _load_sentence_transformer(folder: Path) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", local_files_only=True).eval()


def _export_into(tmp: Path, name: str, st: Any, config: SentenceConfig, opset: int, exporter: str,
                 source: dict[str, Any], reference: Reference) -> EmbedderManifest:
    """Write the fp32 model, tokenizer and manifest into ``tmp``, self-check, and return the manifest."""
    transformer = st[0]
    tokenizer = transformer.tokenizer
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ExportError(f"embedder {name}: its tokenizer has no tokenizers backend (tokenizer.json)")
    inputs = _graph_inputs(transformer.auto_model, tokenizer)
    used = _export_graph(transformer.auto_model, tokenizer, inputs, tmp / MODEL_FILE, opset, exporter)
    _write_tokenizer(tokenizer, tmp / TOKENIZER_FILE)
    max_len = int(st.max_seq_length or config.max_seq_length or tokenizer.model_max_length)
    dim_of = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    manifest = EmbedderManifest(
        name=name, dim=int(dim_of()), pooling=config.pooling, normalize=config.normalize,
        max_seq_length=max_len, lowercase=config.lowercase,
        pad_id=int(tokenizer.pad_token_id), pad_token=str(tokenizer.pad_token), inputs=inputs,
        model_file=MODEL_FILE, tokenizer_file=TOKENIZER_FILE, files=_files(tmp), opset=opset,
        quantized=False, exporter=used, versions=_versions(), source=source,
    )
    return _checked(tmp, manifest, reference)


def _quantize_into(folder: Path, fp32_model: Path, manifest: EmbedderManifest, mode: str,
                   reference: Reference) -> EmbedderManifest:
    """Write the int8 ``model.onnx`` of ``mode`` into ``folder`` next to its tokenizer; self-check."""
    quantize_model(fp32_model, folder / MODEL_FILE, mode)
    manifest = replace(manifest, quantized=True, quantization=mode, files=_files(folder), check={})
    return _checked(folder, manifest, reference)


def _checked(folder: Path, manifest: EmbedderManifest, reference: Reference) -> EmbedderManifest:
    """Write ``manifest``, self-check the folder against ``reference``, write it again with the check."""
    _write_manifest(folder, manifest)
    manifest = replace(manifest, check=_self_check(folder, reference, manifest.quantization))
    _write_manifest(folder, manifest)
    return manifest


def _graph_inputs(model: Any, tokenizer: Any) -> tuple[str, ...]:
    """The inputs the exported graph takes: what the tokenizer gives and the model's forward reads."""
    params = inspect.signature(model.forward).parameters
    given = set(getattr(tokenizer, "model_input_names", ())) | {"input_ids", "attention_mask"}
    return tuple(n for n in INPUT_NAMES if n in given and n in params)


def _export_graph(model: Any, tokenizer: Any, inputs: tuple[str, ...], path: Path,
                  opset: int, exporter: str) -> str:
    """Export ``model``'s last hidden state to ``path``; returns the exporter that worked."""
    import torch

    wrapper = _token_embeddings(model, inputs).eval()
    # Two texts of different lengths: the trace sees real padding in the mask.
    enc = tokenizer(["a red circle on a blue background", "dog"], padding=True, return_tensors="pt")
    args = tuple(enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in inputs)
    order = [exporter] + [e for e in EXPORTERS if e != exporter]
    for i, kind in enumerate(order):
        try:
            with torch.no_grad():
                _run_exporter(kind, wrapper, args, inputs, path, opset)
            return kind
        except Exception as exc:  # exporters raise many types; the fallback or ExportError follows
            if i + 1 < len(order):
                log.warning("the %s ONNX exporter failed (%s); trying %s", kind, exc, order[i + 1])
                continue
            raise ExportError(f"ONNX export failed with the {kind} exporter: {str(exc).splitlines()[0]}") from exc
    raise AssertionError("unreachable")


def _run_exporter(kind: str, wrapper: Any, args: tuple, inputs: tuple[str, ...], path: Path, opset: int) -> None:
    import torch

    axes = {0: "batch", 1: "sequence"}
    names = {"input_names": list(inputs), "output_names": ["token_embeddings"], "opset_version": opset}
    if kind == "legacy":
        with warnings.catch_warnings():
            # Its deprecation notice, and tracer warnings about transformers' mask helpers whose
            # branches are constant for an encoder (the self-check would catch a bad trace).
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), dynamo=False, do_constant_folding=True,
                              dynamic_axes={n: axes for n in (*inputs, "token_embeddings")}, **names)
        return
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    big = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > 1.8e9  # protobuf's 2 GB
    torch.onnx.export(wrapper, args, str(path), dynamo=True, external_data=big, verbose=False,
                      dynamic_shapes=tuple({0: batch, 1: seq} for _ in inputs), **names)


def _token_embeddings(model: Any, inputs: tuple[str, ...]) -> Any:
    """A module giving ``model``'s last hidden state from the positional inputs ``inputs``."""
    import torch

    if inputs != INPUT_NAMES[:len(inputs)]:
        raise ExportError(f"model inputs {list(inputs)} do not export; expected a prefix of {list(INPUT_NAMES)}")

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
            given = dict(zip(INPUT_NAMES, (input_ids, attention_mask, token_type_ids)))
            kwargs = {n: given[n] for n in inputs}
            return self.model(**kwargs, return_dict=True).last_hidden_state

    return TokenEmbeddings()


def _write_tokenizer(tokenizer: Any, path: Path) -> None:
    """The tokenizer sentence-transformers uses, with truncation and padding left to the manifest."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["truncation"] = None
    spec["padding"] = None
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def _files(folder: Path) -> tuple[EmbedderFile, ...]:
    return tuple(
        EmbedderFile(p.relative_to(folder).as_posix(), p.stat().st_size, sha256_file(p))
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE
    )


def _versions() -> dict[str, str]:
    out = {}
    for dist in _VERSIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _write_manifest(folder: Path, manifest: EmbedderManifest) -> None:
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_FILE)


def _self_check(folder: Path, reference: Reference, mode: str) -> dict[str, Any]:
    """Embed :data:`CHECK_TEXTS` with the folder and ``reference``; raise unless every cosine passes."""
    texts = list(CHECK_TEXTS)
    got = OnnxEmbedder(folder).embed(texts)
    cos = np.sum(got * reference(texts), axis=1)
    worst = float(cos.min())
    need = CHECK_MIN_COSINE[mode]
    if worst < need:
        raise ExportError(
            f"the {mode or 'fp32'} ONNX export does not reproduce its reference: cosine {worst:.5f} "
            f"< {need} on {texts[int(cos.argmin())][:40]!r}"
        )
    return {"texts": len(texts), "min_cosine": round(worst, 6), "threshold": need}


def _publish(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing an older export."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}-old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
