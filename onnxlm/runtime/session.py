"""onnxruntime sessions: execution providers in order of preference, session options, IO binding.

Providers are tried TensorRT -> CUDA -> CPU among those this onnxruntime build has; a requested
provider that is missing is skipped with one log line, never an error. CPU is always last.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .kv_cache import is_ortvalue, ort_module

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("onnxlm.runtime")

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PREFERENCE = (TENSORRT, CUDA, CPU)

# short names accepted in `providers=` (the CLI's --provider)
ALIASES = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "gpu": CUDA, "cpu": CPU}


def available_providers(c_api: bool = False) -> list[str]:
    """The execution providers onnxruntime has here. c_api: ask its C library (split.SplitSession's),
    where the wheel ships one and the Python binding is not loaded yet, so as not to load the binding
    for a process that may never need it; otherwise, and by default, the binding."""
    import sys

    from . import ortc

    if c_api and "onnxruntime" not in sys.modules and ortc.available():
        return ortc.available_providers()
    return list(ort_module().get_available_providers())


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def choose_providers(requested: Sequence[str] | str | None = None, c_api: bool = False) -> list[str]:
    """The providers to use, best first; missing ones are logged and skipped, CPU always ends the list
    (c_api: see available_providers)."""
    available = set(available_providers(c_api))
    if requested is None:
        wanted = list(PREFERENCE)
        quiet = True  # the default list is a wish list: skipping silently is expected
    else:
        if isinstance(requested, str):
            requested = [requested]
        wanted = [ALIASES.get(p.lower(), p) for p in requested]
        quiet = False
    chosen: list[str] = []
    for name in wanted:
        if name in chosen:
            continue
        if name in available:
            chosen.append(name)
        elif not quiet:
            log.warning(
                "onnxruntime has no %s here; skipping it (available: %s)", name, ", ".join(sorted(available))
            )
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


STOP_SPINNING = "session.force_spinning_stop"


def _check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")


def session_options(threads: int | None = None, idle_spin: bool = True) -> ort.SessionOptions:
    """idle_spin=False: the session's threads stop spinning when a run ends (they still spin inside
    it). For sessions that take turns (a target and its draft model): each one's idle spinning
    threads would otherwise hold the cores the other is running on (a verify after draft steps
    measured 2x its cost alone, a draft step 1.7x). Alone, spinning between runs pays (5-10% of a
    decode step), so it is the default."""
    _check_threads(threads)
    ort = ort_module()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or cpu_count()
    opts.inter_op_num_threads = 1  # one graph at a time; parallelism lives inside the ops
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; onnxruntime's warnings are mostly noise here
    if not idle_spin:
        opts.add_session_config_entry(STOP_SPINNING, "1")
    return opts


# A run config entry: the arena frees its unused blocks when the run ends. A call bringing SHRINK_FROM
# tokens or more to some row (a long prompt's chunk) runs with it: its attention's scores grow with chunk
# x context (512 queries x 9 heads x 4,000 keys: 74 MB), and an arena keeps every block it made, growing
# by powers of two as contexts lengthen (benchmarks/README.md, "Memory a long prompt left behind").
SHRINK_ARENA = "memory.enable_memory_arena_shrinkage"
SHRINK_FROM = 256


def spins_when_idle(session: ort.InferenceSession) -> bool:
    """Whether the session's threads keep spinning after a run (see session_options)."""
    if hasattr(session, "idle_spin"):  # a SplitSession
        return bool(session.idle_spin)
    try:
        return session.get_session_options().get_session_config_entry(STOP_SPINNING) != "1"
    except RuntimeError:  # the key was never set (onnxruntime raises for a missing key)
        return True


def split_wanted(requested: bool | None = None) -> bool:
    """Whether an int8-cache graph runs as two graphs sharing packed weights (split.SplitSession):
    `requested`, or where that is None, unless ONNXLM_SPLIT=0 in the environment. It saves the Ifs'
    ~5% of a decode step for ~12 MB more resident memory (benchmarks/README.md)."""
    if requested is not None:
        return bool(requested)
    return os.environ.get("ONNXLM_SPLIT", "1") != "0"


def make_session(
    model_path: str | os.PathLike,
    providers: Sequence[str] | str | None = None,
    threads: int | None = None,
    idle_spin: bool = True,
    split_above: int | None = None,
    query_input: str | None = "query_seqlens",
) -> ort.InferenceSession:
    """An InferenceSession over `model_path` (external data resolved beside it); idle_spin as in
    session_options. The memory the build filled (packed weights) is then backed by huge pages
    (collapse_to_huge_pages) unless ONNXLM_HUGE_PAGES=0.

    split_above: the graph's int8-cache layers take their float32 form for calls bringing more than
    this many tokens to a row (query_input): run it as a split.SplitSession (its two forms, no Ifs),
    which stands in for the InferenceSession, where the CPU provider is the only one chosen."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    _check_threads(threads)
    chosen = choose_providers(providers, c_api=split_above is not None)
    before = heap_mappings() if huge_pages_wanted() else None
    session, forms = None, False
    if split_above is not None and query_input and chosen == [CPU]:
        from . import ortc
        from .split import SplitSession

        try:
            session = SplitSession(path, split_above, query_input, threads or cpu_count(), idle_spin)
            forms = True
        except ortc.OrtError as e:  # no usable C library: the graph runs with its Ifs
            log.warning("running %s with its Ifs: onnxruntime's C API is not usable here (%s)", path.name, e)
        except ValueError as e:  # the manifest promises Ifs the graph lacks: run the graph as it is
            log.warning("running %s as one graph: %s", path.name, e)
    if session is None:
        session = ort_module().InferenceSession(
            str(path), sess_options=session_options(threads, idle_spin), providers=chosen
        )
    log.info(
        "onnxruntime session on %s%s",
        ", ".join(session.get_providers()),
        " (two forms sharing packed weights)" if forms else "",
    )
    release_free_heap()  # what the build freed goes back first: only memory in use is collapsed
    if before is not None:
        collapse_to_huge_pages(before)
    return session


def _libc_function(name: str, argtypes: list, restype=ctypes.c_int):
    """A function of the C library, typed, or None where there is no such library or function."""
    lib = ctypes.util.find_library("c")
    try:
        fn = getattr(ctypes.CDLL(lib), name) if lib else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = argtypes, restype
    return fn


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). Parsing tokenizer.json
    and building a session leave tens of MB freed but still held by the allocator; releasing them
    between the two keeps the first out of the process's peak, and after them out of its steady size.
    Returns False where the C library has no malloc_trim (not glibc): nothing to do there."""
    trim = _libc_function("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True


MADV_DONTNEED = 4  # Linux: drop the range's pages from this process; a clean file page comes back on touch


_SMAPS_FIELDS = {"Rss:": "rss_kb", "Anonymous:": "written_kb", "AnonHugePages:": "huge_kb"}


def _mapping_header(line: str) -> tuple[int, int, str, str]:
    """(start, end, perms, path) of a /proc/self/maps line (smaps' header lines are the same; path ""
    for anonymous memory)."""
    head = line.split(None, 5)
    start, end = (int(x, 16) for x in head[0].split("-"))
    return start, end, head[1], head[5].strip() if len(head) == 6 else ""


def mappings() -> list[dict]:
    """This process's memory mappings (Linux /proc/self/smaps): start, end, path ("" for anonymous
    memory), perms ("rw-p"), and the kB resident, the kB anonymous (for a file: the pages this process
    wrote to, which no longer match the file) and the kB on huge pages. Empty where there is no /proc."""
    found, current = [], None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 2)
                if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                    start, end, perms, path = _mapping_header(line)
                    current = {"start": start, "end": end, "path": path, "perms": perms}
                    current.update(rss_kb=0, written_kb=0, huge_kb=0)
                    found.append(current)
                elif current is not None and head[0] in _SMAPS_FIELDS:
                    current[_SMAPS_FIELDS[head[0]]] = int(head[1])
    except (OSError, ValueError, IndexError):
        return []
    return found


def file_mappings(directory: str | os.PathLike) -> list[dict]:
    """`mappings()` of files under `directory`."""
    root = os.path.realpath(directory) + os.sep
    return [m for m in mappings() if m["path"].startswith(root)]


def _map_ranges(keep: Callable[[str, str], bool]) -> list[tuple[int, int]]:
    """The (start, end) of this process's mappings whose (perms, path) `keep` accepts, in
    /proc/self/maps order: no page walk (smaps does one, tens of ms in a large process). Empty where
    there is no /proc."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                start, end, perms, path = _mapping_header(line)
                if keep(perms, path):
                    found.append((start, end))
    except (OSError, ValueError, IndexError):
        return []
    return found


def file_ranges(directory: str | os.PathLike) -> list[tuple[int, int]]:
    """The (start, end) of this process's mappings of files under `directory`: what `file_mappings`
    finds without its page walk (a twentieth of the cost), for callers that poll."""
    root = os.path.realpath(directory) + os.sep
    return _map_ranges(lambda perms, path: path.startswith(root))


def release_mapped_files(directory: str | os.PathLike) -> int:
    """Drop this process's resident pages of the files it maps from `directory` (a bundle's external
    data, which onnxruntime maps rather than reads) and return how many bytes were resident there.
    Packing copies most weights out of the mapping at load (MatMul, MatMulNBits) and reading the
    rest once leaves all of it resident: the float32 embedding table of a tied head, read whole to
    pack the head, stays in the process's RSS though generation then gathers a few rows of it.
    Only mappings with no page written by this process are dropped, so every byte reads back the
    same from the file on its next touch; a mapping with written pages is left as it is."""
    madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
    if madvise is None:
        return 0
    released = 0
    for m in file_mappings(directory):
        if (
            m["rss_kb"]
            and not m["written_kb"]
            and madvise(m["start"], m["end"] - m["start"], MADV_DONTNEED) == 0
        ):
            released += m["rss_kb"] * 1024
    return released


# onnxruntime reads a tied head's 28 MB table (SmolLM2 int4) in ~12 ms at the end of a build: polled
# every 20 ms, all of it was resident at once and made the process's peak (238 against 215-220 MB)
LOAD_RELEASE_EVERY_S = 0.002


def read_only_file_ranges(directory: str | os.PathLike) -> list[tuple[int, int]]:
    """`file_ranges` of the mappings this process cannot write to: dropping their pages
    (MADV_DONTNEED) loses nothing, and leaves them in the page cache."""
    root = os.path.realpath(directory) + os.sep
    return _map_ranges(lambda perms, path: "w" not in perms and path.startswith(root))


@contextmanager
def releasing_mapped_files(
    directory: str | os.PathLike, every_s: float = LOAD_RELEASE_EVERY_S
) -> Iterator[None]:
    """While the body runs (onnxruntime building a session from the bundle at `directory`), drop this
    process's resident pages of the read-only mappings of files from there every `every_s` seconds:
    the bundle's data as split.SplitSession maps it, which the build packs from and would otherwise
    leave resident whole at its end, the process's peak (SmolLM2 int4: 261 MB kept, 248 polled every
    20 ms, 238 every 2 ms).
    The pages stay in the page cache, so the next load of the bundle reads memory, not the disk. (This
    reclaimed with MADV_PAGEOUT, which also evicts the pages from the page cache: each load of the
    fp32 bundle left ~200 MB of its file to be read back from disk by the next, 8-15 s instead of 2 s
    on a slow disk.) The writable private mappings onnxruntime makes of external data itself are left
    to release_mapped_files after the build: dropping a page of one is safe only if this process never
    wrote to it, which no check made before the drop can promise while the build runs.
    A no-op where there is no madvise (not Linux)."""
    madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
    stop = threading.Event()

    def reclaim() -> None:
        while not stop.wait(every_s):
            ranges = read_only_file_ranges(directory)  # no page walk (smaps) each time: it would cost more
            failed = sum(madvise(start, end - start, MADV_DONTNEED) != 0 for start, end in ranges)
            if ranges and failed == len(ranges):  # madvise refused: nothing to do
                return

    worker = threading.Thread(target=reclaim, name="onnxlm-release-pages", daemon=True) if madvise else None
    if worker is not None:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        if worker is not None:
            worker.join()


HUGE_PAGE = 2 << 20  # x86-64 and most arm64 kernels
MADV_COLLAPSE = 25  # Linux 6.1+: back the range with huge pages now (copying), whatever the THP mode
HUGE_PAGES_ENV = "ONNXLM_HUGE_PAGES"  # "0": leave the session's memory on small pages
HUGE_PAGES_BUDGET_S = 2.0


def huge_pages_wanted() -> bool:
    return os.environ.get(HUGE_PAGES_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def heap_mappings() -> list[tuple[int, int]]:
    """The (start, end) of this process's writable anonymous mappings (the C heap, mmap'd chunks),
    sorted (`_map_ranges`)."""
    return sorted(_map_ranges(lambda perms, path: path in ("", "[heap]") and "w" in perms))


def _new_ranges(start: int, end: int, before: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) outside every range in `before` (sorted): a mapping that grew (the
    heap's top) or merged with a new neighbour yields only what was added."""
    out, at = [], start
    for s, e in before:
        if e <= at or s >= end:
            continue
        if s > at:
            out.append((at, s))
        at = max(at, e)
    if at < end:
        out.append((at, end))
    return out


def collapse_to_huge_pages(
    before: Sequence[tuple[int, int]], min_resident: float = 0.9, budget_s: float = HUGE_PAGES_BUDGET_S
) -> int:
    """Back the memory in use in writable anonymous mappings, where they are new since `before` (a
    heap_mappings() taken before a session was built: a grown heap counts from its old top), with
    2 MiB pages (madvise MADV_COLLAPSE); returns the bytes collapsed. A decode step streams every packed weight once: on 4 KiB pages that is ~28,000 TLB
    entries for SmolLM2's int4, and the page walks cost 5-10% of the step (benchmarks/README.md).
    Only 2 MiB ranges at least `min_resident` resident (mincore) are collapsed, so nothing is
    committed that was not in use (a calloc'd buffer stays lazy); contents are unchanged. Linux with
    transparent huge pages not "never" only; elsewhere nothing changes. Stops after `budget_s`
    (collapsing may compact memory first)."""
    madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
    mincore = _libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])
    if madvise is None or mincore is None:
        return 0
    pages = HUGE_PAGE // os.sysconf("SC_PAGE_SIZE")
    vec = ctypes.create_string_buffer(pages)
    resident = np.frombuffer(vec, np.uint8, count=pages)  # a view of what mincore writes
    done = failed = 0
    t0 = time.perf_counter()
    ranges = [r for start, end in heap_mappings() for r in _new_ranges(start, end, before)]
    for start, end in ranges:
        for at in range(-(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE, HUGE_PAGE):
            if mincore(at, HUGE_PAGE, vec) != 0 or int(np.count_nonzero(resident & 1)) < min_resident * pages:
                continue
            if madvise(at, HUGE_PAGE, MADV_COLLAPSE) == 0:
                done += HUGE_PAGE
            else:
                failed += 1
                if failed >= 4 and not done:  # no THP here (EINVAL), or none to be had
                    return 0
            if time.perf_counter() - t0 > budget_s:
                log.info("huge pages: stopped after %.1f s (%d MiB)", budget_s, done >> 20)
                return done
    log.debug("huge pages: %d MiB in %.2f s", done >> 20, time.perf_counter() - t0)
    return done


def binds_arrays(session: ort.InferenceSession) -> bool:
    """Whether the session's binding takes host arrays as they are (split.SplitSession), so that no
    OrtValue of the Python binding need be made for it."""
    return bool(getattr(session, "binds_arrays", False))


def kv_device(session: ort.InferenceSession) -> str:
    """Where the KV cache should live: on the GPU for CUDA/TensorRT sessions, else in host memory."""
    first = session.get_providers()[0]
    return "cuda" if first in (TENSORRT, CUDA) else "cpu"


def run_bound(
    session: ort.InferenceSession,
    inputs: Mapping[str, np.ndarray | ort.OrtValue],
    output_names: Sequence[str],
    device: str = "cpu",
    host_outputs: Sequence[str] = (),
    bound_outputs: Mapping[str, ort.OrtValue] | None = None,
) -> dict[str, ort.OrtValue]:
    """Run with IO binding: OrtValue inputs are bound as they are (no copy), outputs come back as
    OrtValues on `device` (those named in `host_outputs` in host memory), ready to bind next step.
    `bound_outputs` are written into the given OrtValues (a shared KV buffer: the same one as an input)."""
    binding = session.io_binding()
    for name, value in inputs.items():
        if is_ortvalue(value):
            binding.bind_ortvalue_input(name, value)
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    names = list(output_names)
    for name in names:
        binding.bind_output(name, "cpu" if name in host_outputs else device)
    for name, value in (bound_outputs or {}).items():
        binding.bind_ortvalue_output(name, value)
        names.append(name)
    session.run_with_iobinding(binding)
    return dict(zip(names, binding.get_outputs(), strict=True))


def run_numpy(
    session: ort.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    output_names: Sequence[str],
    prefill: bool = False,
) -> dict[str, np.ndarray]:
    """The plain path: numpy in, numpy out (every step copies the cache; for debugging and parity).
    prefill: the call is part of a prompt's prefill (a split session's form; see split.SplitSession)."""
    feeds = {k: v.numpy() if is_ortvalue(v) else v for k, v in inputs.items()}
    extra = {"prefill": True} if prefill and splits_forms(session) else {}
    return dict(zip(output_names, session.run(list(output_names), feeds, **extra), strict=True))


def splits_forms(session) -> bool:
    """Whether `session` runs an int8 cache's forms apart and takes a call's `prefill` flag."""
    return bool(getattr(session, "takes_prefill", False))


class BoundBuffers:
    """An IO binding kept across steps of one KV cache: each (past, present, buffer) bound once as both
    input and output, the small inputs rebound every step, the logits written into a host array that
    is reused while its shape holds. A step then creates no binding and wraps no outputs."""

    def __init__(
        self,
        session: ort.InferenceSession,
        buffers: Sequence[tuple[str, str, ort.OrtValue]],
        logits: str,
        logits_dtype: str = "float32",
    ):
        self.session = session
        self.plain = binds_arrays(session)
        self.logits_name = logits
        self.dtype = np.dtype(logits_dtype)
        self.binding = session.io_binding()
        for past, present, value in buffers:
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)
        self.logits: np.ndarray | None = None

    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        logits_shape: tuple[int, ...],
        prefill: bool = False,
        long_call: bool = False,
    ) -> np.ndarray:
        """Bind `inputs` (host arrays), run, and return the logits array (reused: copy to keep it).
        prefill: as run_numpy's. long_call: a row brings SHRINK_FROM tokens or more, so the run shrinks
        onnxruntime's CPU arena when it ends (a split session decides that itself)."""
        held = {name: np.ascontiguousarray(value) for name, value in inputs.items()}  # alive through the run
        for name, value in held.items():
            self.binding.bind_cpu_input(name, value)
        if self.logits is None or self.logits.shape != tuple(logits_shape):
            self.logits = np.empty(logits_shape, self.dtype)
            out = self.logits if self.plain else ort_module().OrtValue.ortvalue_from_numpy(self.logits)
            self.binding.bind_ortvalue_output(self.logits_name, out)
        if splits_forms(self.session):
            self.session.run_with_iobinding(self.binding, prefill=prefill)
        elif long_call:
            self.session.run_with_iobinding(self.binding, _shrinking())
        else:
            self.session.run_with_iobinding(self.binding)
        return self.logits


@functools.cache
def _shrinking() -> ort.RunOptions:
    """Run options that shrink the CPU arena when the run ends (one, made on first use)."""
    options = ort_module().RunOptions()
    options.add_run_config_entry(SHRINK_ARENA, "cpu:0")
    return options
