"""The `export` extra under transformers 5: a second virtualenv with the project installed from this tree
(`pip install '.[export]' 'transformers>=5,<6'`, torch pinned by the extra), running the family parity
tests there. The main environment runs them under the latest 4.x.

The venv lives under $ONNXLM_HOME/test-venvs (CI keeps ONNXLM_HOME between runs) and is rebuilt when
pyproject.toml changes; ONNXLM_TF5_VENV names a ready one instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# every family module against transformers, the new families' end-to-end parity (fused defaults), their
# chat templates, graph choice and refusals (one pytest run each)
RUNS = [
    [
        "tests/export/test_family_modules.py",
        "tests/export/test_family_chat.py",
        "tests/export/test_family_graphs.py",
        "tests/export/test_longrope.py",
    ],
    [
        "tests/export/test_families.py",
        "-k",
        "qwen3 or olmo2 or granite or smollm3 or gemma or yarn or dynamic or partial",
    ],
]


def _home() -> Path:
    return Path(os.environ.get("ONNXLM_HOME") or Path.home() / ".cache" / "onnxlm")


def _venv() -> Path:
    if os.environ.get("ONNXLM_TF5_VENV"):
        return Path(os.environ["ONNXLM_TF5_VENV"])
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = _home() / "test-venvs" / f"transformers5-{key}"
    python, ready = venv / "bin" / "python", venv / ".ready"  # ready: the install finished
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"{ROOT}[export]", "transformers>=5,<6", "pytest>=8"], check=True, cwd=ROOT)
        ready.touch()
    return venv


def _run(python: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this tree's onnxlm, not the installed copy
    return subprocess.run([str(python), *args], env=env, cwd=ROOT, capture_output=True, text=True, **kwargs)


def test_the_runs_name_test_files_that_exist():
    """The second venv runs these by path: a moved file would fail only there, in the slow run."""
    paths = [a for run in RUNS for a in run if a.startswith("tests/")]
    assert paths and [p for p in paths if not (ROOT / p).is_file()] == []


@pytest.mark.slow
def test_export_extra_installs_with_transformers5_and_families_match_it():
    python = _venv() / "bin" / "python"
    version = _run(
        python, "-c", "import transformers, torch; print(transformers.__version__, torch.__version__)"
    )
    assert version.returncode == 0, version.stderr
    tf, torch = version.stdout.split()
    assert int(tf.split(".")[0]) == 5 and torch.startswith("2.13.0"), version.stdout
    for args in RUNS:
        cmd = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *args]
        result = _run(python, *cmd, timeout=1500)
        tail = "\n".join(result.stdout.splitlines()[-15:])
        assert result.returncode == 0, f"under transformers {tf}:\n{tail}\n{result.stderr[-2000:]}"
        assert " passed" in tail and "failed" not in tail
