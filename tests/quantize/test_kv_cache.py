"""quantize(kv_cache=...): a float16 or int8 KV cache in the fused graph (quantize/kv.py).

float16 keeps greedy tokens; int8 stays close; both run every driver path (batches, speculation,
prefix reuse) and refuse what they cannot take with one line."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxlm
from onnxlm import bundle as B
from onnxlm.cli import cli
from onnxlm.quantize import KV_CACHES, QuantizeError, quantize
from onnxlm.quantize.kv import FLOAT_PREFILL_FROM, layer_nodes
from onnxlm.quantize.report import quantize_with_report
from onnxlm.rewrites import rotary_dim
from onnxlm.runtime import ortc
from onnxlm.runtime.split import SplitSession

PROMPTS = ["Our HR team answers", "the the cat sat on the mat and the cat sat", "客服回答问题"]
# with a prompt of more than FLOAT_PREFILL_FROM tokens, an int8 batch's prefill takes the float32 form
MIXED = [
    *PROMPTS,
    "Leave requests go to your manager first; HR answers questions about pay, leave and benefits.",
]


@pytest.fixture(scope="module")
def kv(conditioned, tmp_path_factory):
    """{kv_cache: int8-recipe bundle} of the conditioned tiny llama (fused graph), and its source."""
    src = conditioned("llama")
    root = tmp_path_factory.mktemp("kv")
    out = {k: quantize(src, root / k, "int8", kv_cache=k, progress=False) for k in KV_CACHES}
    return src, out


def greedy(engine, prompt, n=32):
    return engine.generate(prompt, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids


def test_graph_and_manifest(kv):
    src, out = kv
    facts = B.read_manifest(src).model
    assert B.read_manifest(out["float32"]).io.kv_dtype == "float32"
    for kind in ("float16", "int8"):
        m = B.read_manifest(out[kind])
        assert m.io.kv_dtype == kind and m.io.long_decode_from is None
        assert m.quantization["kv_cache"]["dtype"] == kind
        model = onnx.load(str(out[kind] / B.MODEL), load_external_data=False)
        ifs = [n.name for n in model.graph.node if n.op_type == "If"]  # no long-decode If: its MatMuls
        if kind == "float16":  # read float32; int8 layers switch to float32 attention for prefill chunks
            assert not ifs and m.io.float_prefill_above is None
        else:
            assert len(ifs) == facts.num_layers and all(n.endswith("/float_prefill") for n in ifs)
            assert m.io.float_prefill_above == FLOAT_PREFILL_FROM  # the runtime reads it here
        elem = onnx.helper.tensor_dtype_to_np_dtype
        past = [v for v in model.graph.input if v.name == m.io.past_key.format(i=0)][0]
        assert elem(past.type.tensor_type.elem_type) == np.dtype(kind)
        nodes = layer_nodes(model)
        assert len(nodes) == facts.num_layers
        attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        if kind == "float16":
            assert all("kv_cache_bit_width" not in a for a in attrs)
            continue
        B.load_weights(model, out[kind])
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        rot = rotary_dim(model, facts.head_dim)
        for n, a in zip(nodes, attrs, strict=True):
            assert a["kv_cache_bit_width"] == 8 and a["k_quant_type"] == b"PER_CHANNEL"
            k, v = (inits[n.input[12]], inits[n.input[13]])
            assert k.shape == v.shape == (facts.num_kv_heads * facts.head_dim,)
            assert (k > 0).all() and (v > 0).all()
            k = k.reshape(facts.num_kv_heads, facts.head_dim)
            # a rotary pair shares its scale: rotation moves magnitude between the two channels
            assert np.array_equal(k[:, : rot // 2], k[:, rot // 2 : rot])


def test_float16_keeps_greedy_tokens(kv):
    _, out = kv
    ref, half = onnxlm.load(out["float32"]), onnxlm.load(out["float16"])
    for p in PROMPTS:
        assert greedy(half, p) == greedy(ref, p), p


def test_int8_stays_close(kv):
    _, out = kv
    ref, q = onnxlm.load(out["float32"]), onnxlm.load(out["int8"])
    agree = []
    for p in PROMPTS:
        ids = ref.tokenizer.encode(p) + greedy(ref, p, 48)
        a, b = ref.model.logits(ids), q.model.logits(ids)
        agree.append((a.argmax(-1) == b.argmax(-1)).mean())
        # the int8 cache is off by at most a little of the logits' spread
        assert np.abs(a - b).max() < 0.1 * (a.max() - a.min()), p
    assert np.mean(agree) >= 0.9, agree


def test_int8_prefill_runs_in_float32(kv):
    """A call bringing more than FLOAT_PREFILL_FROM tokens takes the float32 form, which attends over
    what the cache stores (the chunk's own keys and values quantized too), so a prompt gives the same
    logits and stored codes in one call as in two; the codes are the int8 node's, and decode steps on
    either cache read them alike. (The int8 node's own arithmetic differs a little: it is close.)"""
    _, out = kv
    ref, q = onnxlm.load(out["float32"]).model, onnxlm.load(out["int8"]).model
    half = FLOAT_PREFILL_FROM + 1
    n = 2 * half
    ids = np.array([[q.facts.bos_token_id or 1] + list(range(30, 30 + n - 1))])
    whole, parts, small, exact = (m.new_cache(1, capacity=n + 8) for m in (q, q, q, ref))
    last = np.array([[n - 1]])
    a = q.step(ids, np.array([n]), last, whole)
    for s in (0, half):
        b = q.step(ids[:, s : s + half], np.array([half]), np.array([[half - 1]]), parts)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    for s in range(0, n, FLOAT_PREFILL_FROM):  # through the int8 node
        k = min(FLOAT_PREFILL_FROM, n - s)
        c = q.step(ids[:, s : s + k], np.array([k]), np.array([[k - 1]]), small)
    first = [(x, y, z) for x, y, z in zip(whole.read(0), parts.read(0), small.read(0), strict=True)][:2]
    for x, y, z in first:  # layer 0's keys and values: same inputs, so the same codes
        assert x.dtype == np.int8 and np.array_equal(x, y) and np.array_equal(x, z)
    f = ref.step(ids, np.array([n]), last, exact)
    spread = f.max() - f.min()
    assert np.abs(a - f).max() < 0.1 * spread and np.abs(c - a).max() < 0.1 * spread
    steps = [q.step(np.array([[42]]), np.array([1]), np.array([[0]]), cache) for cache in (whole, parts)]
    np.testing.assert_allclose(steps[0], steps[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["float16", "int8"])
def test_every_driver_path(kv, kind):
    """Batches equal single rows; prompt-lookup speculation keeps greedy tokens (int8; a float16 cache
    is read as float32 by attention, so its int8-weight graph verifies inexactly and refuses a draft
    unless asked); a reused prefix gives what a fresh prefill gives."""
    _, out = kv
    engine = onnxlm.load(out[kind])
    prompts = MIXED if kind == "int8" else PROMPTS
    singles = [greedy(engine, p) for p in prompts]
    batch = engine.generate_batch(prompts, max_new_tokens=32, temperature=0, ignore_eos=True)
    assert [c.token_ids for c in batch] == singles
    if kind == "float16":
        with pytest.raises(B.BundleError, match="--draft-inexact"):
            onnxlm.load(out[kind], draft="ngram")
    spec = onnxlm.load(out[kind], draft="ngram", draft_inexact=kind == "float16")
    assert [greedy(spec, p) for p in prompts] == singles  # (float16: so on these prompts)
    if kind == "int8":  # the int8 node computes each query alike in any call: nothing to amplify
        assert spec.verify_gap == 0.0
        # a verify (k drafts + 1) never takes the float32 form, however few tokens it switches from
        spec.manifest.io.float_prefill_above = 4
        drafter = spec.speculator()
        assert drafter.k_max == 3
        assert [greedy(spec, p) for p in prompts] == singles
    chat = [{"role": "user", "content": "Our HR team answers questions about leave."}]
    first = engine.chat(chat, max_new_tokens=8, temperature=0, ignore_eos=True)
    turn2 = chat + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And pay?"}]
    again = engine.chat(turn2, max_new_tokens=16, temperature=0, ignore_eos=True)
    fresh = onnxlm.load(out[kind], prefix_cache_mb=0).chat(
        turn2, max_new_tokens=16, temperature=0, ignore_eos=True
    )
    assert again.token_ids == fresh.token_ids


def test_int8_scales_calibrated_once_per_source_and_text(kv, tmp_path, monkeypatch):
    """`auto` quantizes one source several times: the int8 scales are calibrated once per source and
    calibration text, and a different text calibrates again."""
    from onnxlm.quantize import api
    from onnxlm.quantize import kv as kv_module

    src, _ = kv
    calls = []
    real = kv_module.calibrate
    monkeypatch.setattr(kv_module, "calibrate", lambda *a: calls.append(a[2]) or real(*a))
    api._kv_scales.cache_clear()
    first = quantize(src, tmp_path / "a", "int8", kv_cache="int8", progress=False)
    second = quantize(src, tmp_path / "b", "int4", kv_cache="int8", progress=False)
    assert len(calls) == 1
    a, b = (onnx.load(str(p / B.MODEL)) for p in (first, second))
    scale = layer_nodes(a)[0].input[12]
    pick = lambda m: onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == scale))  # noqa: E731
    np.testing.assert_array_equal(pick(a), pick(b))
    quantize(
        src, tmp_path / "c", "int8", kv_cache="int8", calibration_text="Our HR team. " * 200, progress=False
    )
    assert len(calls) == 2


def test_refused_with_one_line(conditioned, kv, tmp_path):
    src, _ = kv
    with pytest.raises(
        QuantizeError, match="kv_cache must be one of auto, float32, float16, int8; got 'fp8'"
    ):
        quantize(src, tmp_path / "o", kv_cache="fp8")
    with pytest.raises(QuantizeError, match="fp16 recipe's KV cache is float16 already"):
        quantize(src, tmp_path / "o", "fp16", kv_cache="int8")
    with pytest.raises(QuantizeError, match="only used by algorithm 'gptq' and an int8 kv_cache"):
        quantize(src, tmp_path / "o", kv_cache="float16", calibration_text="hello")
    with pytest.raises(QuantizeError, match="int8 KV cache calibration: calibration text is"):
        quantize(src, tmp_path / "o", kv_cache="int8", calibration_text="too short", progress=False)
    plain = conditioned("llama", graph="plain")
    with pytest.raises(QuantizeError, match="needs the fused graph"):
        quantize(plain, tmp_path / "o", kv_cache="float16", progress=False)
    result = CliRunner().invoke(
        cli, ["quantize", str(src), "-o", str(tmp_path / "o"), "--recipe", "gguf", "--kv-cache", "int8"]
    )
    gguf_refusal = "kv_cache applies to the int8 / int4 / int4-mixed recipes, not gguf"
    assert result.exit_code != 0 and gguf_refusal in result.output
    with pytest.raises(QuantizeError, match=gguf_refusal):
        quantize_with_report(src, tmp_path / "o", "gguf", kv_cache="float16", progress=False)
    assert not (tmp_path / "o").exists()


def test_auto_gives_the_int4_recipe_an_int8_cache_where_the_graph_takes_one(conditioned, kv, tmp_path):
    src, _ = kv
    text = "Leave requests go to your manager first. " * 40  # calibration: quick, and not the default's
    four = quantize(src, tmp_path / "int4", "int4", calibration_text=text, progress=False)
    m = B.read_manifest(four)
    assert m.io.kv_dtype == "int8" and m.quantization["kv_cache"]["dtype"] == "int8"
    kept = quantize(src, tmp_path / "int4-f32", "int4", kv_cache="float32", progress=False)
    assert (
        B.read_manifest(kept).io.kv_dtype == "float32"
        and "kv_cache" not in B.read_manifest(kept).quantization
    )
    eight = quantize(src, tmp_path / "int8", "int8", progress=False)  # the other recipes: float32
    assert B.read_manifest(eight).io.kv_dtype == "float32"
    plain = conditioned("llama", graph="plain")  # no fused graph: float32, not a refusal
    assert (
        B.read_manifest(quantize(plain, tmp_path / "plain", "int4", progress=False)).io.kv_dtype == "float32"
    )
    # its verify calls compute what its decode steps do: it speculates without --draft-inexact
    spec, alone = onnxlm.load(four, threads=1, draft="ngram"), onnxlm.load(four, threads=1)
    assert greedy(spec, PROMPTS[1]) == greedy(alone, PROMPTS[1])
    assert "--kv-cache [auto|float32|float16|int8]" in CliRunner().invoke(cli, ["quantize", "--help"]).output


def test_cli(kv, tmp_path):
    src, _ = kv
    result = CliRunner().invoke(
        cli,
        [
            "quantize",
            str(src),
            "-o",
            str(tmp_path / "q"),
            "--recipe",
            "int4",
            "--kv-cache",
            "float16",
            "--no-report",
        ],
    )
    assert result.exit_code == 0, result.output
    assert B.read_manifest(tmp_path / "q").io.kv_dtype == "float16"
    assert "KV shared_buffer (float16)" in CliRunner().invoke(cli, ["info", str(tmp_path / "q")]).output


@pytest.mark.parametrize("model_type", ["mistral", "qwen3", "smollm3", "gemma2", "granite", "phi3"])
def test_int8_prefill_across_families(conditioned, tmp_path, model_type):
    """The float32 form rotates keys itself: with a sliding window (mistral, gemma2), q/k norms before
    the node (qwen3), a layer without rotary (smollm3), a soft cap (gemma2), a custom scale (granite)
    its prefill stays as close to the float32 cache as the int8 node's does, and one call equals two."""
    src = conditioned(model_type)
    bundle = quantize(src, tmp_path / "q", "int8", kv_cache="int8", progress=False)
    q = onnxlm.load(bundle, split_forms=False).model  # the If graph; its two forms are checked below
    flat = onnxlm.load(quantize(src, tmp_path / "f", "int8", progress=False)).model
    half = FLOAT_PREFILL_FROM + 5
    n = 2 * half
    ids = np.array([[q.facts.bos_token_id or 1] + list(range(30, 30 + n - 1))])
    whole, parts, small, exact = (m.new_cache(1, capacity=n + 8) for m in (q, q, q, flat))
    every = np.arange(n)[None]
    a = q.step(ids, np.array([n]), every, whole)[0]
    b = np.concatenate(
        [q.step(ids[:, s : s + half], np.array([half]), np.arange(half)[None], parts)[0] for s in (0, half)]
    )
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    c = np.concatenate(
        [
            q.step(ids[:, s : s + k], np.array([k]), np.arange(k)[None], small)[0]
            for s in range(0, n, FLOAT_PREFILL_FROM)
            if (k := min(FLOAT_PREFILL_FROM, n - s))
        ]
    )
    f = flat.step(ids, np.array([n]), every, exact)[0]  # the same weights with a float32 cache
    assert np.abs(a - f).max() <= max(2 * np.abs(c - f).max(), 1e-3)
    if ortc.available():  # the graph as its two forms (runtime/split.py): the If graph's outputs
        s = onnxlm.load(bundle, split_forms=True).model
        assert isinstance(s.session, SplitSession)
        wide, narrow = (s.new_cache(1, capacity=n + 8) for _ in range(2))
        np.testing.assert_array_equal(s.step(ids, np.array([n]), every, wide)[0], a)
        np.testing.assert_array_equal(
            s.step(
                ids[:, :FLOAT_PREFILL_FROM],
                np.array([FLOAT_PREFILL_FROM]),
                every[:, :FLOAT_PREFILL_FROM],
                narrow,
            )[0],
            c[:FLOAT_PREFILL_FROM],
        )
