"""The suite's waiting helper: returns the first truthy value, fails with what never happened."""

from __future__ import annotations

import pytest

from tests.eventually import eventually, eventually_sync


async def test_returns_the_first_truthy_value_of_a_sync_or_async_check() -> None:
    calls = iter([0, None, "ready"])
    assert await eventually(lambda: next(calls), "a value", interval=0) == "ready"

    async def later() -> int:
        return 7

    assert await eventually(later, "an async value", interval=0) == 7


async def test_fails_naming_what_never_happened_and_the_last_error() -> None:
    def broken() -> bool:
        raise KeyError("gone")

    with pytest.raises(AssertionError, match=r"never happened within 0.05 s: the key \(last: KeyError\('gone'\)\)\nlog"):
        await eventually(broken, "the key", timeout=0.05, interval=0.01, context=lambda: "log")


def test_sync_variant_waits_and_fails_the_same_way() -> None:
    seen = []
    assert eventually_sync(lambda: seen.append(1) or len(seen) >= 3, "three calls", interval=0) is True
    with pytest.raises(AssertionError, match="never happened within 0.02 s: nothing"):
        eventually_sync(lambda: False, "nothing", timeout=0.02, interval=0.005)
