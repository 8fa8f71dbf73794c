"""The export tests' fixture: what `onnxlm info` says of a bundle the exporter wrote."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from onnxlm.cli import cli


@pytest.fixture
def info():
    """info(bundle) -> the text `onnxlm info BUNDLE` prints (the command must succeed)."""

    def show(bundle) -> str:
        result = CliRunner().invoke(cli, ["info", str(bundle)])
        assert result.exit_code == 0, result.output
        return result.output

    return show
