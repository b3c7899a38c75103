"""Shared fixtures: atlases built from SQL and rows, like datasette's fixtures.py."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm():
    """The real default embedder, loaded once per test session."""
    from query.embedder import get_embedder

    return get_embedder("minilm")


@pytest.fixture
def make_atlas(tmp_path, minilm):
    """Factory: ``make_atlas(neurons, sql=(), meta=None, index=True, name="atlas") -> Path``
    (see :func:`testkit.atlases.write_atlas`): an atlas written with SQL in
    the test's tmp folder, label vectors from the real minilm embedder."""
    from testkit.atlases import write_atlas

    def make(neurons, sql=(), meta=None, index=True, name="atlas"):
        return write_atlas(tmp_path / name, minilm, neurons, sql, meta, index)

    return make
