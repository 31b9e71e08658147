"""Shared pytest fixtures: the location of ``../shared/data`` and small synthetic volumes."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, as the command line sets it (measured there: spinning threads made
# VoxelOpt 2-4x slower on a shared 2-core machine); it must be set before torch is imported, and a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

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
