"""One running service (tests/client/stack.py) for every client test in this folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.stack import FaultProxy, Stack, run_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    yield from run_stack(tmp_path_factory.mktemp("client-stack"), tiny_model_dir)


@pytest.fixture
def proxy(stack: Stack) -> Iterator[FaultProxy]:
    fault_proxy = FaultProxy(stack.base)
    try:
        yield fault_proxy
    finally:
        fault_proxy.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every client and playground test starts a whole stack (uvicorn, a worker, chromium): `make test-slow`."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)
