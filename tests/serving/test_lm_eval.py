"""lm-eval's local-completions model against `create_app` on loopback: a multiple-choice task made
from tests/serving/data/lm_eval_mc/questions.jsonl is scored through echo + prompt logprobs (max_tokens 1, as
lm-eval sends) with the server's /tokenize (lm-eval's remote tokenizer), and every per-choice
loglikelihood equals onnxlm's own from the logits to 1e-4.

lm-eval pulls datasets and huggingface_hub versions the export extra's transformers cannot share an
environment with: it runs in its own interpreter (`pip install "lm-eval[api]"` there) named by
`ONNXLM_LM_EVAL_PYTHON`, else in this one when it has lm_eval, else in a venv the test makes once
under $ONNXLM_HOME/test-venvs (CI keeps ONNXLM_HOME)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from onnxlm.runtime import load
from onnxlm.runtime.serving.app import create_app
from tests.bundles import long_bundle
from tests.serving.loopback import ServerThread

DATA = Path(__file__).parent / "data" / "lm_eval_mc" / "questions.jsonl"
TASK = """task: onnxlm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


LM_EVAL = "lm-eval[api]==0.4.13"


def lm_eval_python() -> str:
    """ONNXLM_LM_EVAL_PYTHON, else this interpreter when it has lm_eval, else a venv of its own made
    once under $ONNXLM_HOME/test-venvs (about 80 s; torch pinned to the CPU build the export extra
    uses, which pip takes from the local wheel where there is one)."""
    import sys

    python = os.environ.get("ONNXLM_LM_EVAL_PYTHON")
    if python:
        return python
    if importlib.util.find_spec("lm_eval") is not None:
        return sys.executable
    home = Path(os.environ.get("ONNXLM_HOME") or Path.home() / ".cache" / "onnxlm")
    venv = home / "test-venvs" / "lm-eval-0.4.13"
    python, ready = venv / "bin" / "python", venv / ".ready"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", LM_EVAL, "torch==2.13.0"], check=True)
        ready.touch()
    return str(python)


@pytest.mark.slow  # builds lm-eval's own environment on first use
def test_lm_eval_loglikelihoods_equal_onnxlm(tmp_path):
    python = lm_eval_python()
    engine = load(long_bundle(), threads=1)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "onnxlm_mc.yaml").write_text(TASK.format(data=json.dumps(str(DATA))))
    srv = ServerThread(create_app(engine, model_name="tiny"))
    try:
        args = (
            f"base_url={srv.base}/v1/completions,model=tiny,tokenizer_backend=remote,"
            "tokenized_requests=True,num_concurrent=1,max_retries=1"
        )
        cmd = [python, "-m", "lm_eval", "--model", "local-completions", "--model_args", args]
        cmd += ["--tasks", "onnxlm_mc", "--include_path", str(tmp_path / "tasks")]
        cmd += ["--output_path", str(tmp_path / "out"), "--log_samples"]
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1"}
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        srv.stop()
    (samples,) = list((tmp_path / "out").rglob("samples_onnxlm_mc_*.jsonl"))
    docs = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(docs) == len(DATA.read_text().splitlines())
    tok = engine.tokenizer
    for doc in docs:
        context = doc["doc"]["question"]
        for choice, resp in zip(doc["doc"]["choices"], doc["resps"], strict=True):
            got = float(resp[0][0])
            whole = tok.encode(f"{context} {choice}", add_special_tokens=False)
            ctx = len(tok.encode(context, add_special_tokens=False))
            logits = engine.model.logits(whole).astype(np.float64)  # (seq, vocab)
            rows = logits[ctx - 1 : len(whole) - 1]
            lse = rows.max(-1) + np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1))
            want = float(sum(rows[i, t] - lse[i] for i, t in enumerate(whole[ctx:])))
            assert abs(got - want) < 1e-4, (context, choice, got, want)
