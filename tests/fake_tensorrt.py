"""A small stand-in for the ``tensorrt`` Python module, for contract tests only.

It has the calls distill's builder and runner make (``export/tensorrt.py``, ``export/backends/tensorrt_backend.py``)
with TensorRT's documented signatures and failure signals (None from ``deserialize_cuda_engine`` and
``create_execution_context``, False from ``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` /
``set_timing_cache``, -1 from ``add_optimization_profile``). Its "engine" computes ``0.5 * x_t`` (a fused engine:
``0.5 * noise[:, 0]``), reading and writing the tensors at the addresses it is given, so the tests see what the
runner bound. It proves the calls and the error handling, never TensorRT's numerics.

``FAIL`` holds the names of the calls that fail next (``parse``, ``profile``, ``build``, ``deserialize``,
``context``, ``shape``, ``address``, ``execute``); ``INPUT_DTYPES`` overrides the dtype an engine declares for an
input; ``CACHE_FROM`` is the device that made a timing cache (a cache from another device is refused).
"""

from __future__ import annotations

import ctypes
import enum
import json

import numpy as np

__version__ = "10.16.0"
FAIL: set[str] = set()
INPUT_DTYPES: dict[str, str] = {}
CALLS: list[str] = []
DEVICE = b"fake-gpu"


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 5  # not bit 0: the builder must look the flag up by name


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class BuilderFlag(enum.Enum):
    TF32 = 7


class Logger:
    WARNING = 2

    def __init__(self, level=2):
        self.level = level


class _Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.inputs: list[tuple[str, str]] = []
        self.outputs: list[str] = []


class OnnxParser:
    def __init__(self, network: _Network, logger: Logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        CALLS.append("parse")
        if "parse" in FAIL:
            self.errors = ["In node 3 (importConv):\nUNSUPPORTED_NODE: weights must be an initializer"]
            return False
        g = onnx.load(path, load_external_data=False).graph
        np_type = {1: "float32", 10: "float16", 6: "int32", 7: "int64"}
        self.network.inputs = [(i.name, np_type[i.type.tensor_type.elem_type]) for i in g.input]
        self.network.outputs = [o.name for o in g.output]
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (list(lo), list(opt), list(hi))


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return DEVICE + b":timings"


class _Config:
    def __init__(self):
        self.profiles, self.flags_cleared, self.cache, self.pool = [], [], None, None

    def set_memory_pool_limit(self, pool, size):
        self.pool = size

    def clear_flag(self, flag):
        self.flags_cleared.append(flag)

    def add_optimization_profile(self, profile) -> int:
        if "profile" in FAIL:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        if cache.data and not cache.data.startswith(DEVICE) and not ignore_mismatch:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        return self.cache


class Builder:
    def __init__(self, logger: Logger):
        self.logger = logger

    def create_network(self, flags: int) -> _Network:
        assert flags == 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED), "network must be strongly typed"
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config):
        CALLS.append("build")
        if "build" in FAIL:
            return None
        spec = {"inputs": [[n, INPUT_DTYPES.get(n, d)] for n, d in network.inputs], "outputs": network.outputs,
                "profile": config.profiles[0].shapes, "tf32": BuilderFlag.TF32 not in config.flags_cleared}
        return b"FAKEPLAN" + json.dumps(spec).encode()


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes):
        if "deserialize" in FAIL or not plan.startswith(b"FAKEPLAN"):
            return None
        return _Engine(json.loads(plan[8:]))


class _Engine:
    def __init__(self, spec: dict):
        self.spec = spec
        # outputs first: TensorRT's I/O order is undocumented, so a runner must bind by name
        self.names = spec["outputs"] + [n for n, _ in spec["inputs"]]
        self.dtypes = {n: DataType(d) for n, d in spec["inputs"]} | {n: DataType.FLOAT for n in spec["outputs"]}

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.OUTPUT if name in self.spec["outputs"] else TensorIOMode.INPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.dtypes[name]

    def get_tensor_profile_shape(self, name: str, profile: int):
        return tuple(tuple(s) for s in self.spec["profile"][name])

    def create_execution_context(self):
        return None if "context" in FAIL else _Context(self)


def _read(ptr: int, shape, dtype: str) -> np.ndarray:
    n = int(np.prod(shape))
    buf = (ctypes.c_byte * (n * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


class _Context:
    def __init__(self, engine: _Engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name: str, shape) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if "shape" in FAIL or len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if "address" in FAIL or ptr % 256:
            return False
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name: str):
        if "noise" in self.shapes:
            b, _, *image = self.shapes["noise"]
            return (b, *image)
        return self.shapes.get("x_t", (-1,))

    def execute_async_v3(self, stream_handle: int) -> bool:
        CALLS.append("execute")
        if "execute" in FAIL or set(self.addresses) != set(self.engine.names):
            return False
        first = "noise" if "noise" in self.shapes else "x_t"
        x = _read(self.addresses[first], self.shapes[first], self.engine.dtypes[first].value).astype(np.float32)
        out = 0.5 * (x[:, 0] if first == "noise" else x)
        ctypes.memmove(self.addresses[self.engine.spec["outputs"][0]], out.astype(np.float32).tobytes(), out.nbytes)
        return True
