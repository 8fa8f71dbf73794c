"""Every quantize run ends with a quality report; a perplexity budget fails the run or, with `auto`,
raises sensitive weights to 8 bits until it holds.

Perplexity changes of random tiny models have no reliable sign, so the budget tests drive the control
flow with a stand-in measurement that is a function of the candidate bundle itself (the share of its
weights left at 4 bits); the report test runs the real evaluation.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from onnxlm import bundle as B
from onnxlm.cli import cli
from onnxlm.quantize import QuantizeError
from onnxlm.quantize import report as R
from tests.fixtures import CORPUS, make_hf_folder

TEXT = " ".join(CORPUS * 3)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    from onnxlm.export.convert import export

    root = tmp_path_factory.mktemp("qr")
    folder = make_hf_folder(root / "hf", "llama", hidden_size=256, intermediate_size=512)
    return export(folder, root / "fp32", progress=False)


def int4_share(bundle) -> float:
    """`bundle`: a folder, or the Engine the report evaluates."""
    manifest = bundle.manifest if hasattr(bundle, "manifest") else B.read_manifest(bundle)
    nodes = manifest.quantization["nodes"]
    kinds = [str(v) for v in nodes.values()]
    return sum("int4" in k for k in kinds) / len(kinds)


@pytest.fixture
def fake_eval(monkeypatch):
    """Perplexity change = 10% x the share of weights at 4 bits (int8 everywhere: 0%)."""

    def evaluate(bundle, text=None, against=None, **kw):
        change = 10.0 * int4_share(bundle)
        return {
            "bundle": {"path": str(bundle)},
            "reference": {"path": str(against)},
            "texts": {},
            "worst": {"ppl_change_pct": change, "agreement": 1.0, "top5": 1.0, "kl_mean": 0.0},
        }

    monkeypatch.setattr(R, "evaluate", evaluate)
    monkeypatch.setattr("onnxlm.runtime.eval.format_report", lambda r: f"perplexity change {r['worst']}")


def test_report_is_stored_and_printed(fp32, tmp_path):
    out, report = R.quantize_with_report(fp32, tmp_path / "int8", "int8", text=TEXT, progress=False)
    m = B.check_bundle(out, verify_hashes=True)
    stored = m.quantization["report"]
    assert stored["reference"]["path"] == str(fp32) and stored["bundle"]["path"] == str(out)
    (figures,) = stored["texts"].values()
    assert figures["reference_ppl"] > 1 and {"agreement", "top5", "kl_mean", "ppl_change_pct"} <= set(figures)
    assert stored["bundle"]["weights_bytes"] < 0.35 * stored["reference"]["weights_bytes"]
    assert report == stored
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]  # no staging folder left


def test_budget_failure_writes_nothing(fp32, tmp_path, fake_eval):
    # int4's nodes but the head (at 8 bits under scheme min) are 4-bit: a change of 10% x that share
    with pytest.raises(QuantizeError, match=r"rose \+[6-9]\.\d\d%.*over the budget of \+5"):
        R.quantize_with_report(fp32, tmp_path / "int4", "int4", max_ppl_increase=5.0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_auto_raises_groups_until_the_budget_holds(fp32, tmp_path, fake_eval):
    out, report = R.quantize_with_report(
        fp32, tmp_path / "auto", "auto", max_ppl_increase=5.0, progress=False
    )
    m = B.read_manifest(out)
    raised = m.quantization["auto_raised_to_int8"]
    assert raised == [g for g, _ in R.AUTO_GROUPS[: len(raised)]]
    assert report["worst"]["ppl_change_pct"] <= 5.0
    assert 0 < int4_share(out) <= 0.5  # stopped as soon as the budget held, not at all-int8
    fewer = R.auto_recipe(len(raised) - 1)  # one group less (none: the int4 recipe) would not have held
    assert raised and 10.0 * _share_with(fp32, tmp_path, fewer) > 5.0
    assert m.quantization["max_ppl_increase_pct"] == 5.0


def test_auto_keeps_int4_itself_when_it_holds_the_budget(fp32, tmp_path, fake_eval):
    """auto tries the int4 recipe first (its head at 8 bits), and raises nothing it does not need."""
    out, report = R.quantize_with_report(
        fp32, tmp_path / "auto", "auto", max_ppl_increase=9.5, progress=False
    )
    q = B.read_manifest(out).quantization
    plain = B.read_manifest(_quantized(fp32, tmp_path, "int4")).quantization
    assert q["auto_raised_to_int8"] == [] and report["worst"]["ppl_change_pct"] <= 9.5
    assert q["nodes"] == plain["nodes"] and 0.5 < int4_share(out) < 1.0


def _quantized(fp32, tmp_path, recipe):
    from onnxlm.quantize import quantize

    return quantize(fp32, tmp_path / "fewer", recipe, progress=False, overwrite=True)


def _share_with(fp32, tmp_path, recipe) -> float:
    return int4_share(_quantized(fp32, tmp_path, recipe))


def test_auto_needs_a_budget(fp32, tmp_path):
    with pytest.raises(QuantizeError, match="needs max_ppl_increase"):
        R.quantize_with_report(fp32, tmp_path / "x", "auto", progress=False)


def test_cli_reports_and_fails_cleanly(fp32, tmp_path, fake_eval):
    out = tmp_path / "int4"
    r = CliRunner().invoke(cli, ["quantize", str(fp32), "-o", str(out), "--max-ppl-increase", "5"])
    assert r.exit_code == 1 and "over the budget" in r.output and not out.exists()
    r = CliRunner().invoke(
        cli, ["quantize", str(fp32), "-o", str(out), "--recipe", "auto", "--max-ppl-increase", "5"]
    )
    assert r.exit_code == 0, r.output
    assert B.read_manifest(out).quantization["auto_raised_to_int8"]


def test_cli_real_report(fp32, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    r = CliRunner().invoke(
        cli, ["quantize", str(fp32), "-o", str(tmp_path / "q"), "--recipe", "int8", "--eval-text", str(text)]
    )
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "KL" in r.output and "model.onnx.data" in r.output


def test_hard_linked_source_quantizes(fp32, tmp_path):
    import os
    import shutil

    src = tmp_path / "src"
    shutil.copytree(fp32, src)
    os.link(src / B.MODEL_DATA, tmp_path / "second-name.data")  # a dedup tool or `cp -l` did this
    out, _ = R.quantize_with_report(src, tmp_path / "int8", "int8", report=False, progress=False)
    assert B.check_bundle(out, verify_hashes=True).quantization["recipe"] == "int8"


def test_staging_folder_never_loads_and_overwrite_keeps_the_old_bundle(fp32, tmp_path, monkeypatch):
    """While the report runs (a kill would leave things as they are then) the staging folder is refused
    as a bundle and the bundle being replaced is still whole; only the passed candidate replaces it."""
    out = tmp_path / "q"
    old, _ = R.quantize_with_report(fp32, out, "int8", report=False, progress=False)
    old_recipe = B.check_bundle(old).quantization["recipe"]
    seen = []

    def evaluate(bundle, text=None, against=None, **kw):
        staging = bundle.bundle_dir
        with pytest.raises(B.BundleError, match="unfinished bundle"):
            B.check_bundle(staging)
        r = CliRunner().invoke(cli, ["info", str(staging)])
        assert r.exit_code == 1 and "unfinished bundle" in r.output
        assert B.check_bundle(out, verify_hashes=True).quantization["recipe"] == old_recipe
        seen.append(staging)
        change = 10.0 * int4_share(bundle)
        return {"bundle": {}, "reference": {}, "texts": {}, "worst": {"ppl_change_pct": change}}

    monkeypatch.setattr(R, "evaluate", evaluate)
    with pytest.raises(QuantizeError, match="over the budget"):
        R.quantize_with_report(fp32, out, "int4", max_ppl_increase=5.0, overwrite=True, progress=False)
    assert B.check_bundle(out, verify_hashes=True).quantization["recipe"] == old_recipe  # untouched
    R.quantize_with_report(fp32, out, "int4", overwrite=True, progress=False)
    assert len(seen) == 2
    assert B.check_bundle(out, verify_hashes=True).quantization["recipe"] == "int4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no staging or old folder left
    assert B.STAGING_MARK not in B.read_manifest(out).files
