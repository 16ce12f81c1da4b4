"""A native TensorRT engine (built by ``distill export tensorrt``, :mod:`export.tensorrt`) behind the backend
protocol, and what loading one needs: TensorRT, a CUDA GPU, and the engine's compatibility with both.

TensorRT has no preflight check of its own: an engine is only deserialized where its file's sha256 matches the
manifest and the TensorRT version, the GPU and its compute capability recorded there all match this machine's.
Every status TensorRT returns is checked (``create_execution_context`` is None when GPU memory is short;
``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` return False on failure): a failure is one
line naming the engine file, never uninitialised memory. Inputs are bound by name (the engine's I/O order is not
documented), cast to the dtype the engine declares, checked against the optimization profile (a larger batch is
split into runs the profile takes, a smaller one refused), and 256-byte aligned.

Written against TensorRT's documented Python API (``../shared/REFERENCES.md``). TensorRT cannot be installed on
the machines this project is developed on: :class:`TensorRTBackend` has run only against the contract-test fake
(``tests/fake_tensorrt.py``), which proves the calls and the error handling, never TensorRT's numerics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.errors import DistillError, UsageError
from export.backends import graph_inputs

ALIGNMENT = 256  # bytes: TensorRT's requirement for every I/O address


class TensorRTUnavailable(DistillError):
    """TensorRT (or a CUDA GPU) is missing on this machine (exit code 1)."""


# What TensorRT's Python bindings raise (pybind11 maps its C++ exceptions to these)
TENSORRT_ERRORS = (RuntimeError, TypeError, ValueError, MemoryError)


def one_line(error: Any) -> str:
    """A TensorRT error (an exception or a parser error object) as one line."""
    return " ".join(str(error).split()) or type(error).__name__


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed (pip install tensorrt, from NVIDIA's package index, on "
                                  "a machine with an NVIDIA GPU); --dry-run prints the trtexec command that builds "
                                  "the same engine") from None
    return trt


def cuda_index(device: str) -> int:
    """The CUDA device index of ``device`` (``cuda`` is the current device, ``cuda:N`` the N-th)."""
    import torch

    dev = torch.device(device if device != "cpu" else "cuda")
    if dev.type != "cuda":
        raise UsageError(f"--device {device}: a TensorRT engine runs on a CUDA device (cuda or cuda:N)")
    return dev.index if dev.index is not None else torch.cuda.current_device()


def cuda_gpu(device: str = "cuda") -> tuple[str, str]:
    """Name and compute capability of the CUDA device ``device``."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and none is visible; build the engine on the GPU "
                                  "machine that will run it")
    index = cuda_index(device)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


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


def check_engine_file(manifest: dict[str, Any]) -> bytes:
    """The engine's bytes, refused in one line unless their sha256 is the one the manifest recorded."""
    import hashlib

    path = Path(manifest["path"])
    want = (manifest.get("files") or {}).get(path.name)
    if not want:
        raise UsageError(f"{path}: its manifest records no sha256 for it; rebuild it with 'distill export tensorrt'")
    plan = path.read_bytes()
    if hashlib.sha256(plan).hexdigest() != want:
        raise UsageError(f"{path}: its sha256 differs from the one in its manifest (a damaged or replaced file); "
                         "rebuild it with 'distill export tensorrt'")
    return plan


def torch_dtype(trt, dtype):
    """The torch dtype of a TensorRT ``DataType``."""
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "BOOL": torch.bool, "UINT8": torch.uint8}
    for name, out in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return out
    raise DistillError(f"a TensorRT tensor of type {dtype}, which distill does not bind")


def expected_inputs(manifest: dict[str, Any]) -> list[str]:
    """The graph's input names, in the order :func:`export.backends.graph_inputs` builds them."""
    names = ["noise"] if manifest.get("kind") == "sampler" else ["x_t", "t"]
    return names + (["labels"] if manifest["labels"] else []) + (["w"] if manifest["guided"] else [])


def aligned_empty(shape, dtype, device):
    """An uninitialised tensor whose data starts on a multiple of :data:`ALIGNMENT` bytes."""
    import torch

    n = 1
    for d in shape:
        n *= int(d)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    buf = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, device=device)
    offset = -buf.data_ptr() % ALIGNMENT
    return buf[offset:offset + nbytes].view(dtype).view(tuple(shape))


class _Cuda:
    """The CUDA calls of the runner in one place (the contract tests put a CPU stand-in here)."""

    @staticmethod
    def device(index: int):
        import torch

        return torch.device("cuda", index)

    @staticmethod
    def guard(index: int):
        import torch

        return torch.cuda.device(index)

    @staticmethod
    def stream(index: int):
        import torch

        return torch.cuda.Stream(device=index)

    @staticmethod
    def current(dev):
        import torch

        return torch.cuda.current_stream(dev)

    @staticmethod
    def keep_until_done(tensor, stream) -> None:
        tensor.record_stream(stream)


CUDA = _Cuda()


class TensorRTBackend:
    """A TensorRT engine behind the backend protocol (CUDA tensors in and out, on a non-default stream)."""

    name = "tensorrt"

    def __init__(self, manifest: dict[str, Any], device: str = "cuda"):

        from export.backends import export_attributes

        trt = import_tensorrt()
        self.source = manifest.get("path", "the engine")
        gpu, capability = cuda_gpu(device)
        check_engine_compatible(manifest, trt.__version__, gpu, capability)
        plan = check_engine_file(manifest)
        self.index = cuda_index(device)
        export_attributes(self, manifest, f"cuda:{self.index}")
        self.trt = trt
        with CUDA.guard(self.index):
            try:
                self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
                if self.engine is None:
                    raise UsageError(f"{self.source}: TensorRT refused to deserialize the engine; rebuild it here "
                                     "with 'distill export tensorrt'")
                self.context = self.engine.create_execution_context()
            except TENSORRT_ERRORS as e:
                raise DistillError(f"{self.source}: TensorRT failed to load the engine: {one_line(e)}") from None
            if self.context is None:
                raise DistillError(f"{self.source}: TensorRT could not create an execution context (GPU memory "
                                   f"short on cuda:{self.index}?); free memory or use a smaller --max-batch engine")
            self.stream = CUDA.stream(self.index)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outputs = [n for n in names if n not in inputs]
        self.input_names = expected_inputs(manifest)
        if inputs != set(self.input_names) or len(outputs) != 1:
            raise UsageError(f"{self.source}: the engine's inputs {sorted(inputs)} and outputs {outputs} are not the "
                             f"graph's ({self.input_names} -> one output); rebuild it from its export")
        self.output = outputs[0]
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.batch_range = self._batch_range()

    def _batch_range(self) -> tuple[int, int]:
        """The batch sizes the optimization profile takes (every input's range of axis 0, intersected)."""
        lo, hi = 1, None
        for name in self.input_names:
            low, _, high = self.engine.get_tensor_profile_shape(name, 0)
            lo, hi = max(lo, int(low[0])), int(high[0]) if hi is None else min(hi, int(high[0]))
        return lo, hi

    def _run(self, inputs: list) -> Any:
        """One engine call per chunk of at most the profile's largest batch; outputs as float32."""
        import torch

        lo, hi = self.batch_range
        batch = int(inputs[0].shape[0])
        if batch < lo:
            raise UsageError(f"{self.source}: batch {batch} is below the engine's profile ({lo}..{hi}); rebuild it "
                             f"with --min-batch {batch}")
        if batch <= hi:
            return self._guarded(inputs)
        chunks = [self._guarded([x[i:i + hi] for x in inputs]) for i in range(0, batch, hi) if batch - i >= lo]
        done = sum(c.shape[0] for c in chunks)
        if done < batch:  # a last piece below the profile's smallest batch: refused, never padded silently
            raise UsageError(f"{self.source}: batch {batch} leaves a last run of {batch - done} below the engine's "
                             f"profile ({lo}..{hi}); use a batch size that splits into runs of at least {lo}")
        return torch.cat(chunks)

    def _guarded(self, inputs: list) -> Any:
        try:
            with CUDA.guard(self.index):  # the device the engine was deserialized on (cuda:N)
                return self._run_one(inputs)
        except TENSORRT_ERRORS as e:  # pybind11's translation of a TensorRT exception: one line naming the file
            raise DistillError(f"{self.source}: TensorRT failed while running the engine: {one_line(e)}") from None

    def _run_one(self, inputs: list) -> Any:

        dev = CUDA.device(self.index)
        ctx, where = self.context, self.source
        tensors = {}
        for name, x in zip(self.input_names, inputs):
            x = x.to(device=dev, dtype=self.dtypes[name]).contiguous()
            if x.data_ptr() % ALIGNMENT:  # a view into a batch, a host tensor: copied to an aligned buffer
                x = aligned_empty(x.shape, x.dtype, dev).copy_(x)
            tensors[name] = x
            if not ctx.set_input_shape(name, tuple(x.shape)):
                raise UsageError(f"{where}: TensorRT refused the shape {tuple(x.shape)} for input {name!r} (the "
                                 "engine's profile takes other shapes); rebuild it from its export")
            if not ctx.set_tensor_address(name, x.data_ptr()):
                raise DistillError(f"{where}: TensorRT refused the address of input {name!r}")
        shape = tuple(ctx.get_tensor_shape(self.output))
        if any(d < 0 for d in shape):
            raise DistillError(f"{where}: TensorRT could not infer the output shape {shape} from the inputs")
        out = aligned_empty(shape, self.dtypes[self.output], dev)
        if not ctx.set_tensor_address(self.output, out.data_ptr()):
            raise DistillError(f"{where}: TensorRT refused the address of the output {self.output!r}")
        current = CUDA.current(dev)
        self.stream.wait_stream(current)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise DistillError(f"{where}: TensorRT failed to run the engine (see its log above)")
        current.wait_stream(self.stream)
        for x in tensors.values():  # inputs live until the engine has read them
            CUDA.keep_until_done(x, self.stream)
        return out.float()

    def __call__(self, x_t, t, cond=None):
        if self.kind != "denoiser":
            raise UsageError(f"{self.source} is a fused {self.manifest['steps']}-step sampler engine; it draws whole "
                             "samples (distill sample / eval), not single network evaluations")
        inputs = graph_inputs(x_t.float(), t, cond, labels=self.labels, guided=self.guided,
                              null_label=self.null_label, source=self.source)
        return self._run(inputs).to(device=x_t.device, dtype=x_t.dtype)

    def sample(self, seeds, cond=None):
        from export.fused import fused_noise

        if self.kind != "sampler":
            raise UsageError(f"{self.source} is a per-step denoiser engine; sample it with a sampler, not as a "
                             "fused graph")
        noise = fused_noise(seeds, self.image_shape, self.manifest["noise_slots"])
        inputs = graph_inputs(noise, 0.0, cond, labels=self.labels, guided=self.guided, null_label=self.null_label,
                              source=self.source)
        del inputs[1]
        return self._run(inputs).cpu()
