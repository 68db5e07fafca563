"""The optimized-graph cache: the first load fills it, later loads read it, and images do not change."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from sdonnx.errors import InputError
from sdonnx.runtime import graph_cache
from sdonnx.runtime.pipeline import Pipeline
from sdonnx.runtime.providers import RuntimeOptions


def _image(folder, **options) -> np.ndarray:
    pipe = Pipeline.load(folder, provider="cpu", progress=False, **options)
    return np.asarray(pipe("a cat", steps=3, seed=2)[0])


def test_cached_graphs_give_the_same_image_and_are_reused(optimum_fixture, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    reference = _image(optimum_fixture)
    np.testing.assert_array_equal(_image(optimum_fixture, graph_cache=cache), reference)
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 4 and all((cache / e / "model.onnx").is_file() for e in entries)  # one per graph

    loaded = []
    session = graph_cache.Session

    def recording(*args, load=None, **kwargs):
        loaded.append(load)
        return session(*args, load=load, **kwargs)

    monkeypatch.setattr(graph_cache, "Session", recording)
    np.testing.assert_array_equal(_image(optimum_fixture, graph_cache=cache), reference)
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert len(loaded) == 4 and all(path is not None and path.parent.parent == cache for path in loaded)


def test_a_changed_graph_gets_a_new_key(optimum_fixture, tmp_path):
    graph = tmp_path / "unet" / "model.onnx"
    graph.parent.mkdir()
    shutil.copy(optimum_fixture / "unet" / "model.onnx", graph)
    options = RuntimeOptions(provider="cpu", graph_cache=tmp_path / "cache")
    before = graph_cache.cache_key(graph, options)
    os.utime(graph, ns=(0, graph.stat().st_mtime_ns + 10**9))
    assert graph_cache.cache_key(graph, options) != before
    assert graph_cache.cache_key(graph, RuntimeOptions(provider="cpu", graph_optimization="basic")) != before


def test_graph_cache_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="graph_cache"):
        RuntimeOptions(graph_cache=tmp_path / "file")
