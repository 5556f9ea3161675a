"""The local engine's prefix cache: the store itself (longest match, per adapter, byte budget),
and the engine with it gives exactly the answers it gives without it while skipping prompt
tokens it has seen (shared system prompt across requests, a conversation's next turn)."""

import asyncio

import pytest
import torch
from deploy_helpers import fake_run

from tuneforge.deploy.engines import GenRequest, LocalEngine, _layout, collect
from tuneforge.deploy.prefix_cache import PrefixCache


def _kv(n: int, layers: int = 2, fill: float = 0.0):
    return [(torch.full((1, n, 4), fill + i), torch.full((1, n, 4), -fill - i)) for i in range(layers)]


def test_match_is_the_longest_prefix_of_the_same_adapter_short_of_the_last_token():
    cache = PrefixCache(max_bytes=10**6, min_tokens=3)
    cache.put("a", (1, 2, 3, 4, 5), _kv(5))
    cache.put("a", (1, 2, 3, 9, 9, 9), _kv(6, fill=1))
    cache.put("b", (1, 2, 3, 4, 5, 6, 7), _kv(7))
    n, e = cache.match("a", [1, 2, 3, 4, 5, 6])
    assert (n, e.tokens) == (5, (1, 2, 3, 4, 5))
    n, e = cache.match("a", [1, 2, 3, 9, 9, 9, 1])
    assert (n, e.tokens) == (6, (1, 2, 3, 9, 9, 9))
    # The whole prompt is cached: the last token still has to run, for the first new token.
    assert cache.match("a", [1, 2, 3, 4, 5])[0] == 4
    assert cache.match("b", [1, 2, 3, 4, 5, 6, 7, 8])[0] == 7
    assert cache.match("c", [1, 2, 3, 4, 5, 6]) == (0, None)  # another adapter's KV never serves
    assert cache.match("a", [1, 2, 7, 7]) == (0, None)  # below min_tokens


def test_an_extension_replaces_its_prefix_and_a_covered_sequence_adds_nothing():
    cache = PrefixCache(max_bytes=10**6, min_tokens=2)
    cache.put("a", (1, 2, 3), _kv(3))
    cache.put("a", (1, 2, 3, 4, 5), _kv(5))  # the conversation's next turn
    assert [e.tokens for e in cache.entries.values()] == [(1, 2, 3, 4, 5)]
    cache.put("a", (1, 2, 3, 4), _kv(4))
    assert [e.tokens for e in cache.entries.values()] == [(1, 2, 3, 4, 5)]
    assert cache.bytes == sum(e.nbytes for e in cache.entries.values())


def test_least_recently_used_entries_go_first_within_the_byte_budget_and_unload_drops_an_adapter():
    one = sum(k.nbytes + v.nbytes for k, v in _kv(4))
    cache = PrefixCache(max_bytes=3 * one, min_tokens=2)
    for first in (10, 20, 30):
        cache.put("a", (first, 1, 2, 3), _kv(4))
    assert cache.match("a", [10, 1, 2, 3, 4])[0] == 4  # touched: now the most recent
    cache.put("b", (40, 1, 2, 3), _kv(4))
    assert [k[1][0] for k in cache.entries] == [30, 10, 40]  # 20 was the least recently used
    assert cache.bytes == 3 * one
    cache.put("a", tuple(range(50)), _kv(50))  # larger than the whole budget: not kept
    assert len(cache.entries) == 3
    cache.drop("a")
    assert [k[0] for k in cache.entries] == ["b"] and cache.bytes == one


def test_layout_puts_reused_tokens_first_then_padding_then_the_rest():
    ids, mask = _layout([[5, 6, 7, 8], [5, 6, 9]], reuse=2, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [5, 6, 0, 9]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]
    ids, mask = _layout([[5, 6, 7, 8], [5, 6, 9]], reuse=0, pad_id=0)  # plain left padding
    assert ids.tolist() == [[5, 6, 7, 8], [0, 5, 6, 9]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]


SYSTEM = "You are a careful assistant for a hardware shop. Answer briefly and name the aisle of every item."
QUESTIONS = ["2 apples and 3 pears", "hello", "one box of nails, please", "b c a", "where are the screws?"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-runs")
    return [fake_run(tiny_model_dir, root / f"r{i}", seed=20 + i) for i in range(2)]


def _req(runs, i, messages, tiny_model_dir, max_tokens=6):
    return GenRequest(adapter=f"bot:v{i + 1}", adapter_dir=str(runs[i] / "adapter"), base_model=tiny_model_dir,
                      messages=messages, system_prompt=SYSTEM, max_tokens=max_tokens)


def _rounds(engine, rounds):
    """Each round's requests concurrently (one batch), rounds one after another."""
    async def go():
        out = []
        for reqs in rounds:
            out.append(await asyncio.gather(*(collect(engine.stream(r)) for r in reqs)))
        await engine.close()
        return out
    return asyncio.run(go())


def test_engine_answers_the_same_with_the_cache_and_skips_the_shared_system_prompt(runs, tiny_model_dir):
    # Round 1 fills the cache for both adapters; rounds 2 and 3 are new questions (only the system
    # prompt and chat template are shared) in mixed-adapter batches of different prompt lengths.
    rounds = [[_req(runs, i, [{"role": "user", "content": q}], tiny_model_dir) for i, q in enumerate(QUESTIONS[:2])],
              [_req(runs, i % 2, [{"role": "user", "content": q + "?"}], tiny_model_dir)
               for i, q in enumerate(QUESTIONS)],
              [_req(runs, (i + 1) % 2, [{"role": "user", "content": "Now: " + q}], tiny_model_dir)
               for i, q in enumerate(QUESTIONS)]]
    plain = LocalEngine("cpu", "fp32", max_batch=16, batch_wait_ms=300, prefix_cache_mb=0)
    cached = LocalEngine("cpu", "fp32", max_batch=16, batch_wait_ms=300)
    want, got = _rounds(plain, rounds), _rounds(cached, rounds)
    assert [len(b) for b in cached.batches] == [2, 5, 5] and len(set(cached.batches[1])) == 2
    assert [[c.text for c in r] for r in got] == [[c.text for c in r] for r in want]
    assert [[c.completion_tokens for c in r] for r in got] == [[c.completion_tokens for c in r] for r in want]
    assert [[c.prompt_tokens for c in r] for r in got] == [[c.prompt_tokens for c in r] for r in want]
    assert plain.prefix is None
    # Every row of rounds 2 and 3 started from cached keys/values of its own adapter.
    assert cached.prefix.reused_tokens >= 2 * 5 * cached.prefix.min_tokens
    assert {e.adapter for e in cached.prefix.entries.values()} == {"bot:v1", "bot:v2"}
    # The two adapters answer differently, so a row fed the other adapter's cache would show.
    assert len({c.text for c in want[0]}) == 2


def test_the_next_turn_of_a_conversation_reuses_the_first_turn_and_its_answer(runs, tiny_model_dir):
    first = [{"role": "user", "content": QUESTIONS[2]}]
    engine = LocalEngine("cpu", "fp32", max_batch=1)
    (one,), = _rounds(engine, [[_req(runs, 0, first, tiny_model_dir, max_tokens=8)]])
    turn = first + [{"role": "assistant", "content": one.text}, {"role": "user", "content": "and glue?"}]
    before = engine.prefix.reused_tokens
    (two,), = _rounds(engine, [[_req(runs, 0, turn, tiny_model_dir)]])
    # At least the first turn's whole prompt (the answer too, as far as it tokenizes the same).
    assert engine.prefix.reused_tokens - before >= one.prompt_tokens
    fresh = LocalEngine("cpu", "fp32", max_batch=1, prefix_cache_mb=0)
    (want,), = _rounds(fresh, [[_req(runs, 0, turn, tiny_model_dir)]])
    assert (two.text, two.completion_tokens) == (want.text, want.completion_tokens)


def test_unloading_an_adapter_drops_its_cached_prefixes(runs, tiny_model_dir):
    engine = LocalEngine("cpu", "fp32", max_batch=1)
    _rounds(engine, [[_req(runs, i, [{"role": "user", "content": "hello"}], tiny_model_dir)] for i in range(2)])
    assert {e.adapter for e in engine.prefix.entries.values()} == {"bot:v1", "bot:v2"}
    assert asyncio.run(engine.unload("bot:v1"))
    assert {e.adapter for e in engine.prefix.entries.values()} == {"bot:v2"}


def test_gateway_metrics_show_what_the_prefix_cache_saved(runs, tiny_model_dir, tmp_path):
    from fastapi.testclient import TestClient

    from tuneforge.deploy.config import ServeConfig
    from tuneforge.deploy.server import create_app
    from tuneforge.registry.store import Registry

    reg = Registry(f"sqlite:///{tmp_path / 'reg.db'}")
    reg.add(fake_run(tiny_model_dir, tmp_path / "run", seed=5, system_prompt=SYSTEM), "bot")
    _, key = reg.create_key("app", ["bot"])
    engine = LocalEngine("cpu", "fp32", max_batch=1)

    def metric(page: str, name: str) -> float:
        return float(next(line.split()[1] for line in page.splitlines() if line.startswith(name + " ")))

    with TestClient(create_app(ServeConfig(), reg, engine)) as c:
        for q in QUESTIONS[:2]:
            r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "bot", "messages": [{"role": "user", "content": q}], "max_tokens": 4})
            assert r.status_code == 200
        page = c.get("/metrics").text
    asyncio.run(engine.close())
    # The second request took the run's system prompt (and the chat template) from the cache.
    assert metric(page, "tuneforge_prefix_cache_reused_tokens") == engine.prefix.reused_tokens >= 16
    assert metric(page, "tuneforge_prefix_cache_bytes") == engine.prefix.bytes > 0
