"""Which requests of each owned partition are answered, and how far its offset may be committed.

The worker reads ``inference.requests`` in batches and answers them concurrently, so answers
finish out of offset order; Kafka, Faust and rebalances add their own disorder: a rebalance drops
records Faust fetched but the worker had not started, seeks back to the committed offset and
delivers again offsets whose first delivery may still be in flight. The ledger keeps the facts
straight, with no I/O, so every case can be tested in microseconds:

- each delivered offset is ``queued`` (read, not yet given to a model), ``running`` or
  ``answered`` (its answer records are durable);
- a delivery of an offset the ledger already holds is a duplicate and is not answered again:
  :meth:`RequestLedger.deliver` says :attr:`Verdict.RUNNING` or :attr:`Verdict.ANSWERED`;
- deliveries from an older consumer generation, or of a partition this worker no longer owns,
  are :attr:`Verdict.STALE`: dropped unstarted, the partition's owner reads them again;
- a revocation drops the partition's queued requests (its next owner, maybe this worker again,
  reads them again) and keeps the running ones, whose answers still count if it comes back;
- the committable offset of a partition is its lowest request not answered, or, with none,
  the next offset to read: never past an unanswered request, whatever order things happened in.

Nothing about Faust's or Kafka's delivery order is trusted: a partition's run of offsets starts
at its committed offset and must be contiguous. A delivery past the next expected offset (Faust
resumes fetching before it seeks back, drops records on a rebalance, ...) leaves a *hole* that
the commit cannot pass: :meth:`RequestLedger.holes` names them, and the worker either reads them
again (a seek) or, once the broker shows there is no record there (transaction markers, a log
start past the committed offset), fills them with :meth:`RequestLedger.no_records`.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class Verdict(enum.Enum):
    NEW = "new"  # answer it
    RUNNING = "running"  # a duplicate of a delivery being answered: nothing to do
    ANSWERED = "answered"  # a duplicate of an answered request: nothing to do
    STALE = "stale"  # from an older generation or a partition not owned: drop it unstarted


class _State(enum.Enum):
    QUEUED = 0
    RUNNING = 1
    ANSWERED = 2


@dataclass
class _Partition:
    # Every offset below ``floor`` is answered (or is no record); None until the first delivery.
    floor: int | None = None
    # Every offset in [floor, frontier) is in ``entries`` or is known to be no record.
    frontier: int | None = None
    entries: dict[int, _State] = field(default_factory=dict)
    committed: int | None = None  # the last offset committed (or known committed) by this worker
    suspended: bool = False  # revoked; kept only in case the next assignment gives it back


class RequestLedger(Generic[P]):
    """The answered state of every request in the partitions this worker owns."""

    def __init__(self) -> None:
        self._partitions: dict[P, _Partition] = {}
        self.generation: int | None = None
        # Diagnostics: offsets found past a hole the ledger had taken for "no record".
        self.late_deliveries = 0

    # -- ownership ------------------------------------------------------------------------

    def revoke(self, partitions: Iterable[P]) -> dict[P, int]:
        """The partitions are being revoked: drop their queued requests.

        Returns the offsets to commit for them before the revocation completes.
        """
        offsets = {}
        for tp in partitions:
            part = self._partitions.get(tp)
            if part is None:
                continue
            dropped = [offset for offset, state in part.entries.items() if state is _State.QUEUED]
            for queued in dropped:
                del part.entries[queued]
            if dropped and part.frontier is not None:
                part.frontier = min(part.frontier, min(dropped))
            part.suspended = True
            offset = self._advance(part)
            if offset is not None and (part.committed is None or offset > part.committed):
                offsets[tp] = offset
        return offsets

    def assign(self, partitions: Iterable[P], generation: int, committed: dict[P, int] | None = None) -> None:
        """The consumer's new assignment: deliveries of any other generation are stale from now on.

        Partitions kept from the previous assignment keep their state (their running requests
        absorb the deliveries the seek back to the committed offset brings again); partitions
        no longer assigned are forgotten, and their running requests' answers are ignored.
        """
        assigned = set(partitions)
        committed = committed or {}
        for tp in list(self._partitions):
            if tp not in assigned:
                del self._partitions[tp]
        for tp in assigned:
            part = self._partitions.get(tp)
            offset = committed.get(tp)
            if part is None:
                part = self._partitions[tp] = _Partition(floor=offset, frontier=offset, committed=offset)
            elif offset is not None and (part.floor is None or offset > part.floor):
                # Committed further by another owner meanwhile (this worker was out of the group).
                part.floor = offset
                part.frontier = max(part.frontier or offset, offset)
                part.committed = offset
                for o in [o for o in part.entries if o < offset]:
                    del part.entries[o]
            part.suspended = False
        self.generation = generation

    def knows(self, tp: P) -> bool:
        """``tp`` is owned, or was until a revocation whose next assignment is not known yet."""
        return tp in self._partitions

    # -- requests -------------------------------------------------------------------------

    def deliver(self, tp: P, offset: int, generation: int) -> Verdict:
        """A record was delivered; say whether to answer it."""
        part = self._partitions.get(tp)
        if part is None or part.suspended or generation != self.generation:
            return Verdict.STALE
        if part.floor is None or part.frontier is None:  # committed offset unknown: trust the first
            part.floor = part.frontier = offset
        if offset < part.floor:
            return Verdict.ANSWERED
        state = part.entries.get(offset)
        if state is None:
            if offset < part.frontier:
                self.late_deliveries += 1  # a record where none was known to be: answer it
            part.entries[offset] = _State.QUEUED
        self._extend(part)
        if state is None:
            return Verdict.NEW
        return Verdict.ANSWERED if state is _State.ANSWERED else Verdict.RUNNING

    def start(self, tp: P, offset: int) -> bool:
        """A queued request is about to be answered; False if it was dropped meanwhile (revoked)."""
        part = self._partitions.get(tp)
        if part is None or part.suspended or part.entries.get(offset) is not _State.QUEUED:
            return False
        part.entries[offset] = _State.RUNNING
        return True

    def drop(self, tp: P, offset: int) -> None:
        """A started request was stopped before it called a model: its partition's owner reads it
        again, so the commit must stop below it."""
        part = self._partitions.get(tp)
        if part is None or part.entries.get(offset, _State.ANSWERED) is _State.ANSWERED:
            return
        del part.entries[offset]
        if part.frontier is not None:
            part.frontier = min(part.frontier, offset)

    def answered(self, tp: P, offset: int) -> None:
        """The request's answer records are durable (ignored for a partition lost meanwhile)."""
        part = self._partitions.get(tp)
        if part is not None and offset in part.entries:
            part.entries[offset] = _State.ANSWERED

    def holes(self) -> dict[P, tuple[int, int]]:
        """Per owned partition with a hole: its first offset and the first delivered offset above
        it. The commit stops at the hole until it is read again or shown to hold no record."""
        found = {}
        for tp, part in self._partitions.items():
            if part.suspended or part.frontier is None:
                continue
            above = [o for o in part.entries if o > part.frontier]
            if above:
                found[tp] = (part.frontier, min(above))
        return found

    def no_records(self, tp: P, start: int, end: int) -> None:
        """The broker holds no record of ``tp`` in [start, end): the hole there is none."""
        part = self._partitions.get(tp)
        if part is not None and part.frontier is not None and start <= part.frontier < end:
            part.frontier = end
            self._extend(part)

    # -- commits --------------------------------------------------------------------------

    def committable(self) -> dict[P, int]:
        """The offsets to commit now: per owned partition, where it moved past the last commit."""
        offsets = {}
        for tp, part in self._partitions.items():
            if part.suspended:
                continue
            offset = self._advance(part)
            if offset is not None and (part.committed is None or offset > part.committed):
                offsets[tp] = offset
        return offsets

    def committed(self, offsets: dict[P, int]) -> None:
        """Kafka accepted the commit of ``offsets``."""
        for tp, offset in offsets.items():
            part = self._partitions.get(tp)
            if part is not None and (part.committed is None or offset > part.committed):
                part.committed = offset

    def answered_below(self, tp: P) -> int | None:
        """Every request of ``tp`` below this offset is answered."""
        part = self._partitions.get(tp)
        return None if part is None else self._advance(part)

    def read_up_to(self, tp: P) -> int | None:
        """The first offset of ``tp`` not delivered yet (every one below was, or holds no record)."""
        part = self._partitions.get(tp)
        return None if part is None else part.frontier

    def describe(self) -> dict[P, dict[str, object]]:
        """Each owned partition's state, for ``/health``."""
        return {
            tp: {
                "answered_below": part.floor,
                "read_up_to": part.frontier,
                "committed": part.committed,
                "queued": sum(1 for s in part.entries.values() if s is _State.QUEUED),
                "running": sum(1 for s in part.entries.values() if s is _State.RUNNING),
                "answered_above": sum(1 for s in part.entries.values() if s is _State.ANSWERED),
                "revoked": part.suspended,
            }
            for tp, part in self._partitions.items()
        }

    @staticmethod
    def _extend(part: _Partition) -> None:
        """Move the frontier over the delivered offsets that continue the run."""
        assert part.frontier is not None
        while part.frontier in part.entries:
            part.frontier += 1

    @staticmethod
    def _advance(part: _Partition) -> int | None:
        """Move the floor up to the lowest unanswered request; forget the answered ones below."""
        if part.floor is None or part.frontier is None:
            return None
        floor = min(
            (offset for offset, state in part.entries.items() if state is not _State.ANSWERED),
            default=part.frontier,
        )
        floor = min(floor, part.frontier)
        if floor > part.floor:
            part.floor = floor
            for offset in [o for o in part.entries if o < floor]:
                del part.entries[offset]
        return part.floor
