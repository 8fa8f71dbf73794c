"""A hostile chat template cannot hang the process, exhaust its memory or escape as a raw exception:
every probe ends, quickly, as one ChatTemplateError line; long texts tokenize without holding the GIL."""

import threading
import time

import pytest

from onnxlm.runtime.chat_template import ChatTemplateError, compile_chat_template, render_chat_template
from onnxlm.runtime.tokenizer import GIL_FREE_CHARS, Tokenizer
from tests.fixtures import build_tokenizer
from tests.runtime.test_tokenizer import manifest

MESSAGES = [{"role": "user", "content": "hi"}]

PROBES = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over messages": "{% for a in messages %}{% for b in messages %}{% for c in messages %}"
    "{% for d in messages %}{% for e in messages %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}",
    "10 GB string": "{{ 'a' * 10**10 }}",
    "list repeat": "{{ (messages * 10**9) | length }}",
    "float overflow": "{{ 10.0 ** 1000 }}",
    "huge power": "{{ 7 ** 100000000 }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "doubling with ~": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "doubling with +": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s | length }}",
    "filter width": "{{ 'x' | center(10**10) }}",
    "method width": "{{ 'x'.ljust(10**10) }}",
    "output flood": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "range too long": "{{ range(10**30) | list }}",
    "type error": "{{ messages + 1 }}",
    "zero division": "{{ 1 // 0 }}",
    "lorem ipsum": "{{ lipsum(n=10**6) }}",
}


@pytest.mark.parametrize("name", list(PROBES))
def test_hostile_templates_end_as_one_line_errors(name):
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError) as e:
        render_chat_template(compile_chat_template(PROBES[name]), budget_s=1.0, messages=MESSAGES * 40)
    assert time.perf_counter() - t0 < 3, name
    assert str(e.value).startswith("chat template") and "\n" not in str(e.value)


def test_deeply_nested_source_is_a_compile_error():
    with pytest.raises(ChatTemplateError, match="chat template"):
        compile_chat_template("{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}")


def test_limits_leave_ordinary_templates_alone():
    source = (
        "{% for m in messages %}{{ m.role ~ ': ' ~ m['content'] }}{% if not loop.last %}; {% endif %}"
        "{% endfor %}{{ range(3) | list }}{{ 'ab' * 2 }}{{ 2 ** 10 }}{{ [1] + [2] }}"
    )
    messages = [{"role": "user", "content": f"message {i}"} for i in range(10_000)]
    t0 = time.perf_counter()
    out = render_chat_template(compile_chat_template(source), messages=messages)
    assert time.perf_counter() - t0 < 1.0
    assert out.startswith("user: message 0; user: message 1; ")
    assert out.endswith("user: message 9999[0, 1, 2]abab1024[1, 2]")


def test_budget_and_cap_apply_per_render():
    template = compile_chat_template("{% for i in range(50000) %}{{ i }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="over the cap of 1,000"):
        render_chat_template(template, max_chars=1000)
    assert len(render_chat_template(template)) > 1000  # the next render has the default limits again


def test_the_time_budget_is_per_thread():
    """A slow render on one thread does not spend another thread's budget."""
    slow = compile_chat_template(PROBES["nested loops"])
    quick = compile_chat_template("{% for i in range(1000) %}{{ i }}{% endfor %}")
    errors = []
    worker = threading.Thread(
        target=lambda: errors.append(pytest.raises(ChatTemplateError, render_chat_template, slow, budget_s=1))
    )
    worker.start()
    time.sleep(0.2)
    for _ in range(20):
        render_chat_template(quick, budget_s=0.5)
        time.sleep(0.05)
    worker.join()
    assert errors


def test_lone_surrogates_are_a_value_error_naming_the_character():
    tok = Tokenizer(build_tokenizer(), manifest())
    with pytest.raises(ValueError, match="not valid Unicode: character 1 is a lone surrogate"):
        tok.encode("a\udcffb")


@pytest.mark.parametrize("special", [True, False])
def test_the_gil_free_path_gives_the_same_ids(special, monkeypatch):
    from onnxlm.runtime import tokenizer as T

    tok = Tokenizer(build_tokenizer(), manifest())
    text = "Hello world! 我们今天去公园散步。<s> </s> tabs\tand  spaces\n" * (GIL_FREE_CHARS // 40 + 1)
    assert len(text) > GIL_FREE_CHARS
    fast = tok.encode(text, add_special_tokens=special)
    monkeypatch.setattr(T, "GIL_FREE_CHARS", 10**12)  # the plain encode path
    assert fast == tok.encode(text, add_special_tokens=special)


def test_long_texts_tokenize_without_holding_the_gil():
    tok = Tokenizer(build_tokenizer(), manifest())
    text = "hello world, this is text. " * 40_000  # about 1 MB
    gaps, done = [], threading.Event()

    def ticker():
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = threading.Thread(target=ticker)
    t.start()
    t0 = time.perf_counter()
    tok.encode(text)
    took = time.perf_counter() - t0
    done.set()
    t.join()
    assert took > 0.2 and max(gaps) < took / 2, (took, max(gaps))
