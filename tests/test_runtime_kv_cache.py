"""KVCache without a model: feeds / update / trim / select / free, numpy and OrtValue (IO binding)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxlm.bundle import GraphIO
from onnxlm.runtime.kv_cache import KVCache
from onnxlm.runtime.session import run_bound, run_numpy

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
