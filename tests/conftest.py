"""Shared fixtures: tiny diffusers pipelines built locally and their sdonnx exports (built once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny_models import KINDS, SDXL_KINDS, build_tiny_pipeline, build_tiny_sdxl

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
OPTIMUM_FIXTURE = SHARED / "fixtures" / "optimum-tiny-sd"
OPTIMUM_SDXL_FIXTURE = SHARED / "fixtures" / "optimum-tiny-sdxl"


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    """{"sd1": folder, "sd2": folder}: diffusers folders of the two tiny model shapes."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("tiny-sources")
    return {kind: build_tiny_pipeline(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="session")
def tiny_exports(tiny_sources, tmp_path_factory) -> dict[str, Path]:
    """{"sd1": folder, "sd2": folder}: the tiny pipelines exported by `sdonnx export`."""
    return _export_all(tiny_sources, tmp_path_factory.mktemp("tiny-exports"))


def _shared_fixture(folder: Path) -> Path:
    if not folder.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{folder} is missing: CI must run with shared/ beside the clone")
        pytest.skip(f"{folder} not present")
    return folder


@pytest.fixture(scope="session")
def optimum_fixture() -> Path:
    """A real optimum export of a tiny SD pipeline (../shared/fixtures/optimum-tiny-sd)."""
    return _shared_fixture(OPTIMUM_FIXTURE)


@pytest.fixture(scope="session")
def optimum_sdxl_fixture() -> Path:
    """A real optimum export of a tiny SDXL pipeline (../shared/fixtures/optimum-tiny-sdxl; source/ beside it)."""
    return _shared_fixture(OPTIMUM_SDXL_FIXTURE)


@pytest.fixture(scope="session")
def tiny_sdxl_sources(tmp_path_factory) -> dict[str, Path]:
    """{"sdxl": folder, "sdxl_refiner": folder}: diffusers folders of the two tiny SDXL layouts."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("tiny-sdxl-sources")
    return {kind: build_tiny_sdxl(kind, root / kind) for kind in SDXL_KINDS}


@pytest.fixture(scope="session")
def tiny_sdxl_exports(tiny_sdxl_sources, tmp_path_factory) -> dict[str, Path]:
    """{"sdxl": folder, "sdxl_refiner": folder}: the tiny SDXL pipelines exported by `sdonnx export`."""
    return _export_all(tiny_sdxl_sources, tmp_path_factory.mktemp("tiny-sdxl-exports"))


def _export_all(sources: dict[str, Path], root: Path) -> dict[str, Path]:
    """Each diffusers folder of `sources` exported by `sdonnx export` into root/KIND."""
    from sdonnx.export import ExportConfig, export_model

    for kind, source in sources.items():
        export_model(ExportConfig(source=str(source), out=root / kind, quiet=True))
    return {kind: root / kind for kind in sources}
