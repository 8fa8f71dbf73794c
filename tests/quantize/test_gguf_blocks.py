"""GGUF blocks kept as they are: Q4_1 / Q8_0 bytes -> MatMulNBits (+ the Q4_1 minimum correction)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxlm.quantize import gguf_blocks as G


def q4_1_raw(rng, n, k):
    """Random Q4_1 rows as ggml lays them out, and the weights they stand for (d·q + m)."""
    nb = k // 32
    d = rng.uniform(0.001, 0.05, (n, nb)).astype(np.float16)
    m = rng.uniform(-0.2, 0.0, (n, nb)).astype(np.float16)
    q = rng.integers(0, 16, (n, nb, 32)).astype(np.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)  # ggml: element j low nibble, j+16 high nibble
    raw = np.concatenate([d[..., None].view(np.uint8), m[..., None].view(np.uint8), qs], axis=-1)
    w = d.astype(np.float32)[..., None] * q.astype(np.float32) + m.astype(np.float32)[..., None]
    return raw.reshape(n, nb * 20), w.reshape(n, k)


def q8_0_raw(rng, n, k):
    nb = k // 32
    d = rng.uniform(0.001, 0.05, (n, nb)).astype(np.float16)
    q = rng.integers(-127, 128, (n, nb, 32)).astype(np.int8)
    raw = np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)], axis=-1)
    w = d.astype(np.float32)[..., None] * q.astype(np.float32)
    return raw.reshape(n, nb * 34), w.reshape(n, k)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_blocks_decode_to_the_ggml_weights(kind):
    rng = np.random.default_rng(0)
    raw, w = (q4_1_raw if kind == "q4_1" else q8_0_raw)(rng, 48, 96)
    b = G._from_q4_1(raw) if kind == "q4_1" else G._from_q8_0(raw)
    assert b.kind == kind and b.shape == (48, 96)
    np.testing.assert_array_equal(b.dequantize(), w)


@pytest.mark.parametrize("linear,table", [("q4_1", "q8_0"), ("q8_0", "q4_1")])
def test_kept_blocks_compute_the_ggml_weights(linear, table):
    """A projection MatMul and a tied embedding + head, rewritten onto the blocks (float compute):
    the graph computes with exactly the weights ggml would (d·q (+ m))."""
    rng = np.random.default_rng(1)
    k, n, vocab = 128, 64, 96
    make = {"q4_1": (q4_1_raw, G._from_q4_1), "q8_0": (q8_0_raw, G._from_q8_0)}
    raw, w = make[linear][0](rng, n, k)  # (N, K)
    raw_e, e = make[table][0](rng, vocab, n)  # (vocab, hidden = N)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h0"], name="/embed_tokens/Gather"),
        helper.make_node("MatMul", ["x", "W"], ["h1"], name="/layers.0/down_proj/MatMul"),
        helper.make_node("Add", ["h0", "h1"], ["h"], name="/Add"),
        helper.make_node("Gemm", ["h", "E"], ["logits"], name="/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, vocab])],
        [onnx.numpy_helper.from_array(e, "E"), onnx.numpy_helper.from_array(np.ascontiguousarray(w.T), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    blocks = {"blk.0.ffn_down.weight": make[linear][1](raw), "token_embd.weight": make[table][1](raw_e)}
    report = G.keep_gguf_blocks(model, blocks, vocab, accuracy_level=0)
    assert set(report) == {"/embed_tokens/Gather", "/layers.0/down_proj/MatMul", "/Gemm"}
    assert {t.name for t in model.graph.initializer}.isdisjoint({"E", "W"})  # the fp32 copies are gone
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids, x = np.array([0, 7, 95]), rng.standard_normal((3, k)).astype(np.float32)
    want = (e[ids] + x @ w.T) @ e.T
    np.testing.assert_allclose(sess.run(None, {"ids": ids, "x": x})[0], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not match the bundle's weight"):
        blocks["blk.0.ffn_down.weight"] = make[linear][1](make[linear][0](rng, n, k)[0])
        G.keep_gguf_blocks(
            helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), blocks, vocab
        )


@pytest.mark.parametrize("heads", [1, 3, 4])
def test_rotary_row_order_matches_transformers(heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    expected = LlamaTensorProcessor(config={})._reverse_permute_weights(rows, heads, heads)
    np.testing.assert_array_equal(rows[G._reverse_permute_rows(24, heads)], expected)


def test_find_gguf_takes_a_path_and_never_fetches(tmp_path):
    """Without a file there is nothing to fetch: the error names the source and the option."""
    manifest = SimpleNamespace(
        provenance={"source_kind": "gguf", "source": "gguf:m.gguf", "source_sha256": "0"}
    )
    with pytest.raises(ValueError, match=r"gguf:m\.gguf.*--gguf FILE"):
        G.find_gguf(manifest, None)
    with pytest.raises(ValueError, match="no such GGUF"):
        G.find_gguf(manifest, tmp_path / "absent.gguf")
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="sha256 differs"):
        G.find_gguf(manifest, tmp_path / "other.gguf")


def test_gguf_names():
    assert G.gguf_names("/layers.3/down_proj/MatMul") == ("blk.3.ffn_down.weight",)
    assert G.gguf_names("/layers.0/qkv_proj/MatMul") == tuple(f"blk.0.attn_{x}.weight" for x in "qkv")
    assert G.gguf_names("/lm_head/MatMul") is None


def test_stacked_blocks_are_the_rows_of_the_parts():
    rng = np.random.default_rng(2)
    parts = [G._from_q4_1(q4_1_raw(rng, n, 64)[0]) for n in (8, 4, 4)]
    merged = G.stack(parts)
    np.testing.assert_array_equal(merged.dequantize(), np.concatenate([p.dequantize() for p in parts]))
    assert G.stack([parts[0], G._from_q8_0(q8_0_raw(rng, 4, 64)[0])]) is None  # mixed kinds stay as they are


@pytest.mark.slow
def test_smollm2_blocks_are_lossless(tmp_path, smollm2_bundle):
    """The real GGUF: kept blocks reproduce the fp32 bundle's logits (accuracy level 0), whatever its graph."""
    from onnxlm.runtime import load

    bundle = smollm2_bundle
    from onnxlm.commands import default_gguf

    gguf = default_gguf(bundle)
    out = G.keep_blocks(bundle, tmp_path / "gguf", gguf, accuracy_level=0, progress=False)
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    projections = [n.name for n in graph.node if n.op_type == "MatMul" and G.gguf_names(n.name)]
    nodes = load(out).manifest.quantization["nodes"]
    assert (
        set(projections) < set(nodes) and len(nodes) == len(projections) + 2
    )  # + the head and the embedding
    ref = load(bundle)
    ids = ref.encode_prompt("The capital of France is Paris. The capital of Germany is")
    got, want = load(out).model.logits(ids), ref.model.logits(ids)
    assert np.abs(got - want).max() < 1e-3
    # the blocks' codes, their scales as the float32 the kernels read (quantize/graph.py), the minimums
    # float16: 20.2% of the float32 bytes
    assert (out / "model.onnx.data").stat().st_size < 0.21 * (bundle / "model.onnx.data").stat().st_size
