from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import gateway as gw_mod  # noqa: E402


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[gw_mod.Gateway]:
    gw = gw_mod.start(tmp_path_factory.mktemp("gateway"))
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def held_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[gw_mod.Gateway]:
    """A gateway that holds calls needing approval for up to 20 s
    (``[approval] hold``) instead of answering ``approval_required`` at once."""
    gw = gw_mod.start(tmp_path_factory.mktemp("held"), '\n[approval]\nhold = "20s"\n')
    try:
        yield gw
    finally:
        gw.stop()
