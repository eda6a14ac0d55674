"""A pytest plugin for tests/unit/test_workers.py: each worker writes the test ids it collected,
in its order, to ``$ORDER_PROBE_DIR/<worker>``, then deselects them all (nothing boots)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.hookimpl(trylast=True)  # after pytest-xdist has added the groups to the ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    out = Path(os.environ["ORDER_PROBE_DIR"]) / worker
    out.write_text("".join(f"{item.nodeid}\n" for item in items))
    config.hook.pytest_deselected(items=list(items))
    items[:] = []
