"""Precision lives in the ONNX graph: FP16 with explicit casts, INT8 as Q/DQ nodes (``../shared/DESIGN.md``).

FP16 is onnxconverter-common's converter; INT8 is ONNX Runtime's static quantizer. What is ours is which nodes stay
in fp32 (FP16), and the calibration data and which layers are quantized (INT8).

FP16 keeps in fp32 (a recorded list, in the manifest):
- the conditioning path: every node that does not depend on ``x_t`` (time and schedule math, the sinusoidal time
  embedding and its MLP, per-block embedding projections, class and ``w`` embeddings). It is batch x vector work,
  so fp32 there costs nothing, and ``1000 t`` in fp16 would round to steps of 0.5;
- the normalizations and softmax (:data:`FP16_KEEP_OPS`): fp16 variance and exp overflow, the usual cause of the
  NaN / black-image FP16 UNets reported against diffusers and ONNX Runtime.

INT8 has two targets (the manifest says which a file is for):
- ``cpu``: what runs fastest through ONNX Runtime on x86: U8 activations, S8 per-channel symmetric weights
  (U8S8, the VNNI/AMX kernels' format) on Conv / Gemm / MatMul only;
- ``tensorrt``: TensorRT's strongly typed Q/DQ rules: S8 symmetric activations and weights, zero points 0,
  per-channel weights (axis 0 for Conv, 1 for ConvTranspose), float biases, a Q/DQ pair per weight.
Both leave the layers Model Optimizer's diffusers recipe leaves in higher precision (:data:`DEFAULT_EXCLUDE`).
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from export.calibration import SOURCES, CalibrationSet

FP16_KEEP_OPS = ("InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization",
                 "Softmax", "ReduceMean", "Pow", "Sqrt", "Exp", "Sin", "Cos")

# Model Optimizer's diffusers recipe keeps time_emb_proj, time_embedding, conv_in, conv_out, conv_shortcut and
# add_embedding in higher precision; in our UNet's parameter names those are:
DEFAULT_EXCLUDE = ("time_mlp.", "guidance_mlp.", ".emb.", "conv_in.", "conv_out.", ".skip.")
INT8_TARGETS = ("cpu", "tensorrt")
CALIBRATION_METHODS = ("auto", "minmax", "moving-average", "entropy", "percentile", "step-percentile")
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# -- FP16 --------------------------------------------------------------------------------------------------------

def conditioning_nodes(model, image_input: str) -> list[str]:
    """Names of the nodes whose inputs do not depend on ``image_input`` (the conditioning path). A weight's
    quantize/dequantize pair (an INT8 graph's Q/DQ on an initializer) is not: it belongs to the layer it feeds."""
    tainted = {image_input}
    weight_q = weight_qdq_nodes(model)
    out = []
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
        elif node.name not in weight_q:
            out.append(node.name)
    return out


def weight_qdq_nodes(model) -> set[str]:
    """Names of the QuantizeLinear nodes reading an initializer and the DequantizeLinear nodes reading those (or
    an int8 initializer directly): the weight side of a Q/DQ graph."""
    inits = {i.name for i in model.graph.initializer}
    quantized = set()
    out = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in inits:
            out.add(node.name)
            quantized.add(node.output[0])
        elif node.op_type == "DequantizeLinear" and (node.input[0] in quantized or node.input[0] in inits):
            out.add(node.name)
    return out


def to_fp16(model, image_input: str = "x_t", keep_ops: Sequence[str] = FP16_KEEP_OPS,
            keep_nodes: Sequence[str] = ()):
    """An explicit-cast FP16 copy of an fp32 ONNX model (inputs and outputs stay fp32) and the fp32 node list;
    ``keep_nodes`` are kept in fp32 besides the conditioning path and ``keep_ops``.

    onnxconverter-common's converter does the conversion; it leaves the kept nodes half-kept (every fp32 weight
    turned fp16 and cast back in front of the node that was to stay fp32, and an fp32 -> fp16 -> fp32 round trip
    between any two kept nodes, one of them in front of the time embedding's Sin/Cos), which :func:`fp32_kept_path`
    undoes. :func:`fp16_violations` must then find nothing (checked at export)."""
    from onnxconverter_common import float16

    # the converter's own list holds the ops without fp16 kernels or with float-typed control inputs (Resize)
    ops = sorted(set(keep_ops) | set(float16.DEFAULT_OP_BLOCK_LIST))
    keep_nodes = sorted(set(conditioning_nodes(model, image_input)) | set(keep_nodes))
    kept = sorted(set(keep_nodes) | {n.name for n in model.graph.node if n.op_type in ops})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated to 1e-07": tiny weights, known
        half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=ops,
                                                node_block_list=keep_nodes)
    cleaned = fp32_kept_path(half, model)
    bad = fp16_violations(half, image_input, kept)
    if bad:
        from distill.errors import DistillError

        raise DistillError(f"the fp16 graph keeps lossy casts on its fp32 path ({bad[0]}; {len(bad)} in all); "
                           "a bug in export/precision.py, please report")
    return half, {"fp32_ops": list(keep_ops), "fp32_nodes": kept, "fp32_node_count": len(kept),
                  "converter": "onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True), "
                               "then export.precision.fp32_kept_path",
                  "cleaned": cleaned}


_F32, _F16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _constant_tensors(g) -> dict:
    """The tensor values of a graph's Constant nodes, by output name."""
    return {n.output[0]: n.attribute[0].t for n in g.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].type == 4}  # 4: AttributeProto.TENSOR


def _producers_consumers(g) -> tuple[dict, dict[str, list]]:
    """``(tensor -> the node making it, tensor -> the nodes reading it)``."""
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _drop_unused(g, op_types: Sequence[str]) -> list:
    """Remove, in place, the nodes of ``op_types`` nothing reads (repeatedly: a removed node may leave its own
    inputs unread), then the initializers nothing reads. Returns the removed nodes."""
    outputs = {o.name for o in g.output}
    removed = []
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type in op_types and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += dead
    used = {i for n in g.node for i in n.input} | outputs
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return removed


def _float_types(model) -> dict[str, int]:
    """Element type of every tensor whose type ONNX's shape inference (or the graph) states."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # a >2 GB graph or an op shape inference does not know: what the graph itself states
        inferred = model.graph
    out = {v.name: v.type.tensor_type.elem_type
           for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    out.update({i.name: i.data_type for i in model.graph.initializer})
    out.update({name: t.data_type for name, t in _constant_tensors(model.graph).items()})
    out.update({n.output[0]: _cast_to(n) for n in model.graph.node if n.op_type == "Cast"})
    return out


def fp32_kept_path(half, original) -> dict[str, int]:
    """Make the kept nodes of a converted graph really fp32, in place: a Cast to fp32 of an fp16 weight (an
    initializer or Constant the converter rounded) reads the original fp32 weight instead, and an fp32 tensor cast
    to fp16 and back reads the fp32 tensor. Casts left without a consumer are removed. Returns the counts."""
    g = half.graph
    types = _float_types(half)
    producer = {o: n for n in g.node for o in n.output}
    fp32_init = {i.name: i for i in original.graph.initializer if i.data_type == _F32}
    fp32_const = {k: t for k, t in _constant_tensors(original.graph).items() if t.data_type == _F32}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    restored: dict[str, str] = {}
    counts = {"round_trips_removed": 0, "weights_restored_fp32": 0, "casts_removed": 0}
    for node in g.node:
        if _cast_to(node) != _F32 or node.output[0] in outputs:
            continue
        src = node.input[0]
        up = producer.get(src)
        if up is not None and _cast_to(up) == _F16 and types.get(up.input[0]) == _F32:
            rename[node.output[0]] = up.input[0]  # fp32 -> fp16 -> fp32: the fp32 tensor itself
            counts["round_trips_removed"] += 1
            continue
        weight = fp32_init.get(src) if up is None else \
            (fp32_const.get(src) if up.op_type == "Constant" else None)
        if weight is not None and types.get(src) == _F16:
            if src not in restored:
                name = f"{src}_fp32"
                tensor = type(weight)()
                tensor.CopyFrom(weight)
                tensor.name = name
                g.initializer.append(tensor)
                restored[src] = name
                counts["weights_restored_fp32"] += 1
            rename[node.output[0]] = restored[src]
    counts["weights_copied_fp16"] = _fp16_copies_for_fp16_nodes(g, types, rename)
    if not rename:
        return counts

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    for node in g.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = resolve(name)
    # drop what no longer has a consumer (the bypassed casts, then the fp16 casts and weights they read)
    counts["casts_removed"] = sum(n.op_type == "Cast" for n in _drop_unused(g, ("Cast", "Constant")))
    return counts


def _fp16_copies_for_fp16_nodes(g, types: dict[str, int], rename: dict[str, str]) -> int:
    """An fp32 initializer the converter left fp32 because a kept node shares it, read by a node computing in
    fp16 (its other float inputs fp16): that node gets an fp16 copy (in place). Returns the copies made."""
    from onnx import numpy_helper

    inits = {i.name: i for i in g.initializer}
    copies: dict[str, str] = {}
    for node in g.node:
        if node.op_type in ("Cast", "QuantizeLinear", "DequantizeLinear"):
            continue
        live = [rename.get(i, i) for i in node.input]
        if _F16 not in {types.get(i) for i in live}:
            continue
        for k, name in enumerate(live):
            init = inits.get(name)
            if init is None or init.data_type != _F32:
                continue
            if name not in copies:
                copies[name] = f"{name}_fp16"
                g.initializer.append(numpy_helper.from_array(
                    numpy_helper.to_array(init).astype(np.float16), copies[name]))
            node.input[k] = copies[name]
    return len(copies)


def fp16_violations(model, image_input: str, kept: Sequence[str]) -> list[str]:
    """Where an fp16 graph's fp32 path is not fp32 (empty: none):
    - a round trip fp32 -> fp16 -> fp32 (a Cast pair: the value is rounded to fp16 on a path meant to be fp32);
    - a kept node reading an fp16 weight (directly, or through a Cast to fp32: the weight was rounded);
    - an fp16 tensor on the conditioning (time) path: a tensor that does not depend on ``image_input`` is fp16
      only where it leaves that path (every consumer depends on the image)."""
    g = model.graph
    types = _float_types(model)
    producer, consumers = _producers_consumers(g)
    weights16 = {i.name for i in g.initializer if i.data_type == _F16} | \
        {n.output[0] for n in g.node if n.op_type == "Constant" and types.get(n.output[0]) == _F16}
    keep = set(kept)
    tainted = {image_input}
    for node in g.node:
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
    out = []
    graph_outputs = {o.name for o in g.output}
    for node in g.node:
        if _cast_to(node) == _F32 and node.output[0] not in graph_outputs:  # an output's Cast is the io boundary
            up = producer.get(node.input[0])
            if up is not None and _cast_to(up) == _F16 and types.get(up.input[0]) == _F32:
                out.append(f"{up.name} -> {node.name}: fp32 -> fp16 -> fp32 round trip of {up.input[0]}")
        if node.name in keep:
            for i in node.input:
                up = producer.get(i)
                if i in weights16 or (up is not None and _cast_to(up) == _F32 and up.input[0] in weights16):
                    out.append(f"{node.name} ({node.op_type}, kept fp32) reads the fp16 weight "
                               f"{up.input[0] if i not in weights16 else i}")
        if any(o in tainted for o in node.output):
            continue
        for o in node.output:
            if types.get(o) == _F16 and any(not any(x in tainted for x in u.output) for u in consumers.get(o, [])):
                out.append(f"{node.name} ({node.op_type}): fp16 tensor {o} on the conditioning path")
    return out


# -- INT8 --------------------------------------------------------------------------------------------------------

def _weight_axis(user, weight_dims: int) -> int | None:
    """The output-channel axis of ``user``'s weight (input 1): where TensorRT takes per-channel scales."""
    if user.op_type == "Conv":
        return 0
    if user.op_type == "ConvTranspose":
        return 1
    if user.op_type == "Gemm":
        return 0 if next((a.i for a in user.attribute if a.name == "transB"), 0) else 1
    if user.op_type == "MatMul":
        return weight_dims - 1
    return None


def qdq_violations(model, base_dir: str | Path | None = None) -> list[str]:
    """Where a Q/DQ ONNX graph breaks TensorRT's strongly typed INT8 rules (empty: none), each rule a line:
    - zero points present (a missing one means UINT8), INT8 and all 0 (symmetric); no INT32 (bias) dequantization;
    - scales > 0, constant (an initializer or Constant; external data read from ``base_dir``) and in the dtype of
      the tensor they quantize (a Q's input; for a DQ, its Q's input);
    - per-tensor scales and zero points scalars, a zero point the shape of its scale;
    - per-channel only on weights, opset >= 13, along the output-channel axis of the layer (Conv 0,
      ConvTranspose 1, Gemm 0 with transB else 1, MatMul the last), one scale per channel."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = _constant_tensors(g)
    types = _float_types(model)
    producer, consumers = _producers_consumers(g)
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    out: list[str] = []

    def value(name: str, node, what: str):
        tensor = inits.get(name) or consts.get(name)
        if tensor is None:
            out.append(f"{node.name}: the {what} {name} is computed, not a constant (TensorRT needs constant "
                       "scales and zero points)")
            return None
        try:
            return numpy_helper.to_array(tensor, str(base_dir) if base_dir else "")
        except Exception as e:  # noqa: BLE001  (OSError, or onnx's ValidationError for a missing file)
            out.append(f"{node.name}: the {what} {name} is in external data that cannot be read ({e})")
            return None

    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = value(n.input[1], n, "scale")
        if len(n.input) < 3 or not n.input[2]:
            zero = None
            if n.op_type == "QuantizeLinear":
                out.append(f"{n.name}: no zero point (QuantizeLinear then makes UINT8; give an INT8 zero point 0)")
        else:
            zero = value(n.input[2], n, "zero point")
        if scale is None:
            continue
        if not (scale > 0).all():
            out.append(f"{n.name}: scale <= 0")
        if zero is not None:
            if zero.dtype == np.uint8:
                out.append(f"{n.name}: UINT8 quantization (TensorRT takes INT8)")
            elif zero.dtype == np.int32:
                out.append(f"{n.name}: INT32 (bias) dequantization; keep biases float")
            if zero.any():
                out.append(f"{n.name}: non-zero zero point (asymmetric; TensorRT takes symmetric INT8 only)")
            if zero.shape != scale.shape:
                out.append(f"{n.name}: zero point shape {list(zero.shape)} differs from the scale's "
                           f"{list(scale.shape)}")
        # the dtype of the tensor quantized: a Q's input, a DQ's Q's input (a DQ of an int8 initializer: none)
        q = n if n.op_type == "QuantizeLinear" else producer.get(n.input[0])
        quantized = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None
        want = types.get(quantized) if quantized else None
        have = types.get(n.input[1])
        if want and have and want != have:
            from onnx import helper

            out.append(f"{n.name}: scale is {helper.tensor_dtype_to_np_dtype(have).name}, the tensor it quantizes "
                       f"is {helper.tensor_dtype_to_np_dtype(want).name} (strongly typed: the same)")
        has_axis = any(a.name == "axis" for a in n.attribute)
        if scale.size == 1 and not (has_axis and scale.ndim == 1):  # [1] with an axis: one channel, per-channel
            if scale.ndim:
                out.append(f"{n.name}: per-tensor scale of shape {list(scale.shape)} (make it a scalar)")
            continue
        if opset < 13:
            out.append(f"{n.name}: per-channel Q/DQ needs opset >= 13, graph has {opset}")
        weight = n.input[0] if n.input[0] in inits else (quantized if quantized in inits else None)
        if weight is None:
            out.append(f"{n.name}: per-channel quantization of an activation (weights only)")
            continue
        if n.op_type != "DequantizeLinear":
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        dims = list(inits[weight].dims)
        for user in consumers.get(n.output[0], []):
            if len(user.input) < 2 or user.input[1] != n.output[0]:
                continue
            want_axis = _weight_axis(user, len(dims))
            if want_axis is not None and axis % len(dims) != want_axis:
                out.append(f"{n.name}: per-channel axis {axis} on a {user.op_type} weight (want {want_axis})")
            elif want_axis is not None and dims[want_axis] != scale.size:
                out.append(f"{n.name}: {scale.size} scales for {dims[want_axis]} output channels")
    return out


def quantize_weighted_inputs_only(model) -> int:
    """In place: every consumer of a quantized activation that is not a weighted layer's data input (a Concat of
    a skip connection, a residual Add, a norm) reads the unquantized tensor instead; ONNX Runtime's quantizer
    shares one Q/DQ pair among all consumers of a tensor. Q/DQ pairs left without a consumer are removed.
    Returns how many inputs were rewired."""
    g = model.graph
    weight_q = weight_qdq_nodes(model)
    producer = {o: n for n in g.node for o in n.output}
    source = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.name not in weight_q:
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                source[n.output[0]] = q.input[0]
    weight_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.name in weight_q}
    count = 0
    for n in g.node:
        for k, name in enumerate(n.input):
            quantized_layer = n.op_type in QUANTIZED_OPS and k == 0 and len(n.input) > 1 and n.input[1] in weight_dq
            if name in source and not quantized_layer:  # an excluded (float) layer reads the float tensor too
                n.input[k] = source[name]
                count += 1
    _drop_unused(g, ("QuantizeLinear", "DequantizeLinear"))
    return count


def qdq_placement(model) -> list[str]:
    """Where a Q/DQ graph departs from TensorRT's explicit-quantization placement (empty: none): activation Q/DQ
    only on the data inputs of weighted layers (no quantizer on a layer's output that feeds anything else), and
    none on attention's activation-activation matmuls (a MatMul / Gemm whose second input is not a weight)."""
    g = model.graph
    weight_q = weight_qdq_nodes(model)
    producer, consumers = _producers_consumers(g)
    weight_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.name in weight_q}
    out = []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.name not in weight_q:
            for user in consumers.get(n.output[0], []):
                if user.op_type in QUANTIZED_OPS and user.input[0] == n.output[0] and (
                        len(user.input) < 2 or user.input[1] not in weight_dq):
                    out.append(f"{n.name}: a quantized activation feeds {user.name} ({user.op_type}), a layer whose "
                               "weight is not quantized")
                elif user.op_type not in QUANTIZED_OPS or user.input[0] != n.output[0]:
                    up = producer.get(producer[n.input[0]].input[0]) if n.input[0] in producer else None
                    where = f" (the output of {up.name}, {up.op_type})" if up is not None else ""
                    out.append(f"{n.name}: a quantized activation{where} feeds {user.name} ({user.op_type}), "
                               "not a weighted layer's input")
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1:
            b = producer.get(n.input[1])
            b_is_weight = n.input[1] in {i.name for i in g.initializer} or (b is not None and b.name in weight_q)
            if not b_is_weight and any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                       for i in n.input[:2]):
                out.append(f"{n.name}: an activation-activation {n.op_type} (attention) is quantized")
    return out


@dataclass
class Int8Options:
    """How an INT8 graph is made (recorded in the manifest)."""

    target: str = "cpu"
    calibration: str = "trajectory"
    # auto: moving-average for a fused graph, minmax for the per-step graph (each measured best on the shipped
    # 4-step student, benchmarks/results/export.md)
    method: str = "auto"
    # trajectories (or their count of random inputs); None: 256 for a fused graph (moving-average needs the
    # batches), 64 for the per-step graph (minmax's ranges widen with more samples: 1.146x FD at 64, 1.31x at 256)
    samples: int | None = None
    percentile: float = 99.999  # for method 'percentile' (of |activation| values)
    step_percentile: float = 50.0  # for 'step-percentile': of the per-step amax values
    exclude: tuple[str, ...] = field(default_factory=lambda: DEFAULT_EXCLUDE)
    float_steps: tuple[int, ...] = ()  # fused graphs: unrolled steps (1 = first) kept entirely in float

    def validate(self) -> None:
        from distill.errors import UsageError

        if self.target not in INT8_TARGETS:
            raise UsageError(f"--int8-target {self.target!r}: use one of {', '.join(INT8_TARGETS)}")
        if self.calibration not in SOURCES:
            raise UsageError(f"--calibration {self.calibration!r}: use one of {', '.join(SOURCES)}")
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(f"--calib-method {self.method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"--calib-samples {self.samples}: give at least 1 trajectory")
        if not (0 < self.percentile <= 100 and 0 <= self.step_percentile <= 100):
            raise UsageError("--percentile / --step-percentile: must lie in (0, 100]")
        if any(k < 1 for k in self.float_steps):
            raise UsageError(f"--float-steps {list(self.float_steps)}: steps count from 1")

    def trajectories(self, fused: bool) -> int:
        return self.samples if self.samples is not None else (256 if fused else 64)

    def record(self) -> dict:
        return {**asdict(self), "exclude": list(self.exclude), "float_steps": list(self.float_steps)}


def excluded_nodes(model, patterns: Sequence[str]) -> list[str]:
    """Quantizable nodes whose weight (or own name) matches one of ``patterns`` (substring, or fnmatch with ``*``)."""
    inits = {i.name for i in model.graph.initializer}

    def hit(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p if "*" in p else f"*{p}*") for p in patterns)

    out = []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        weights = [i for i in node.input if i in inits]
        if hit(node.name) or any(hit(w) for w in weights):
            out.append(node.name)
    return out


def unrolled_step_of_nodes(model) -> dict[str, int]:
    """For a fused sampler graph: the unrolled step (1 = first) each quantizable node belongs to. The k-th node
    using a weight is in step k; a node without weights (attention's MatMul) is in the step of the last weighted
    node before it (ONNX nodes are topologically sorted)."""
    inits = {i.name for i in model.graph.initializer}
    uses: dict[str, int] = {}
    current, out = 1, {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        weights = [i for i in node.input if i in inits]
        if weights:
            uses[weights[0]] = uses.get(weights[0], 0) + 1
            current = uses[weights[0]]
        out[node.name] = current
    return out


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` over a :class:`CalibrationSet` (rows ``index``), in batches."""

    def __init__(self, calib: CalibrationSet, index=None, batch: int = 32):
        from onnxruntime.quantization import CalibrationDataReader  # noqa: F401  (the protocol it follows)

        self.calib = calib
        self.index = np.arange(len(calib)) if index is None else np.asarray(index)
        self.batch, self.pos = batch, 0

    def get_next(self):
        if self.pos >= len(self.index):
            return None
        rows = self.calib.rows(self.index[self.pos:self.pos + self.batch])
        self.pos += self.batch
        return rows

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch)


def step_ranges(model_path: Path, calib: CalibrationSet, percentile: float, workdir: Path) -> dict[str, dict]:
    """Model Optimizer's diffusion calibrator, on ONNX Runtime: per tensor, the amax of each sampler step
    separately, combined by a percentile over the steps (symmetric ranges), as ``TensorQuantOverrides``."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    per_step = {}
    for step in np.unique(calib.step):
        calibrator = create_calibrator(Path(model_path), list(QUANTIZED_OPS),
                                       augmented_model_path=str(workdir / f"augmented-{step}.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax,
                                       extra_options={"symmetric": True})
        calibrator.collect_data(_Reader(calib, np.flatnonzero(calib.step == step)))
        for name, data in calibrator.compute_data().data.items():
            lo, hi = data.range_value
            per_step.setdefault(name, []).append(float(max(np.abs(lo).max(), np.abs(hi).max())))
        del calibrator
    out = {}
    for name, amaxes in per_step.items():
        amax = float(np.percentile(amaxes, percentile))
        out[name] = [{"rmin": np.array(-amax, dtype=np.float32), "rmax": np.array(amax, dtype=np.float32)}]
    return out


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider")


def to_int8(model_path: Path, out_path: Path, calib: CalibrationSet, opts: Int8Options, workdir: Path) -> dict:
    """Quantize ``model_path`` (fp32 ONNX) to a Q/DQ graph at ``out_path``; returns what was done, for the
    manifest."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(model_path))
    exclude = excluded_nodes(model, opts.exclude)
    if opts.float_steps:
        step_of = unrolled_step_of_nodes(model)
        if max(opts.float_steps) > max(step_of.values(), default=0):
            from distill.errors import UsageError

            raise UsageError(f"--float-steps {list(opts.float_steps)}: the graph unrolls {max(step_of.values())} "
                             "steps")
        exclude = sorted(set(exclude) | {n for n, k in step_of.items() if k in opts.float_steps})
    # A fused graph uses each weight once per unrolled step: dedicated Q/DQ pairs, or ONNX Runtime cannot fuse a
    # shared weight DequantizeLinear into each QLinearConv (measured: the fused INT8 graph ran slower than FP32).
    fused = bool(calib.info.get("fused"))
    extra = {"QuantizeBias": False, "DedicatedQDQPair": fused,
             "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
             "WeightSymmetric": True, "CalibPercentile": opts.percentile}
    if opts.target == "tensorrt":  # TensorRT's explicit-quantization placement (Model Optimizer's recipe)
        act = QuantType.QInt8
        extra.update({"ActivationSymmetric": True, "AddQDQPairToWeight": True,
                      # Q/DQ on the inputs of weighted layers only, never on their outputs
                      "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                      # attention's activation-activation matmuls stay unquantized
                      "MatMulConstBOnly": True})
        inits = {i.name for i in model.graph.initializer}
        exclude = sorted(set(exclude) | {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                                         and n.input[1] not in inits})
    else:
        act = QuantType.QUInt8
        extra.update({"ActivationSymmetric": False, "AddQDQPairToWeight": False})
    name = opts.method if opts.method != "auto" else ("moving-average" if fused else "minmax")
    method = {"minmax": CalibrationMethod.MinMax, "moving-average": CalibrationMethod.MinMax,
              "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
              "step-percentile": CalibrationMethod.MinMax}[name]
    if name == "moving-average":  # each range an average over calibration batches, not the extreme of all
        extra.update({"CalibMovingAverage": True, "CalibMovingAverageConstant": 0.01})
    if name == "step-percentile":
        extra["TensorQuantOverrides"] = step_ranges(model_path, calib, opts.step_percentile, workdir)
    advice = _DropAdvice()  # ONNX Runtime's "consider pre-processing" lines on the root logger, at every call
    logging.getLogger().addFilter(advice)
    try:
        quantize_static(str(model_path), str(out_path), _Reader(calib), quant_format=QuantFormat.QDQ,
                        activation_type=act, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=exclude,
                        calibrate_method=method, extra_options=extra)
    finally:
        logging.getLogger().removeFilter(advice)
    quantized = onnx.load(str(out_path))
    elsewhere = {}
    if opts.target == "tensorrt":
        # fp16 everywhere else (strongly typed TensorRT runs each layer in its input type), scales fp16 with the
        # tensors they quantize; the conditioning path and the normalizations stay fp32 as in the FP16 export
        rewired = quantize_weighted_inputs_only(quantized)
        quantized, fp16 = to_fp16(quantized, image_input=model.graph.input[0].name)
        fp16["float_consumers_rewired"] = rewired
        bad = qdq_violations(quantized) + qdq_placement(quantized)
        if bad:
            from distill.errors import DistillError

            raise DistillError(f"the TensorRT INT8 graph breaks a Q/DQ rule ({bad[0]}; {len(bad)} in all); a bug "
                               "in export/precision.py, please report")
        onnx.save(quantized, str(out_path))
        elsewhere = {"high_precision": "fp16", "fp16": fp16}
    else:
        elsewhere = {"high_precision": "fp32"}
    counts = {op: sum(n.op_type == op for n in quantized.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    weight_q = weight_qdq_nodes(quantized)
    return {**opts.record(), "method_used": name, "excluded_nodes": exclude, "activation_type": act.name,
            "weight_type": "QInt8",
            "per_channel": True, "format": "QDQ", **{f"{k}_nodes": v for k, v in counts.items()},
            "activation_quantizers": sum(n.op_type == "QuantizeLinear" and n.name not in weight_q
                                         for n in quantized.graph.node),
            **elsewhere,
            "quantizer": "onnxruntime.quantization.quantize_static", "calibration_inputs": len(calib),
            "calibration_set": calib.info}
