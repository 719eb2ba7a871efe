"""One exception root: everything Nexus raises on purpose is a NexusError.

A user (or a role) that wants to tell Nexus's own refusals from bugs catches
:class:`nexus.errors.NexusError`; the tree in its docstring names every class.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

from nexus.errors import NexusError
from tests.unit.test_layout import MODULES

# Modules that need optional or heavy runtime pieces are still importable here; keep it that way.
EXCEPTIONS = sorted(
    {
        (obj.__module__, obj.__qualname__): obj
        for name in MODULES
        if not name.endswith("__main__")
        for obj in vars(importlib.import_module(name)).values()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name
    }.items()
)


@pytest.mark.parametrize("where, cls", EXCEPTIONS, ids=[f"{m}.{q}" for (m, q), _ in EXCEPTIONS])
def test_every_exception_derives_from_the_root(where: tuple[str, str], cls: type[BaseException]) -> None:
    assert issubclass(cls, NexusError), f"{where[0]}.{where[1]} should derive from nexus.errors.NexusError"


def test_the_root_docstring_names_every_exception() -> None:
    doc = importlib.import_module("nexus.errors").__doc__ or ""
    missing = sorted(q for (_, q), _ in EXCEPTIONS if q not in doc)
    assert not missing, f"nexus/errors.py's tree does not name {missing}"


def test_errors_users_catch_keep_their_standard_bases() -> None:
    from nexus.settings import ConfigError
    from producers import ResponseTimeoutError
    from schemas import SchemaError
    from schemas.validation import RejectedRequest

    assert issubclass(ConfigError, ValueError) and issubclass(SchemaError, ValueError)
    assert issubclass(RejectedRequest, ValueError) and issubclass(ResponseTimeoutError, TimeoutError)
