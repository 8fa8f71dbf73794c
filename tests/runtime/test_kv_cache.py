"""KVCache and SharedKVCache without a model: feeds / update / trim / select / free, numpy and OrtValue
(IO binding), and a shared buffer written in place by bare GroupQueryAttention nodes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxlm.bundle import GraphIO
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.session import run_bound, run_numpy
from onnxlm.runtime.shared_kv import SharedKVCache

L, H, D = 2, 2, 4


def present(cache, arrays):
    io = cache.io
    out = {}
    for i, (k, v) in enumerate(arrays):
        out[io.present_key.format(i=i)], out[io.present_value.format(i=i)] = k, v
    return out


def step_arrays(cache, new, batch=1):
    """Past + `new` positions per layer, filled with recognisable values."""
    arrays = []
    for i in range(L):
        k_old, v_old = cache.layer(i)
        k_new = np.full((batch, H, new, D), 10 * i + cache.offset, np.float32)
        arrays.append((np.concatenate([k_old, k_new], 2), np.concatenate([v_old, -k_new], 2)))
    return arrays


def test_feeds_use_manifest_names_and_start_empty():
    io = GraphIO(past_key="pk.{i}", past_value="pv.{i}", present_key="k.{i}", present_value="v.{i}")
    cache = KVCache(L, H, D, batch=3, io=io)
    feeds = cache.feeds()
    assert sorted(feeds) == ["pk.0", "pk.1", "pv.0", "pv.1"]
    assert all(f.shape == (3, H, 0, D) and f.dtype == np.float32 for f in feeds.values())
    assert cache.offset == len(cache) == 0
    assert cache.output_names() == ["k.0", "v.0", "k.1", "v.1"]


def test_update_advances_offset_and_next_feeds_are_the_presents():
    cache = KVCache(L, H, D)
    arrays = step_arrays(cache, 5)
    cache.update(present(cache, arrays))
    assert cache.offset == 5
    feeds = cache.feeds()
    assert feeds["past_key_values.1.key"] is arrays[1][0]
    assert feeds["past_key_values.0.value"] is arrays[0][1]
    cache.update(present(cache, step_arrays(cache, 1)))
    assert cache.offset == 6
    k, v = cache.layer(1)
    assert k.shape == (1, H, 6, D) and k[0, 0, 5, 0] == 10 + 5 and v[0, 0, 5, 0] == -(10 + 5)


def test_update_rejects_wrong_shapes_and_missing_names():
    cache = KVCache(L, H, D, batch=2)
    with pytest.raises(KeyError, match="present.0.key"):
        cache.update({})
    bad = present(cache, step_arrays(KVCache(L, H, D), 3))  # batch 1 into a batch-2 cache
    with pytest.raises(ValueError, match="expected"):
        cache.update(bad)
    cache.update(present(cache, step_arrays(cache, 3, batch=2)))
    shrunk = present(cache, [(k[:, :, :1], v[:, :, :1]) for k, v in (cache.layer(i) for i in range(L))])
    with pytest.raises(ValueError, match="fewer"):
        cache.update(shrunk)


def test_trim_select_free():
    cache = KVCache(L, H, D, batch=2)
    cache.update(present(cache, step_arrays(cache, 4, batch=2)))
    cache.update(present(cache, step_arrays(cache, 3, batch=2)))
    assert cache.trim(3) == 3 and cache.offset == 4
    assert cache.layer(0)[0][0, 0, :, 0].tolist() == [0, 0, 0, 0]
    assert cache.trim(100) == 4 and cache.offset == 0
    with pytest.raises(ValueError):
        cache.trim(-1)
    cache.update(present(cache, step_arrays(cache, 2, batch=2)))
    k0 = cache.layer(0)[0].copy()
    k0[1] += 7  # make the rows distinguishable
    cache.keys[0] = k0
    cache.select([1])
    assert cache.batch == 1 and cache.layer(0)[0][0, 0, 0, 0] == 7
    with pytest.raises(ValueError):
        cache.select([3])
    cache.free()
    assert cache.offset == 0 and cache.feeds()["past_key_values.0.key"].shape == (1, H, 0, D)
    assert cache.nbytes() == 0


def _concat_graph(path):
    """present.{i}.k/v = Concat(past.{i}.k/v, new) along seq: a stand-in for a decoder's KV outputs."""
    io = GraphIO()
    dims = ["batch", H, "past", D]
    inputs = [helper.make_tensor_value_info("new", TensorProto.FLOAT, ["batch", H, "seq", D])]
    outputs, nodes = [], []
    for i in range(L):
        for past, pres in ((io.past_key, io.present_key), (io.past_value, io.present_value)):
            p, q = past.format(i=i), pres.format(i=i)
            inputs.append(helper.make_tensor_value_info(p, TensorProto.FLOAT, dims))
            outputs.append(helper.make_tensor_value_info(q, TensorProto.FLOAT, ["batch", H, "total", D]))
            nodes.append(helper.make_node("Concat", [p, "new"], [q], axis=2))
    graph = helper.make_graph(nodes, "kv", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_io_binding_passes_present_ortvalues_as_next_past(tmp_path):
    session = _concat_graph(tmp_path / "kv.onnx")
    bound, plain = KVCache(L, H, D, batch=2), KVCache(L, H, D, batch=2)
    for step, seq in enumerate([3, 1, 1]):
        new = np.full((2, H, seq, D), step, np.float32)
        out = run_bound(session, {"new": new, **bound.feeds()}, bound.output_names())
        assert all(isinstance(v, ort.OrtValue) for v in out.values())
        bound.update(out)
        feeds = bound.feeds()
        assert feeds["past_key_values.0.key"] is out["present.0.key"]  # bound as is, no numpy copy
        plain.update(run_numpy(session, {"new": new, **plain.feeds()}, plain.output_names()))
    assert bound.offset == plain.offset == 5
    for i in range(L):
        np.testing.assert_array_equal(bound.layer(i)[0], plain.layer(i)[0])
    assert bound.layer(0)[0][0, 0, :, 0].tolist() == [0, 0, 0, 1, 2]
    bound.trim(2)
    bound.select([1])
    out = run_bound(
        session, {"new": np.zeros((1, H, 1, D), np.float32), **bound.feeds()}, bound.output_names()
    )
    bound.update(out)
    assert bound.offset == 4 and bound.batch == 1


# --- SharedKVCache: one buffer per layer, bound as past and present ------------------------------
def test_shared_feeds_lengths_and_one_allocation():
    io = GraphIO.shared_buffer()
    cache = SharedKVCache(L, H, D, batch=2, capacity=8, io=io)
    assert cache.offset == 0 and cache.nbytes() == 0  # nothing allocated before the first step
    feeds = cache.feeds([3, 1])
    assert feeds["seqlens_k"].tolist() == [2, 0] and feeds["seqlens_k"].dtype == np.int32
    assert int(feeds["total_sequence_length"]) == 3 and feeds["total_sequence_length"].shape == ()
    assert feeds["query_seqlens"].tolist() == [3, 1]
    past = {n: v for n, v in feeds.items() if n.startswith("past_key_values")}
    assert len(past) == 2 * L and all(v.shape() == [2, H, 8, D] for v in past.values())
    assert cache.nbytes() == 2 * L * 2 * H * 8 * D * 4
    bound = cache.bound_outputs()
    assert sorted(bound) == sorted(cache.output_names())
    assert [v.data_ptr() for v in bound.values()] == [v.data_ptr() for v in past.values()]
    cache.update(bound)  # the graph wrote in place: nothing to copy
    assert cache.lengths.tolist() == [3, 1] and cache.offset == 3
    again = cache.feeds()  # default: one token per row
    assert again["seqlens_k"].tolist() == [3, 1] and int(again["total_sequence_length"]) == 4
    assert [again[n].data_ptr() for n in past] == [v.data_ptr() for v in past.values()]  # same buffers


def test_shared_numpy_presents_are_copied_into_the_buffer():
    cache = SharedKVCache(L, H, D, batch=1, capacity=4)
    feeds = cache.feeds([2])
    ptr = feeds["past_key_values.0.key"].data_ptr()
    presents = {n: np.full((1, H, 4, D), i, np.float32) for i, n in enumerate(cache.output_names())}
    cache.update(presents)
    k, v = cache.layer(1)
    assert k.shape == (1, H, 2, D) and (k == 2).all() and (v == 3).all()
    assert cache.feeds()["past_key_values.0.key"].data_ptr() == ptr
    with pytest.raises(ValueError, match="shape"):
        cache.update({n: np.zeros((1, H, 3, D), np.float32) for n in cache.output_names()})


def test_shared_refuses_overflow_empty_rows_and_update_without_step():
    cache = SharedKVCache(L, H, D, batch=2, capacity=4)
    with pytest.raises(RuntimeError, match="no step"):
        cache.update({})
    with pytest.raises(ValueError, match="no tokens"):
        cache.feeds([2, 0])  # an idle row must already hold tokens
    with pytest.raises(ValueError, match="do not fit"):
        cache.feeds([5, 1])
    with pytest.raises(ValueError, match="query_lens"):
        cache.feeds([1])
    cache.feeds([4, 1])
    cache.update(cache.bound_outputs())
    with pytest.raises(ValueError, match="do not fit"):
        cache.feeds()  # row 0 is full
    with pytest.raises(ValueError, match="do not fit"):
        cache.feeds([0, 1])  # idle, a full row still needs room for the chunk after it (the kernel's check)
    cache.reserve(5)
    lengths = cache.feeds([0, 1])  # row 0 idles, row 1 goes on
    assert lengths["seqlens_k"].tolist() == [3, 1] and int(lengths["total_sequence_length"]) == 5
    with pytest.raises(ValueError, match="kv_layout"):
        SharedKVCache(L, H, D, capacity=4, io=GraphIO())


def test_shared_trim_select_free():
    cache = SharedKVCache(L, H, D, batch=3, capacity=6)
    cache.feeds([3, 2, 1])
    presents = {n: np.zeros((3, H, 6, D), np.float32) for n in cache.output_names()}
    for row in range(3):
        for arr in presents.values():
            arr[row] = row + 1  # every slot of row r holds r + 1
    cache.update(presents)
    base = cache.bound_outputs()["present.0.key"].data_ptr()
    assert cache.trim(1) == 1 and cache.lengths.tolist() == [2, 1, 0]
    cache.select([1, 2])  # ascending: rows move forward inside the same memory
    assert cache.batch == 2 and cache.lengths.tolist() == [1, 0]
    bound = cache.bound_outputs()["present.0.key"]
    assert bound.data_ptr() == base and bound.shape() == [2, H, 6, D]
    assert cache.layer(0)[0][:, 0, 0, 0].tolist() == [2.0, 3.0]
    cache.select([1, 0])  # any order
    assert cache.lengths.tolist() == [0, 1] and cache.layer(0)[0][:, 0, 0, 0].tolist() == [3.0, 2.0]
    with pytest.raises(ValueError):
        cache.select([0, 0])
    cache.free()
    assert cache.nbytes() == 0 and cache.offset == 0 and cache.batch == 2
    assert cache.feeds([1, 1])["past_key_values.1.value"].shape() == [2, H, 6, D]


def test_shared_buffers_go_back_to_the_system_when_large(monkeypatch):
    from onnxlm.runtime import shared_kv

    trims = []
    monkeypatch.setattr(shared_kv, "release_free_heap", lambda: trims.append(True))
    small = SharedKVCache(L, H, D, batch=1, capacity=6)
    small.feeds([1])
    small.free()
    assert trims == []  # a few bytes: left to the allocator
    # 2 layers x (key, value) x 8 rows x 2 heads x 32,768 slots x 4 dims x 4 bytes = 32 MiB
    large = SharedKVCache(L, H, D, batch=8, capacity=32768)
    large.feeds([1] * 8)
    assert large.nbytes() == 2 * shared_kv.GIVE_BACK_BYTES
    large.free()
    assert trims == [True]
    large.feeds([1] * 8)  # allocates again at the same size
    assert large.shrink(room=8) and trims == [True, True]  # rebuilt 4,096 times smaller
    assert not large.shrink(room=8) and trims == [True, True]


GQA_D = 8  # GroupQueryAttention wants head sizes in multiples of 8


def _gqa_graph(path, batch_dim="batch"):
    """One GroupQueryAttention node (no rotary) per layer over packed q|k|v: a decoder's KV plumbing
    with no model around it."""
    io = GraphIO.shared_buffer()
    D = GQA_D
    heads, width = 2 * H, (2 * H + 2 * H) * D
    inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [batch_dim, "seq", width]),
        helper.make_tensor_value_info(io.seqlens_k, TensorProto.INT32, [batch_dim]),
        helper.make_tensor_value_info(io.total_sequence_length, TensorProto.INT32, []),
        helper.make_tensor_value_info(io.query_seqlens, TensorProto.INT32, [batch_dim]),
    ]
    outputs, nodes = [], []
    for i in range(L):
        names = [t.format(i=i) for t in (io.past_key, io.past_value, io.present_key, io.present_value)]
        for n in names[:2]:
            inputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch_dim, H, "capacity", D]))
        for n in names[2:]:
            outputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch_dim, H, "capacity", D]))
        outputs.append(
            helper.make_tensor_value_info(f"out.{i}", TensorProto.FLOAT, [batch_dim, "seq", heads * D])
        )
        gqa_inputs = ["qkv", "", "", *names[:2], io.seqlens_k, io.total_sequence_length]
        gqa_inputs += [""] * 9 + [io.query_seqlens]  # cos_cache .. k_norm_weight unused
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                gqa_inputs,
                [f"out.{i}", *names[2:]],
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=H,
            )
        )
    graph = helper.make_graph(nodes, "gqa", inputs, outputs)
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=ops)
    model.ir_version = 8
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_shared_buffer_is_written_in_place_by_the_graph(tmp_path):
    """Bound as both past and present, each layer's buffer comes back as the present (same memory),
    and a step writes only its rows' new keys/values at [length, length + query_len)."""
    session = _gqa_graph(tmp_path / "gqa.onnx")
    D = GQA_D
    cache = SharedKVCache(L, H, D, batch=2, capacity=8)
    rng = np.random.default_rng(0)
    expected = np.zeros((2, H, 8, D), np.float32)  # layer 0's keys as they should be
    for q in ([3, 1], [1, 1], [0, 1], [1, 1]):  # a right-padded prefill, decode, row 0 idle, decode
        seq = max(q)
        qkv = rng.standard_normal((2, seq, 4 * H * D)).astype(np.float32)
        before = cache.lengths.copy()
        feeds = {"qkv": qkv, **cache.feeds(q)}
        ptrs = [feeds[n].data_ptr() for n in feeds if n.startswith("past_key_values")]
        out = run_bound(session, feeds, ["out.0", "out.1"], bound_outputs=cache.bound_outputs())
        presents = [out[n] for n in cache.output_names()]
        assert [p.data_ptr() for p in presents] == ptrs  # present aliases past: no copy
        cache.update(out)
        for row in range(2):
            k = qkv[row, : q[row], 2 * H * D : 3 * H * D].reshape(q[row], H, D).transpose(1, 0, 2)
            expected[row, :, before[row] : before[row] + q[row]] = k
        assert cache.lengths.tolist() == (before + q).tolist()
        k0 = cache.layer(0)[0]
        for row in range(2):
            n = cache.lengths[row]
            np.testing.assert_array_equal(k0[row, :, :n], expected[row, :, :n])
    assert cache.lengths.tolist() == [5, 4]
