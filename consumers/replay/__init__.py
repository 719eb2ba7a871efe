"""``nexus replay``: read Nexus's topics over a time range, for audit, without joining a group.

The pure decisions (times, filters, decoding, the join report) and the errors load with the
package; the Kafka shell (:mod:`consumers.replay.reader`, which pulls in aiokafka and the
producer) loads on first use of one of its names, so ``nexus --help`` stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consumers.replay.audit import RecordFilter, ReplayRecord, parse_time
from consumers.replay.errors import ReplayArgumentError, ReplayError, ReplayKafkaError, ReplayStalledError
from consumers.replay.join import Joiner, JoinReport

if TYPE_CHECKING:
    from consumers.replay.reader import (
        RangeReader,
        ReplayOptions,
        Resubmitted,
        join_report,
        replay_records,
        resubmit,
    )

__all__ = [
    # reading a range (consumers.replay.reader)
    "RangeReader", "ReplayOptions", "replay_records", "join_report", "resubmit", "Resubmitted",
    # what is read and how it is selected
    "RecordFilter", "ReplayRecord", "parse_time", "Joiner", "JoinReport",
    # errors
    "ReplayError", "ReplayArgumentError", "ReplayKafkaError", "ReplayStalledError",
]

_READER_NAMES = frozenset({"RangeReader", "ReplayOptions", "replay_records", "join_report", "resubmit", "Resubmitted"})


def __getattr__(name: str) -> Any:
    if name in _READER_NAMES:
        from consumers.replay import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
