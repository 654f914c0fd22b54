"""Shared pytest fixtures. Others add to this file: keep each fixture small and documented.

Fixtures
--------
shared_dir (session)
    ``pathlib.Path`` of the shared data folder ``<repo>/../shared`` (holds ``datasets/``).
    Missing: the test is skipped with the reason, except under ``CI=true`` where a missing
    shared folder fails the test. Use :func:`shared_path` for a file inside it.
shared_path (session)
    ``shared_path("datasets/beauty/interactions.parquet")`` -> Path; skips (or fails on CI) when
    that file is missing.
ray_local (session)
    A real local Ray cluster started once per session (``ray.init(address="local",
    num_cpus=2, include_dashboard=False)``) and shut down at the end; yields the ``ray`` module.
    If Ray is already initialised in this process it is reused and left running.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = (REPO_ROOT / ".." / "shared").resolve()


def _on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(what: str) -> None:
    msg = f"shared data not found: {what} (expected the shared folder at {SHARED_DIR})"
    if _on_ci():
        pytest.fail(msg + "; CI=true requires it")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        _missing(str(SHARED_DIR))
    return SHARED_DIR


@pytest.fixture(scope="session")
def shared_path(shared_dir):
    def get(rel: str) -> Path:
        p = shared_dir / rel
        if not p.exists():
            _missing(str(p))
        return p

    return get


@pytest.fixture(scope="session")
def ray_local():
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=300 * 1024 * 1024,
        )
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
