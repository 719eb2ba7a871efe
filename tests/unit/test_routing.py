"""ModelRouter and the cache policy as pure decisions: fake clock, seeded rng, microseconds."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import replace

import pytest

from nexus.settings import EndpointSettings, ModelSettings
from schemas import InferenceOptions, InferenceRequest, Message, ModelContext, Tool, ToolCall
from streams.answering import cache
from streams.answering.routing import Circuit, ModelRouter, backoff_seconds

A, B = "http://a", "http://b"


def router(*endpoints: EndpointSettings, seed: int = 7, **kwargs: float) -> ModelRouter:
    return ModelRouter(ModelSettings("m", tuple(endpoints)), random.Random(seed), **kwargs)  # type: ignore[arg-type]


def two(**kwargs: object) -> ModelRouter:
    return router(EndpointSettings(A, **kwargs), EndpointSettings(B, **kwargs))  # type: ignore[arg-type]


def observe(r: ModelRouter, url: str, seconds: float, times: int = 5) -> None:
    """Feed the EWMA as if ``url`` had answered ``times`` requests in ``seconds`` each."""
    for _ in range(times):
        r.endpoints[url].in_flight += 1
        r.succeeded(url, seconds)


# ----------------------------------------------------------------------------- speed


def test_faster_endpoint_receives_most_traffic_while_both_have_free_slots() -> None:
    """Closed loop of 3 clients over two 4-slot endpoints: nobody is ever full, speed decides."""
    service = {A: 0.03, B: 0.09}
    r = two(max_concurrency=4)
    now, done = 0.0, []  # (finish time, seq, url)
    counts: Counter[str] = Counter()
    for seq in range(3):
        e = r.choose(now)
        assert e is not None
        heapq.heappush(done, (now + service[e.url], seq, e.url))
    for seq in range(3, 600):
        now, _, url = heapq.heappop(done)
        r.succeeded(url, service[url])
        e = r.choose(now)
        assert e is not None, "3 clients can never fill 8 slots"
        assert all(s.in_flight < s.settings.max_concurrency for s in r.endpoints.values())
        counts[e.url] += 1
        heapq.heappush(done, (now + service[e.url], seq, e.url))
    assert counts[A] > 0.75 * sum(counts.values()), counts
    assert r.endpoints[A].seconds_per_request == pytest.approx(0.03)


def test_lower_ewma_wins_the_next_request_at_equal_load() -> None:
    r = two()
    observe(r, A, 0.5)
    observe(r, B, 0.1)
    picks = Counter()
    for _ in range(50):
        e = r.choose(0.0)
        assert e is not None
        picks[e.url] += 1
        r.released(e.url)
    assert picks == {B: 50}


# ----------------------------------------------------------------------------- capacity


def test_max_concurrency_is_never_exceeded_and_slots_free_on_every_outcome() -> None:
    r = router(EndpointSettings(A, max_concurrency=2))
    assert r.choose(0.0) is not None and r.choose(0.0) is not None
    assert r.choose(0.0) is None, "a full endpoint takes no third request"
    r.succeeded(A, 0.1)
    assert r.choose(0.1) is not None
    assert r.choose(0.1) is None
    r.failed(A, 0.2, "boom")
    assert r.choose(0.2) is not None
    assert r.choose(0.2) is None
    r.released(A)
    assert r.choose(0.3) is not None
    assert r.endpoints[A].in_flight == 2


def test_random_interleavings_never_exceed_any_endpoints_capacity() -> None:
    r = router(EndpointSettings(A, max_concurrency=3), EndpointSettings(B, max_concurrency=1))
    rng = random.Random(1)
    held: list[str] = []
    for step in range(5000):
        if held and rng.random() < 0.45:
            url = held.pop(rng.randrange(len(held)))
            rng.choice([lambda: r.succeeded(url, 0.1), lambda: r.failed(url, step, "x", False), lambda: r.released(url)])()  # noqa: B023 (called at once)
        else:
            e = r.choose(float(step))
            if e is None:
                assert len(held) == 4, "None only when every slot is held"
            else:
                held.append(e.url)
        assert r.endpoints[A].in_flight == held.count(A) <= 3
        assert r.endpoints[B].in_flight == held.count(B) <= 1


def test_max_rps_caps_starts_in_every_one_second_window_and_wait_hint_says_when() -> None:
    r = router(EndpointSettings(A, max_concurrency=100, max_rps=5))
    starts = []
    now = 0.0
    while now < 5.0:  # ask every 10 ms, answer at once: only the rate limits
        e = r.choose(now)
        if e is not None:
            starts.append(now)
            r.succeeded(A, 0.001)
        now = round(now + 0.01, 6)
    for i, t in enumerate(starts):
        assert sum(1 for s in starts[i:] if s < t + 1.05) <= 5, f"window from {t} (a second and the guard)"
    assert len(starts) == 25, "the limit is reached, not undershot"

    fresh = router(EndpointSettings(A, max_concurrency=100, max_rps=3))
    for t in (0.0, 0.2, 0.4):
        assert fresh.choose(t) is not None
    assert fresh.choose(0.5) is None
    assert fresh.wait_hint(0.97) == pytest.approx(0.08), "the first start leaves the window at 1.05 (the guard)"
    assert 0 < fresh.wait_hint(0.5) <= 0.5, "never sleeps past the moment the window frees"
    now, polls = 0.5, 0
    while fresh.choose(now) is None:  # a caller sleeping wait_hint() each time
        now += fresh.wait_hint(now)
        polls += 1
    assert now == pytest.approx(1.05) and polls < 20


# ----------------------------------------------------------------------------- priors and ties


def test_weights_are_the_prior_before_any_observation() -> None:
    r = router(EndpointSettings(A, weight=3.0), EndpointSettings(B, weight=1.0))
    picks = Counter()
    for _ in range(100):
        e = r.choose(0.0)
        assert e is not None
        picks[e.url] += 1
        r.released(e.url)
    assert picks == {A: 100}
    # Filling up: the heavy endpoint takes two, then ties with the light one at 3/4 vs 1/4 load.
    held = [e.url for e in (r.choose(0.0) for _ in range(4)) if e]
    assert held[:2] == [A, A] and Counter(held) == {A: 3, B: 1}


def test_observations_outweigh_the_prior() -> None:
    r = router(EndpointSettings(A, weight=3.0), EndpointSettings(B, weight=1.0))
    observe(r, A, 0.5)  # ten times slower than B: a weight of 3 does not make up for it
    observe(r, B, 0.05)
    e = r.choose(0.0)
    assert e is not None and e.url == B


def test_an_endpoint_not_yet_observed_gets_traffic_below_saturation() -> None:
    """One request at a time never fills anything: without data, B must still be tried."""
    r = two()
    picks = Counter()
    for i in range(200):
        e = r.choose(float(i))
        assert e is not None
        picks[e.url] += 1
        r.succeeded(e.url, 0.02)
    assert min(picks.values()) > 50, picks
    assert r.endpoints[A].seconds_per_request and r.endpoints[B].seconds_per_request


def test_ties_are_broken_randomly_so_both_endpoints_get_traffic() -> None:
    for seed in range(5):
        r = router(EndpointSettings(A), EndpointSettings(B), seed=seed)
        picks = Counter()
        for _ in range(1000):
            e = r.choose(0.0)
            assert e is not None
            picks[e.url] += 1
            r.released(e.url)
        assert min(picks[A], picks[B]) > 400, (seed, picks)


# ----------------------------------------------------------------------------- sessions


def test_sticky_session_keeps_its_endpoint_while_it_has_a_slot_then_moves() -> None:
    r = two(max_concurrency=2)
    first = r.choose(0.0, session_id="s")
    assert first is not None
    home, other = first.url, (B if first.url == A else A)
    r.succeeded(home, 0.1)
    observe(r, home, 0.9)  # home now looks slower: stickiness still wins while it has room
    observe(r, other, 0.1)
    for i in range(20):
        e = r.choose(float(i), session_id="s")
        assert e is not None and e.url == home
        r.succeeded(home, 0.9)
    # Fill home with other sessions' requests (other is faster, so pin them by excluding it).
    for _ in range(2):
        assert r.choose(30.0, session_id="x", exclude=frozenset({other})).url == home  # type: ignore[union-attr]
    moved = r.choose(30.0, session_id="s")
    assert moved is not None and moved.url == other
    r.released(home)
    r.released(home)
    r.succeeded(other, 0.1)
    again = r.choose(31.0, session_id="s")
    assert again is not None and again.url == other, "the session follows its last endpoint"


def test_many_sessions_spread_over_equal_endpoints() -> None:
    r = two()
    picks = Counter()
    for i in range(400):
        e = r.choose(0.0, session_id=f"s{i}")
        assert e is not None
        picks[e.url] += 1
        r.released(e.url)
    assert min(picks.values()) > 150, picks


# ----------------------------------------------------------------------------- circuits


def test_circuit_opens_after_threshold_then_probe_success_closes_it() -> None:
    r = two(max_concurrency=8)
    r._failure_threshold, r._open_seconds = 3, 5.0  # the defaults, stated here
    for _ in range(3):
        r.endpoints[A].in_flight += 1
        r.failed(A, 10.0, "connection refused")
    assert r.endpoints[A].circuit is Circuit.OPEN
    for _ in range(20):
        e = r.choose(11.0)
        assert e is not None and e.url == B
        r.released(B)
    assert r.probe_candidates(14.9) == []
    assert r.wait_hint(14.0) == pytest.approx(0.5), "at most the safety-net poll"
    assert r.wait_hint(14.98) == pytest.approx(0.02)
    assert [e.url for e in r.probe_candidates(15.0)] == [A]
    r.probe_started(A)
    assert r.endpoints[A].circuit is Circuit.HALF_OPEN
    assert r.probe_candidates(15.0) == [], "one probe at a time"
    assert r.choose(15.0, exclude=frozenset({B})) is None, "no traffic while half-open"
    r.probe_finished(A, True, 15.1)
    assert r.endpoints[A].circuit is Circuit.CLOSED
    e = r.choose(15.2, exclude=frozenset({B}))
    assert e is not None and e.url == A


def test_probe_failure_reopens_for_another_cool_down() -> None:
    r = router(EndpointSettings(A), failure_threshold=2, open_seconds=1.0)
    for _ in range(2):
        assert r.choose(0.0) is not None
        r.failed(A, 0.0, "503")
    assert r.choose(0.5) is None
    r.probe_started(A)
    r.probe_finished(A, False, 1.2)
    assert r.endpoints[A].circuit is Circuit.OPEN
    assert r.probe_candidates(2.1) == []
    assert [e.url for e in r.probe_candidates(2.2)] == [A]


def test_only_consecutive_failures_open_the_circuit() -> None:
    r = router(EndpointSettings(A), failure_threshold=3)
    for outcome in ("fail", "fail", "ok", "fail", "fail", "ok", "fail", "fail"):
        assert r.choose(0.0) is not None
        if outcome == "ok":
            r.succeeded(A, 0.1)
        else:
            r.failed(A, 0.0, "x")
    assert r.endpoints[A].circuit is Circuit.CLOSED


def test_failures_that_are_not_the_endpoints_fault_never_open_its_circuit() -> None:
    r = router(EndpointSettings(A), failure_threshold=3)
    for i in range(20):
        assert r.choose(float(i)) is not None
        r.failed(A, float(i), "400 bad request", counts_against_endpoint=False)
    state = r.endpoints[A]
    assert state.circuit is Circuit.CLOSED and state.in_flight == 0 and state.failed == 0
    assert state.last_error == "400 bad request"


def test_server_busy_lowers_capacity_to_what_the_endpoint_held_and_successes_restore_it() -> None:
    r = router(EndpointSettings(A, max_concurrency=4), failure_threshold=3)
    for _ in range(4):
        assert r.choose(0.0) is not None
    for _ in range(2):  # two of the four answered "server busy": it holds the other two
        r.busy(A, "503 server busy")
    state = r.endpoints[A]
    assert state.capacity() == 2 and state.in_flight == 2
    assert r.choose(0.1) is None, "no more than it holds"
    assert state.circuit is Circuit.CLOSED and state.failed == 0, "busy is not broken"
    answers = 0
    while state.capacity() < 4:  # additive increase: about one slot per capacity's worth of answers
        r.succeeded(A, 0.05)
        answers += 1
        assert r.choose(0.2) is not None
    assert 3 <= answers <= 8, answers
    assert state.limit is None and r.endpoints[A].snapshot()["concurrency_limit"] == 4


def test_busy_with_nothing_else_in_flight_keeps_one_slot() -> None:
    r = router(EndpointSettings(A, max_concurrency=8))
    assert r.choose(0.0) is not None
    r.busy(A, "503")
    assert r.endpoints[A].capacity() == 1
    assert r.choose(0.0) is not None and r.choose(0.0) is None


def test_a_start_counts_from_when_it_went_on_the_wire() -> None:
    r = router(EndpointSettings(A, max_concurrency=10, max_rps=2))
    assert r.choose(0.0) is not None and r.choose(0.1) is not None
    r.sent(A, 0.0, 0.3)  # the first one waited 300 ms for its connection
    assert list(r.endpoints[A].starts) == [0.1, 0.3]
    # The window is a second and a 50 ms guard (RATE_WINDOW_S).
    assert r.choose(1.1) is None
    assert r.choose(1.16) is not None, "the second left the window"
    assert r.choose(1.3) is None, "the delayed first still fills the window until 1.35"
    assert r.choose(1.36) is not None
    r.sent(A, 1.36, 1.36)
    r.sent(A, 0.5, 2.2)  # chosen long ago and already pruned: still counted from the send
    assert list(r.endpoints[A].starts) == [1.16, 1.36, 2.2]


def test_all_down_only_when_no_circuit_is_closed() -> None:
    r = two()
    r._failure_threshold = 1
    assert not r.all_down()
    r.endpoints[A].in_flight += 1
    r.failed(A, 0.0, "x")
    assert not r.all_down()
    r.endpoints[B].in_flight += 1
    r.failed(B, 0.0, "x")
    assert r.all_down()
    r.probe_started(A)
    assert r.all_down(), "half-open takes no traffic yet"
    r.probe_finished(A, True, 6.0)
    assert not r.all_down()


# ----------------------------------------------------------------------------- backoff


@pytest.mark.parametrize("attempt", range(10))
def test_backoff_stays_within_full_jitter_bounds(attempt: int) -> None:
    rng = random.Random(attempt)
    bound = min(2.0, 0.05 * 2**attempt)
    samples = [backoff_seconds(attempt, rng) for _ in range(2000)]
    assert all(0.0 <= s <= bound for s in samples)
    assert max(samples) > 0.9 * bound and min(samples) < 0.1 * bound, "jitter spans the range"
    custom = [backoff_seconds(attempt, rng, base=0.2, cap=0.5) for _ in range(200)]
    assert all(0.0 <= s <= min(0.5, 0.2 * 2**attempt) for s in custom)


# ============================================================================= cache policy

MODEL = ModelSettings("m", (EndpointSettings(A),))


def request(**changes: object) -> InferenceRequest:
    base = InferenceRequest(
        "id-1", "m", "hello", ModelContext("s1", {"user": "alice", "lang": "en"}), InferenceOptions(temperature=0.0)
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_cache_key_changes_with_everything_that_shapes_the_answer() -> None:
    base = cache.cache_key(request())
    variants = [
        request(model_id="other"),
        request(input="hello!"),
        request(context=ModelContext("s2", {"user": "alice", "lang": "en"})),
        request(context=ModelContext("s1", {"user": "bob", "lang": "en"})),
        request(context=ModelContext("s1", {"user": "alice"})),
        request(options=InferenceOptions(temperature=0.5)),
        request(options=InferenceOptions(temperature=0.0, max_tokens=10)),
        request(options=InferenceOptions(temperature=0.0, seed=1)),
    ]
    keys = [cache.cache_key(v) for v in variants]
    assert base not in keys and len(set(keys)) == len(keys)


def test_cache_key_ignores_what_does_not_shape_the_answer() -> None:
    same = request(id="id-2", stream=True, cache="no-store", reply_to="x",
                   context=ModelContext("s1", {"lang": "en", "user": "alice"}))
    assert cache.cache_key(same) == cache.cache_key(request())


def test_a_plain_prompts_cache_key_is_the_one_it_always_was() -> None:
    """Keys computed before conversations joined the key: the entries cached then stay valid."""
    r = InferenceRequest("r1", "llama3.1", "Why is the sky blue?", ModelContext("s1", {"user": "ana", "lang": "é"}),
                         InferenceOptions(temperature=0.0, max_tokens=64, seed=7))
    assert cache.cache_key(r) == b"401d6b97e4c4cef65ab6a28c1d055ef3724e37abe9d3c0a2a797a9924508160a"
    assert cache.cache_key(InferenceRequest("r1", "m", "hi", ModelContext("s"))) == (
        b"32a65ed27e06893bbfe20f838e1e520c0b72cd813b88329364c8aaed52024816")
    assert cache.cache_key(replace(r, keep_alive="1h")) == cache.cache_key(r), "keep_alive shapes no answer"
    assert cache.answer_shape(r) == {}


def test_cache_key_covers_the_conversation_tools_format_and_every_option() -> None:
    turn = Message("user", "hello")
    chat = request(messages=(turn,))
    base = cache.cache_key(request())
    variants = [
        chat,
        request(messages=(Message("system", "be brief"), turn)),
        request(messages=(Message("user", "hello", images=(b"\x89PNG one",)),)),
        request(messages=(Message("user", "hello", images=(b"\x89PNG two",)),)),
        request(messages=(turn, Message("assistant", "", tool_calls=(ToolCall("f", '{"a": 1}'),)))),
        request(messages=(turn, Message("assistant", "", tool_calls=(ToolCall("f", '{"a": 2}'),)))),
        request(messages=(turn, Message("tool", "21", tool_name="f"))),
        request(messages=(turn, Message("tool", "21", tool_name="g"))),
        request(messages=(turn,), tools=(Tool("f"),)),
        request(messages=(turn,), tools=(Tool("f", parameters='{"type": "object"}'),)),
        request(messages=(turn,), tools=(Tool("f"),), tool_choice="required"),
        request(format="json"),
        request(format='{"type": "object"}'),
        *(request(options=replace(InferenceOptions(temperature=0.0), **{name: value}))
          for name, value in [("top_p", 0.9), ("top_k", 40), ("min_p", 0.1), ("stop", ("\n",)), ("num_ctx", 8192),
                              ("repeat_penalty", 1.2), ("presence_penalty", 0.5), ("frequency_penalty", 0.5),
                              ("extra", '{"mirostat": 2}')]),
    ]
    keys = [cache.cache_key(v) for v in variants]
    assert base not in keys and len(set(keys)) == len(keys)
    assert cache.cache_key(replace(chat, id="other", keep_alive="5m", stream=True)) == cache.cache_key(chat)


def test_a_cache_entry_keeps_its_tool_calls_and_reads_entries_written_before_them() -> None:
    call = ToolCall("get_weather", '{"city": "Lyon"}', "call_1")
    entry = cache.CacheEntry("", 3, 4, "stop", A, expires_at=100.0, tool_calls=(call,))
    assert cache.CacheEntry.from_bytes(entry.to_bytes()) == entry
    older = (b'{"output":"out","prompt_tokens":3,"completion_tokens":4,"done_reason":"stop",'
             b'"endpoint":"http://a","expires_at":100.0}')
    assert cache.CacheEntry.from_bytes(older) == cache.CacheEntry("out", 3, 4, "stop", A, 100.0)
    assert cache.CacheEntry("out", 3, 4, "stop", A, 100.0).to_bytes() == older, "a worker not upgraded reads it"


def test_only_deterministic_requests_are_looked_up_and_stored() -> None:
    deterministic = [request(), request(options=InferenceOptions(temperature=0.7, seed=42))]
    random_ones = [request(options=InferenceOptions()), request(options=InferenceOptions(temperature=0.7))]
    for r in deterministic:
        assert cache.should_look_up(r, MODEL) and cache.should_store(r, MODEL) and cache.shareable(r)
    for r in random_ones:
        assert not cache.should_look_up(r, MODEL) and not cache.should_store(r, MODEL)
        assert not cache.shareable(r)


def test_request_cache_policies_and_model_cache_off() -> None:
    no_cache, no_store = request(cache="no-cache"), request(cache="no-store")
    assert not cache.should_look_up(no_cache, MODEL) and cache.should_store(no_cache, MODEL)
    assert cache.should_look_up(no_store, MODEL) and not cache.should_store(no_store, MODEL)
    assert not cache.shareable(no_cache), "no-cache asks for a fresh call"
    off = replace(MODEL, cache="off")
    for r in (request(), no_cache, no_store):
        assert not cache.should_look_up(r, off) and not cache.should_store(r, off)


def test_cache_entry_round_trips_and_expires() -> None:
    entry = cache.CacheEntry("out", 3, 4, "stop", A, expires_at=100.0)
    assert cache.CacheEntry.from_bytes(entry.to_bytes()) == entry
    assert entry.fresh(99.9) and not entry.fresh(100.0)


@pytest.mark.parametrize(
    "text", ["", "one", "[simulated m] You said: hello there", "  leading and  double  spaces ", "a b c d e f g h i"]
)
def test_chunks_of_concatenate_back_to_the_text(text: str) -> None:
    chunks = cache.chunks_of(text)
    assert "".join(chunks) == text
    assert len(chunks) == max(1, -(-len(text.split(" ")) // 4))
