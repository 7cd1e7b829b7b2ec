"""Shared pytest fixtures: where the real data lives, and a skip when it is absent."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The folder ../shared/data, or skip the test with the reason."""
    if not SHARED.is_dir():
        pytest.skip(f"real data folder {SHARED} is absent (it exists only on the dev machines)")
    return SHARED
