"""Shared fixtures. ``shared_data`` is the folder of real datasets the data tests read (never copied here)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA_ENV = "RECADAPT_TEST_DATA"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$RECADAPT_TEST_DATA``, else ``../shared/data`` beside the repository.

    A missing folder fails the test (it does not skip): the real-data checks are the point of these tests.
    """
    env = os.environ.get(TEST_DATA_ENV)
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.fail(
            f"real test data not found at {path}. Point {TEST_DATA_ENV} at the folder holding ml-100k/, "
            "lastfm-hetrec2011-2k/, llara-splits/ and collm-ml-1m/ (see its README.md).",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Small hand-written data files committed with the tests."""
    return FIXTURES


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One torch thread for the test: tiny models run ~100x faster on one thread than on two contended ones.

    A module opts in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    import torch  # imported here, so that collecting the tests that never use torch does not load it

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
