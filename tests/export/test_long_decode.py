"""Decode steps at long contexts compute attention with MatMul / Softmax (an If per layer around
GroupQueryAttention): the same tokens as GroupQueryAttention alone, whichever branch a step takes."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxlm import bundle as B
from onnxlm.export.convert import ExportError, export
from onnxlm.quantize.api import quantize
from onnxlm.rewrites import PREFIX, from_tokens_of, unwrap_long_decode
from onnxlm.runtime import load
from tests.fixtures import make_hf_folder

FROM = 12  # a tiny model's context is short: switch early so tests cross it


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(wrapped, GroupQueryAttention only) bundles of one tiny Llama."""
    root = tmp_path_factory.mktemp("long_decode")
    folder = make_hf_folder(root / "hf", "llama", init_std=0.1, max_position_embeddings=128)
    wrapped = export(folder, root / "wrapped", long_decode_from=FROM, progress=False)  # validated
    plain = export(folder, root / "gqa", long_decode_from=None, progress=False, validate=False)
    return wrapped, plain


def _ops(path):
    return collections.Counter(
        n.op_type for n in onnx.load(str(path / B.MODEL), load_external_data=False).graph.node
    )


def test_graph_and_manifest_say_where_it_switches(pair):
    wrapped, plain = pair
    layers = B.read_manifest(wrapped).model.num_layers
    assert _ops(wrapped)["If"] == layers + 1 and _ops(wrapped)["GroupQueryAttention"] == 0  # + the prelude
    assert _ops(plain)["GroupQueryAttention"] == layers and _ops(plain)["If"] == 0
    assert B.read_manifest(wrapped).io.long_decode_from == FROM
    assert B.read_manifest(plain).io.long_decode_from is None
    assert from_tokens_of(onnx.load(str(wrapped / B.MODEL), load_external_data=False)) == FROM


@pytest.mark.parametrize("prompt_len", [4, 30])  # crossing the switch while decoding / past it from the start
def test_greedy_tokens_and_logprobs_match_gqa_alone(pair, prompt_len):
    wrapped, plain = (load(p, threads=1) for p in pair)
    ids = list(range(5, 5 + prompt_len))
    a = plain.generate(ids, max_new_tokens=24, ignore_eos=True, temperature=0, logprobs=True)
    b = wrapped.generate(ids, max_new_tokens=24, ignore_eos=True, temperature=0, logprobs=True)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_a_batch_of_different_lengths_matches_gqa_alone(pair):
    wrapped, plain = (load(p, threads=1) for p in pair)
    prompts = [list(range(5, 9)), list(range(20, 45)), list(range(7, 17))]
    a = plain.generate_batch(prompts, max_new_tokens=20, ignore_eos=True, temperature=0, logprobs=True)
    b = wrapped.generate_batch(prompts, max_new_tokens=20, ignore_eos=True, temperature=0, logprobs=True)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)


def _branches_run(bundle, tmp_path, capacity: int, steps: list[list[int]]) -> list[set[str]]:
    """The operator types onnxruntime's profile saw in each of `steps` (token ids per step, one row)."""
    engine = load(bundle, threads=1)
    model, io = engine.model, engine.manifest.io
    cache = model.new_cache(1, capacity=capacity)
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "prof")
    seen = []
    for ids in steps:
        session = ort.InferenceSession(str(bundle / B.MODEL), opts, providers=["CPUExecutionProvider"])
        feeds = {
            io.input_ids: np.array([ids]),
            io.logits_index: np.array([[len(ids) - 1]]),
            **cache.feeds([len(ids)]),
        }
        out = session.run(None, feeds)
        cache.update(dict(zip([o.name for o in session.get_outputs()], out, strict=True)))
        events = json.loads(open(session.end_profiling()).read())
        seen.append(
            {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e["args"]}
        )
    return seen


def test_the_matmul_branch_runs_only_for_long_decode_steps(pair, tmp_path):
    """onnxruntime's profile names the nodes each step ran: ScatterND (the MatMul form) only on a
    one-token step holding >= FROM tokens in a buffer at most 4/3 of that; GroupQueryAttention otherwise."""
    wrapped, _ = pair
    prefill, short, long = _branches_run(
        wrapped, tmp_path, FROM + 2, [list(range(5, 5 + FROM - 2)), [7], [8]]
    )
    for s in (prefill, short):
        assert "GroupQueryAttention" in s and "ScatterND" not in s
    assert "ScatterND" in long and "GroupQueryAttention" not in long
    # the same step in a buffer grown far ahead of what it holds stays on GroupQueryAttention
    *_, roomy = _branches_run(wrapped, tmp_path, 3 * FROM, [list(range(5, 5 + FROM - 1)), [8]])
    assert "GroupQueryAttention" in roomy and "ScatterND" not in roomy


def test_sliding_window_family_matches_gqa_alone(tmp_path):
    folder = make_hf_folder(
        tmp_path / "hf", "mistral", init_std=0.1, max_position_embeddings=128, sliding_window=8
    )
    wrapped = load(
        export(folder, tmp_path / "w", long_decode_from=10, progress=False, validate=False), threads=1
    )
    plain = load(
        export(folder, tmp_path / "g", long_decode_from=None, progress=False, validate=False), threads=1
    )
    ids = list(range(5, 11))
    a = plain.generate(ids, max_new_tokens=30, ignore_eos=True, temperature=0, logprobs=True)
    b = wrapped.generate(ids, max_new_tokens=30, ignore_eos=True, temperature=0, logprobs=True)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


@pytest.mark.parametrize(
    "model_type,overrides",
    [
        ("gemma2", {}),  # scale, attention soft-cap, windows on alternate layers
        ("gemma3_text", {}),  # q, k, v apart (q/k norms), local and global cos/sin caches
        ("smollm3", {}),  # a layer without rotary
        ("granite", {}),  # attention multiplier as the scale
        # cos/sin computed at each step, from 16 tokens held on
        ("llama", {"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 8.0}}),
    ],
    ids=["gemma2", "gemma3_text", "smollm3", "granite", "llama-dynamic"],
)
def test_new_family_attention_matches_gqa_alone(model_type, overrides, tmp_path):
    overrides = {"max_position_embeddings": 128, **overrides}
    folder = make_hf_folder(tmp_path / "hf", model_type, init_std=0.1, **overrides)
    wrapped = load(
        export(folder, tmp_path / "w", long_decode_from=10, progress=False, validate=False), threads=1
    )
    plain = load(
        export(folder, tmp_path / "g", long_decode_from=None, progress=False, validate=False), threads=1
    )
    assert wrapped.manifest.io.long_decode_from == 10
    ids = list(range(5, 11))
    a = plain.generate(ids, max_new_tokens=24, ignore_eos=True, temperature=0, logprobs=True)
    b = wrapped.generate(ids, max_new_tokens=24, ignore_eos=True, temperature=0, logprobs=True)
    assert a.token_ids == b.token_ids
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_quantized_bundles_keep_the_switch_and_float16_drops_it(pair, tmp_path, info):
    wrapped, plain = pair
    q = quantize(
        wrapped, tmp_path / "int4", "int4", kv_cache="float32", progress=False
    )  # the switch reads it
    assert B.read_manifest(q).io.long_decode_from == FROM and _ops(q)["If"] > 0
    graph = onnx.load(str(q / B.MODEL), load_external_data=False)
    assert any(
        t.name.startswith(PREFIX) for t in graph.graph.initializer
    )  # read only inside the branches: kept
    ref = load(quantize(plain, tmp_path / "int4-gqa", "int4", kv_cache="float32", progress=False), threads=1)
    ids = list(range(5, 40))
    np.testing.assert_allclose(load(q, threads=1).model.logits(ids), ref.model.logits(ids), atol=1e-4)
    assert len(load(q, threads=1).generate(ids, max_new_tokens=8, ignore_eos=True).token_ids) == 8
    shown = info(q)
    assert (
        f"MatMul/Softmax from {FROM} tokens held" in shown
        and "recipe int4; scheme min folded; block size 32" in shown
    )
    auto = quantize(wrapped, tmp_path / "int4-auto", "int4", progress=False)  # an int8 cache: no switch
    assert B.read_manifest(auto).io.long_decode_from is None and B.read_manifest(auto).io.kv_dtype == "int8"
    half = quantize(wrapped, tmp_path / "fp16", "fp16", progress=False)
    assert B.read_manifest(half).io.long_decode_from is None and _ops(half)["If"] == 0
    assert _ops(half)["GroupQueryAttention"] == B.read_manifest(half).model.num_layers


def test_unwrap_restores_the_plain_gqa_graph(pair):
    wrapped, plain = pair
    graph = onnx.load(str(wrapped / B.MODEL), load_external_data=False)
    assert unwrap_long_decode(graph)
    assert not unwrap_long_decode(graph)  # nothing left to unwrap
    ops = collections.Counter(n.op_type for n in graph.graph.node)
    assert ops == _ops(plain)
    assert not any(t.name.startswith(PREFIX) for t in graph.graph.initializer)


def test_bad_threshold_is_refused(tmp_path):
    folder = make_hf_folder(tmp_path / "hf", "llama")
    with pytest.raises(ExportError, match="long_decode_from"):
        export(folder, tmp_path / "b", long_decode_from=0, progress=False)
    assert not (tmp_path / "b").exists()


def test_cli_option_and_its_default(tmp_path):
    from click.testing import CliRunner

    from onnxlm.cli import cli

    runner = CliRunner()
    assert "[default: 0]" in runner.invoke(cli, ["export", "--help"]).output
    folder = make_hf_folder(tmp_path / "hf", "llama", max_position_embeddings=64)
    for flag, expect in (("0", None), ("20", 20)):
        out = tmp_path / f"b{flag}"
        r = runner.invoke(
            cli, ["export", str(folder), "-o", str(out), "--no-validate", "--long-decode-from", flag]
        )
        assert r.exit_code == 0, r.output
        assert B.read_manifest(out).io.long_decode_from == expect
    # a threshold at or past the context window would never switch: the graph is left as it is
    r = runner.invoke(
        cli, ["export", str(folder), "-o", str(tmp_path / "c"), "--no-validate", "--long-decode-from", "64"]
    )
    assert r.exit_code == 0 and B.read_manifest(tmp_path / "c").io.long_decode_from is None
    assert _ops(tmp_path / "c")["If"] == 0
    # by default no switch: end to end it no longer pays (benchmarks/README.md)
    r = runner.invoke(cli, ["export", str(folder), "-o", str(tmp_path / "d"), "--no-validate"])
    assert r.exit_code == 0 and B.read_manifest(tmp_path / "d").io.long_decode_from is None
    assert _ops(tmp_path / "d")["If"] == 0 and _ops(tmp_path / "d")["GroupQueryAttention"] > 0
