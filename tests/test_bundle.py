"""Damaged and hostile bundles: each a clear error naming the file, never a crash or a silent load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest

from onnxlm import bundle as B


def resign(path):
    """Rewrite the manifest's sizes and hashes so only the damage under test remains."""
    m = json.loads((path / B.MANIFEST).read_text())
    for name in list(m["files"]):
        f = path / name
        if f.is_file():
            m["files"][name] = {"size": f.stat().st_size, "sha256": B.sha256_file(f)}
    (path / B.MANIFEST).write_text(json.dumps(m))


def set_location(path, location):
    model = onnx.load(str(path / B.MODEL), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(path / B.MODEL))
    resign(path)


def test_good_bundle_loads_and_verifies(tiny_llama_bundle):
    m = B.check_bundle(tiny_llama_bundle, verify_hashes=True)
    assert m.model.model_type == "llama" and m.model.num_layers == 2
    assert set(m.files) == {B.MODEL, B.MODEL_DATA, B.TOKENIZER}
    assert m.validation["greedy_agreement"] == 1.0
    assert m.validation["prefill_max_abs_diff"] < 1e-3
    assert m.chat_template and m.provenance["source_sha256"]


def test_model_missing(bundle_copy):
    (bundle_copy / B.MODEL).unlink()
    with pytest.raises(B.BundleError, match=r"model\.onnx: missing"):
        B.check_bundle(bundle_copy)


def test_model_empty(bundle_copy):
    (bundle_copy / B.MODEL).write_bytes(b"")
    with pytest.raises(B.BundleError, match=r"model\.onnx: 0 bytes"):
        B.check_bundle(bundle_copy)


def test_model_corrupt_same_size(bundle_copy):
    size = (bundle_copy / B.MODEL).stat().st_size
    (bundle_copy / B.MODEL).write_bytes(b"\xff" * size)
    with pytest.raises(B.BundleError, match="not a readable ONNX model"):
        B.check_bundle(bundle_copy)
    resign(bundle_copy)  # even with a manifest that agrees, the graph itself is refused
    with pytest.raises(B.BundleError, match="not a readable ONNX model"):
        B.check_bundle(bundle_copy)


def test_data_truncated(bundle_copy):
    data = bundle_copy / B.MODEL_DATA
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(B.BundleError, match=r"model\.onnx\.data: \d+ bytes, the manifest says"):
        B.check_bundle(bundle_copy)


def test_hash_mismatch_found_on_verify(bundle_copy):
    data = bundle_copy / B.MODEL_DATA
    with open(data, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    B.check_bundle(bundle_copy)  # sizes agree: the cheap check passes
    with pytest.raises(B.BundleError, match="sha256 differs"):
        B.check_bundle(bundle_copy, verify_hashes=True)


@pytest.mark.parametrize(
    "location,match", [("../outside.data", "leaves the bundle"), ("/etc/passwd", "absolute path")]
)
def test_external_data_outside(bundle_copy, location, match):
    set_location(bundle_copy, location)
    with pytest.raises(B.BundleError, match=match):
        B.check_bundle(bundle_copy)


def test_external_data_symlink(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.data"
    os.replace(bundle_copy / B.MODEL_DATA, outside)
    os.symlink(outside, bundle_copy / B.MODEL_DATA)
    with pytest.raises(B.BundleError, match="symbolic link"):
        B.check_bundle(bundle_copy)


def test_tokenizer_missing(bundle_copy):
    (bundle_copy / B.TOKENIZER).unlink()
    with pytest.raises(B.BundleError, match=r"tokenizer\.json: missing"):
        B.check_bundle(bundle_copy)


def test_manifest_not_json(bundle_copy):
    (bundle_copy / B.MANIFEST).write_text("{ not json")
    with pytest.raises(B.BundleError, match="not valid JSON"):
        B.check_bundle(bundle_copy)


def test_manifest_unknown_version(bundle_copy):
    m = json.loads((bundle_copy / B.MANIFEST).read_text())
    m["format_version"] = 99
    (bundle_copy / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(B.BundleError, match="unknown format version 99"):
        B.check_bundle(bundle_copy)


def test_manifest_missing_means_not_a_bundle(bundle_copy):
    (bundle_copy / B.MANIFEST).unlink()
    with pytest.raises(B.BundleError, match="not a complete onnxlm bundle"):
        B.check_bundle(bundle_copy)


def test_writer_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with B.BundleWriter(out) as tmp:
            (tmp / "model.onnx").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_writer_refuses_to_clobber_a_non_bundle(tmp_path):
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    with pytest.raises(B.BundleError, match="not a bundle"):
        B.BundleWriter(victim, overwrite=True)
    assert (victim / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("damage", ["missing_model", "truncated_data", "bad_manifest"])
def test_cli_reports_one_line(bundle_copy, damage):
    if damage == "missing_model":
        (bundle_copy / B.MODEL).unlink()
    elif damage == "truncated_data":
        with open(bundle_copy / B.MODEL_DATA, "r+b") as f:
            f.truncate(10)
    else:
        (bundle_copy / B.MANIFEST).write_text("[]")
    for args in (["info", str(bundle_copy)], ["generate", str(bundle_copy), "hello", "-n", "2"]):
        r = subprocess.run([sys.executable, "-m", "onnxlm", *args], capture_output=True, text=True)
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and str(bundle_copy) in errors[0], r.stderr


def edit_manifest(path, change):
    m = json.loads((path / B.MANIFEST).read_text())
    change(m)
    (path / B.MANIFEST).write_text(json.dumps(m))


MANIFEST_DAMAGE = {
    "files entry a string": (lambda m: m["files"].update({B.TOKENIZER: "x"}), "files['tokenizer.json']"),
    "file without its size": (lambda m: m["files"][B.MODEL].pop("size"), "files['model.onnx']"),
    "validation without its keys": (lambda m: m.update(validation={"greedy_agreement": 1.0}), "validation"),
    "eos_token_ids an int": (lambda m: m["model"].update(eos_token_ids=2), "model.eos_token_ids"),
    "context_length -5": (lambda m: m["model"].update(context_length=-5), "model.context_length"),
    "context_length 1e12": (lambda m: m["model"].update(context_length=1e12), "model.context_length"),
    "num_layers a string": (lambda m: m["model"].update(num_layers="2"), "model.num_layers"),
    "no model": (lambda m: m.pop("model"), "(the top level)"),
    "unknown field": (lambda m: m.update(colour="blue"), "(the top level)"),
    "layer template without {i}": (lambda m: m["io"].update(past_key="past.{x}"), "io.past_key"),
    "eos outside the vocabulary": (
        lambda m: m["model"].update(eos_token_ids=[10**6]),
        "model.eos_token_ids[0]",
    ),
    "kv heads not dividing heads": (lambda m: m["model"].update(num_kv_heads=3), "model.num_kv_heads"),
    "chat_template a list": (lambda m: m.update(chat_template=["x"]), "chat_template"),
    "quantization nodes not names": (
        lambda m: m.update(quantization={"nodes": {"a": 1}}),
        "quantization.nodes.a",
    ),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_manifest_fields_are_checked_against_the_schema(bundle_copy, damage):
    change, field = MANIFEST_DAMAGE[damage]
    edit_manifest(bundle_copy, change)
    with pytest.raises(B.BundleError) as e:
        B.check_bundle(bundle_copy)
    message = str(e.value)
    assert message.startswith(str(bundle_copy / B.MANIFEST) + ": ") and "\n" not in message, message
    assert f"field {field}" in message, message


def test_deeply_nested_manifest_is_one_error(bundle_copy):
    text = (bundle_copy / B.MANIFEST).read_text()
    deep = '"deep": ' + "[" * 200_000 + "]" * 200_000 + ", "
    (bundle_copy / B.MANIFEST).write_text(text.replace('"provenance": {', '"provenance": {' + deep, 1))
    with pytest.raises(B.BundleError, match="nested too deeply"):
        B.check_bundle(bundle_copy)


def test_info_prints_nothing_but_the_error_for_a_bad_manifest(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.update(validation={"reference": "x"}))
    r = subprocess.run(
        [sys.executable, "-m", "onnxlm", "info", str(bundle_copy)], capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and "field validation" in r.stderr


@pytest.mark.parametrize("layers", [1, 3])
def test_graph_layers_must_match_the_manifest(bundle_copy, layers):
    edit_manifest(bundle_copy, lambda m: m["model"].update(num_layers=layers))
    with pytest.raises(
        B.BundleError, match=r"model\.onnx: the graph's inputs do not match onnxlm\.json"
    ) as e:
        B.check_bundle(bundle_copy)
    assert f"says {layers} layers; the graph takes KV for 2" in str(e.value)


def test_graph_with_an_extra_output_is_refused(bundle_copy):
    model = onnx.load(str(bundle_copy / B.MODEL), load_external_data=False)
    model.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    onnx.save(model, str(bundle_copy / B.MODEL))
    resign(bundle_copy)
    with pytest.raises(B.BundleError, match="outputs do not match.*also has extra"):
        B.check_bundle(bundle_copy)


def _subgraph_with_external(location):
    """An If node whose then-branch holds an initializer stored at `location`."""
    t = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [0.0])
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="length", value="4")
    out = onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [1])
    branch = onnx.helper.make_graph([], "then", [], [out], initializer=[t])
    return onnx.helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)


@pytest.mark.parametrize(
    "location,match", [("../../etc/passwd", "leaves the bundle"), ("/etc/passwd", "absolute path")]
)
def test_external_data_in_subgraphs_is_checked(bundle_copy, location, match):
    model = onnx.load(str(bundle_copy / B.MODEL), load_external_data=False)
    model.graph.node.append(_subgraph_with_external(location))
    onnx.save(model, str(bundle_copy / B.MODEL))
    resign(bundle_copy)
    with pytest.raises(B.BundleError, match=rf"model\.onnx: external data .*{match}"):
        B.check_bundle(bundle_copy)


def test_messages_name_the_file_at_fault(bundle_copy, tmp_path):
    edit_manifest(bundle_copy, lambda m: m["files"].update({"..": m["files"][B.TOKENIZER]}))
    with pytest.raises(B.BundleError) as e:
        B.check_bundle(bundle_copy)
    assert str(e.value).startswith(str(bundle_copy / B.MANIFEST)) and "model.onnx" not in str(e.value)
    edit_manifest(bundle_copy, lambda m: m["files"].pop(".."))
    os.replace(bundle_copy / B.TOKENIZER, tmp_path / B.TOKENIZER)
    os.symlink(tmp_path / B.TOKENIZER, bundle_copy / B.TOKENIZER)
    with pytest.raises(B.BundleError) as e:
        B.check_bundle(bundle_copy)
    assert str(e.value) == (
        f"{bundle_copy / B.MANIFEST}: the listed file 'tokenizer.json' is a symbolic link"
    ), str(e.value)


def test_a_staging_folder_never_loads(bundle_copy):
    (bundle_copy / B.STAGING_MARK).write_text("")
    with pytest.raises(B.BundleError, match="unfinished bundle"):
        B.check_bundle(bundle_copy)


@pytest.mark.parametrize("content", [b"{ not json", b"[" * 100_000, b'{"model": 5}'])
def test_a_bad_tokenizer_is_an_error_naming_tokenizer_json(bundle_copy, content):
    from onnxlm.runtime import load

    (bundle_copy / B.TOKENIZER).write_bytes(content)
    resign(bundle_copy)
    with pytest.raises(B.BundleError) as e:
        load(bundle_copy)
    assert str(e.value).startswith(f"{bundle_copy / B.TOKENIZER}: not a usable tokenizer (")
    assert "\n" not in str(e.value)


def test_graph_outline_fields_are_onnx_own():
    """The subset of onnx.proto that check_bundle parses has onnx's field numbers, labels and types."""
    from google.protobuf.descriptor import FieldDescriptor

    for message, fields in B._OUTLINE.items():
        own = getattr(onnx, message).DESCRIPTOR.fields_by_name
        for name, number, kind in fields:
            f = own[name]
            assert f.number == number, (message, name, f.number)
            repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED
            assert repeated == kind.endswith("*"), (message, name)
            kind = kind.rstrip("*")
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                assert f.message_type.name == kind, (message, name, f.message_type.name)
            else:  # an enum reads as the int32 it is on the wire
                want = {"string": [FieldDescriptor.TYPE_STRING], "int32": [FieldDescriptor.TYPE_ENUM]}
                assert f.type in want[kind], (message, name, f.type)


def test_graph_outline_finds_what_onnx_finds(bundle_copy):
    """External data in the main graph, an If branch, a sparse initializer, a node attribute and a
    function: the outline lists the same locations, inputs and outputs as onnx's own parse."""
    model = onnx.load(str(bundle_copy / B.MODEL), load_external_data=False)
    model.graph.node.append(_subgraph_with_external("branch.data"))
    values = onnx.helper.make_tensor("sv", onnx.TensorProto.FLOAT, [1], [0.0])
    values.ClearField("float_data")
    values.data_location = onnx.TensorProto.EXTERNAL
    values.external_data.add(key="location", value="sparse.data")
    indices = onnx.helper.make_tensor("si", onnx.TensorProto.INT64, [1], [0])
    model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [4]))
    attr = onnx.helper.make_tensor("c", onnx.TensorProto.FLOAT, [1], [0.0])
    attr.ClearField("float_data")
    attr.data_location = onnx.TensorProto.EXTERNAL
    attr.external_data.add(key="location", value="function.data")
    const = onnx.helper.make_node("Constant", [], ["c"], value=attr)
    model.functions.append(onnx.helper.make_function("local", "f", [], ["c"], [const], []))
    onnx.save(model, str(bundle_copy / B.MODEL))
    outline = B.load_graph_outline(bundle_copy / B.MODEL)
    full = B.load_graph(bundle_copy / B.MODEL)
    assert B.external_locations(outline) == B.external_locations(full)
    assert {"branch.data", "sparse.data", "function.data", B.MODEL_DATA} <= B.external_locations(outline)
    assert B.external_locations(bundle_copy / B.MODEL) == B.external_locations(full)  # a path: the outline
    for io in ("input", "output", "initializer"):
        assert [x.name for x in getattr(outline.graph, io)] == [x.name for x in getattr(full.graph, io)]


def test_loading_a_bundle_does_not_import_onnx(tiny_llama_bundle):
    """onnx is for writing bundles; a process that loads one and generates holds ~17 MB less without it."""
    code = (
        "import sys, onnxlm; onnxlm.load(sys.argv[1]); print(sorted(m for m in sys.modules if m == 'onnx'))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tiny_llama_bundle)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
