"""The CLI behaves like one binary: light imports, one-line errors, every command present."""

from __future__ import annotations

import subprocess
import sys

PROBE = (
    "import sys, runpy; sys.argv = ['onnxlm'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('onnxlm', run_name='__main__')\nexcept SystemExit: pass\n"
    "heavy = sorted(m for m in ('torch', 'transformers', 'onnxruntime') if m in sys.modules)\n"
    "print('HEAVY=' + ','.join(heavy))\n"
)


def _heavy(*args):
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    return r.stdout.strip().splitlines()[-1].removeprefix("HEAVY=")


def test_help_loads_nothing_heavy():
    assert _heavy("--help") == ""
    assert _heavy("export", "--help") == ""


def test_runtime_commands_never_import_torch(tiny_llama_bundle):
    assert _heavy("info", str(tiny_llama_bundle)) == ""
    assert "torch" not in _heavy("generate", str(tiny_llama_bundle), "hello", "-n", "3")


def test_import_runtime_loads_no_torch_or_transformers():
    code = "import onnxlm, onnxlm.runtime, sys; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_commands_listed(run_cli):
    out = run_cli("--help").output
    for cmd in ("pull", "export", "generate", "chat", "info"):
        assert cmd in out


def test_generate_streams_and_info_reports(tiny_llama_bundle, run_cli):
    r = run_cli("generate", str(tiny_llama_bundle), "The quick", "-n", "8", "--ignore-eos")
    assert r.exit_code == 0, r.output
    assert r.output.strip()
    r = run_cli("info", str(tiny_llama_bundle))
    assert r.exit_code == 0 and "greedy agreement 100%" in r.output and "model.onnx.data" in r.output
    assert "graph       fused, KV shared_buffer (float32)" in r.output


def test_chat_multi_turn_from_stdin(tiny_llama_bundle):
    r = subprocess.run(
        [sys.executable, "-m", "onnxlm", "chat", str(tiny_llama_bundle), "-n", "4", "--ignore-eos"],
        input="hello\n/reset\nsecond question\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("4 tokens") == 2  # two answers, one per user turn


def test_overlong_prompt_is_one_clear_error(tiny_llama_bundle):
    prompt = "fox " * 400  # the tiny model's window is 256 tokens
    r = subprocess.run(
        [sys.executable, "-m", "onnxlm", "generate", str(tiny_llama_bundle), prompt],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("error")][0]
    assert "256" in line and "prompt" in line


def test_missing_bundle_and_bad_option():
    r = subprocess.run(
        [sys.executable, "-m", "onnxlm", "info", "/nonexistent/bundle"], capture_output=True, text=True
    )
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "onnxlm", "generate", "x", "y", "--temperature", "abc"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_eval_command(tiny_llama_bundle, tmp_path, run_cli):
    import json

    text = tmp_path / "t.txt"
    text.write_text(
        "The quick brown fox jumps over the lazy dog. 你好，欢迎使用我们的客服系统。" * 8, encoding="utf-8"
    )
    args = ["eval", str(tiny_llama_bundle), "--text", str(text), "--window", "64"]
    r = run_cli(*args, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    (only,) = result["texts"].values()
    assert only["ppl"] > 1 and only["tokens"] > 64
    r = run_cli(*args, "--against", str(tiny_llama_bundle))
    assert r.exit_code == 0 and "agreement" in r.output.lower(), r.output


def test_bench_command_reports_every_context(tiny_llama_bundle, run_cli):
    import json

    r = run_cli("bench", str(tiny_llama_bundle), "--contexts", "8,32", "-n", "6", "--json", "--no-bandwidth")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert [c["context"] for c in result["contexts"]] == [8, 32]
    for c in result["contexts"]:
        assert c["new_tokens"] == 6 and c["decode_tokens_per_s"] > 0 and c["ttft_s"] > 0
        assert abs(c["decode_gb_per_s"] - result["weight_bytes"] * c["decode_tokens_per_s"] / 1e9) < 1e-9
    assert result["peak_rss_mb"] > 0
    if sys.platform.startswith("linux"):
        assert 0 < result["rss_mb"] <= result["peak_rss_mb"] + 1
    r = run_cli("bench", str(tiny_llama_bundle), "--contexts", "250", "-n", "16")
    assert r.exit_code == 1 and "exceeds the window" in r.output


def test_public_face_from_a_fresh_interpreter():
    code = (
        "import onnxlm, sys; assert callable(onnxlm.export) and callable(onnxlm.load); "
        "assert onnxlm.Engine.__name__ == 'Engine'; print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"  # naming export does not import torch until it is called


def test_invalid_utf8_arguments_are_one_line_errors(tiny_llama_bundle):
    for args in (
        ["generate", str(tiny_llama_bundle), b"caf\xe9"],
        ["chat", str(tiny_llama_bundle), "--system", b"\xff"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "onnxlm", *args], capture_output=True, input=b"", timeout=120
        )
        stderr = r.stderr.decode()
        assert r.returncode == 1 and "Traceback" not in stderr, stderr
        errors = [x for x in stderr.splitlines() if x.startswith("error")]
        assert len(errors) == 1 and "not valid Unicode" in errors[0] and "TypeError" not in errors[0], stderr


def test_chat_keeps_its_history_after_a_bad_line(tiny_llama_bundle, monkeypatch, run_cli):
    """A line of invalid UTF-8, or one the model refuses (past its window), costs that line only."""
    import onnxlm.cli as cli_module
    from onnxlm.runtime import load

    engine = load(tiny_llama_bundle)
    seen = []

    class Recording:
        def stream_chat(self, messages, **params):
            seen.append([dict(m) for m in messages])
            return engine.stream_chat(messages, **params)

    monkeypatch.setattr(cli_module, "_load", lambda *a: Recording())
    lines = b"hello\n\xff\xfe broken\n" + b"fox " * 400 + b"\nsecond\n"
    r = run_cli("chat", str(tiny_llama_bundle), "-n", "3", "--ignore-eos", input=lines)
    assert r.exit_code == 0, r.output
    assert "not valid UTF-8" in r.output and "context window" in r.output
    first, _overlong, last = seen
    assert [m["role"] for m in last] == ["user", "assistant", "user"]
    assert last[0] == first[0] and last[2]["content"] == "second" and last[1]["content"]


def test_a_hostile_chat_template_is_one_line_in_the_cli(bundle_copy):
    import json
    import time

    for source in (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ 'a' * 10**10 }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ):
        path = bundle_copy / "onnxlm.json"
        manifest = json.loads(path.read_text())
        manifest["chat_template"] = source
        path.write_text(json.dumps(manifest))
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "onnxlm", "generate", "--chat", str(bundle_copy), "hi", "-n", "2"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        errors = [x for x in r.stderr.splitlines() if x.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith("error: chat template"), r.stderr
        assert time.perf_counter() - t0 < 60


def test_chat_template_kwargs_reach_the_template(bundle_copy, run_cli):
    """--chat-template-kwargs JSON: its variables render in the template; bad JSON is one line."""
    import json

    path = bundle_copy / "onnxlm.json"
    manifest = json.loads(path.read_text())
    manifest["chat_template"] = (
        "{% if not flag %}{{ raise_exception('flag missing') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    path.write_text(json.dumps(manifest))
    base = ["generate", str(bundle_copy), "hi", "--chat", "-n", "2"]
    bad = run_cli(*base)
    assert bad.exit_code != 0 and "flag missing" in bad.output
    ok = run_cli(*base, "--chat-template-kwargs", '{"flag": true}')
    assert ok.exit_code == 0, ok.output
    for wrong in ("{flag", "[1]"):
        r = run_cli(*base, "--chat-template-kwargs", wrong)
        assert r.exit_code == 2 and "--chat-template-kwargs" in r.output
    r = run_cli("generate", str(bundle_copy), "hi", "--chat-template-kwargs", "{}")
    assert r.exit_code == 2 and "needs --chat" in r.output
