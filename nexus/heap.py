"""The garbage collector of a long-running role, set for a server's heap.

CPython collects its youngest generation every 700 net allocations of container objects and
the whole heap every hundred or so of those. A started worker holds ~85,000 objects of its own
(Faust, aiokafka, the schemas, the modules) that will live as long as the process, and each
full collection walked all of them: 50 ms per collection, 13 % of the worker's CPU per request
under load (docs/performance.md, section 9). What a request allocates is freed by reference
counting when it is answered; the collector is only needed for the few cycles it leaves.

:func:`settle` is called once a role has started: what exists then is moved out of the
collector's sight (``gc.freeze``), and collections run after :data:`YOUNG` net allocations
instead of 700, so they are rare and each one finds mostly garbage.
"""

from __future__ import annotations

import gc

YOUNG = 20_000  # net container allocations between collections of the youngest generation
OLDER = (20, 100)  # collections of one generation between collections of the next


def settle() -> None:
    """The role has started: collect once, keep what is left out of every later collection,
    and collect less often from now on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG, *OLDER)
