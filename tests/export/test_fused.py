"""The fused graph: what the exporter writes, and how the runtime drives it (a KV buffer per layer,
allocated once, bound as past and present, written in place by GroupQueryAttention)."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnxruntime as ort
import pytest

from onnxlm import bundle as B
from onnxlm.export.convert import ExportError, export
from onnxlm.runtime import load
from onnxlm.runtime.driver import SharedRows, left_pad
from onnxlm.runtime.session import run_bound
from tests.bundles import tiny_bundle
from tests.fixtures import make_hf_folder

PROMPTS = ["The quick brown fox", "我们今天去公园散步。 Hello world! This is a much longer prompt"]


@pytest.fixture(scope="module")
def fused():
    return load(tiny_bundle("fused").path, threads=2)


@pytest.fixture(scope="module")
def plain():
    return load(tiny_bundle("plain").path, threads=2)


def test_graph_and_manifest(fused):
    import onnx

    m = fused.manifest
    assert m.io.graph == "fused" and m.io.kv_layout == B.KV_SHARED
    assert m.validation["greedy_agreement"] == 1.0 and m.validation["prefill_max_abs_diff"] < 1e-3
    proto = onnx.load(str(fused.bundle_dir / B.MODEL), load_external_data=False)
    L = m.model.num_layers
    assert [i.name for i in proto.graph.input] == m.io.input_names(L)
    assert [o.name for o in proto.graph.output] == m.io.output_names(L)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["GroupQueryAttention"] == L and ops["SkipSimplifiedLayerNormalization"] == 2 * L - 1
    assert ops["SimplifiedLayerNormalization"] == 2  # layer 0's input norm and the final norm
    assert ops["MatMul"] == 4 * L  # qkv (merged), o, gate|up (merged), down
    gate_up = [n for n in proto.graph.node if n.op_type == "Split" and "/layers." in n.name]
    assert len(gate_up) == L and all(len(n.output) == 2 for n in gate_up)  # gate and up apart
    assert not {"Softmax", "Pow", "ReduceMean", "Sqrt"} & set(ops), ops
    kv_readers = {
        n.op_type for n in proto.graph.node if any(i.startswith("past_key_values") for i in n.input)
    }
    assert kv_readers == {"GroupQueryAttention"}  # nothing concatenates or copies the cache
    gqa = next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["do_rotary"] == 1 and attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
    assert gqa.input[1] == gqa.input[2] == "" and gqa.input[16] == m.io.query_seqlens
    sizes = {t.name: list(t.dims) for t in proto.graph.initializer}
    # the rotary caches are computed from inv_freq in the graph (onnxruntime folds them at load)
    assert "cos_cache" not in sizes and sizes["rotary_inv_freq"] == [m.model.head_dim // 2]
    rotary = [n for n in proto.graph.node if n.name.startswith("/rotary_caches/")]
    inits = [t for t in proto.graph.initializer if t.name.startswith("rotary_")]
    out = [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
        for n in ("cos_cache", "sin_cache")
    ]
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(rotary, "r", [], out, inits), opset_imports=proto.opset_import
    )
    cos, sin = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    inv_freq = onnx.numpy_helper.to_array(next(t for t in inits if t.name == "rotary_inv_freq"))
    freqs = np.arange(m.model.context_length, dtype=np.float32)[:, None] * inv_freq
    np.testing.assert_allclose(cos, np.cos(freqs), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(freqs), atol=1e-6)
    assert sum(m.model.vocab_size in d for d in sizes.values()) == 1  # the tied head is the embedding
    raw = json.loads((fused.bundle_dir / B.MANIFEST).read_text())
    assert raw["io"]["kv_layout"] == "shared_buffer" and raw["io"]["attention_mask"] is None


def test_decode_step_copies_no_cache(fused):
    """Every step's presents are the buffers bound as past (same memory, one binding kept across
    steps); once grown, the buffers stay put while there is room, and each step writes exactly one new
    position per row."""
    rows = SharedRows(fused.model)
    job = rows.start([fused.tokenizer.encode(p) for p in PROMPTS])
    last = job.run()
    rows.join(job)
    logits = rows.decode(last.argmax(-1))[:, 0]  # the first step grows the prompt-sized buffer
    cache = rows.cache
    assert cache.capacity >= int(cache.lengths.max()) + 6
    buffers = [v for _, _, v in cache.buffers()]
    ptrs = [v.data_ptr() for v in buffers]
    nbytes, binding = cache.nbytes(), cache.binding
    for _ in range(6):
        before = cache.layer(1)[0]  # (batch, kv_heads, offset, head_dim), a copy
        held = cache.lengths.copy()
        logits = rows.decode(logits.argmax(-1))[:, 0]
        presents = binding.binding.get_outputs()[: len(buffers)]  # bound first, in buffers() order
        assert [p.data_ptr() for p in presents] == ptrs  # present aliases past: nothing copied
        assert cache.binding is binding and [v.data_ptr() for _, _, v in cache.buffers()] == ptrs
        assert cache.nbytes() == nbytes
        after = cache.layer(1)[0]
        assert cache.lengths.tolist() == (held + 1).tolist()
        for row in range(2):  # old positions untouched, the new one written
            np.testing.assert_array_equal(after[row, :, : held[row]], before[row, :, : held[row]])
            assert np.abs(after[row, :, held[row]]).sum() > 0


def test_logits_of_every_position_equal_across_graphs(fused, plain):
    ids = fused.tokenizer.encode(PROMPTS[1])
    a, b = fused.model.logits(ids), plain.model.logits(ids)
    assert a.shape == (len(ids), fused.manifest.model.vocab_size)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_forward_takes_left_padded_batches_on_either_graph(fused, plain):
    prompts = [fused.tokenizer.encode(p) for p in PROMPTS]
    ids, mask, pos = left_pad(prompts, 0)
    got = []
    for engine in (fused, plain):
        cache = (
            engine.model.new_cache(2, capacity=ids.shape[1] + 1)
            if engine is fused
            else engine.model.new_cache(2)
        )
        first = engine.model.forward(ids, mask, pos, cache)
        mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        second = engine.model.forward(first.argmax(-1)[:, None], mask2, mask.sum(1)[:, None], cache)
        got.append((first, second))
    for a, b in zip(*got, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_io_binding_runs_the_buffers_through_run_bound(fused):
    """run_bound returns the bound present OrtValues themselves."""
    model, io = fused.model, fused.manifest.io
    cache = model.new_cache(1, capacity=4)
    feeds = {io.input_ids: np.array([[5, 6]]), io.logits_index: np.array([[1]]), **cache.feeds([2])}
    out = run_bound(
        model.session, feeds, [io.logits], host_outputs=(io.logits,), bound_outputs=cache.bound_outputs()
    )
    assert out[io.logits].shape() == [1, 1, fused.manifest.model.vocab_size]
    for name, value in cache.bound_outputs().items():
        assert out[name].data_ptr() == value.data_ptr()


def test_export_refusals_and_fallback(tmp_path, caplog):
    gpt2 = make_hf_folder(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ExportError, match="no fused graph"):
        export(gpt2, tmp_path / "g", graph="fused", progress=False, validate=False)
    with pytest.raises(ExportError, match="unknown graph"):
        export(gpt2, tmp_path / "g", graph="fast", progress=False)
    # partial rotary over 8 of 16 channels: GroupQueryAttention's cos/sin caches need multiples of 8 columns
    phi3 = make_hf_folder(tmp_path / "phi3", "phi3", partial_rotary_factor=0.5)
    with pytest.raises(ExportError, match="multiple of 8"):
        export(phi3, tmp_path / "p", graph="fused", progress=False, validate=False)


def test_old_manifest_layout_reads_as_concat():
    io = B.GraphIO(kv_layout="batch,kv_heads,seq,head_dim")
    assert io.kv_layout == B.KV_CONCAT and not io.shared
    with pytest.raises(ValueError, match="unknown kv_layout"):
        B.GraphIO(kv_layout="paged")
    with pytest.raises(ValueError, match="needs the input"):
        B.GraphIO(kv_layout=B.KV_SHARED)
