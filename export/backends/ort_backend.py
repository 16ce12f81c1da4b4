"""ONNX Runtime behind the backend protocol: an export folder's graph on the CPU, CUDA or TensorRT execution
provider (whichever the device asks for and this onnxruntime build has)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.denoiser import Cond
from distill.errors import UsageError
from export.backends import export_attributes, graph_inputs


def providers_for(device: str, tensorrt_ep: bool = False) -> list[str]:
    """Execution providers for ``device`` (cpu, cuda[:N]), refused in one line when this build lacks them."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if torch.device(device).type == "cpu" and not tensorrt_ep:
        return ["CPUExecutionProvider"]
    wanted = (["TensorrtExecutionProvider"] if tensorrt_ep else []) + ["CUDAExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise UsageError(f"--backend onnxruntime{'-trt' if tensorrt_ep else ''} on {device}: this onnxruntime "
                         f"build lacks {', '.join(missing)} (it has {', '.join(available)}); install onnxruntime-gpu "
                         "or use --device cpu")
    return wanted + ["CPUExecutionProvider"]


class OrtBackend:
    """An ONNX export (``manifest`` from :func:`export.artifact.read_manifest`) on ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, manifest: dict[str, Any], device: str = "cpu", tensorrt_ep: bool = False,
                 threads: int | None = None, keep: Any = None):
        from export.onnx import ort_session

        export_attributes(self, manifest, device)
        self.source = manifest.get("path", "the export")
        self.providers = providers_for(device, tensorrt_ep)
        if tensorrt_ep:
            self.name = "onnxruntime-trt"
        self.session = ort_session(Path(manifest["path"]), self.providers, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._keep = keep  # the temporary folder of an on-the-fly export lives as long as the backend
        # a latent model's export: its decoder.onnx decodes the samples (a fused graph decodes inside)
        self.decodes_itself = bool(manifest.get("decodes"))
        decoder = manifest.get("decoder")
        if decoder and not self.decodes_itself:
            self._decoder = ort_session(Path(manifest["path"]).parent / decoder["graph"], self.providers, threads)
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
        feed = {n: v.detach().cpu().numpy() for n, v in zip(self.input_names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])

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
        return self._run(inputs)
