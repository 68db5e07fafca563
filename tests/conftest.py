"""Shared fixtures: tiny diffusers pipelines built locally and their sdonnx exports (built once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny_models import KINDS, build_tiny_pipeline

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OPTIMUM_FIXTURE = SHARED / "fixtures" / "optimum-tiny-sd"


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    """{"sd1": folder, "sd2": folder}: diffusers folders of the two tiny model shapes."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("tiny-sources")
    return {kind: build_tiny_pipeline(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="session")
def tiny_exports(tiny_sources, tmp_path_factory) -> dict[str, Path]:
    """{"sd1": folder, "sd2": folder}: the tiny pipelines exported by `sdonnx export`."""
    from sdonnx.export import ExportConfig, export_model

    root = tmp_path_factory.mktemp("tiny-exports")
    for kind, source in tiny_sources.items():
        export_model(ExportConfig(source=str(source), out=root / kind, quiet=True))
    return {kind: root / kind for kind in KINDS}


@pytest.fixture(scope="session")
def optimum_fixture() -> Path:
    """A real optimum export of a tiny SD pipeline (../shared/fixtures/optimum-tiny-sd)."""
    if not OPTIMUM_FIXTURE.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{OPTIMUM_FIXTURE} is missing: CI must run with shared/ beside the clone")
        pytest.skip(f"{OPTIMUM_FIXTURE} not present")
    return OPTIMUM_FIXTURE
