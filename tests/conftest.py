"""Fixtures every layer's tests share: the tiny Llama's Hugging Face folder and its bundle, and the real
SmolLM2 bundle. Each layer's own fixtures sit in its folder's conftest.py; importable helpers in
tests/fixtures.py (tiny model folders), tests/bundles.py (tiny bundles) and tests/constraint_schemas.py."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory):
    from tests.fixtures import make_hf_folder

    return make_hf_folder(tmp_path_factory.mktemp("hf") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_llama_bundle(tmp_path_factory, tiny_llama_folder):
    """A validated bundle of a tiny llama, exported once per session (read-only for tests)."""
    from onnxlm.export.convert import export

    return export(tiny_llama_folder, tmp_path_factory.mktemp("bundles") / "llama", progress=False)


@pytest.fixture
def bundle_copy(tiny_llama_bundle, tmp_path):
    """A private copy of the tiny bundle that a test may damage."""
    import shutil

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_llama_bundle, dst)
    return dst


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory):
    """Reuse the cached bundle `make demo` made when there is one; else export into a temp folder."""
    from onnxlm.export import sources
    from onnxlm.export.convert import export

    cached = sources.default_bundle_dir("smollm2")
    if (cached / "onnxlm.json").is_file() and os.environ.get("ONNXLM_FRESH_EXPORT") != "1":
        return cached
    return export("smollm2", tmp_path_factory.mktemp("smol") / "bundle", progress=False)
