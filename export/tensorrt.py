"""``distill export tensorrt``: a strongly typed TensorRT engine from an ONNX export folder (the builder; its
runner is :class:`export.backends.tensorrt_backend.TensorRTBackend`).

Precision comes from the ONNX graph (FP32, FP16 casts, INT8 Q/DQ), never from builder flags: TensorRT 10 deprecated
weak typing and TensorRT 11 removed ``--fp16/--int8/--best``. The network is created with the
``STRONGLY_TYPED`` flag looked up by name (its bit moved between 10 and 11; 11 is always strongly typed). The
engine folder's manifest records the equivalent ``trtexec`` command, the TensorRT version, the GPU and its compute
capability; an engine is only deserialized where all three match (TensorRT has no preflight check of its own).

Written against TensorRT's documented Python API (``../shared/REFERENCES.md``). TensorRT cannot be installed on
the machines this project is developed on, so :func:`build_engine` and the engine's backend have not been run;
everything before the first ``import tensorrt`` (profiles, commands, manifest checks, Q/DQ rules) is tested.
"""

from __future__ import annotations

import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill.errors import DistillError, UsageError
from export.artifact import (
    EXPORT_FORMAT,
    GRAPH_FILES,
    check_export_out,
    read_manifest,
    sha256,
    staged_dir,
    write_manifest,
)
from export.backends import input_shapes
from export.backends.tensorrt_backend import TENSORRT_ERRORS, cuda_gpu, import_tensorrt, one_line
from export.precision import qdq_violations

LOG = logging.getLogger("distill")  # progress lines: the CLI prints them, a library caller configures logging

DEFAULT_WORKSPACE = 4 << 30


@dataclass
class BuildOptions:
    min_batch: int = 1
    opt_batch: int | None = None  # default: 64, or max_batch when smaller
    max_batch: int = 256
    workspace: int = DEFAULT_WORKSPACE
    timing_cache: Path | None = None  # persistent across builds; default: beside the engine
    # TensorRT lets FP32 layers run in TF32 by default (10-bit mantissa matmuls and convolutions): kept, recorded,
    # and off with tf32=False (--no-tf32) for engines that must match fp32 closely
    tf32: bool = True

    def __post_init__(self):
        if self.opt_batch is None:
            self.opt_batch = max(self.min_batch, min(64, self.max_batch))

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(f"--min-batch/--opt-batch/--max-batch: need 1 <= min <= opt <= max, got "
                             f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.workspace < 1 << 20:
            raise UsageError(f"--workspace {self.workspace}: give at least 1 MiB (bytes)")


def optimization_profile(manifest: dict[str, Any], opts: BuildOptions) -> dict[str, dict[str, list[int]]]:
    """``{input: {"min", "opt", "max"}}`` shapes over the batch range (the dynamic batch axis is 0)."""
    lo, mid, hi = (input_shapes(manifest, b) for b in (opts.min_batch, opts.opt_batch, opts.max_batch))
    return {name: {"min": list(lo[name]), "opt": list(mid[name]), "max": list(hi[name])} for name in lo}


def trtexec_command(onnx_path: Path, engine_path: Path, profile: dict, opts: BuildOptions, cache: Path) -> str:
    """The ``trtexec`` invocation equivalent to :func:`build_engine` (TensorRT 10: ``--stronglyTyped``; it is the
    default and only mode in 11), shell-quoted."""
    def shapes(key: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[key]))}" for name, dims in profile.items())

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped",
            f"--minShapes={shapes('min')}", f"--optShapes={shapes('opt')}", f"--maxShapes={shapes('max')}",
            f"--memPoolSize=workspace:{opts.workspace >> 20}M", f"--timingCacheFile={cache}"]
    if not opts.tf32:
        args.append("--noTF32")
    return " ".join(shlex.quote(a) for a in args)


# The ONNX opsets every TensorRT 10 and 11 parses (onnx-tensorrt docs/operators.md: 10.0 takes opset 9 to 20,
# 10.15 and 11.x 9 to 24); exports are pinned to opset 20 (export.onnx.ONNX_OPSET).
TENSORRT_OPSETS = (9, 20)
# The ONNX operators onnx-tensorrt 10.15 lists as supported (docs/operators.md, rows marked Y).
TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh
Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu
Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def tensorrt_graph_problems(model) -> list[str]:
    """What in an ONNX graph TensorRT's ONNX parser would refuse (empty: none): an opset outside
    :data:`TENSORRT_OPSETS`, an operator outside onnx-tensorrt's support list, a custom domain."""
    out = []
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and not TENSORRT_OPSETS[0] <= o.version <= TENSORRT_OPSETS[1]:
            out.append(f"opset {o.version} is outside {TENSORRT_OPSETS[0]}-{TENSORRT_OPSETS[1]}, the range every "
                       "TensorRT 10/11 parses")
    ops = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")} - TENSORRT_OPS)
    if ops:
        out.append(f"operators TensorRT's ONNX parser does not support: {', '.join(ops)}")
    custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        out.append(f"operators of custom domains: {', '.join(custom)}")
    return out


def polygraphy_lint(path: Path, timeout: int = 600) -> dict[str, Any]:
    """``polygraphy check lint`` on an ONNX file (NVIDIA's graph linter; it runs the graph on ONNX Runtime):
    ``{"passed", "failing" (node names), "messages" (warnings and errors)}``; None-free, and ``passed`` False with the
    reason when polygraphy is missing."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="distill-lint-") as tmp:
        report = Path(tmp) / "lint.json"
        run = subprocess.run([sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())",
                              "check", "lint", str(path), "-o", str(report)], capture_output=True, text=True,
                             timeout=timeout)
        if not report.is_file():
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            return {"passed": False, "failing": [], "messages": [" ".join(tail) or "polygraphy wrote no report"]}
        data = json.loads(report.read_text())
    failing = list(data.get("summary", {}).get("failing", []))
    messages = [f"{e.get('level')}: {e.get('message')}" for e in data.get("lint_entries", [])]
    return {"passed": run.returncode == 0 and not failing, "failing": failing, "messages": messages}


def prepare_build(source: Path, out: Path, opts: BuildOptions) -> dict[str, Any]:
    """Everything :func:`build_engine` checks and records before TensorRT is touched: the source export, Q/DQ rules
    of an INT8 graph, the profile, the ``trtexec`` command. Returns the engine manifest without build results."""
    import onnx

    opts.validate()
    check_export_out(out)
    src = read_manifest(source)
    if not src["graph"].endswith(".onnx"):
        raise UsageError(f"{source}: not an ONNX export; pass a folder written by 'distill export onnx'")
    if src["precision"] == "int8":
        if src.get("target") != "tensorrt":
            raise UsageError(f"{source}: an INT8 graph made for {src.get('target')} (U8 activations, ONNX Runtime's "
                             "CPU kernels); export one for TensorRT with --int8-target tensorrt")
        bad = qdq_violations(onnx.load(src["path"], load_external_data=False), Path(src["path"]).parent)
        if bad:
            raise UsageError(f"{source}: the Q/DQ graph breaks TensorRT's INT8 rules ({bad[0]}; {len(bad)} in all); "
                             "export it again with --int8-target tensorrt")
    problems = tensorrt_graph_problems(onnx.load(src["path"], load_external_data=False))
    if problems:
        raise UsageError(f"{source}: TensorRT cannot parse this graph ({'; '.join(problems)}); export it again with "
                         "this version of distill")
    profile = optimization_profile(src, opts)
    cache = (Path(opts.timing_cache) if opts.timing_cache else Path(out) / "timing.cache").resolve()
    engine = Path(out) / GRAPH_FILES["tensorrt"]
    return {"format": EXPORT_FORMAT, "graph": GRAPH_FILES["tensorrt"], "kind": src.get("kind", "denoiser"),
            "precision": src["precision"], "target": "tensorrt", "metadata": src["metadata"],
            "image_shape": src["image_shape"], "labels": src["labels"], "guided": src["guided"],
            **{k: src[k] for k in ("sampler", "steps", "timesteps", "noise_slots", "num_classes", "null_label",
                                   "decodes") if k in src},
            "source": {"export": str(source), "onnx_sha256": sha256(Path(src["path"]))},
            "tensorrt": {"profile": profile, "workspace": opts.workspace, "timing_cache": str(cache),
                         "tf32": bool(opts.tf32),  # applies to the graph's fp32 layers, whatever its precision
                         "trtexec": trtexec_command(Path(src["path"]), engine, profile, opts, cache)}}


def build_engine(source: Path, out: Path, opts: BuildOptions, *, command: str = "", log=LOG.info) -> dict[str, Any]:
    """Build a strongly typed engine from the ONNX export ``source`` into the folder ``out`` (needs TensorRT).
    Every status TensorRT returns is checked; its failures end as one line naming the file."""
    manifest = prepare_build(source, out, opts)
    manifest["command"] = command
    trt = import_tensorrt()
    gpu, capability = cuda_gpu()
    src = read_manifest(source)
    try:
        return _build(trt, src, source, Path(out), opts, manifest, gpu, capability, log)
    except TENSORRT_ERRORS as e:
        raise DistillError(f"{source}: TensorRT failed while building the engine: {one_line(e)}") from None


def _build(trt, src: dict, source: Path, out: Path, opts: BuildOptions, manifest: dict, gpu: str, capability: str,
           log) -> dict[str, Any]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # by name: the bit differs in 10 and 11
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(src["path"]):
        errors = "; ".join(one_line(parser.get_error(i)) for i in range(parser.num_errors))
        raise DistillError(f"{source}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace)
    if not opts.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if hasattr(trt, "ProfilingVerbosity"):  # layer names, precisions and formats for the engine inspector
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, dims in manifest["tensorrt"]["profile"].items():
        profile.set_shape(name, dims["min"], dims["opt"], dims["max"])
    index = config.add_optimization_profile(profile)
    if index != 0:  # -1: TensorRT found the profile invalid; it is the only one, so anything but 0 is wrong
        raise DistillError(f"{source}: TensorRT refused the optimization profile "
                           f"{manifest['tensorrt']['profile']} (index {index})")
    cache_path = Path(manifest["tensorrt"]["timing_cache"])
    earlier = cache_path.read_bytes() if cache_path.is_file() else b""
    try:
        cache = config.create_timing_cache(earlier)
    except TENSORRT_ERRORS:  # a blob this TensorRT cannot read at all: treated as a cache from elsewhere
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"{cache_path}: a timing cache made on another GPU or TensorRT version; building with a fresh one, "
            "which replaces it")
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise DistillError(f"{cache_path}: TensorRT refused even an empty timing cache")
        manifest["tensorrt"]["timing_cache_replaced"] = True
    manifest["tensorrt"]["timing_cache_reused"] = bool(earlier) and not manifest["tensorrt"].get(
        "timing_cache_replaced")
    log(f"building a {manifest['precision']} TensorRT engine for {gpu} (TF32 {'on' if opts.tf32 else 'off'}) ...")
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DistillError(f"{source}: TensorRT failed to build the engine (see its log above)")
    with staged_dir(out) as stage:
        (stage / GRAPH_FILES["tensorrt"]).write_bytes(bytes(plan))
        serialized = config.get_timing_cache().serialize()
        inside = cache_path.parent == Path(out).resolve()
        (stage / cache_path.name if inside else cache_path).write_bytes(bytes(serialized))
        if inside:
            manifest["tensorrt"]["timing_cache"] = str(Path(out).resolve() / cache_path.name)
        manifest["tensorrt"].update({"version": trt.__version__, "gpu": gpu, "compute_capability": capability,
                                     "build_seconds": round(time.perf_counter() - start, 1)})
        manifest["files"] = {p.name: sha256(p) for p in sorted(stage.iterdir()) if p.is_file()}
        write_manifest(stage, manifest)
    return manifest
