"""The few calls of onnxruntime's C API that its Python binding lacks, through ctypes.

onnxruntime packs a MatMulNBits / MatMul weight into memory of its own once per kernel that reads it,
so two sessions over the same weights hold two packed copies (int4 SmolLM2: ~100 MB each). Its C API
can share them: sessions created with one prepacked-weights container, whose weights are initializers
the caller supplies (AddInitializer), keep one packed copy between them. The Python binding exposes
neither the container nor a way to build a session with one. The wheel ships the library those
calls live in (onnxruntime/capi/libonnxruntime.so.*), so this module loads it and calls them; `split`
builds on it.

Only CPU sessions and host memory: a value wraps a numpy array (or another binding's OrtValue) without
copying it. Function slots are the C API's `OrtApi` struct order, which onnxruntime only ever appends
to (onnxruntime_c_api.h), so they hold for every version that has the container (1.8 on).
"""

from __future__ import annotations

import ctypes as C
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

API_VERSION = 8  # the first with CreateSessionFromArrayWithPrepackedWeightsContainer
_SLOTS = {  # OrtApi function pointer index
    "GetErrorMessage": 2,
    "CreateEnv": 3,
    "Run": 9,
    "CreateSessionOptions": 10,
    "CreateRunOptions": 39,
    "SetSessionLogSeverityLevel": 22,
    "SetSessionGraphOptimizationLevel": 23,
    "SetIntraOpNumThreads": 24,
    "SetInterOpNumThreads": 25,
    "CreateTensorWithDataAsOrtValue": 49,
    "GetTensorMutableData": 51,
    "GetTensorElementType": 60,
    "GetDimensionsCount": 61,
    "GetDimensions": 62,
    "GetTensorTypeAndShape": 65,
    "CreateCpuMemoryInfo": 69,
    "ReleaseStatus": 93,
    "ReleaseSession": 95,
    "ReleaseValue": 96,
    "ReleaseRunOptions": 97,
    "ReleaseTensorTypeAndShapeInfo": 99,
    "ReleaseSessionOptions": 100,
    "GetAvailableProviders": 125,
    "ReleaseAvailableProviders": 126,
    "AddSessionConfigEntry": 130,
    "RunWithBinding": 133,
    "CreateIoBinding": 134,
    "ReleaseIoBinding": 135,
    "BindInput": 136,
    "BindOutput": 137,
    "AddInitializer": 150,
    "AddRunConfigEntry": 165,
    "CreatePrepackedWeightsContainer": 166,
    "ReleasePrepackedWeightsContainer": 167,
    "CreateSessionFromArrayWithPrepackedWeightsContainer": 169,
}
# ONNXTensorElementDataType (= onnx's TensorProto.DataType) <-> numpy
DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
_CODES = {np.dtype(t): code for code, t in DTYPES.items()}

_P = C.c_void_p
_PP = C.POINTER(C.c_void_p)
_SIGNATURES = {  # name: (return type, argument types); None returns: Release* functions
    "GetErrorMessage": (C.c_char_p, [_P]),
    "ReleaseStatus": (None, [_P]),
    "CreateEnv": (_P, [C.c_int, C.c_char_p, _PP]),
    "Run": (_P, [_P, _P, C.POINTER(C.c_char_p), _PP, C.c_size_t, C.POINTER(C.c_char_p), C.c_size_t, _PP]),
    "CreateSessionOptions": (_P, [_PP]),
    "CreateRunOptions": (_P, [_PP]),
    "ReleaseRunOptions": (None, [_P]),
    "AddRunConfigEntry": (_P, [_P, C.c_char_p, C.c_char_p]),
    "SetSessionLogSeverityLevel": (_P, [_P, C.c_int]),
    "SetSessionGraphOptimizationLevel": (_P, [_P, C.c_int]),
    "SetIntraOpNumThreads": (_P, [_P, C.c_int]),
    "SetInterOpNumThreads": (_P, [_P, C.c_int]),
    "CreateTensorWithDataAsOrtValue": (
        _P,
        [_P, _P, C.c_size_t, C.POINTER(C.c_int64), C.c_size_t, C.c_int, _PP],
    ),
    "GetTensorMutableData": (_P, [_P, _PP]),
    "GetTensorElementType": (_P, [_P, C.POINTER(C.c_int)]),
    "GetDimensionsCount": (_P, [_P, C.POINTER(C.c_size_t)]),
    "GetDimensions": (_P, [_P, C.POINTER(C.c_int64), C.c_size_t]),
    "GetTensorTypeAndShape": (_P, [_P, _PP]),
    "CreateCpuMemoryInfo": (_P, [C.c_int, C.c_int, _PP]),
    "ReleaseSession": (None, [_P]),
    "ReleaseValue": (None, [_P]),
    "ReleaseTensorTypeAndShapeInfo": (None, [_P]),
    "ReleaseSessionOptions": (None, [_P]),
    "GetAvailableProviders": (_P, [C.POINTER(C.POINTER(C.c_char_p)), C.POINTER(C.c_int)]),
    "ReleaseAvailableProviders": (_P, [C.POINTER(C.c_char_p), C.c_int]),
    "AddSessionConfigEntry": (_P, [_P, C.c_char_p, C.c_char_p]),
    "RunWithBinding": (_P, [_P, _P, _P]),
    "CreateIoBinding": (_P, [_P, _PP]),
    "ReleaseIoBinding": (None, [_P]),
    "BindInput": (_P, [_P, C.c_char_p, _P]),
    "BindOutput": (_P, [_P, C.c_char_p, _P]),
    "AddInitializer": (_P, [_P, C.c_char_p, _P]),
    "CreatePrepackedWeightsContainer": (_P, [_PP]),
    "ReleasePrepackedWeightsContainer": (None, [_P]),
    "CreateSessionFromArrayWithPrepackedWeightsContainer": (_P, [_P, C.c_char_p, C.c_size_t, _P, _P, _PP]),
}
ORT_ENABLE_ALL = 99
LOG_ERROR = 3
_ARENA_ALLOCATOR, _MEM_DEFAULT = 1, 0


class OrtError(RuntimeError):
    """onnxruntime's C API returned an error status; the message is onnxruntime's."""


class _Api:
    """The loaded library: its functions by name, one environment and one CPU memory description."""

    def __init__(self, path: Path):
        lib = C.CDLL(str(path))

        class Base(C.Structure):
            _fields_ = [
                ("GetApi", C.CFUNCTYPE(_P, C.c_uint32)),
                ("GetVersionString", C.CFUNCTYPE(C.c_char_p)),
            ]

        lib.OrtGetApiBase.restype = C.POINTER(Base)
        lib.OrtGetApiBase.argtypes = []
        base = lib.OrtGetApiBase().contents
        table = base.GetApi(API_VERSION)
        if not table:
            raise OrtError(f"{path.name} does not offer C API version {API_VERSION}")
        self.version = base.GetVersionString().decode()
        slots = C.cast(table, C.POINTER(_P * (max(_SLOTS.values()) + 1))).contents
        self.lib = lib  # keeps the library loaded
        for name, slot in _SLOTS.items():
            res, args = _SIGNATURES[name]
            setattr(self, name, C.CFUNCTYPE(res, *args)(slots[slot]))
        self.env = self.out(self.CreateEnv, LOG_ERROR, b"onnxlm")
        self.cpu = self.out(self.CreateCpuMemoryInfo, _ARENA_ALLOCATOR, _MEM_DEFAULT)

    def check(self, status) -> None:
        if status:
            message = self.GetErrorMessage(status).decode(errors="replace")
            self.ReleaseStatus(status)
            raise OrtError(message)

    def out(self, fn, *args):
        """Call a function whose last argument is an out-pointer; return what it wrote."""
        made = _P()
        self.check(fn(*args, C.byref(made)))
        return made


_api: _Api | None = None
_api_error: str | None = None
_lock = threading.Lock()


def library_path() -> Path | None:
    """The onnxruntime shared library the installed wheel ships beside its Python binding, if any
    (found without importing the binding)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    for pattern in ("libonnxruntime.so*", "libonnxruntime*.dylib", "onnxruntime.dll"):
        found = sorted(capi.glob(pattern))
        if found:
            return found[0]
    return None


def api() -> _Api:
    """The C API, loaded once; OrtError says why where it cannot be (no library, too old)."""
    global _api, _api_error
    with _lock:
        if _api is None and _api_error is None:
            path = library_path()
            try:
                if path is None:
                    raise OrtError("the onnxruntime wheel has no shared library beside its Python binding")
                _api = _Api(path)
            except (OSError, AttributeError, OrtError) as e:
                _api_error = str(e)
        if _api is None:
            raise OrtError(_api_error or "onnxruntime's C API is not available")
        return _api


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build has (what the Python binding's
    get_available_providers says)."""
    a = api()
    names, count = C.POINTER(C.c_char_p)(), C.c_int()
    a.check(a.GetAvailableProviders(C.byref(names), C.byref(count)))
    try:
        return [names[i].decode() for i in range(count.value)]
    finally:
        a.check(a.ReleaseAvailableProviders(names, count))


def available() -> bool:
    try:
        api()
    except OrtError:
        return False
    return True


class _Owned:
    """An object the C API made (`ptr`), released with the function named `_release` when it goes."""

    __slots__ = ()
    _release = ""

    def __del__(self):
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            getattr(self._api, self._release)(ptr)


class Value(_Owned):
    """An OrtValue over a host array's memory (no copy); `keep` holds whatever owns that memory."""

    __slots__ = ("ptr", "shape", "dtype", "keep", "_api")
    _release = "ReleaseValue"

    def __init__(self, address: int, shape: Sequence[int], dtype, keep: object):
        a = api()
        self._api = a
        self.shape, self.dtype, self.keep = tuple(int(d) for d in shape), np.dtype(dtype), keep
        dims = (C.c_int64 * max(1, len(self.shape)))(*self.shape)
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = a.out(
            a.CreateTensorWithDataAsOrtValue,
            a.cpu,
            address,
            nbytes,
            dims,
            len(self.shape),
            _CODES[self.dtype],
        )

    @classmethod
    def of(cls, array: np.ndarray) -> Value:
        if not array.flags.c_contiguous:
            raise ValueError("ortc.Value needs a C-contiguous array")
        return cls(array.ctypes.data, array.shape, array.dtype, array)


class Session(_Owned):
    """One graph's session, built from the graph's bytes. `initializers` (name -> Value) are used as
    they are instead of the graph's own weights; sessions given the same `container` keep one packed
    copy of each weight they pack alike. `config`: session config entries (onnxruntime's keys)."""

    __slots__ = ("ptr", "initializers", "container", "_api")
    _release = "ReleaseSession"

    def __init__(
        self,
        graph: bytes,
        threads: int,
        initializers: Mapping[str, Value],
        container: Container,
        config: Mapping[str, str] = (),
    ):
        a = self._api = api()
        self.initializers, self.container = initializers, container  # both outlive the session
        options = a.out(a.CreateSessionOptions)
        try:
            a.check(a.SetIntraOpNumThreads(options, threads))
            a.check(a.SetInterOpNumThreads(options, 1))
            a.check(a.SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL))
            a.check(a.SetSessionLogSeverityLevel(options, LOG_ERROR))
            for key, value in dict(config).items():
                a.check(a.AddSessionConfigEntry(options, key.encode(), value.encode()))
            for name, value in initializers.items():
                a.check(a.AddInitializer(options, name.encode(), value.ptr))
            self.ptr = a.out(
                a.CreateSessionFromArrayWithPrepackedWeightsContainer,
                a.env,
                graph,
                len(graph),
                options,
                container.ptr,
            )
        finally:
            a.ReleaseSessionOptions(options)

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str], options: RunOptions | None = None
    ) -> list[np.ndarray]:
        """Plain run: host arrays in, new host arrays out (onnxruntime allocates, then they are copied)."""
        a = self._api
        inputs = {name: Value.of(np.ascontiguousarray(v)) for name, v in feeds.items()}
        in_names = (C.c_char_p * len(inputs))(*(n.encode() for n in inputs))
        in_values = (_P * len(inputs))(*(v.ptr for v in inputs.values()))
        out_names = (C.c_char_p * len(output_names))(*(n.encode() for n in output_names))
        outs = (_P * len(output_names))()
        run = options and options.ptr
        a.check(a.Run(self.ptr, run, in_names, in_values, len(inputs), out_names, len(output_names), outs))
        try:
            return [self._to_numpy(v) for v in outs]
        finally:
            for v in outs:
                if v:
                    a.ReleaseValue(v)

    def _to_numpy(self, value) -> np.ndarray:
        a = self._api
        info = a.out(a.GetTensorTypeAndShape, value)
        try:
            n, code = C.c_size_t(), C.c_int()
            a.check(a.GetDimensionsCount(info, C.byref(n)))
            dims = (C.c_int64 * max(1, n.value))()
            a.check(a.GetDimensions(info, dims, n.value))
            a.check(a.GetTensorElementType(info, C.byref(code)))
        finally:
            a.ReleaseTensorTypeAndShapeInfo(info)
        array = np.empty(tuple(dims[: n.value]), DTYPES[code.value])
        if array.nbytes:
            data = a.out(a.GetTensorMutableData, value)
            C.memmove(array.ctypes.data, data, array.nbytes)
        return array


class Binding(_Owned):
    """An IO binding of one Session; the values bound stay referenced until rebound."""

    __slots__ = ("ptr", "session", "bound", "_api")
    _release = "ReleaseIoBinding"

    def __init__(self, session: Session):
        a = self._api = api()
        self.session = session
        self.ptr = a.out(a.CreateIoBinding, session.ptr)
        self.bound: dict[tuple[str, bool], Value] = {}

    def bind(self, name: str, value: Value, output: bool = False) -> None:
        a = self._api
        a.check((a.BindOutput if output else a.BindInput)(self.ptr, name.encode(), value.ptr))
        self.bound[name, output] = value

    def run(self, options: RunOptions | None = None) -> None:
        self._api.check(self._api.RunWithBinding(self.session.ptr, options and options.ptr, self.ptr))


class RunOptions(_Owned):
    """Run options holding run config entries (onnxruntime's keys), for Binding.run."""

    __slots__ = ("ptr", "_api")
    _release = "ReleaseRunOptions"

    def __init__(self, config: Mapping[str, str]):
        a = self._api = api()
        self.ptr = a.out(a.CreateRunOptions)
        for key, value in config.items():
            a.check(a.AddRunConfigEntry(self.ptr, key.encode(), value.encode()))


class Container(_Owned):
    """A prepacked-weights container: sessions built with it share the weights they pack alike."""

    __slots__ = ("ptr", "_api")
    _release = "ReleasePrepackedWeightsContainer"

    def __init__(self):
        self._api = api()
        self.ptr = self._api.out(self._api.CreatePrepackedWeightsContainer)
