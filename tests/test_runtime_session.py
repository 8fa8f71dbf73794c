"""Providers, session options, and the runtime's import hygiene."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort

from onnxlm.runtime import session as S

ROOT = Path(__file__).resolve().parents[1]


def test_default_providers_follow_preference_and_end_with_cpu():
    chosen = S.choose_providers()
    assert chosen[-1] == S.CPU
    order = [p for p in S.PREFERENCE if p in chosen]
    assert chosen == order
    assert set(chosen) <= set(ort.get_available_providers())


def test_missing_requested_provider_is_skipped_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setattr(S, "available_providers", lambda: [S.CPU])
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
    monkeypatch.setattr(S, "available_providers", lambda: [S.CPU, S.CUDA, S.TENSORRT])
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
