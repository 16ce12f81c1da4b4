"""``distill inspect FILE``: what an artifact is (a model, an ONNX export, a TensorRT engine), without running it."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from distill.errors import UsageError


def _card_summary(meta: dict[str, Any]) -> dict[str, Any]:
    card = meta.get("card") or {}
    model = (meta.get("model") or {}).get("config") or {}
    diffusion = meta.get("diffusion") or {}
    data = meta.get("data") or {}
    keys = ("method", "stage", "teacher", "sampler", "steps", "timesteps", "guidance", "guidance_range")
    return {"card": {k: card[k] for k in keys if card.get(k) is not None},
            "network": {k: model.get(k) for k in ("image_size", "in_channels", "channels", "channel_mult",
                                                  "num_classes", "guidance_embed") if k in model},
            "diffusion": diffusion, "data": data.get("spec") or data.get("name")}


def describe_onnx(path: Path) -> dict[str, Any]:
    """An ONNX file on its own: inputs, outputs, opset, op counts, precision as read from the graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node)

    def io(v) -> str:
        t = v.type.tensor_type
        dims = "x".join(str(d.dim_param or d.dim_value) for d in t.shape.dim)
        return f"{v.name}: {onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name}[{dims}]"

    weights = Counter(onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in model.graph.initializer)
    precision = "int8" if ops.get("QuantizeLinear") else "fp16" if weights.get("float16") else "fp32"
    return {"kind": "onnx", "inputs": [io(v) for v in model.graph.input],
            "outputs": [io(v) for v in model.graph.output],
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "nodes": len(model.graph.node), "precision (from the graph)": precision,
            "initializer dtypes": dict(weights), "ops": dict(ops.most_common(12))}


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-able description of a model file / run / shipped name, an export folder, or a bare ONNX file."""
    from distill.checkpoint import check_model_metadata, read_metadata, resolve_model_path
    from export.artifact import is_artifact, read_manifest

    p = Path(path)
    if is_artifact(p):
        m = read_manifest(p)
        out: dict[str, Any] = {"kind": f"{'TensorRT engine' if m['graph'].endswith('.engine') else 'ONNX'} export "
                                       f"({m.get('kind', 'denoiser')} graph)",
                               "path": m["path"], "precision": m["precision"], "target": m.get("target"),
                               "source": m.get("source"), "command": m.get("command")}
        if m.get("kind") == "sampler":
            out["fused sampler"] = {k: m.get(k) for k in ("sampler", "steps", "timesteps", "noise_slots")}
        if m["graph"].endswith(".onnx"):
            out["graph"] = describe_onnx(Path(m["path"]))
        if "fp16" in m:
            out["fp16"] = {k: m["fp16"][k] for k in ("fp32_ops", "fp32_node_count", "converter")}
        if "int8" in m:
            keys = ("target", "calibration", "method", "samples", "calibration_inputs", "activation_type",
                    "weight_type", "per_channel", "exclude", "excluded_nodes", "QuantizeLinear_nodes")
            out["int8"] = {k: m["int8"].get(k) for k in keys}
        if "tensorrt" in m:
            out["tensorrt"] = m["tensorrt"]
        if "parity" in m:
            out["parity"] = {"against": m["parity"]["against"], "max_rel_err": m["parity"]["max_rel_err"],
                             "tolerance": m["parity"]["tolerance"]}
        out.update(_card_summary(m["metadata"]))
        return out
    if p.suffix == ".onnx" and p.is_file():
        return {"path": str(p), **describe_onnx(p), "note": "no manifest beside it: not made by distill export"}
    if p.suffix == ".engine":
        raise UsageError(f"{p}: an engine without its manifest.json cannot be checked against this GPU; pass the "
                         "folder 'distill export tensorrt' wrote")
    model = resolve_model_path(path)
    meta = read_metadata(model)
    if meta.get("format") != "distill.model/1":
        raise UsageError(f"{path}: not a distill model, export folder or ONNX file")
    check_model_metadata(meta, str(model))  # as every other command would refuse it
    from safetensors import safe_open

    with safe_open(str(model), "pt") as f:
        dtypes = Counter(str(f.get_slice(k).get_dtype()) for k in f.keys())
        params = sum(int(math.prod(f.get_slice(k).get_shape())) for k in f.keys())
    return {"kind": "model", "path": str(model), "parameters": params, "weight dtypes": dict(dtypes),
            **_card_summary(meta)}


def format_description(d: dict[str, Any], indent: int = 0) -> str:
    """Readable lines: one ``key: value`` per entry, nested dictionaries indented."""
    lines = []
    for k, v in d.items():
        if v is None or v == {} or v == []:
            continue
        if isinstance(v, dict):
            lines.append(" " * indent + f"{k}:")
            lines.append(format_description(v, indent + 2))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            lines.append(" " * indent + f"{k}: {text}")
    return "\n".join(line for line in lines if line)
