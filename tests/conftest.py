import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(os.environ.get("MIMKIT_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present (set MIMKIT_SHARED_DATA=/path/to/data to run "
                    "the tests on real data)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-array caches go to a per-session temporary folder, never the user's home."""
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path_factory.getbasetemp() / "mimkit-cache"))
