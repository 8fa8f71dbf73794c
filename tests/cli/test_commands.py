"""onnxlm/commands.py: what the CLI's commands do, beyond parsing."""

from __future__ import annotations

import logging

import pytest

from onnxlm import commands


@pytest.fixture
def transformers_records():
    """Records that reach transformers' root logger's handlers."""
    pytest.importorskip("transformers")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    root = logging.getLogger("transformers")
    handler = Keep()
    root.addHandler(handler)
    yield seen
    root.removeHandler(handler)


def test_export_drops_transformers_notices_and_keeps_its_warnings(transformers_records):
    from transformers.utils import logging as hf_logging

    child = logging.getLogger("transformers.models.llama.tokenization_llama_fast")
    with commands.quiet_transformers():
        child.warning("You are using the default legacy behaviour of the <class 'LlamaTokenizerFast'>.")
        child.warning("The tokenizer class you load from this checkpoint is not the same type as the class")
        child.warning("something the user should read")
        assert not hf_logging.is_progress_bar_enabled()
        from transformers import modeling_gguf_pytorch_utils as gguf_reader

        assert gguf_reader.tqdm([1, 2], desc="Converting") == [1, 2]  # no bar: the items as they are
    child.warning("You are using the default legacy behaviour, outside onnxlm export")
    assert transformers_records == [
        "something the user should read",
        "You are using the default legacy behaviour, outside onnxlm export",
    ]
    assert hf_logging.is_progress_bar_enabled()
    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    assert gguf_reader.tqdm is not None and gguf_reader.tqdm.__module__.startswith("tqdm")


def test_info_text_names_the_bundle_and_its_files(tiny_llama_bundle):
    text = commands.info_text(tiny_llama_bundle)
    lines = text.splitlines()
    assert lines[0] == f"bundle      {tiny_llama_bundle}"
    assert any(line.startswith("file        model.onnx ") for line in lines)
    assert lines[-1].startswith("validation")


def test_default_gguf_is_only_what_is_cached(tiny_llama_bundle, tmp_path, monkeypatch):
    """Never fetched: a bundle from an unknown source, or a default model not pulled, has none."""
    monkeypatch.setenv("ONNXLM_HOME", str(tmp_path))
    assert commands.default_gguf(tiny_llama_bundle) is None
