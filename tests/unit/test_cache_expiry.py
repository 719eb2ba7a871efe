"""The response cache: an answer's entry is held in memory and written to the changelog partition of
its model's requests; the cache stays bounded: expired entries are deleted (from memory, and from
Kafka with a tombstone on their changelog partition), and past ``worker.cache_max_entries`` the
entries closest to expiry go first."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import InferenceRequest, ModelContext
from streams.answering.cache import CacheEntry, CacheIndex, Doomed
from streams.sinks import CacheKeeper, TableCache

# ----------------------------------------------------------------------------- the index (pure)


def test_expired_entries_are_due_once_closest_to_expiry_first_and_fresh_ones_stay() -> None:
    index = CacheIndex()
    index.add(b"late", 0, 300.0)
    index.add(b"soon", 1, 100.0)
    index.add(b"sooner", 0, 50.0)
    assert index.due(now=10.0, max_entries=10) == []
    assert index.due(now=100.0, max_entries=10) == [Doomed(b"sooner", 0, "expired"), Doomed(b"soon", 1, "expired")]
    assert index.due(now=100.0, max_entries=10) == [], "each entry is due once"
    assert list(index) == [b"late"] and len(index) == 1


def test_an_entry_expires_when_a_lookup_stops_serving_it() -> None:
    entry = CacheEntry("answer", 1, 1, "stop", None, expires_at=100.0)
    index = CacheIndex()
    index.add(b"k", 0, entry.expires_at)
    assert entry.fresh(99.9) and index.due(99.9, 10) == []
    assert not entry.fresh(100.0) and index.due(100.0, 10) == [Doomed(b"k", 0, "expired")]


def test_over_the_bound_the_entries_closest_to_expiry_are_evicted_oldest_written_first_on_ties() -> None:
    index = CacheIndex()
    for i, expires in enumerate([500.0, 200.0, 200.0, 900.0, 300.0]):
        index.add(f"k{i}".encode(), i % 2, expires)
    evicted = index.due(now=0.0, max_entries=2)
    assert [(d.key, d.partition, d.reason) for d in evicted] == [(b"k1", 1, "evicted"), (b"k2", 0, "evicted"),
                                                                  (b"k4", 0, "evicted")]
    assert sorted(index) == [b"k0", b"k3"]


def test_a_rewritten_entry_counts_once_with_its_last_expiry_and_partition() -> None:
    index = CacheIndex()
    index.add(b"k", 0, 100.0)
    index.add(b"k", 3, 500.0)  # written again (a later answer), as the table keeps the last write
    assert len(index) == 1
    assert index.due(now=200.0, max_entries=10) == []
    assert index.due(now=500.0, max_entries=10) == [Doomed(b"k", 3, "expired")]


def test_an_entry_deleted_by_someone_else_is_not_due_again() -> None:
    index = CacheIndex()
    index.add(b"k", 0, 100.0)
    index.remove(b"k")
    assert b"k" not in index and index.due(now=1000.0, max_entries=0) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3), st.integers(0, 100)), max_size=60),
       st.integers(0, 100), st.integers(0, 20))
def test_after_a_sweep_nothing_expired_and_at_most_the_bound_remain(
    writes: list[tuple[int, int, int]], now: int, bound: int,
) -> None:
    index = CacheIndex()
    last: dict[bytes, tuple[int, float]] = {}
    for key, partition, expires in writes:
        index.add(str(key).encode(), partition, float(expires))
        last[str(key).encode()] = (partition, float(expires))
    doomed = index.due(float(now), bound)
    assert len({d.key for d in doomed}) == len(doomed), "each key once"
    assert all(last[d.key][0] == d.partition for d in doomed), "on the partition of its last write"
    kept = set(index)
    assert kept | {d.key for d in doomed} == set(last) and not kept & {d.key for d in doomed}
    assert all(last[k][1] > now for k in kept) and len(kept) <= bound
    evicted = [last[d.key][1] for d in doomed if d.reason == "evicted"]
    assert all(e <= last[k][1] for e in evicted for k in kept), "the evicted expire no later than the kept"


# ----------------------------------------------------------------------------- the keeper (the shell)


class FakeTable(dict):  # type: ignore[type-arg]
    """What CacheKeeper uses of a Faust table: item access, its store, its changelog, on_recover."""

    def __init__(self) -> None:
        super().__init__()
        self.changelog: list[tuple[int, bytes, bytes | None]] = []
        self.recover_callbacks: list[Any] = []

    @property
    def data(self) -> FakeTable:
        return self

    def send_changelog(self, partition: int, key: bytes, value: bytes | None, **_: Any) -> None:
        self.changelog.append((partition, key, value))

    def on_recover(self, fun: Any) -> Any:
        self.recover_callbacks.append(fun)
        return fun


def entry(expires_at: float) -> bytes:
    return CacheEntry("answer", 1, 1, "stop", None, expires_at).to_bytes()


def changelog_event(key: bytes, value: bytes | None, partition: int) -> Any:
    return SimpleNamespace(key=key, value=value, message=SimpleNamespace(value=value, partition=partition))


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_expired_entries_leave_memory_with_a_tombstone_on_their_own_partition_only_when_owned() -> None:
    table, clock, deleted = FakeTable(), Clock(), []
    keeper = CacheKeeper(table, 100, owned=lambda: {0, 1}, clock=clock, deleted=deleted.append)  # type: ignore[arg-type]
    keeper.store(b"mine", entry(10.0), partition=1)
    await keeper.on_changelog(changelog_event(b"standby", entry(10.0), partition=5))  # another worker's partition
    table[b"standby"] = entry(10.0)  # as Faust applies it to the store
    keeper.store(b"fresh", entry(99.0), partition=0)
    assert table.changelog == [] and len(keeper) == 3

    clock.now = 50.0
    assert [d.key for d in keeper.sweep()] == [b"mine", b"standby"]
    assert set(table) == {b"fresh"}, "both left memory"
    assert table.changelog == [(1, b"mine", None)], "a tombstone only for the partition this worker owns"
    assert [d.reason for d in deleted] == ["expired", "expired"]


async def test_writing_past_the_bound_evicts_the_entry_closest_to_expiry_with_a_tombstone() -> None:
    table = FakeTable()
    keeper = CacheKeeper(table, 2, owned=lambda: {0}, clock=Clock())  # type: ignore[arg-type]
    keeper.store(b"a", entry(300.0), partition=0)
    keeper.store(b"b", entry(100.0), partition=0)
    keeper.store(b"c", entry(200.0), partition=0)
    assert set(table) == {b"a", b"c"} and table.changelog == [(0, b"b", None)]


async def test_entries_recovered_from_the_changelog_are_swept_and_tombstones_read_unindex_them() -> None:
    table, clock = FakeTable(), Clock()
    keeper = CacheKeeper(table, 100, owned=lambda: {2}, clock=clock)  # type: ignore[arg-type]
    for key, expires in ((b"old", 5.0), (b"gone", 5.0), (b"new", 500.0)):
        await keeper.on_changelog(changelog_event(key, entry(expires), partition=2))
        table[key] = entry(expires)
    await keeper.on_changelog(changelog_event(b"gone", None, partition=2))  # deleted by the previous owner
    del table[b"gone"]
    clock.now = 10.0
    [recovered] = table.recover_callbacks
    await recovered()  # Faust: recovery completed
    assert set(table) == {b"new"} and table.changelog == [(2, b"old", None)]


async def test_after_a_recovery_what_faust_dropped_from_memory_leaves_the_index() -> None:
    table = FakeTable()
    keeper = CacheKeeper(table, 100, owned=lambda: {0}, clock=Clock())  # type: ignore[arg-type]
    keeper.store(b"kept", entry(100.0), partition=0)
    await keeper.on_changelog(changelog_event(b"standby", entry(100.0), partition=3))  # not applied to memory
    await table.recover_callbacks[0]()
    assert list(keeper.index) == [b"kept"]


async def test_an_unreadable_entry_is_deleted_at_once() -> None:
    table = FakeTable()
    keeper = CacheKeeper(table, 100, owned=lambda: {0}, clock=Clock())  # type: ignore[arg-type]
    keeper.store(b"junk", b"not json", partition=0)
    assert b"junk" not in table and table.changelog == [(0, b"junk", None)]


async def test_an_answer_is_cached_in_memory_at_once_and_on_the_changelog_partition_of_its_models_requests() -> None:
    table, written = FakeTable(), []
    keeper = CacheKeeper(table, 100, owned=lambda: {0}, clock=Clock())  # type: ignore[arg-type]

    async def write(partition: int, key: bytes, value: bytes) -> None:
        written.append((partition, key, value))

    cache = TableCache(keeper, 8, write)
    answers = {model: CacheEntry(f"answer of {model}", 1, 1, "stop", None, 100.0) for model in ("llama3.1", "mistral", "m")}
    for model, answer in answers.items():
        await cache.put(InferenceRequest(f"r-{model}", model, "hi", ModelContext("s")), model.encode(), answer)
    # Where the producer API's producer (aiokafka, Kafka's default partitioner) puts each model's requests.
    placed = {model: DefaultPartitioner()(model.encode(), list(range(8)), list(range(8))) for model in answers}
    assert written == [(placed[m], m.encode(), a.to_bytes()) for m, a in answers.items()]
    assert len(set(placed.values())) > 1, "the models' partitions differ: the test tells them apart"
    assert all(cache.get(m.encode()) == a for m, a in answers.items()), "served from memory before any ack"
    assert table.changelog == [], "the changelog record is the writer's, once"
    assert sorted(keeper.index) == sorted(m.encode() for m in answers)

