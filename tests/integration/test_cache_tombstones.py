"""Expired response-cache entries are deleted on the real broker: from the worker's memory, and from
Kafka, as a tombstone on the cache table's compacted changelog; a worker restarted afterwards
recovers no expired entry."""

from __future__ import annotations

import time
from pathlib import Path

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
