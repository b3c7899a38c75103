"""int8 variants of an exported embedder graph (no torch needed).

Two modes, measured on all-MiniLM-L6-v2 against sentence-transformers
(200 labels; see the ONNX embedder tests):

- ``"dynamic"``: onnxruntime's dynamic quantization, per-channel int8
  weights, activations quantized at run time (MatMulInteger). 23.5 MB
  instead of 90 MB; cosine min 0.970, mean 0.992.
- ``"weights"``: int8 weights with per-output-channel scales (per-row for
  embedding tables), dequantized to float at run time, float activations.
  Same size; cosine min 0.995, mean 0.999: the one to ship to a browser.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

QUANTIZATIONS = ("dynamic", "weights")
MIN_ELEMENTS = 4096  # smaller tensors stay float: no size to gain, only error


def quantize_model(src: str | Path, dest: str | Path, mode: str) -> None:
    """Write an int8 variant of the ONNX graph ``src`` to ``dest`` (``mode``: dynamic or weights)."""
    if mode == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet_onnxruntime_root_logs():
            quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gather"])
    elif mode == "weights":
        quantize_weights(src, dest)
    else:
        raise ValueError(f"unknown quantization {mode!r}; valid: {', '.join(QUANTIZATIONS)}")


class _quiet_onnxruntime_root_logs:
    """Drop the advice onnxruntime's quantizer logs on the root logger (pre-processing, per node).

    Its pre-processing step fails on these graphs ("Incomplete symbolic shape
    inference"), so the advice is noise on a build's stderr.
    """

    def __enter__(self) -> None:
        self._filter = logging.Filter()
        self._filter.filter = lambda r: r.levelno >= logging.ERROR or "onnxruntime" not in r.pathname
        logging.getLogger().addFilter(self._filter)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeFilter(self._filter)


def quantize_weights(src: str | Path, dest: str | Path) -> int:
    """Store the float weights of MatMul and Gather nodes as int8 plus scales; returns how many.

    A MatMul weight ``W (in, out)`` becomes ``DequantizeLinear(Wq, s, axis=1)``
    (symmetric, one scale per output column). A Gather table ``T (rows, dim)``
    gathers int8 rows and their scales, then multiplies: the table is never
    dequantized whole, so a lookup costs what it did.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    # Only weights with a single consumer: a tied weight would lose its float copy.
    inits = {t.name: t for t in graph.initializer if uses.get(t.name) == 1}
    replaced: set[str] = set()
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMul" and _quantizable(inits.get(node.input[1])):
            weight = numpy_helper.to_array(inits[node.input[1]])
            nodes += [*_dequantized_matmul_weight(node.input[1], weight, graph), node]
            replaced.add(node.input[1])
        elif node.op_type == "Gather" and _quantizable(inits.get(node.input[0])) and _axis(node) == 0:
            table = numpy_helper.to_array(inits[node.input[0]])
            nodes += _dequantized_gather(node, table, graph)
            replaced.add(node.input[0])
        else:
            nodes.append(node)
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(dest))
    log.info("int8 weights for %d nodes of %s", len(replaced), src)
    return len(replaced)


def _quantizable(tensor) -> bool:
    if tensor is None or len(tensor.dims) != 2:
        return False
    import onnx

    return tensor.data_type == onnx.TensorProto.FLOAT and int(np.prod(tensor.dims)) >= MIN_ELEMENTS


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _symmetric_int8(values: np.ndarray, reduce_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and float32 scales, one per slice along the other axis (max |x| maps to 127)."""
    scale = np.abs(values).max(axis=reduce_axis) / 127.0
    scale[scale == 0] = 1.0
    shape = [1, 1]
    shape[1 - reduce_axis] = -1
    q = np.clip(np.rint(values / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def _dequantized_matmul_weight(name: str, weight: np.ndarray, graph) -> list:
    from onnx import helper, numpy_helper

    q, scale = _symmetric_int8(weight, reduce_axis=0)  # one scale per output column
    graph.initializer.extend([
        numpy_helper.from_array(q, f"{name}.int8"),
        numpy_helper.from_array(scale, f"{name}.scale"),
        numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}.zero"),
    ])
    return [helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale", f"{name}.zero"],
                             [name], axis=1, name=f"{name}.dequantize")]


def _dequantized_gather(node, table: np.ndarray, graph) -> list:
    from onnx import TensorProto, helper, numpy_helper

    name, ids, out = node.input[0], node.input[1], node.output[0]
    q, scale = _symmetric_int8(table, reduce_axis=1)  # one scale per row
    graph.initializer.extend([
        numpy_helper.from_array(q, f"{name}.int8"),
        numpy_helper.from_array(scale.reshape(-1, 1), f"{name}.scale"),
    ])
    p = f"{node.name or name}.int8"
    return [
        helper.make_node("Gather", [f"{name}.int8", ids], [f"{p}.rows"], axis=0, name=f"{p}.gather"),
        helper.make_node("Gather", [f"{name}.scale", ids], [f"{p}.scales"], axis=0, name=f"{p}.gather_scale"),
        helper.make_node("Cast", [f"{p}.rows"], [f"{p}.float"], to=TensorProto.FLOAT, name=f"{p}.cast"),
        helper.make_node("Mul", [f"{p}.float", f"{p}.scales"], [out], name=f"{p}.mul"),
    ]
