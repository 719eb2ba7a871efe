"""The worker's request ledger (pure): commits never pass an unanswered request, whatever happens.

The property test plays two workers sharing partitions of a log through random fetches, starts,
answers, commits, rebalances (stale deliveries from the old generation included), seeks back to
the committed offset, kills and holes in the offsets, and checks at every commit that each
request below the committed offset has a durable answer; at the end every request is answered.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.commits.ledger import RequestLedger, Verdict


def test_answers_finishing_out_of_order_commit_only_the_answered_prefix() -> None:
    ledger: RequestLedger[str] = RequestLedger()
    ledger.assign({"p0"}, generation=1)
    for offset in (10, 11, 12):
        assert ledger.deliver("p0", offset, 1) is Verdict.NEW
        assert ledger.start("p0", offset)
    ledger.answered("p0", 12)
    ledger.answered("p0", 11)
    assert ledger.committable() == {"p0": 10}
    ledger.answered("p0", 10)
    assert ledger.committable() == {"p0": 13}


def test_a_redelivery_of_a_running_or_answered_request_is_not_answered_again() -> None:
    ledger: RequestLedger[str] = RequestLedger()
    ledger.assign({"p0"}, generation=1)
    for offset in (0, 1, 2):
        ledger.deliver("p0", offset, 1)
        ledger.start("p0", offset)
    ledger.answered("p0", 1)
    ledger.revoke({"p0"})
    ledger.assign({"p0"}, generation=2)  # the seek brings 0.. again
    assert [ledger.deliver("p0", o, 2) for o in (0, 1, 2, 3)] == [
        Verdict.RUNNING, Verdict.ANSWERED, Verdict.RUNNING, Verdict.NEW
    ]
    # The KeyError of issue 11: a second delivery finishing is harmless.
    ledger.answered("p0", 1)
    assert ledger.committable() == {"p0": 0}


def test_a_revocation_drops_queued_requests_and_the_commit_stops_below_them() -> None:
    ledger: RequestLedger[str] = RequestLedger()
    ledger.assign({"p0"}, generation=1)
    for offset in range(5):
        ledger.deliver("p0", offset, 1)
    # Dispatch order is not offset order (identical requests share a call): 3 runs first.
    assert ledger.start("p0", 0) and ledger.start("p0", 3)
    ledger.answered("p0", 0)
    ledger.answered("p0", 3)
    assert ledger.revoke({"p0"}) == {"p0": 1}
    assert not ledger.start("p0", 1)  # dropped: its next owner reads it again
    ledger.assign({"p0"}, generation=2)
    assert ledger.committable() == {"p0": 1}  # not past 1, 2 although 3 is answered
    assert [ledger.deliver("p0", o, 2) for o in (1, 2, 3, 4)] == [
        Verdict.NEW, Verdict.NEW, Verdict.ANSWERED, Verdict.NEW
    ]


def test_a_started_request_dropped_before_its_model_call_holds_the_commit_until_read_again() -> None:
    ledger: RequestLedger[str] = RequestLedger()
    ledger.assign({"p0"}, generation=1)
    for offset in range(3):
        ledger.deliver("p0", offset, 1)
        ledger.start("p0", offset)
    ledger.answered("p0", 0)
    ledger.answered("p0", 2)
    ledger.drop("p0", 1)  # was waiting for an endpoint slot when its partition was revoked
    ledger.drop("p0", 2)  # answered already: stays answered
    assert ledger.revoke({"p0"}) == {"p0": 1}
    ledger.assign({"p0"}, generation=2)
    assert [ledger.deliver("p0", o, 2) for o in (1, 2)] == [Verdict.NEW, Verdict.ANSWERED]


def test_deliveries_of_an_older_generation_or_a_lost_partition_are_stale() -> None:
    ledger: RequestLedger[str] = RequestLedger()
    ledger.assign({"p0", "p1"}, generation=1)
    ledger.deliver("p0", 0, 1)
    ledger.start("p0", 0)
    ledger.revoke({"p0", "p1"})
    assert ledger.deliver("p0", 1, 1) is Verdict.STALE  # while revoked
    ledger.assign({"p1"}, generation=2)
    assert ledger.deliver("p1", 0, 1) is Verdict.STALE  # the take buffer's old events
    assert ledger.deliver("p0", 1, 2) is Verdict.STALE  # not ours any more
    ledger.answered("p0", 0)  # a running answer of a lost partition is ignored
    assert ledger.committable() == {}
    assert ledger.deliver("p1", 0, 2) is Verdict.NEW


def test_a_hole_in_the_run_holds_the_commit_until_read_or_shown_empty() -> None:
    ledger: RequestLedger[str] = RequestLedger()
    ledger.assign({"p0"}, generation=1, committed={"p0": 4})
    for offset in (4, 5, 9, 10):  # 6-8 skipped: Faust fetched past them, or markers
        ledger.deliver("p0", offset, 1)
        ledger.start("p0", offset)
        ledger.answered("p0", offset)
    assert ledger.committable() == {"p0": 6}
    assert ledger.holes() == {"p0": (6, 9)}
    ledger.deliver("p0", 6, 1)  # read again after a seek
    assert ledger.holes() == {"p0": (7, 9)}
    ledger.no_records("p0", 7, 9)  # the broker has none there
    assert ledger.holes() == {}
    assert ledger.committable() == {"p0": 6}  # 6 is not answered yet
    ledger.start("p0", 6)
    ledger.answered("p0", 6)
    assert ledger.committable() == {"p0": 11}


def test_the_committed_offset_starts_the_run_not_the_first_delivery() -> None:
    ledger: RequestLedger[str] = RequestLedger()
    ledger.assign({"p0"}, generation=1, committed={"p0": 100})
    ledger.deliver("p0", 150, 1)  # fetched before Faust's seek back to the committed offset
    ledger.start("p0", 150)
    ledger.answered("p0", 150)
    assert ledger.committable() == {}  # 100 is committed already; 100-149 are not answered
    assert ledger.answered_below("p0") == 100
    assert ledger.deliver("p0", 99, 1) is Verdict.ANSWERED  # below the committed offset


# -- the property --------------------------------------------------------------------------

PARTITIONS = ("p0", "p1")


@dataclass
class Worker:
    ledger: RequestLedger[str] = field(default_factory=RequestLedger)
    queued: list[tuple[str, int, int]] = field(default_factory=list)  # (tp, offset, generation)
    running: list[tuple[str, int]] = field(default_factory=list)
    position: dict[str, int] = field(default_factory=dict)


@dataclass
class World:
    logs: dict[str, list[int]]  # the offsets that are records (holes are markers)
    workers: list[Worker]
    owner: dict[str, int]
    generation: int = 1
    committed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    answers: Counter[tuple[str, int]] = field(default_factory=Counter)
    stale: list[tuple[int, str, int, int]] = field(default_factory=list)

    def check_commit(self, w: Worker, offsets: dict[str, int]) -> None:
        for tp, offset in offsets.items():
            missing = [o for o in self.logs[tp] if o < offset and not self.answers[(tp, o)]]
            assert not missing, f"commit of {tp}@{offset} passes unanswered {missing}"
            self.committed[tp] = max(self.committed[tp], offset)
        w.ledger.committed(offsets)

    def fetch(self, i: int, tp: str, n: int, skip: int = 0) -> None:
        """Deliver up to n records from the position; ``skip`` records are lost on the way (Faust)."""
        w = self.workers[i]
        if self.owner.get(tp) != i:
            return
        pos = w.position.setdefault(tp, self.committed[tp])
        records = [o for o in self.logs[tp] if o >= pos]
        if skip and records:
            w.position[tp] = records[min(skip, len(records) - 1)]
            records = records[skip:]
        for offset in records[:n]:
            verdict = w.ledger.deliver(tp, offset, self.generation)
            assert verdict is not Verdict.STALE
            if verdict is Verdict.NEW:
                w.queued.append((tp, offset, self.generation))
            w.position[tp] = offset + 1

    def start(self, i: int, pick: int) -> None:
        w = self.workers[i]
        if w.queued:
            tp, offset, _ = w.queued.pop(pick % len(w.queued))
            if w.ledger.start(tp, offset):
                w.running.append((tp, offset))

    def answer(self, i: int, pick: int) -> None:
        w = self.workers[i]
        if w.running:
            tp, offset = w.running.pop(pick % len(w.running))
            self.answers[(tp, offset)] += 1
            w.ledger.answered(tp, offset)

    def commit(self, i: int) -> None:
        w = self.workers[i]
        self.check_commit(w, w.ledger.committable())

    def resolve_holes(self, i: int) -> None:
        """The worker's hole check: records in a hole are read again (seek), an empty one is filled."""
        w = self.workers[i]
        for tp, (start, end) in w.ledger.holes().items():
            if any(start <= o < end for o in self.logs[tp]):
                w.position[tp] = start
            else:
                w.ledger.no_records(tp, start, end)

    def rebalance(self, rng: random.Random, kill: int | None) -> None:
        for i, w in enumerate(self.workers):
            owned = [tp for tp, o in self.owner.items() if o == i]
            # Requests still waiting for an endpoint slot are cancelled, unanswered.
            waiting = [(tp, o) for tp, o in w.running if tp in owned and rng.random() < 0.5]
            for tp, offset in waiting:
                w.running.remove((tp, offset))
                w.ledger.drop(tp, offset)
            self.check_commit(w, w.ledger.revoke(owned))
            # Faust drops what it fetched and had not delivered; some delivered events are
            # still in the take buffer and arrive after the rebalance, with the old generation.
            self.stale.extend((i, tp, o, g) for tp, o, g in w.queued)
            if rng.random() < 0.5:  # else the fetch goes on from where it was, before Faust's seek
                w.position.clear()
        if kill is not None:
            self.workers[kill] = Worker()  # running calls die with it, unanswered
        self.generation += 1
        self.owner = {tp: rng.randrange(len(self.workers)) for tp in PARTITIONS}
        for i, w in enumerate(self.workers):
            owned = {tp for tp, o in self.owner.items() if o == i}
            w.ledger.assign(owned, self.generation, {tp: self.committed[tp] for tp in owned})
            for tp in list(w.position):
                if tp not in owned:
                    del w.position[tp]

    def deliver_stale(self) -> None:
        for i, tp, offset, generation in self.stale:
            assert self.workers[i].ledger.deliver(tp, offset, generation) is Verdict.STALE
        self.stale.clear()


OPS = st.lists(
    st.tuples(st.sampled_from(["fetch", "skip", "start", "answer", "commit", "rebalance", "kill", "stale", "holes"]),
              st.integers(0, 1), st.integers(0, 50), st.sampled_from(PARTITIONS)),
    max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(ops=OPS, seed=st.integers(0, 2**16), holes=st.sets(st.integers(0, 29), max_size=6))
def test_commits_never_pass_an_unanswered_request_and_everything_is_answered(
    ops: list[tuple[str, int, int, str]], seed: int, holes: set[int]
) -> None:
    rng = random.Random(seed)
    logs = {tp: [o for o in range(30) if o not in holes] for tp in PARTITIONS}
    world = World(logs=logs, workers=[Worker(), Worker()], owner={"p0": 0, "p1": 1})
    for i, w in enumerate(world.workers):
        w.ledger.assign({tp for tp, o in world.owner.items() if o == i}, world.generation,
                        {"p0": 0, "p1": 0})
    for op, i, n, tp in ops:
        if op == "fetch":
            world.fetch(i, tp, n % 8 + 1)
        elif op == "skip":
            world.fetch(i, tp, n % 8 + 1, skip=n % 3 + 1)
        elif op == "holes":
            world.resolve_holes(i)
        elif op == "start":
            world.start(i, n)
        elif op == "answer":
            world.answer(i, n)
        elif op == "commit":
            world.commit(i)
        elif op == "rebalance":
            world.rebalance(rng, None)
        elif op == "kill":
            world.rebalance(rng, i)
        else:
            world.deliver_stale()
    # Drain: one more rebalance, then Faust's seek to the committed offsets (a fetch may go on
    # from where it was before that seek, never instead of it), then the owners work until
    # everything is committed.
    world.rebalance(rng, None)
    for w in world.workers:
        w.position.clear()
    for _ in range(200):
        for i in range(2):
            for tp in PARTITIONS:
                world.fetch(i, tp, 8)
            while world.workers[i].queued:
                world.start(i, 0)
            while world.workers[i].running:
                world.answer(i, 0)
            world.commit(i)
            world.resolve_holes(i)
        if all(world.committed[tp] > logs[tp][-1] for tp in PARTITIONS):
            break
    for tp in PARTITIONS:
        assert world.committed[tp] == logs[tp][-1] + 1
        assert all(world.answers[(tp, o)] >= 1 for o in logs[tp])


@settings(max_examples=200, deadline=None)
@given(ops=OPS)
def test_a_worker_that_keeps_its_partitions_through_rebalances_calls_the_model_once_per_request(
    ops: list[tuple[str, int, int, str]]
) -> None:
    logs = {tp: list(range(30)) for tp in PARTITIONS}
    world = World(logs=logs, workers=[Worker()], owner={"p0": 0, "p1": 0})
    world.workers[0].ledger.assign(set(PARTITIONS), world.generation)
    rng = random.Random(0)
    for op, _, n, tp in ops:
        if op == "fetch":
            world.fetch(0, tp, n % 8 + 1)
        elif op == "start":
            world.start(0, n)
        elif op == "answer":
            world.answer(0, n)
        elif op == "commit":
            world.commit(0)
        elif op in ("rebalance", "kill"):
            world.rebalance(rng, None)  # one worker: it gets everything back
        else:
            world.deliver_stale()
    assert max(world.answers.values(), default=0) <= 1
