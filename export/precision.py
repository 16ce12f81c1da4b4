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
    """Names of the nodes whose inputs do not depend on ``image_input`` (the conditioning path)."""
    tainted = {image_input}
    out = []
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if any(i in tainted for i in node.input):
            tainted.update(node.output)
        else:
            out.append(node.name)
    return out


def to_fp16(model, image_input: str = "x_t", keep_ops: Sequence[str] = FP16_KEEP_OPS,
            keep_nodes: Sequence[str] = ()):
    """An explicit-cast FP16 copy of an fp32 ONNX model (inputs and outputs stay fp32) and the fp32 node list;
    ``keep_nodes`` are kept in fp32 besides the conditioning path and ``keep_ops``."""
    from onnxconverter_common import float16

    # the converter's own list holds the ops without fp16 kernels or with float-typed control inputs (Resize)
    ops = sorted(set(keep_ops) | set(float16.DEFAULT_OP_BLOCK_LIST))
    keep_nodes = sorted(set(conditioning_nodes(model, image_input)) | set(keep_nodes))
    kept = sorted(set(keep_nodes) | {n.name for n in model.graph.node if n.op_type in ops})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated to 1e-07": tiny weights, known
        half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=ops,
                                                node_block_list=keep_nodes)
    return half, {"fp32_ops": list(keep_ops), "fp32_nodes": kept, "fp32_node_count": len(kept),
                  "converter": "onnxconverter_common.float16.convert_float_to_float16(keep_io_types=True)"}


# -- INT8 --------------------------------------------------------------------------------------------------------

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
    if opts.target == "tensorrt":
        act = QuantType.QInt8
        extra.update({"ActivationSymmetric": True, "AddQDQPairToWeight": True})
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
    counts = {op: sum(n.op_type == op for n in quantized.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    return {**opts.record(), "method_used": name, "excluded_nodes": exclude, "activation_type": act.name,
            "weight_type": "QInt8",
            "per_channel": True, "format": "QDQ", **{f"{k}_nodes": v for k, v in counts.items()},
            "quantizer": "onnxruntime.quantization.quantize_static", "calibration_inputs": len(calib),
            "calibration_set": calib.info}
