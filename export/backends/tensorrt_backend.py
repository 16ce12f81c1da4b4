"""A native TensorRT engine (built by ``distill export tensorrt``, :mod:`export.tensorrt`) behind the backend
protocol, and what loading one needs: TensorRT, a CUDA GPU, and the engine's compatibility with both.

TensorRT has no preflight check of its own: an engine is only deserialized where the TensorRT version, the GPU and
its compute capability recorded in its manifest all match this machine's. Written against TensorRT's documented
Python API (``../shared/REFERENCES.md``); TensorRT cannot be installed on the machines this project is developed on,
so :class:`TensorRTBackend` has not been run (the compatibility check is tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.errors import DistillError, UsageError
from export.backends import graph_inputs


class TensorRTUnavailable(DistillError):
    """TensorRT (or a CUDA GPU) is missing on this machine (exit code 1)."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed (pip install tensorrt, from NVIDIA's package index, on "
                                  "a machine with an NVIDIA GPU); --dry-run prints the trtexec command that builds "
                                  "the same engine") from None
    return trt


def cuda_gpu() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and none is visible; build the engine on the GPU "
                                  "machine that will run it")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def check_engine_compatible(manifest: dict[str, Any], version: str, gpu: str, capability: str) -> None:
    """Refuse, in one line, an engine built by another TensorRT version or for another GPU."""
    built = manifest.get("tensorrt") or {}
    where = manifest.get("path", "the engine")
    if built.get("version") != version:
        raise UsageError(f"{where}: built with TensorRT {built.get('version')}, this machine has {version}; rebuild "
                         "it here with 'distill export tensorrt'")
    if built.get("compute_capability") != capability or built.get("gpu") != gpu:
        raise UsageError(f"{where}: built for {built.get('gpu')} (compute capability "
                         f"{built.get('compute_capability')}), this GPU is {gpu} ({capability}); rebuild it here "
                         "with 'distill export tensorrt'")


class TensorRTBackend:
    """A TensorRT engine behind the backend protocol (CUDA tensors in and out, on a non-default stream)."""

    name = "tensorrt"

    def __init__(self, manifest: dict[str, Any], device: str = "cuda"):
        import torch

        from export.backends import export_attributes

        trt = import_tensorrt()
        gpu, capability = cuda_gpu()
        check_engine_compatible(manifest, trt.__version__, gpu, capability)
        export_attributes(self, manifest, device if device != "cpu" else "cuda")
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            Path(manifest["path"]).read_bytes())
        if self.engine is None:
            raise UsageError(f"{manifest['path']}: TensorRT refused to deserialize the engine; rebuild it here")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output = next(n for n in self.names if n not in self.inputs)
        self.stream = torch.cuda.Stream()

    def _run(self, inputs: list) -> Any:
        import torch

        dev = torch.device(self.device)
        tensors = [x.to(dev).contiguous() for x in inputs]
        for name, x in zip(self.inputs, tensors):
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=torch.float32, device=dev)
        self.context.set_tensor_address(self.output, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(dev))
        self.context.execute_async_v3(self.stream.cuda_stream)
        torch.cuda.current_stream(dev).wait_stream(self.stream)
        return out

    def __call__(self, x_t, t, cond=None):
        inputs = graph_inputs(x_t.float(), t, cond, labels=self.labels, guided=self.guided,
                              null_label=self.null_label, source=self.manifest.get("path", "the engine"))
        return self._run(inputs).to(device=x_t.device, dtype=x_t.dtype)

    def sample(self, seeds, cond=None):
        from export.fused import fused_noise

        noise = fused_noise(seeds, self.image_shape, self.manifest["noise_slots"])
        inputs = graph_inputs(noise, 0.0, cond, labels=self.labels, guided=self.guided, null_label=self.null_label,
                              source=self.manifest.get("path", "the engine"))
        del inputs[1]
        return self._run(inputs).cpu()
