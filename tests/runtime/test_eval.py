"""Evaluation (onnxlm.runtime.eval) on the tiny bundle, against transformers as the reference."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxlm.bundle import BundleError
from onnxlm.runtime.eval import (
    builtin_text,
    builtin_texts,
    compare,
    evaluate,
    format_report,
    load_engine,
    perplexity,
    quality_report,
    windows,
)

WINDOW, STRIDE = 64, 24  # the tiny model's context is 256; texts below are several windows long


@pytest.fixture(scope="module")
def engine(tiny_llama_bundle):
    return load_engine(tiny_llama_bundle, threads=2)


@pytest.fixture(scope="module")
def text(engine):
    t = builtin_text("en")[:1200]
    assert len(engine.tokenizer.encode(t)) > 4 * WINDOW
    return t


@pytest.fixture(scope="module")
def other_seed_bundle(tmp_path_factory):
    from onnxlm.export.convert import export
    from tests.fixtures import make_hf_folder

    folder = make_hf_folder(tmp_path_factory.mktemp("hf") / "llama_seed1", "llama", seed=1)
    return export(folder, tmp_path_factory.mktemp("bundles") / "llama_seed1", progress=False)


def hf_perplexity(folder, ids, window, stride):
    """Hugging Face's perplexity guide, verbatim in spirit: labels -100 outside each window's new tokens."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.tensor([ids])
    n = ids.shape[1]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())  # the model shifts labels left by one
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


def test_windows_score_each_token_once():
    for n, window, stride in [(2, 4, 2), (10, 4, 2), (100, 64, 24), (65, 64, 64), (1000, 512, 256)]:
        spans = windows(n, window, stride)
        assert all(len(w) <= window and w.scored >= 1 for w in spans)
        scored = [t for w in spans for t in range(w.end - w.scored, w.end)]
        assert len(scored) == len(set(scored))
        if stride < window:
            assert scored == list(range(1, n)) and spans[-1].end == n
        else:  # no overlap: each window's first token has no context and is not scored (as in HF)
            assert scored == [t for t in range(1, n) if t % window]


def test_perplexity_matches_transformers(tiny_llama_folder, engine, text):
    got = perplexity(engine, text, window=WINDOW, stride=STRIDE, progress=False)
    ids = engine.tokenizer.encode(text)
    want, n_scored = hf_perplexity(tiny_llama_folder, ids, WINDOW, STRIDE)
    assert got["tokens"] == n_scored == len(ids) - 1
    assert got["windows"] > 4 and got["window"] == WINDOW and got["stride"] == STRIDE
    assert got["ppl"] == pytest.approx(want, rel=1e-3)
    assert got["nll_mean"] == pytest.approx(math.log(got["ppl"]))
    assert got["seconds"] >= 0


def test_window_fits_context_and_max_tokens(engine, text):
    got = perplexity(engine, text, window=10_000, stride=100, max_tokens=300, progress=False)
    assert got["window"] == engine.manifest.model.context_length == 256
    assert got["text_tokens"] == 300 and got["tokens"] == 299


def test_compare_with_itself(engine, text):
    got = compare(engine, engine, text, window=WINDOW, stride=STRIDE, progress=False)
    assert got["agreement"] == 1.0 and got["top5"] == 1.0
    assert got["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert got["ppl"] == pytest.approx(got["reference_ppl"], rel=1e-6)
    assert abs(got["ppl_change_pct"]) < 1e-4


def test_compare_with_another_model(engine, other_seed_bundle, text):
    got = compare(other_seed_bundle, engine, text, window=WINDOW, stride=STRIDE, progress=False)
    alone = perplexity(other_seed_bundle, text, window=WINDOW, stride=STRIDE, progress=False)
    assert got["agreement"] < 1.0 and got["top5"] <= 1.0 and got["top5"] >= got["agreement"]
    assert got["kl_mean"] > 0.01 and got["kl_max"] >= got["kl_mean"]
    assert got["ppl"] == pytest.approx(alone["ppl"], rel=1e-5)
    assert got["reference_ppl"] != pytest.approx(got["ppl"], rel=1e-3)


def test_evaluate_and_report(tiny_llama_bundle, other_seed_bundle, engine):
    alone = evaluate(engine, max_tokens=200, window=WINDOW, stride=STRIDE, as_json=True)
    assert set(alone["texts"]) == {"en", "zh"} and alone["reference"] is None
    assert alone["bundle"]["weights_bytes"] == (Path(tiny_llama_bundle) / "model.onnx.data").stat().st_size
    table = format_report(json.loads(json.dumps(alone)))  # plain JSON data
    assert "| en | 199 |" in table and "| zh | 199 |" in table

    report = quality_report(
        other_seed_bundle, tiny_llama_bundle, max_tokens=200, window=WINDOW, progress=False
    )
    json.dumps(report)
    for r in report["texts"].values():
        assert r["ppl_change_pct"] == pytest.approx(100 * (r["ppl"] / r["reference_ppl"] - 1))
    assert report["worst"]["ppl_change_pct"] == max(r["ppl_change_pct"] for r in report["texts"].values())
    table = format_report(report)
    for row in ("model.onnx.data", "perplexity, en", "perplexity, zh", "greedy agreement, en", "KL("):
        assert row in table
    assert re.search(r"perplexity, en \(199 tokens\) \| [\d.]+ \| [\d.]+ \| [+-][\d.]+% \|", table)


def test_evaluate_text_file(engine, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(builtin_text("zh")[:300], encoding="utf-8")
    got = evaluate(engine, path, window=WINDOW, stride=STRIDE, progress=False)
    assert list(got["texts"]) == ["notes.txt"]
    assert got["texts"]["notes.txt"]["ppl"] > 1
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        evaluate(engine, tmp_path / "latin1.txt", progress=False)
    with pytest.raises(ValueError, match="no such text file"):
        evaluate(engine, tmp_path / "missing.txt", progress=False)


def test_builtin_texts(engine):
    texts = builtin_texts()
    assert set(texts) == {"en", "zh"}
    en, zh = texts["en"], texts["zh"]
    assert len(en) > 9000 and len(en.split()) > 1500
    assert len(zh) > 2500 and len(re.findall(r"[\u4e00-\u9fff]", zh)) > 2000
    for t in (en, zh):
        assert len(engine.tokenizer.encode(t)) >= 2000
    smol = Path("/tmp/b_smol/tokenizer.json")  # the real model's tokenizer, where it is at hand
    if smol.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(smol))
        assert all(len(tok.encode(t).ids) >= 2000 for t in (en, zh))


def test_bad_input(engine, tmp_path):
    for bad in ("", "   \n"):
        with pytest.raises(ValueError, match="empty"):
            perplexity(engine, bad, progress=False)
    one = next(c for c in "abcdefgh" if len(engine.tokenizer.encode(c)) < 2)
    with pytest.raises(ValueError, match="needs at least 2"):
        perplexity(engine, one, progress=False)
    with pytest.raises(ValueError, match="stride"):
        perplexity(engine, "hello world", window=8, stride=16, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        perplexity(engine, "hello world", max_tokens=1, progress=False)
    with pytest.raises(BundleError, match="not a bundle|missing"):
        perplexity(tmp_path, "hello world", progress=False)
    with pytest.raises(BundleError):
        compare(engine, tmp_path / "nowhere", "hello world", progress=False)
    with pytest.raises(ValueError, match="no built-in"):
        builtin_text("fr")


def test_import_does_not_load_torch():
    code = (
        "import sys, onnxlm.runtime.eval\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_full_logits_match_the_decode_path(engine):
    from onnxlm.runtime.eval import full_logits

    ids = np.array(engine.tokenizer.encode("The quick brown fox"))
    logits = full_logits(engine, ids)  # (seq, vocab)
    assert logits.shape == (len(ids), engine.manifest.model.vocab_size) and logits.dtype == np.float32
    cache = engine.model.new_cache(1)
    last = engine.model.forward(ids[None], np.ones((1, len(ids))), np.arange(len(ids))[None], cache)
    np.testing.assert_allclose(logits[-1], last[0], atol=1e-4)
