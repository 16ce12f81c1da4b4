"""ONNX Runtime behind the backend protocol: an export folder's graph on the CPU, CUDA or TensorRT execution
provider (whichever the device asks for and this onnxruntime build has).

On a GPU the session gets the device index and provider options (the TensorRT EP: an engine and timing cache under
``$DISTILL_CACHE/ort-trt`` and the batch range as profile shapes, so an engine is built once, not per session and
per batch size), the providers the session really got are checked against those asked for (ONNX Runtime falls back
to the next provider silently when a library is missing: ``onnxruntime-trt`` results would be CUDA results under
another name), and calls bind device tensors with IOBinding, so a CUDA call does not copy through the host.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.denoiser import Cond
from distill.errors import DistillError, UsageError
from export.backends import export_attributes, graph_inputs

TRT_EP, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
TRT_EP_MAX_BATCH = 256  # the TensorRT EP's profile: batch 1 .. 256, tuned for 64 (distill export tensorrt's range)
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64,
             "tensor(int32)": torch.int32, "tensor(bfloat16)": torch.bfloat16}


def providers_for(device: str, tensorrt_ep: bool = False) -> list[str]:
    """Execution providers for ``device`` (cpu, cuda[:N]), refused in one line when this build lacks them."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if torch.device(device).type == "cpu" and not tensorrt_ep:
        return [CPU_EP]
    wanted = ([TRT_EP] if tensorrt_ep else []) + [CUDA_EP]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise UsageError(f"--backend onnxruntime{'-trt' if tensorrt_ep else ''} on {device}: this onnxruntime "
                         f"build lacks {', '.join(missing)} (it has {', '.join(available)}); install onnxruntime-gpu "
                         "or use --device cpu")
    return wanted + [CPU_EP]


def device_index(device: str) -> int:
    """The CUDA device index of ``device`` (``cuda``: the current device)."""
    dev = torch.device(device if device != "cpu" else "cuda")
    if dev.index is not None:
        return dev.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def provider_options(providers: list[str], manifest: dict[str, Any], device: str) -> list:
    """``providers`` with their options: the device index for CUDA and TensorRT; for TensorRT also its engine and
    timing caches (keyed by the graph's sha256) and the profile shapes over batch 1..:data:`TRT_EP_MAX_BATCH`."""
    out: list = []
    index = device_index(device)
    for name in providers:
        if name == CUDA_EP:
            # TF32 off: an fp32 graph computes in fp32 (ONNX Runtime's CUDA provider would use TF32 matmuls)
            out.append((name, {"device_id": str(index), "use_tf32": "0"}))
        elif name == TRT_EP:
            from distill.rundir import cache_dir
            from export.backends import input_shapes

            graph = Path(manifest["path"])
            key = (manifest.get("files") or {}).get(graph.name) or "unhashed"
            cache = cache_dir() / "ort-trt" / key[:32]
            cache.mkdir(parents=True, exist_ok=True)  # the TensorRT EP creates one folder level only

            def shapes(batch: int) -> str:
                return ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in input_shapes(manifest, batch).items())

            out.append((name, {"device_id": str(index), "trt_engine_cache_enable": "True",
                               "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True",
                               "trt_timing_cache_path": str(cache),
                               "trt_profile_min_shapes": shapes(1),
                               "trt_profile_opt_shapes": shapes(min(64, TRT_EP_MAX_BATCH)),
                               "trt_profile_max_shapes": shapes(TRT_EP_MAX_BATCH)}))
        else:
            out.append(name)
    return out


def check_providers(session, asked: list[str], source: str) -> list[str]:
    """The providers ``session`` really got; refused in one line when one asked for is missing (ONNX Runtime falls
    back to the next one silently, e.g. CUDA when TensorRT's libraries are not found)."""
    got = list(session.get_providers())
    missing = [p for p in asked if p not in got]
    if missing:
        raise DistillError(f"{source}: ONNX Runtime did not enable {', '.join(missing)} (the session got "
                           f"{', '.join(got)}: a missing CUDA/TensorRT library or an unsupported GPU; run with "
                           "ONNX Runtime's verbose log to see why), so its results would be another provider's")
    return got


class OrtBackend:
    """An ONNX export (``manifest`` from :func:`export.artifact.read_manifest`) on ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, manifest: dict[str, Any], device: str = "cpu", tensorrt_ep: bool = False,
                 threads: int | None = None, keep: Any = None, iobinding: bool | None = None):
        from export.onnx import ort_session

        export_attributes(self, manifest, device)
        self.source = manifest.get("path", "the export")
        asked = providers_for(device, tensorrt_ep)
        if tensorrt_ep:
            self.name = "onnxruntime-trt"
        self.session = ort_session(Path(manifest["path"]), provider_options(asked, manifest, device), threads)
        self.providers = check_providers(self.session, asked, self.source)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_types = {i.name: ORT_TYPES.get(i.type, torch.float32) for i in self.session.get_inputs()}
        out = self.session.get_outputs()[0]
        self.output_name, self.output_type = out.name, ORT_TYPES.get(out.type, torch.float32)
        self.output_dims = list(out.shape)[1:]  # after the batch axis
        # device tensors bound in place on a GPU; the CPU provider takes numpy arrays (IOBinding costs it time)
        on_gpu = torch.device(device).type == "cuda"
        self.iobinding = on_gpu if iobinding is None else iobinding
        self.ort_device = ("cuda", device_index(device)) if on_gpu else ("cpu", 0)
        self._keep = keep  # the temporary folder of an on-the-fly export lives as long as the backend
        # a latent model's export: its decoder.onnx decodes the samples (a fused graph decodes inside)
        self.decodes_itself = bool(manifest.get("decodes"))
        decoder = manifest.get("decoder")
        if decoder and not self.decodes_itself:
            path = Path(manifest["path"]).parent / decoder["graph"]
            plain = [p for p in asked if p != TRT_EP]  # the decoder's input is not the profile's
            self._decoder = ort_session(path, provider_options(plain, manifest, device), threads)
            check_providers(self._decoder, plain, str(path))
            self.decode = self._decode

    def _decode(self, latents: Tensor) -> Tensor:
        """Images from latents, through the export's decoder graph."""
        out = self._decoder.run(None, {"latents": latents.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(latents.device)

    @classmethod
    def from_model(cls, model: str, device: str = "cpu", tensorrt_ep: bool = False, threads: int | None = None):
        """Export ``model`` to fp32 ONNX in a temporary folder and open it."""
        from export.artifact import read_manifest
        from export.onnx import ExportOptions, export_onnx

        tmp = tempfile.TemporaryDirectory(prefix="distill-onnx-")
        out = Path(tmp.name) / "export"
        export_onnx(model, out, ExportOptions(check_batches=(1,)), command="(on the fly)", log=lambda *a: None)
        return cls(read_manifest(out), device, tensorrt_ep, threads, keep=tmp)

    def _run(self, inputs: Sequence[Tensor]) -> Tensor:
        if self.iobinding:
            return self._run_bound(inputs)
        feed = {n: v.detach().cpu().to(self.input_types[n]).numpy() for n, v in zip(self.input_names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0]).float()

    def _run_bound(self, inputs: Sequence[Tensor]) -> Tensor:
        """One call with every input and the output bound in place on the device (no host copy on a GPU)."""
        kind, index = self.ort_device
        dev = torch.device(kind, index) if kind == "cuda" else torch.device("cpu")
        binding = self.session.io_binding()
        held = []
        for name, x in zip(self.input_names, inputs):
            x = x.detach().to(device=dev, dtype=self.input_types[name]).contiguous()
            held.append(x)
            binding.bind_input(name, kind, index, _np_type(x.dtype), list(x.shape), x.data_ptr())
        batch = int(inputs[0].shape[0])
        dims = [d if isinstance(d, int) else None for d in self.output_dims]
        out = None
        if any(d is None for d in dims):  # a non-batch dynamic axis: ONNX Runtime allocates, then we copy
            binding.bind_output(self.output_name, kind, index)
        else:
            out = torch.empty([batch, *dims], dtype=self.output_type, device=dev)
            binding.bind_output(self.output_name, kind, index, _np_type(out.dtype), list(out.shape), out.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(dev).synchronize()  # inputs written by torch before ONNX Runtime reads them
        self.session.run_with_iobinding(binding)
        if out is None:
            return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(dev).float()
        del held
        return out.float()

    def __call__(self, x_t: Tensor, t: Tensor | float, cond: Cond | None = None) -> Tensor:
        if self.kind != "denoiser":
            raise UsageError(f"{self.source} is a fused {self.manifest['steps']}-step sampler graph; it draws whole "
                             "samples (distill sample / eval), not single network evaluations")
        inputs = graph_inputs(x_t.float(), t, cond, labels=self.labels, guided=self.guided,
                              null_label=self.null_label, source=self.source)
        return self._run(inputs).to(device=x_t.device, dtype=x_t.dtype)

    def sample(self, seeds: Sequence[int], cond: Cond | None = None) -> Tensor:
        """A fused sampler graph: one image per seed, the same as the Python sampler draws for those seeds."""
        from export.fused import fused_noise

        noise = fused_noise(seeds, self.image_shape, self.manifest["noise_slots"])
        inputs = graph_inputs(noise, 0.0, cond, labels=self.labels, guided=self.guided, null_label=self.null_label,
                              source=self.source)
        del inputs[1]  # the fused graph has no time input
        return self._run(inputs).cpu()


def _np_type(dtype: torch.dtype):
    types = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
             torch.bool: np.bool_}
    if dtype not in types:  # numpy has no bfloat16: such a graph runs through the plain (host) path
        raise UsageError(f"a {dtype} graph input or output cannot be bound in place; run it on the CPU provider")
    return types[dtype]
