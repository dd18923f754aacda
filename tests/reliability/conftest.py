"""Fixtures of the reliability suite (the helpers live in hostile_corpus.py)."""

from pathlib import Path

import pytest
from hostile_corpus import Case, build_bad_corpus


@pytest.fixture(scope="module")
def bad_corpus(demo_files, tmp_path_factory) -> tuple[Path, list[Case]]:
    """The corpus without the 1-hour file (that one has its own slow test)."""
    root = tmp_path_factory.mktemp("bad") / "hostile corpus"
    return root, build_bad_corpus(root, demo_files, with_hour=False)
