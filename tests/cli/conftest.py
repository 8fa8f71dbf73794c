"""The CLI tests' fixture: `onnxlm ARGS` run in-process through click's runner."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from onnxlm.cli import cli


@pytest.fixture
def run_cli():
    """run_cli(*args, input=None) -> click's Result; paths and numbers may be given as they are."""
    runner = CliRunner()
    return lambda *args, **kw: runner.invoke(cli, [str(a) for a in args], **kw)
