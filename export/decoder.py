"""The decoder of a latent model as its own graph, ``decoder.onnx`` (``latents -> images``), written by ``distill
export`` beside the denoiser graph so that a deployment folder holds every network it needs.

- FP32: traced once (the trace cache of :mod:`export.onnx`, keyed by the autoencoder's digest), checked in ONNX
  Runtime against torch on latents the model itself samples.
- FP16 (with ``--precision fp16``), kept numerically safe: FP16 VAE decoders overflow (the NaN and black images
  reported against Stable Diffusion's VAE, which diffusers answers by upcasting the whole decoder, its
  ``force_upcast``). Here the fp32 decoder is run on the model's own latents, every node whose activations exceed
  1/4 of the fp16 range (16,384) stays in fp32 with the normalizations and softmax, and the fp16 decode must then be
  finite, inside the fp32 decode's range (plus 5 %) and within 1e-2 relative of it; otherwise the fp32 decoder is
  shipped and the manifest says why.
- INT8 (with ``--precision int8``), where it holds quality: ONNX Runtime's static Q/DQ quantizer (U8 activations,
  S8 per-channel weights, the first and last convolutions kept in float as for the denoiser), calibrated on latents
  the model samples; shipped only if its decode of other sampled latents is finite, in range and within 2e-2 of
  the fp32 decode, else the fp32 decoder is shipped and the manifest says why.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.errors import DistillError

DECODER_FILE = "decoder.onnx"
FP16_SAFE_AMAX = 16384.0  # a quarter of fp16's largest finite value (65,504)
TOLERANCE = {"fp32": 1e-5, "fp16": 1e-2, "int8": 2e-2}
CHECK_SEEDS = range(5_000_000, 5_000_016)  # latents for the checks, sampled by the model itself
CALIBRATION_SEEDS = range(5_100_000, 5_100_064)  # an INT8 decoder's calibration latents (not the check's)


def model_latents(den, seeds=CHECK_SEEDS) -> torch.Tensor:
    """Latents the model samples (its card's sampler and grid): what its decoder sees in deployment."""
    from distill.checkpoint import card_guidance, card_sampling
    from distill.denoiser import Cond
    from distill.samplers import generate

    sampler, steps, spacing, times = card_sampling(den.metadata or {})
    labels = torch.arange(len(seeds)) % den.num_classes if den.num_classes else None
    cond = Cond(labels, card_guidance(den.metadata or {}) if labels is not None else 0.0)
    with torch.no_grad():
        return generate(den, den.image_shape, list(seeds), sampler=sampler, steps=steps, spacing=spacing,
                        timesteps=times, cond=cond).float()


def activation_amax(path: Path, latents: np.ndarray) -> dict[str, float]:
    """The largest |value| of every node output of the ONNX graph at ``path`` on ``latents`` (by node name)."""
    import onnx

    from export.onnx import ort_session

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    known = {v.name for v in model.graph.output}
    producer = {}
    for node in model.graph.node:
        for o in node.output:
            if o and o not in known:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(o))
                producer[o] = node.name
    tmp = path.with_name(path.stem + ".amax.onnx")
    onnx.save(model, str(tmp))
    try:
        session = ort_session(tmp)
        names = [o.name for o in session.get_outputs()]
        amax: dict[str, float] = {}
        for i in range(0, len(latents), 4):
            for name, value in zip(names, session.run(None, {"latents": latents[i:i + 4]})):
                if name in producer and np.issubdtype(np.asarray(value).dtype, np.floating):
                    node = producer[name]
                    amax[node] = max(amax.get(node, 0.0), float(np.abs(value).max()) if value.size else 0.0)
        return amax
    finally:
        tmp.unlink(missing_ok=True)


def _check(got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    from export.onnx import rel_err

    top = float(np.abs(ref).max())
    return {"rel_err": rel_err(got, ref.astype(np.float64)), "finite": bool(np.isfinite(got).all()),
            "max_abs": float(np.abs(got).max()) if np.isfinite(got).all() else float("inf"), "fp32_max_abs": top,
            "in_range": bool(np.isfinite(got).all() and np.abs(got).max() <= 1.05 * top + 1e-6)}


def _ship_if_it_holds(out: dict[str, Any], precision: str, candidate: Path, path: Path, feed: np.ndarray,
                      ref: np.ndarray, start: float, log) -> None:
    """Replace the fp32 decoder at ``path`` by ``candidate`` if its decode of ``feed`` is finite, in range and
    within :data:`TOLERANCE` of ``ref``; record the check (and otherwise why the fp32 decoder stays)."""
    from export.onnx import check_graph, ort_session

    check = _check(ort_session(candidate).run(None, {"latents": feed})[0], ref)
    out[precision].update(check=check, seconds=round(time.perf_counter() - start, 1))
    if check["finite"] and check["in_range"] and check["rel_err"] <= TOLERANCE[precision]:
        candidate.replace(path)
        out["precision"] = precision
        out["graph_info"] = check_graph(path)
        return
    candidate.unlink()
    what = "not finite" if not check["finite"] else "out of range" if not check["in_range"] else \
        f"off by {check['rel_err']:.2e} (bound {TOLERANCE[precision]:g})"
    out[precision].update(shipped=False, why_fp32=f"the {precision} decode was {what} on the model's latents; the "
                                                  "fp32 decoder is shipped")
    log(f"note: {out[precision]['why_fp32']}")


def export_decoder(den, stage: Path, precision: str, log=print) -> dict[str, Any]:
    """Write ``stage/decoder.onnx`` for the latent model ``den``; returns its manifest record."""
    import onnx

    from distill.latent import Decoder, load_autoencoder
    from export.onnx import check_graph, onnx_export, ort_session, recall_graph, remember_graph
    from export.precision import to_fp16

    latent = den.latent
    ae = load_autoencoder(latent)
    module = Decoder(ae).eval()
    latents = model_latents(den)
    path = stage / DECODER_FILE
    key = ("decoder", latent["digest"], latent["scaling_factor"], latent.get("shift_factor", 0.0),
           tuple(latent["latent_shape"]))
    earlier = recall_graph(key)
    if earlier:
        graph, record, where = earlier
        path.write_bytes(graph)
        record = {**record, "export_seconds": 0.0, "trace_reused_from": where}
    else:
        log("exporting the autoencoder's decoder ...")
        record = onnx_export(module, (latents[:2],), ["latents"], "images", path)
        remember_graph(key, path, record)
    with torch.no_grad():
        ref = module(latents).numpy()
    feed = latents.numpy()
    fp32 = _check(ort_session(path).run(None, {"latents": feed})[0], ref)
    if not fp32["finite"] or fp32["rel_err"] > TOLERANCE["fp32"]:
        raise DistillError(f"the decoder's ONNX graph disagrees with torch (relative error {fp32['rel_err']:.2e}, "
                           f"bound {TOLERANCE['fp32']:g}); nothing was written")
    out: dict[str, Any] = {"graph": DECODER_FILE, "precision": "fp32", "latent": latent, "export": record,
                           "parity": {"against": "torch fp32, on latents the model samples (seeds 5,000,000+)",
                                      "fp32": fp32, "tolerance": TOLERANCE["fp32"]},
                           "force_upcast": bool(getattr(ae.vae.config, "force_upcast", False))}
    if precision == "int8":
        from export.calibration import CalibrationSet
        from export.precision import Int8Options, to_int8

        start = time.perf_counter()
        calib_latents = model_latents(den, CALIBRATION_SEEDS).numpy()
        calib = CalibrationSet({"latents": calib_latents}, np.full(len(calib_latents), -1),
                               {"source": "latents the model samples", "seeds": "5,100,000+"})
        tmp = stage / "decoder.int8.onnx"
        info = to_int8(path, tmp, calib, Int8Options(), stage)
        for extra in stage.glob("augmented*"):
            extra.unlink()
        out["int8"] = info
        _ship_if_it_holds(out, "int8", tmp, path, feed, ref, start, log)
    if precision == "fp16":
        start = time.perf_counter()
        amax = activation_amax(path, feed)
        hot = sorted(n for n, a in amax.items() if a > FP16_SAFE_AMAX)
        half, info = to_fp16(onnx.load(str(path)), image_input="latents", keep_nodes=hot)
        tmp = stage / "decoder.fp16.onnx"
        onnx.save(half, str(tmp))
        out["fp16"] = {**info, "activation_max": max(amax.values(), default=0.0), "kept_for_range": hot}
        _ship_if_it_holds(out, "fp16", tmp, path, feed, ref, start, log)
    out.setdefault("graph_info", check_graph(path))
    return out
