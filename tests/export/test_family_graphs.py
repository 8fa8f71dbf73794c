"""Which graph a family's export gets, what `onnxlm info` says of it, and what is refused by name."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from onnxlm import bundle as B
from onnxlm.cli import cli
from onnxlm.export.convert import ExportError, export
from tests.fixtures import make_hf_folder

PARTIAL = {"partial_rotary_factor": 0.5}  # phi3, head 16: rotary over 8 channels, 4 cos/sin columns


@pytest.fixture(scope="module")
def partial_folder(tmp_path_factory):
    return make_hf_folder(tmp_path_factory.mktemp("partial") / "hf", "phi3", **PARTIAL)


def test_a_config_gqa_cannot_run_falls_back_to_plain_and_says_why(partial_folder, tmp_path, info):
    bundle = export(partial_folder, tmp_path / "b", progress=False, validate=False)
    m = B.read_manifest(bundle)
    assert m.io.graph == "plain"
    assert "rotary over 8 of 16 channels" in m.provenance["graph_fallback"]
    assert "graph       plain" in info(bundle)


def test_dynamic_ntk_serves_the_stretched_context_on_the_fused_graph(tmp_path):
    dynamic = {"max_position_embeddings": 24, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}
    folder = make_hf_folder(tmp_path / "hf", "llama", **dynamic)
    m = B.read_manifest(export(folder, tmp_path / "b", progress=False, validate=False))
    assert m.io.graph == "fused" and m.model.context_length == 96  # 24 stretched by the factor 4


def test_fused_family_export_is_fused_and_info_says_so(tmp_path, info):
    folder = make_hf_folder(tmp_path / "hf", "gemma2")
    bundle = export(folder, tmp_path / "b", progress=False, validate=False)
    m = B.read_manifest(bundle)
    assert m.io.graph == "fused" and "graph_fallback" not in m.provenance
    assert "graph       fused" in info(bundle)


def test_asking_for_a_fused_graph_it_cannot_have_is_refused_by_name(partial_folder, tmp_path):
    with pytest.raises(ExportError, match="no fused graph for this config .global rotary over 8 of 16") as e:
        export(partial_folder, tmp_path / "b", graph="fused", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "b").exists()


def test_a_feature_neither_graph_reproduces_is_refused_in_one_line(tmp_path):
    folder = make_hf_folder(tmp_path / "hf", "gemma3_text", use_bidirectional_attention=True)
    result = CliRunner().invoke(cli, ["export", str(folder), "-o", str(tmp_path / "b")])
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert lines == [
        "error: cannot export this gemma3_text model: gemma3_text with use_bidirectional_attention "
        "(an encoder) is not exported"
    ]
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "model_type,overrides,extra",
    [
        ("gemma3_text", {}, "_local"),  # the local layers' rotary
        (
            "phi3",
            {
                "original_max_position_embeddings": 4,
                "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8},
            },
            "_1",  # longrope's long segment, after the short one in one cache; a row's offset picks it
        ),
    ],
)
def test_every_cos_sin_cache_is_computed_in_the_graph(tmp_path, model_type, overrides, extra):
    import onnx

    folder = make_hf_folder(tmp_path / "hf", model_type, **overrides)
    bundle = export(folder, tmp_path / "b", graph="fused", progress=False, validate=False)
    inits = {t.name for t in onnx.load(str(bundle / B.MODEL), load_external_data=False).graph.initializer}
    assert not any(name.startswith(("cos_cache", "sin_cache")) for name in inits)
    assert {"rotary_inv_freq", f"rotary_inv_freq{extra}"} <= inits
