"""Marks every test by its tier, from the folder it lives in.

``pytest -m unit`` (or ``pytest tests/unit``) runs the in-process tier alone;
``pytest -m integration`` the tier that needs a broker. The broker fixtures live
in ``tests/integration/conftest.py``, so the unit tier never starts one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_HERE = Path(__file__).parent

# The broker's jars (~100 MB) stay in the checkout's git-ignored .cache/, as under `make test`
# (NEXUS_HOME, see localdev/home.py); role subprocesses inherit it. An explicit value wins.
os.environ.setdefault("NEXUS_HOME", str(_HERE.parent / ".cache"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.path)).relative_to(_HERE).parts[0]
        if tier in ("unit", "integration"):
            item.add_marker(tier)
