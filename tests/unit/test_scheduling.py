"""The schedule's order: class, then weighted fair share among tenants, then deadline."""

from __future__ import annotations

from collections import Counter

from streams.answering.scheduling import Schedule, Ticket


def _ticket(id_: str, tenant: str, priority: str = "interactive", deadline: float = float("inf"),
            max_tokens: int | None = 100) -> Ticket:
    return Ticket(id_, tenant, priority, deadline, prompt_tokens=0.0, max_tokens=max_tokens)


def _drain(schedule: Schedule, n: int | None = None) -> list[Ticket]:
    out = []
    while (n is None or len(out) < n) and (t := schedule.pop()) is not None:
        out.append(t)
    return out


def test_every_interactive_request_starts_before_any_batch_one_whatever_came_first() -> None:
    schedule = Schedule()
    for i in range(5):
        schedule.add(_ticket(f"b{i}", "a", "batch"))
    schedule.add(_ticket("i0", "b"))
    schedule.add(_ticket("i1", "a"))
    assert [t.id for t in _drain(schedule)] == ["i0", "i1", "b0", "b1", "b2", "b3", "b4"]


def test_backlogged_tenants_share_starts_by_their_weights() -> None:
    weights = {"a": 1.0, "b": 2.0, "c": 1.0}
    schedule = Schedule(weights.__getitem__)
    for tenant in weights:
        for i in range(400):  # unequal demand does not matter while all are backlogged
            schedule.add(_ticket(f"{tenant}{i}", tenant))
    started = Counter(t.tenant for t in _drain(schedule, 400))
    assert abs(started["a"] - 100) <= 10 and abs(started["b"] - 200) <= 20 and abs(started["c"] - 100) <= 10


def test_a_light_tenant_is_not_stuck_behind_a_heavy_one_that_queued_first() -> None:
    schedule = Schedule()
    for i in range(1000):
        schedule.add(_ticket(f"a{i}", "a"))
    for i in range(3):
        schedule.add(_ticket(f"b{i}", "b"))
    first = [t.id for t in _drain(schedule, 6)]
    assert set(first) >= {"b0", "b1", "b2"}


def test_within_a_tenant_the_earliest_deadline_starts_first_then_arrival() -> None:
    schedule = Schedule()
    schedule.add(_ticket("late", "a", deadline=50.0))
    schedule.add(_ticket("none", "a"))
    schedule.add(_ticket("soon", "a", deadline=10.0))
    schedule.add(_ticket("late2", "a", deadline=50.0))
    assert [t.id for t in _drain(schedule)] == ["soon", "late", "late2", "none"]


def test_an_idle_tenant_banks_no_credit() -> None:
    """A tenant that had the model to itself does not then yield it for as long to a newcomer."""
    schedule = Schedule()
    for i in range(100):
        schedule.started(_ticket(f"a-alone{i}", "a"))  # started without waiting: charged all the same
    for i in range(10):
        schedule.add(_ticket(f"a{i}", "a"))
        schedule.add(_ticket(f"b{i}", "b"))
    first_ten = Counter(t.tenant for t in _drain(schedule, 10))
    assert first_ten["a"] >= 4, "b came back at the current virtual time, not at zero"


def test_a_tenant_whose_answers_cost_more_than_expected_gets_fewer_starts() -> None:
    schedule = Schedule()
    for i in range(300):
        schedule.add(_ticket(f"a{i}", "a"))
        schedule.add(_ticket(f"b{i}", "b"))
    started = Counter()
    for _ in range(200):
        ticket = schedule.pop()
        assert ticket is not None
        started[ticket.tenant] += 1
        schedule.finished(ticket, 400.0 if ticket.tenant == "a" else 100.0)  # a's answers are 4x longer
    assert started["b"] > 2.5 * started["a"]


def test_a_ticket_given_back_keeps_its_turn_and_its_tenant_is_refunded() -> None:
    schedule = Schedule()
    schedule.add(_ticket("a0", "a"))
    schedule.add(_ticket("b0", "b"))
    schedule.add(_ticket("a1", "a"))
    first = schedule.pop()
    assert first is not None and first.id == "a0"
    schedule.giveback(first)
    assert [t.id for t in _drain(schedule)] == ["a0", "b0", "a1"]


def test_the_reported_order_is_the_order_they_start_in() -> None:
    schedule = Schedule({"a": 1.0, "b": 3.0}.__getitem__)
    for i in range(20):
        schedule.add(_ticket(f"a{i}", "a", deadline=float(100 - i)))
        schedule.add(_ticket(f"b{i}", "b", "batch" if i % 3 == 0 else "interactive"))
    predicted = [t.id for t in schedule.order()]
    assert [t.id for t in schedule.order(limit=5)] == predicted[:5]
    assert [t.id for t in _drain(schedule)] == predicted


def test_removed_tickets_never_start_and_the_counts_follow() -> None:
    schedule = Schedule()
    tickets = [_ticket(f"r{i}", "a" if i % 2 else "b", "batch" if i > 6 else "interactive") for i in range(10)]
    for t in tickets:
        schedule.add(t)
    assert schedule.remove(tickets[3]) and not schedule.remove(tickets[3])
    assert len(schedule) == 9 and schedule.waiting_by_class() == {"interactive": 6, "batch": 3}
    assert "r3" not in [t.id for t in _drain(schedule)]
    assert len(schedule) == 0 and schedule.pop() is None


def test_tenants_that_come_and_go_are_forgotten() -> None:
    schedule = Schedule()
    for i in range(5000):  # one tenant per session: each comes once
        ticket = _ticket(f"r{i}", f"session-{i}")
        schedule.add(ticket)
        popped = schedule.pop()
        assert popped is ticket
        schedule.finished(popped, 100.0)
    assert len(schedule._classes[0].tenants) <= 1100


def test_equal_deadlines_and_none_keep_arrival_order() -> None:
    schedule = Schedule()
    for i in range(5):
        schedule.add(_ticket(f"none{i}", "a"))
    for i in range(5):
        schedule.add(_ticket(f"same{i}", "a", deadline=1_800_000_000.0))
    assert [t.id for t in _drain(schedule)] == [f"same{i}" for i in range(5)] + [f"none{i}" for i in range(5)]
