"""When the requests a lane has read are handed over as a batch: the rule, without I/O.

A batch window pays only when something shares it: identical requests answered by one call, or
fewer rounds of per-batch work under load. A lone request gains nothing from waiting for
company, so a batch is handed over as soon as the stream has nothing more ready; the window
(``worker.max_wait_ms``) only bounds how long a steady trickle of arrivals is held together.
The asynchronous buffer that applies this rule is :class:`streams.intake.ReadyBatches`.
"""

from __future__ import annotations

from dataclasses import dataclass

# Turns of the event loop with no new arrival after which the stream counts as having nothing
# more ready. The worker's consumer delivers the records of one fetch in one go
# (streams/consumer.py), and the lane's reader takes them from the stream a turn or two apart at
# most; a turn of an idle loop costs microseconds.
IDLE_TURNS = 3


@dataclass(frozen=True)
class BatchWindow:
    """Hand a batch over when it is full, when the stream has had nothing more ready for
    ``idle_turns`` turns of the event loop, or ``within_s`` after its first request arrived."""

    max_batch: int
    within_s: float
    idle_turns: int = IDLE_TURNS

    def full(self, held: int) -> bool:
        """No more requests may join: the reader waits until the batch is taken."""
        return held >= self.max_batch

    def hand_over(self, held: int, idle_turns: int, since_first_s: float) -> bool:
        """Whether ``held`` requests (the first ``since_first_s`` ago, nothing new for
        ``idle_turns`` turns) go now."""
        if held <= 0:
            return False
        return self.full(held) or idle_turns >= self.idle_turns or since_first_s >= self.within_s
