"""The benchmark scripts' own checks: what they time must compute what the runtime computes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxlm import bundle as B
from onnxlm.rewrites import matmul_attention
from onnxlm.runtime import load
from onnxlm.runtime.engine import Engine
from tests.bundles import tiny_bundle

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def attention():
    return _script("attention")


def test_attention_forms_agree_before_they_are_timed(attention, tmp_path):
    r = attention.main(
        ["--contexts", "5,70", "--layers", "2", "--steps", "1", "--repeat", "1", "--out", str(tmp_path)]
    )
    for context in ("5", "70"):
        row = r["per_layer_decode_step"][context]
        assert set(row) == set(attention.FORMS)
        assert row["matmul"]["max_abs_diff_vs_gqa"] < 1e-5
        assert row["gqa-fp16"]["max_abs_diff_vs_gqa"] < 1e-2  # float16 keys and values
        assert all(v["us_per_layer"] > 0 for v in row.values())
    assert (tmp_path / "attention.json").is_file()


def test_matmul_attention_graph_generates_what_the_bundle_does(attention):
    """The whole-model comparison runs the bundle's own graph with GroupQueryAttention rewritten:
    prefill logits and greedy tokens must match the bundle as it is."""
    root = tiny_bundle("fused").path
    manifest = B.check_bundle(root)
    graph = matmul_attention(onnx.load(str(root / B.MODEL)))
    assert not [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    rewritten = Engine.from_parts(root, manifest, session)
    original = load(root, threads=1)
    ids = list(range(5, 45))
    np.testing.assert_allclose(rewritten.model.logits(ids), original.model.logits(ids), atol=1e-4)
    a = original.generate(ids, max_new_tokens=12, ignore_eos=True, temperature=0, logprobs=True)
    b = rewritten.generate(ids, max_new_tokens=12, ignore_eos=True, temperature=0, logprobs=True)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_matmul_attention_refuses_a_graph_without_gqa(attention):
    root = tiny_bundle("plain").path
    with pytest.raises(ValueError, match="no GroupQueryAttention"):
        matmul_attention(onnx.load(str(root / B.MODEL)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_compare_reports_speed_and_each_engines_memory(tiny_llama_bundle, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--onnxlm", f"tiny={tiny_llama_bundle}"]
    cmd += (
        ["--gguf", f"missing={tmp_path / 'none.gguf'}"]
        if importlib.util.find_spec("llama_cpp") is None
        else []
    )
    cmd += ["--contexts", "8,20", "--new-tokens", "4", "--rounds", "1", "--memory", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "compare.json").read_text())
    rows = {(r["engine"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {("onnxlm tiny", 8), ("onnxlm tiny", 20)}
    assert all(r["decode_tokens_per_s"] > 0 and r["ttft_s"] > 0 for r in rows.values())
    size = sum(f.stat().st_size for f in Path(tiny_llama_bundle).glob("model.onnx*"))
    for r in rows.values():
        assert r["model_bytes"] == size
        assert abs(r["decode_gb_per_s"] - size * r["decode_tokens_per_s"] / 1e9) < 1e-9
    assert result["machine"]["read_gb_per_s"] > 0
    mem = result["memory"]["onnxlm tiny"]
    assert 0 < mem["rss_mb"] <= mem["peak_rss_mb"] + 1, mem
    assert "| onnxlm tiny |" in (out / "compare.md").read_text() and "peak RSS" in done.stdout
    if "--gguf" in cmd:  # a peer whose package is missing is reported, not run
        assert "not installed" in result["skipped"]["llama.cpp missing"]


def test_compare_pairs_each_round_against_a_baseline(tiny_llama_bundle, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--onnxlm", f"a={tiny_llama_bundle}"]
    cmd += ["--onnxlm", f"b={tiny_llama_bundle}", "--contexts", "8", "--new-tokens", "4", "--rounds", "3"]
    done = subprocess.run([*cmd, "--baseline", "onnxlm c", "--out", str(out)], capture_output=True, text=True)
    assert (
        done.returncode != 0
        and "--baseline 'onnxlm c'" in done.stderr
        and not (out / "compare.json").exists()
    )
    done = subprocess.run([*cmd, "--baseline", "onnxlm a", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "compare.json").read_text())
    rows = {r["engine"]: r["rounds"] for r in result["rows"]}
    (pair,) = result["paired"]
    assert (pair["engine"], pair["baseline"]) == ("onnxlm b", "onnxlm a")
    want = [
        b["decode_tokens_per_s"] / a["decode_tokens_per_s"]
        for a, b in zip(rows["onnxlm a"], rows["onnxlm b"], strict=True)
    ]
    assert pair["rounds"]["8"] == pytest.approx(want) and len(want) == 3
    # each round's order rotated: no engine always runs after the same neighbour
    assert result["orders"] == [["onnxlm a", "onnxlm b"], ["onnxlm b", "onnxlm a"], ["onnxlm a", "onnxlm b"]]
    assert pair["median"]["8"] == pytest.approx(sorted(want)[1])
    assert f"| onnxlm b | onnxlm a | {sorted(want)[1]:.2f}x" in (out / "compare.md").read_text()


def test_draft_turns_times_every_setting_of_the_two_sessions(tiny_llama_bundle, tmp_path):
    out = tmp_path / "out"
    script = str(ROOT / "benchmarks" / "draft_turns.py")
    cmd = [sys.executable, script, tiny_llama_bundle, tiny_llama_bundle, "--context", "12", "--rounds", "2"]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "draft_turns.json").read_text())
    assert set(result["settings"]) == {"both spin", "draft stops", "both stop"}
    for times in result["settings"].values():
        assert set(times) == {"verify alone", "draft step", "verify after draft", "step after"}
        assert all(v > 0 for v in times.values())
    assert "| both stop |" in (out / "draft_turns.md").read_text()


def test_int4_gemv_checks_both_kernels_before_timing_them(tiny_llama_bundle, tmp_path):
    from onnxlm.quantize.api import quantize

    int4 = quantize(tiny_llama_bundle, tmp_path / "int4", "int4", progress=False)
    gemv = _script("int4_gemv")
    r = gemv.main(["--pairs", "2", "--repeat", "2", "--rounds", "2", "--threads", "2", "--bundle", str(int4)])
    assert r["matrices"] == 4 and r["bytes"] == r["weights"] * 0.75
    sides = r["sides"]
    assert sides["matmulnbits"]["max_rel_error"] < 0.03 and sides["matmulnbits"]["ms_per_chain"] > 0
    if "c" in r["skipped"]:  # no compiler or no AVX-512 VNNI here: said, not faked
        assert "c" not in sides and r["skipped"]["c"]
    else:
        assert sides["c"]["max_rel_error"] < 0.03 and len(sides["c"]["rounds"]) == 2
        assert r["c_speedup"] == sides["matmulnbits"]["ms_per_chain"] / sides["c"]["ms_per_chain"]
    b = r["bundles"][str(int4)]
    assert b["matmulnbits"] == sum(
        n.op_type == "MatMulNBits" for n in onnx.load(int4 / "model.onnx").graph.node
    )
    assert 0 < b["matmuls_ms"] and 0 < b["step_ms"]


def test_prefill_exact_finds_every_chunking_and_hit_alike(tiny_llama_bundle, tmp_path):
    """The shared-buffer driver gives one call's logits bit for bit however a prompt is chunked and
    from a prefix hit leaving two or more tokens (a hit leaving one runs a one-token call)."""
    bench = _script("prefill_exact")
    r = bench.main([str(tiny_llama_bundle), "--tokens", "9,30", "--chunks", "1,2,4", "--threads", "1",
                    "--out", str(tmp_path)])  # fmt: skip
    cases = {(row["tokens"], row["case"]): row["max_abs_diff"] for row in r["rows"]}
    assert (30, "chunks of 1 (last 1)") in cases and (30, "hit of 28, 2 left") in cases
    assert all(d == 0.0 for (_, case), d in cases.items() if "1 left" not in case), cases
    assert (tmp_path / "prefill_exact.md").read_text().count("\n| ") == len(cases) + 2  # and the header


def test_q4_1_blocks_dequantize_as_the_kernel_reads_them():
    gemv = _script("int4_gemv")
    w = gemv.q4_1_blocks(np.random.default_rng(0), 64, 3)
    w["q"][0, 0, :] = 0x21  # low nibble 1 (elements 0..15), high nibble 2 (elements 16..31)
    dense = gemv.q4_1_dense(w)
    d, m = float(w["d"][0, 0]), float(w["m"][0, 0])
    assert np.allclose(dense[0, :16], 1 * d + m) and np.allclose(dense[0, 16:32], 2 * d + m)


@pytest.mark.parametrize(
    "script", sorted(p.name for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py"))
)
def test_every_benchmark_script_starts(script):
    """Each script's imports still resolve against the package (a moved function breaks a benchmark
    no other test runs): `--help` imports it and exits."""
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    r = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower()


def test_verify_cost_prices_lookup_rounds_as_they_would_run():
    vc = _script("verify_cost")
    price = {1: 1.0, 2: 1.5, 3: 1.75, 4: 2.0}
    prompt = [1, 5, 6, 7, 8, 9, 1]
    # after the first token (5) the context ends "1 5", which the prompt holds: drafts 6 7 8
    assert vc.lookup_speedup(prompt, [5, 6, 7, 8, 9], 3, price) == 4 / 2.0  # all kept: 4 tokens, one call
    # drafts stop short of the last token (6 7 here); 6 is kept and 0 emitted in place of 7 (one
    # width-3 call), then the last token in a plain step
    assert vc.lookup_speedup(prompt, [5, 6, 0, 2], 3, price) == 3 / (1.75 + 1.0)
    assert vc.lookup_speedup(prompt, [5, 6, 7, 8, 9], 1, price) == 4 / (1.5 + 1.5)  # two width-2 calls
    assert vc.lookup_speedup([2, 3, 4], [9, 9, 8], 3, price) == 1.0  # nothing to copy: plain steps


def test_verify_cost_measures_each_width_against_a_step(tiny_llama_bundle, tmp_path):
    out = tmp_path / "out"
    script = str(ROOT / "benchmarks" / "verify_cost.py")
    cmd = [sys.executable, script, "--bundle", f"tiny={tiny_llama_bundle}", "--contexts", "8,20"]
    cmd += ["--widths", "2,3", "--rounds", "2", "--threads", "1", "--no-kernel", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "verify_cost.json").read_text())
    for ctx in ("8", "20"):
        r = result["bundles"]["tiny"][ctx]
        assert r["step_ms"] > 0 and set(r["ratio"]) == {"2", "3"} and all(v > 0 for v in r["ratio"].values())
    assert "| tiny | 20 |" in (out / "verify_cost.md").read_text()


def test_prefill_memory_reports_each_prompt_after_load(tiny_llama_bundle, tmp_path):
    bench = _script("prefill_memory")
    r = bench.main([str(tiny_llama_bundle), "--tokens", "9,120,30", "--new-tokens", "2", "--threads", "1",
                    "--out", str(tmp_path)])  # fmt: skip
    assert [row["tokens"] for row in r["rows"]] == [9, 120, 30]
    assert r["rss_after_load_mb"] > 0 and all(row["rss_mb"] > 0 and row["seconds"] > 0 for row in r["rows"])
    assert (tmp_path / "prefill_memory.md").read_text().count("\n| ") == 3 + 2  # and the header
