"""``priority`` and ``tenant`` in POST /infer bodies (and ``nexus submit``'s lines, the bridge's
submit frames): accepted, defaulted, or refused with a 400 naming the field; the tenant rule."""

from __future__ import annotations

import json

import pytest

from schemas import validation
from schemas.limits import MAX_TENANT_LENGTH
from schemas.validation import RejectedRequest, effective_tenant, parse_infer_body

MODELS = ("llama3.1",)


def _parse(**fields: object):
    return parse_infer_body(json.dumps({"model_id": "llama3.1", "input": "hi", **fields}).encode(), MODELS)


def _rejected(**fields: object) -> RejectedRequest:
    with pytest.raises(RejectedRequest) as info:
        _parse(**fields)
    assert info.value.status == 400
    return info.value


def test_priority_and_tenant_are_carried_to_the_request() -> None:
    request = _parse(priority="batch", tenant="team-a")
    assert (request.priority, request.tenant) == ("batch", "team-a")


def test_absent_or_null_they_default_to_interactive_and_no_tenant() -> None:
    for request in (_parse(), _parse(priority=None, tenant=None)):
        assert (request.priority, request.tenant) == ("interactive", None)
        assert request.tenant_or_session == request.context.session_id


@pytest.mark.parametrize("value", ["urgent", "", "Batch", 1, True, ["batch"]])
def test_an_unknown_priority_is_a_400_naming_the_classes(value: object) -> None:
    error = _rejected(priority=value)
    assert error.message.startswith("'priority' must be one of interactive, batch, got ")
    assert error.param == "priority"


@pytest.mark.parametrize("value, message", [
    ("", "'tenant' must be a non-empty string"),
    (7, "'tenant' must be a non-empty string"),
    ("t" * (MAX_TENANT_LENGTH + 1), f"'tenant' is longer than {MAX_TENANT_LENGTH} characters"),
])
def test_a_bad_tenant_is_a_400(value: object, message: str) -> None:
    error = _rejected(tenant=value)
    assert error.message == message and error.param == "tenant"


def test_the_longest_tenant_is_accepted() -> None:
    assert _parse(tenant="t" * MAX_TENANT_LENGTH).tenant == "t" * MAX_TENANT_LENGTH


def test_a_long_bad_priority_is_not_echoed_whole() -> None:
    assert len(_rejected(priority="x" * 10_000).message) < 200


def test_the_field_checks_are_shared() -> None:
    assert validation.priority(None) == "interactive" and validation.priority("batch", "p") == "batch"
    with pytest.raises(RejectedRequest, match="'frame.priority' must be one of interactive, batch"):
        validation.priority("now", "frame.priority")
    assert validation.tenant(None) is None and validation.tenant("a") == "a"
    for name in ("priority", "tenant", "effective_tenant"):
        assert name in validation.__all__


def test_the_effective_tenant_is_the_key_then_the_given_tenant_then_the_session() -> None:
    assert effective_tenant("key-a", "team-b", "s1") == "key-a"  # with keys on, a client cannot pick another
    assert effective_tenant(None, "team-b", "s1") == "team-b"
    assert effective_tenant(None, None, "s1") == "s1"
    assert effective_tenant(None, "", "s1") == "s1"
