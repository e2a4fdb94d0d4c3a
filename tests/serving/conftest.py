"""The serving tests' shared folder: a tiny backbone, prepared splits and the tiny runs trained once."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_llm import save_tiny_backbone


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serving")
    save_tiny_backbone(root / "backbone")
    return root
