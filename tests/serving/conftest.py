"""The serving tests' fixtures: an engine on the tiny fused bundle (a module that serves another model
defines its own `engine`) and `serve`, which puts an app on loopback and stops it after the module."""

from __future__ import annotations

import pytest

from onnxlm.runtime import load
from tests.bundles import tiny_bundle
from tests.serving.loopback import ServerThread


@pytest.fixture(scope="module")
def engine():
    return load(tiny_bundle("fused").path, threads=1)


@pytest.fixture(scope="module")
def serve():
    """serve(app) -> a running ServerThread; every server started is stopped when the module ends."""
    started: list[ServerThread] = []

    def start(app) -> ServerThread:
        started.append(ServerThread(app))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()
