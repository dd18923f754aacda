"""Shared fixtures: the committed demo corpus, the shared data folder, the reference package."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "data" / "demo_tiny"
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The committed 24-speaker demo corpus (speaker folders of 16 kHz FLAC)."""
    assert DEMO_DIR.is_dir(), f"the committed demo corpus is missing at {DEMO_DIR}"
    return DEMO_DIR


@pytest.fixture(scope="session")
def demo_files(demo_dir: Path) -> list[Path]:
    return sorted(demo_dir.glob("*/*.flac"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data: present in CI, absent on a fresh user clone (those tests skip)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (a fresh clone has no ../shared; CI has it)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for the module (the 2 cores here are shared with BLAS and workers)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
