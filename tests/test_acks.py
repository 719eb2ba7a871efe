"""In-order acknowledgement of out-of-order answers (pure)."""

from streams.acks import InOrderAcks


def test_an_answer_finishing_early_waits_for_the_ones_before_it() -> None:
    acks: InOrderAcks[str] = InOrderAcks()
    for offset in (10, 11, 12):
        acks.add("p0", offset, f"e{offset}")
    assert acks.done("p0", 12) == []
    assert acks.done("p0", 11) == []
    assert acks.done("p0", 10) == ["e10", "e11", "e12"]
    assert acks.outstanding() == 0


def test_partitions_are_independent() -> None:
    acks: InOrderAcks[str] = InOrderAcks()
    acks.add("p0", 5, "a")
    acks.add("p1", 7, "b")
    acks.add("p0", 6, "c")
    assert acks.done("p1", 7) == ["b"]
    assert acks.done("p0", 6) == []
    assert acks.outstanding() == 2
    assert acks.done("p0", 5) == ["a", "c"]
