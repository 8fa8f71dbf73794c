"""CLI --json-schema FILE, --regex and --grammar FILE: the printed output follows the constraint."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests.constraint_schemas import SCHEMAS


@pytest.fixture
def run(run_cli):
    return lambda *args: run_cli("-q", "generate", *args)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_file(tiny_llama_bundle, tmp_path, name, run):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMAS[name]))
    for t in ("0", "1"):
        r = run(tiny_llama_bundle, "Hello", "--json-schema", path, "-n", "300", "-t", t, "--seed", "2")
        assert r.exit_code == 0, r.output
        jsonschema.validate(json.loads(r.stdout.strip()), SCHEMAS[name])


def test_regex_and_grammar_files(tiny_llama_bundle, tmp_path, run):
    r = run(tiny_llama_bundle, "Hi", "--regex", "[A-Z]{2}-[0-9]{2}", "-t", "1", "--seed", "1")
    assert r.exit_code == 0 and re.fullmatch("[A-Z]{2}-[0-9]{2}", r.stdout.strip()), r.output
    lark = tmp_path / "g.lark"
    lark.write_text('start: "(" WORD ")"\nWORD: /[a-z]{1,5}/\n')
    r = run(tiny_llama_bundle, "Hi", "--grammar", lark, "-t", "1", "--seed", "1")
    assert r.exit_code == 0 and re.fullmatch(r"\([a-z]{1,5}\)", r.stdout.strip()), r.output
    gbnf = tmp_path / "g.gbnf"
    gbnf.write_text('root ::= "yes" | "no"\n')
    r = run(tiny_llama_bundle, "Hi", "--grammar", gbnf)
    assert r.exit_code == 0 and r.stdout.strip() in ("yes", "no"), r.output


def test_bad_constraints_are_one_line_errors(tiny_llama_bundle, tmp_path, run):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run(tiny_llama_bundle, "Hi", "--json-schema", bad)
    assert r.exit_code != 0 and "not valid JSON" in r.output
    r = run(tiny_llama_bundle, "Hi", "--regex", "a(")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "regex" in r.output
    r = run(tiny_llama_bundle, "Hi", "--regex", "a", "--json-schema", bad.with_name("missing.json"))
    assert r.exit_code != 0 and "missing.json" in r.output
