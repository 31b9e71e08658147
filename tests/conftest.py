"""Shared pytest fixtures: the location of ``../shared/data`` and small synthetic volumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (PROJECT_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared Learn2Reg-layout datasets; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (a fresh clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU random generator, so each test's random data is reproducible."""
    return torch.Generator().manual_seed(0)
