"""The README's `onnxlm` commands name only options that exist, and its links point inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxlm.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def commands() -> list[tuple[str, list[str]]]:
    """(subcommand, its --options) for every README line that runs `onnxlm SUBCOMMAND ...`."""
    out = []
    for line in README.splitlines():
        m = re.match(r"\s*onnxlm (?:--debug |-q )?([a-z]+)\b(.*)", line.split("#")[0])
        if m:
            out.append((m.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(2))))
    return out


def test_the_readme_runs_commands():
    assert len(commands()) >= 15


@pytest.mark.parametrize("name, options", commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_readme_command_options_exist(name, options):
    assert name in cli.commands, f"onnxlm {name}: no such command"
    help_text = CliRunner().invoke(cli, [name, "--help"]).output
    assert [o for o in options if o not in help_text] == []


def test_readme_prose_names_existing_options():
    """Options named in backticks in the prose (`--max-batch`) exist in some command."""
    known = " ".join(CliRunner().invoke(cli, [c, "--help"]).output for c in cli.commands)
    known += CliRunner().invoke(cli, ["--help"]).output
    named = set(re.findall(r"`(--[a-z][a-z0-9-]*)", README))
    assert named and [o for o in sorted(named) if o not in known] == []


def test_readme_links_stay_in_the_repository():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
