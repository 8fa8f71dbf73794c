"""The runtime's fixtures: the tiny bundle and an engine on it, once per graph kind, so that a test taking
them runs on the plain graph (left padding, KV concatenated) and on the fused one (right padding, a
shared KV buffer). A module that needs another engine (threads, draft, window) defines its own."""

from __future__ import annotations

import pytest

from onnxlm.runtime import load
from tests.bundles import TinyBundle, tiny_bundle


@pytest.fixture(scope="module", params=["plain", "fused"])
def bundle(request) -> TinyBundle:
    return tiny_bundle(request.param)


@pytest.fixture(scope="module")
def engine(bundle):
    return load(bundle.path, threads=2)
