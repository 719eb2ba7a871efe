"""The response cache on the real broker: entries a worker wrote are recovered from the changelog
and served after a restart; expired entries are deleted, from the worker's memory and from Kafka
as a tombstone on the cache table's compacted changelog, and a worker restarted afterwards recovers
no expired entry."""

from __future__ import annotations

import time
from pathlib import Path

from schemas import ModelContext
from streams.answering.cache import cache_key
from streams.app import cache_changelog_topic
from tests.eventually import eventually
from tests.integration.support import TopicReader
from tests.integration.test_orchestration import DETERMINISTIC, endpoint, endpoint_toml, nexus, simulators

TTL_S = 2.0


async def test_an_expired_entry_is_tombstoned_on_the_changelog_and_gone_from_memory(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    [sim] = simulators(logs_dir, ["--models", "m", "--ttft-ms", "0", "--tokens-per-s", "0"])
    config = endpoint_toml("m", endpoint(sim), cache_ttl_s=TTL_S) + "[worker]\ncache_sweep_interval_s = 0.5\n"
    async with nexus(bootstrap, logs_dir, tmp_path, config, [sim]) as nx:
        changelog = cache_changelog_topic(f"nexus-orch-{nx.run}")
        async with TopicReader(bootstrap, changelog) as records:
            request = nx.request("cached", input="what is two plus two?", options=DETERMINISTIC)
            [first] = (await nx.ask([request])).values()
            key = cache_key(request)
            await records.read_until(lambda rs: any(r.key == key and r.value for r in rs), 30)
            await nx.until("the entry is in the worker's cache",
                           lambda: _equals(nx.metric("nexus_worker_cache_entries"), 1))
            # Past its TTL the next sweep (every 0.5 s here) deletes it, with a tombstone.
            await records.read_until(lambda rs: any(r.key == key and r.value is None for r in rs), 30)
            await nx.until("the entry left the worker's memory",
                           lambda: _equals(nx.metric("nexus_worker_cache_entries"), 0))
            deleted = await nx.metric("nexus_worker_cache_deletions_total", reason="expired")
            [again] = (await nx.ask([nx.request("again", input="what is two plus two?", options=DETERMINISTIC)])).values()
            history = [r.value is None for r in records.records if r.key == key]
    assert first.status == again.status == "ok"
    assert (first.cached, again.cached) == (False, False), "the expired entry served nobody"
    assert history[:2] == [False, True], "the entry, then its tombstone"
    assert deleted >= 1


async def _equals(value: object, expected: float) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_an_entry_that_expired_while_no_worker_ran_is_tombstoned_by_the_next_one_after_recovery(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    """No sweep timer in this test (an hour): the restarted worker indexes what it recovers from the
    changelog and deletes what expired meanwhile as soon as its recovery completes."""
    [sim] = simulators(logs_dir, ["--models", "m", "--ttft-ms", "0", "--tokens-per-s", "0"])
    config = endpoint_toml("m", endpoint(sim), cache_ttl_s=TTL_S) + "[worker]\ncache_sweep_interval_s = 3600.0\n"
    async with nexus(bootstrap, logs_dir, tmp_path, config, [sim]) as nx:
        changelog = cache_changelog_topic(f"nexus-orch-{nx.run}")
        async with TopicReader(bootstrap, changelog) as records:
            request = nx.request("cached", input="what is three plus three?", options=DETERMINISTIC)
            [first] = (await nx.ask([request])).values()
            key = cache_key(request)
            await records.read_until(lambda rs: any(r.key == key and r.value for r in rs), 30)
            nx.worker.stop()
            expires_at = first.completed_at.timestamp() + TTL_S
            await eventually(lambda: time.time() > expires_at + 0.5, "the entry expired while no worker ran")
            assert not any(r.key == key and r.value is None for r in await records.drain())
            nx.worker.start()
            await records.read_until(lambda rs: any(r.key == key and r.value is None for r in rs), 90)
            await nx.until("the restarted worker holds no entry",
                           lambda: _equals(nx.metric("nexus_worker_cache_entries"), 0), timeout=60)
    assert first.status == "ok" and not first.cached


async def test_an_answer_cached_before_a_restart_is_served_from_the_cache_after_it(
    bootstrap: str, logs_dir: Path, tmp_path: Path
) -> None:
    """The entry the worker wrote to the changelog partition of the model's requests is the one the
    restarted worker recovers for that partition, and serves."""
    [sim] = simulators(logs_dir, ["--models", "m", "--ttft-ms", "0", "--tokens-per-s", "0"])
    config = endpoint_toml("m", endpoint(sim), cache_ttl_s=3600.0)
    async with nexus(bootstrap, logs_dir, tmp_path, config, [sim]) as nx:
        changelog = cache_changelog_topic(f"nexus-orch-{nx.run}")
        same = {"input": "what is four plus four?", "options": DETERMINISTIC, "context": ModelContext("c")}
        async with TopicReader(bootstrap, changelog) as records:
            first_request = nx.request("before", **same)
            [first] = (await nx.ask([first_request])).values()
            await records.read_until(lambda rs: any(r.key == cache_key(first_request) and r.value for r in rs), 30)
        nx.worker.stop()
        nx.worker.start()
        served = (await sim.stats())["served_by_model"]["m"]
        [again] = (await nx.ask([nx.request("after", **same)], timeout=90)).values()
        served_after = (await sim.stats())["served_by_model"]["m"]
    assert first.status == again.status == "ok"
    assert (first.cached, again.cached) == (False, True) and again.output == first.output
    assert served == served_after == 1, "the restarted worker did not call the model again"

