"""Providers, session options, and the runtime's import hygiene."""

import ctypes
import logging
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxlm.runtime import session as S

ROOT = Path(__file__).resolve().parents[2]


def test_default_providers_follow_preference_and_end_with_cpu():
    chosen = S.choose_providers()
    assert chosen[-1] == S.CPU
    order = [p for p in S.PREFERENCE if p in chosen]
    assert chosen == order
    assert set(chosen) <= set(ort.get_available_providers())


def test_missing_requested_provider_is_skipped_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setattr(S, "available_providers", lambda c_api=False: [S.CPU])
    with caplog.at_level(logging.WARNING, logger="onnxlm.runtime"):
        chosen = S.choose_providers(["TensorrtExecutionProvider", "cuda", "cpu"])
    assert chosen == [S.CPU]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "TensorrtExecutionProvider" in lines[0] and "CUDAExecutionProvider" in lines[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnxlm.runtime"):
        assert S.choose_providers() == [S.CPU]  # the default wish list skips quietly
    assert not caplog.records


def test_provider_preference_with_fake_gpu_build(monkeypatch):
    monkeypatch.setattr(S, "available_providers", lambda c_api=False: [S.CPU, S.CUDA, S.TENSORRT])
    assert S.choose_providers() == [S.TENSORRT, S.CUDA, S.CPU]
    assert S.choose_providers("cuda") == [S.CUDA, S.CPU]


def test_session_options_threads():
    opts = S.session_options()
    assert opts.intra_op_num_threads == len(os.sched_getaffinity(0))
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert S.session_options(3).intra_op_num_threads == 3
    for bad in (0, -1, 1.5, True):
        try:
            S.session_options(bad)
        except ValueError:
            continue
        raise AssertionError(f"threads={bad!r} accepted")


def test_make_session_missing_file(tmp_path):
    try:
        S.make_session(tmp_path / "nope.onnx")
    except FileNotFoundError as e:
        assert "nope.onnx" in str(e)
    else:
        raise AssertionError("no error")


def test_runtime_imports_neither_torch_nor_transformers():
    code = (
        "import sys, onnxlm.runtime\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_release_free_heap_returns_freed_pages_to_the_system():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(1024) for _ in range(64 * 1024)]  # 64 MB of small chunks on the heap
    for p in blocks:
        ctypes.memset(p, 1, 1024)  # resident
    for p in blocks[:-1]:
        libc.free(p)  # the last one pins the heap's top: free() alone cannot shrink it
    before = _rss_mb()
    released = S.release_free_heap()
    after = _rss_mb()
    libc.free(blocks[-1])
    if not released:
        pytest.skip("this C library has no malloc_trim")
    assert before - after > 32, f"RSS {before:.0f} -> {after:.0f} MB"


def test_release_free_heap_without_malloc_trim_is_a_no_op(monkeypatch):
    monkeypatch.setattr(S.ctypes.util, "find_library", lambda name: None)
    assert S.release_free_heap() is False


def _mapped_kb(directory) -> tuple[int, int]:
    maps = S.file_mappings(directory)
    return sum(m["rss_kb"] for m in maps), sum(m["written_kb"] for m in maps)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_release_mapped_files_drops_clean_pages_and_they_read_back(tmp_path):
    data = np.arange(4 * 1024 * 1024, dtype=np.float32)  # 16 MB
    (tmp_path / "w").mkdir()
    data.tofile(tmp_path / "w" / "model.onnx.data")
    other = tmp_path / "other.bin"
    data.tofile(other)
    mapped = np.memmap(
        tmp_path / "w" / "model.onnx.data", np.float32, mode="c"
    )  # private, as onnxruntime maps
    elsewhere = np.memmap(other, np.float32, mode="c")
    expected = float(data.sum(dtype=np.float64))
    assert (
        float(mapped.sum(dtype=np.float64)) == expected and float(elsewhere.sum(dtype=np.float64)) == expected
    )
    assert _mapped_kb(tmp_path / "w")[0] > 15 * 1024

    released = S.release_mapped_files(tmp_path / "w")

    assert released > 15 * 1024 * 1024
    assert _mapped_kb(tmp_path / "w")[0] < 1024
    assert _mapped_kb(tmp_path)[0] > 15 * 1024  # other.bin lies outside the folder released: still resident
    assert float(mapped.sum(dtype=np.float64)) == expected  # the same bytes, read back from the file


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_release_mapped_files_leaves_a_mapping_with_written_pages(tmp_path):
    np.ones(1024 * 1024, np.float32).tofile(tmp_path / "model.onnx.data")
    mapped = np.memmap(tmp_path / "model.onnx.data", np.float32, mode="c")
    assert float(mapped.sum()) == 1024 * 1024
    mapped[:1024] = 7.0  # a private copy of the first page: dropping it would lose the write
    resident, written = _mapped_kb(tmp_path)
    assert written > 0

    assert S.release_mapped_files(tmp_path) == 0
    assert float(mapped[:1024].sum()) == 7.0 * 1024
    assert _mapped_kb(tmp_path) == (resident, written)


def test_release_mapped_files_without_a_mapping_or_proc(tmp_path, monkeypatch):
    assert S.release_mapped_files(tmp_path) == 0
    monkeypatch.setattr(S, "_libc_function", lambda name, argtypes, restype=None: None)
    assert S.release_mapped_files(tmp_path) == 0


def _cached_pages(path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages in all): mincore over a fresh mapping, whose own
    page tables hold nothing yet."""
    mincore = S._libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])
    fresh = np.memmap(path, np.uint8, mode="r")
    pages = -(-fresh.nbytes // mmap.PAGESIZE)
    vec = ctypes.create_string_buffer(pages)
    assert mincore(fresh.ctypes.data, fresh.nbytes, vec) == 0
    return int(np.count_nonzero(np.frombuffer(vec.raw, np.uint8) & 1)), pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_releasing_mapped_files_drops_read_only_pages_while_the_body_runs_and_keeps_the_page_cache(tmp_path):
    data = np.arange(4 * 1024 * 1024, dtype=np.float32)  # 16 MB
    (tmp_path / "w").mkdir()
    path = tmp_path / "w" / "model.onnx.data"
    data.tofile(path)
    data.tofile(tmp_path / "other.bin")
    expected = float(data.sum(dtype=np.float64))
    shared = np.memmap(path, np.float32, mode="r")  # read-only, as split.SplitSession maps
    written = np.memmap(path, np.float32, mode="c")  # private and writable, as onnxruntime maps
    elsewhere = np.memmap(tmp_path / "other.bin", np.float32, mode="r")
    assert float(elsewhere.sum(dtype=np.float64)) == expected
    written[:1024] = 7.0
    with_write = expected - float(data[:1024].sum(dtype=np.float64)) + 7.0 * 1024
    with S.releasing_mapped_files(tmp_path / "w", every_s=0.01):
        assert float(shared.sum(dtype=np.float64)) == expected  # all of it resident, for a moment
        assert float(written.sum(dtype=np.float64)) == with_write
        deadline = time.monotonic() + 5
        while _rss_kb(shared) > 1024 and time.monotonic() < deadline:
            time.sleep(0.01)
        during_shared, during_written = _rss_kb(shared), _rss_kb(written)
    assert during_shared <= 1024, f"{during_shared} kB of the read-only mapping still resident"
    assert during_written > 15 * 1024  # a writable mapping is left alone while the body runs
    cached, pages = _cached_pages(path)
    assert cached == pages, f"{pages - cached} of {pages} pages left the page cache"
    assert float(written.sum(dtype=np.float64)) == with_write  # the write survived
    assert float(shared.sum(dtype=np.float64)) == expected  # the same bytes, read back
    assert _rss_kb(elsewhere) > 15 * 1024  # other.bin lies outside the folder: untouched
    time.sleep(0.05)  # after the body nothing reclaims any more
    assert _rss_kb(shared) > 15 * 1024


def _rss_kb(array: np.memmap) -> int:
    """kB resident of the mapping that holds `array`."""
    address = array.ctypes.data
    for m in S.mappings():
        if m["start"] <= address < m["end"]:
            return m["rss_kb"]
    raise AssertionError("no mapping holds the array")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_file_ranges_are_the_mappings_of_the_folder_without_a_page_walk(tmp_path):
    (tmp_path / "w").mkdir()
    np.arange(1 << 20, dtype=np.float32).tofile(tmp_path / "w" / "a.data")
    np.arange(1 << 20, dtype=np.float32).tofile(tmp_path / "b.data")
    inside = np.memmap(tmp_path / "w" / "a.data", np.float32, mode="c")
    outside = np.memmap(tmp_path / "b.data", np.float32, mode="c")
    ranges = S.file_ranges(tmp_path / "w")
    assert len(ranges) == 1 and ranges[0][1] - ranges[0][0] >= inside.nbytes
    assert ranges == [(m["start"], m["end"]) for m in S.file_mappings(tmp_path / "w")]
    assert len(S.file_ranges(tmp_path)) == 2  # the folder above holds both
    del inside, outside
    assert S.file_ranges(tmp_path) == []


def test_releasing_mapped_files_without_madvise_runs_the_body(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "_libc_function", lambda name, argtypes, restype=None: None)
    ran = []
    with S.releasing_mapped_files(tmp_path):
        ran.append(True)
    assert ran == [True]


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0] if "[" in text else None


def _resident_pages(a: np.ndarray) -> int:
    import ctypes

    mincore = S._libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p])
    page = os.sysconf("SC_PAGE_SIZE")
    start = a.ctypes.data // page * page
    n = -(-(a.ctypes.data + a.nbytes - start) // page)
    vec = ctypes.create_string_buffer(n)
    assert mincore(start, n * page, vec) == 0
    return sum(c & 1 for c in vec.raw)


def _mapping_of(address: int) -> dict:
    (m,) = [m for m in S.mappings() if m["start"] <= address < m["end"]]
    return m


def _anonymous(nbytes: int, fill: bool) -> np.ndarray:
    """A fresh private anonymous mapping, as the C heap's large chunks are (numpy's own large arrays
    ask for huge pages themselves)."""
    import mmap

    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(region, np.float32)
    if fill:
        a[:] = np.arange(a.size, dtype=np.float32)
    return a


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_collapse_to_huge_pages_backs_new_resident_memory_and_keeps_its_contents():
    before = S.heap_mappings()
    filled = _anonymous(24 * 2**20, fill=True)  # resident
    lazy = _anonymous(96 * 2**20, fill=False)  # mapped, none of it resident
    expected = float(filled.sum(dtype=np.float64))
    if _mapping_of(filled.ctypes.data)["huge_kb"]:
        pytest.skip("huge pages already back every new mapping here (transparent_hugepage: always)")

    done = S.collapse_to_huge_pages(before)

    if _thp_mode() in (None, "never") or not done:
        pytest.skip(f"no huge pages to be had here (transparent_hugepage: {_thp_mode()})")
    assert done >= 20 * 2**20  # the whole 2 MiB-aligned part of the filled buffer, at least
    assert _mapping_of(filled.ctypes.data)["huge_kb"] >= 20 * 1024
    assert float(filled.sum(dtype=np.float64)) == expected
    assert _resident_pages(lazy) < 64  # nothing committed that was not in use
    assert not lazy[:: 2**18].any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_collapse_leaves_mappings_that_existed_before_alone():
    filled = _anonymous(24 * 2**20, fill=True)
    had = _mapping_of(filled.ctypes.data)["huge_kb"]
    assert S.collapse_to_huge_pages(S.heap_mappings()) == 0
    assert _mapping_of(filled.ctypes.data)["huge_kb"] == had


def test_make_session_collapses_unless_told_not_to(monkeypatch):
    from tests.bundles import tiny_bundle

    model = tiny_bundle("fused").path / "model.onnx"
    calls = []
    monkeypatch.setattr(S, "collapse_to_huge_pages", lambda before: calls.append(before) or 0)
    monkeypatch.delenv(S.HUGE_PAGES_ENV, raising=False)
    S.make_session(model)
    assert len(calls) == 1 and isinstance(calls[0], list)
    for off in ("0", "off", "false"):
        monkeypatch.setenv(S.HUGE_PAGES_ENV, off)
        S.make_session(model)
    assert len(calls) == 1


def test_new_ranges_are_what_a_mapping_added():
    before = [(100, 200), (300, 400)]
    assert S._new_ranges(100, 200, before) == []  # unchanged
    assert S._new_ranges(100, 260, before) == [(200, 260)]  # grew at its top (the heap)
    assert S._new_ranges(40, 200, before) == [(40, 100)]  # a new neighbour merged below
    assert S._new_ranges(150, 450, before) == [(200, 300), (400, 450)]
    assert S._new_ranges(500, 600, before) == [(500, 600)]  # new
