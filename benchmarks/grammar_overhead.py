"""Grammar libraries for constrained decoding, measured on this machine with a real tokenizer:
the time to compile a realistic JSON schema (a required tool call over three functions, as the
server builds it) and the time per generated token to compute the allowed-token mask and apply
it to one row of logits. The token walk feeds the tokens of a valid call, so every step is a
real mid-JSON state.

    PYTHONPATH=. python benchmarks/grammar_overhead.py [--tokenizer smollm2-135m-instruct] [--engine]

``--engine`` also times the served path end to end: LocalEngine answers one chat on the base
model with and without a JSON-schema grammar (greedy, fp32, one row), in ms per generated token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch

from tuneforge.data.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, call_schema
from tuneforge.deploy.grammar import apply_bitmask
from tuneforge.models.load import load_tokenizer

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "book_table", "parameters": {
        "type": "object", "properties": {"restaurant": {"type": "string"}, "people": {"type": "integer"},
                                         "time": {"type": "string"}, "notes": {"type": ["string", "null"]},
                                         "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["restaurant", "people", "time"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "number"}},
        "required": ["query"]}}},
]
CALL = {"name": "book_table", "arguments": {"restaurant": "Chez Nous", "people": 4, "time": "19:30",
                                            "notes": None, "tags": ["window", "quiet"]}}


def bench_xgrammar(tok, schema: dict, text: str, vocab: int) -> dict:
    import xgrammar as xgr  # deferred: a candidate under test, not a tuneforge dependency

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = compiler.compile_grammar(xgr.Grammar.concat(
        xgr.Grammar.from_ebnf(f'root ::= "{TOOL_CALL_OPEN}\\n"'), xgr.Grammar.from_json_schema(json.dumps(schema)),
        xgr.Grammar.from_ebnf(f'root ::= "\\n{TOOL_CALL_CLOSE}"')))
    compile_s = time.perf_counter() - t0
    matcher = xgr.GrammarMatcher(grammar)
    mask = xgr.allocate_token_bitmask(1, vocab)
    logits = torch.randn(1, vocab)
    steps = []
    for t in tok(text, add_special_tokens=False).input_ids:
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        steps.append(time.perf_counter() - t0)
        assert matcher.accept_token(t), tok.decode([t])
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "steps": steps}


def bench_llguidance(tok, schema: dict, text: str, vocab: int) -> dict:
    # deferred: each library is imported by its own benchmark only
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    tokenizer_s = time.perf_counter() - t0
    lark = f'start: "{TOOL_CALL_OPEN}\\n" call "\\n{TOOL_CALL_CLOSE}"\ncall: %json {json.dumps(schema)}\n'
    t0 = time.perf_counter()
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(lark))
    compile_s = time.perf_counter() - t0
    assert not matcher.is_error(), matcher.get_error()
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    logits = torch.randn(1, vocab)
    steps = []
    for t in tok(text, add_special_tokens=False).input_ids:
        t0 = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        apply_bitmask(logits, mask)  # what the server runs (tuneforge/deploy/grammar.py)
        steps.append(time.perf_counter() - t0)
        assert matcher.consume_token(t), (tok.decode([t]), matcher.get_error())
    return {"tokenizer_s": tokenizer_s, "compile_s": compile_s, "steps": steps}


def bench_engine(model: str, repeats: int = 3) -> None:
    import asyncio  # deferred: only --engine runs an event loop

    # deferred: only --engine loads the serving stack
    from tuneforge.deploy.engines import GenRequest, LocalEngine, collect
    from tuneforge.deploy.grammar import json_grammar

    order = {"type": "object", "properties": {"item": {"type": "string"}, "qty": {"type": "integer"},
                                              "notes": {"type": "string"}}, "required": ["item", "qty", "notes"]}
    msgs = [{"role": "user", "content": "Write an order for 3 boxes of nails as JSON with a long note."}]

    async def run() -> None:
        engine = LocalEngine("cpu", "fp32", max_batch=1)
        await engine.load(GenRequest("base", None, model))
        for _ in range(repeats):
            for grammar in (None, json_grammar(order)):
                t0 = time.perf_counter()
                out = await collect(engine.stream(GenRequest("base", None, model, msgs, max_tokens=48,
                                                             grammar=grammar)))
                dt = time.perf_counter() - t0
                print(f"engine {'grammar' if grammar else 'free   '}: {out.completion_tokens} tokens, "
                      f"{dt * 1000 / max(1, out.completion_tokens):.1f} ms/token, {out.text[:60]!r}")
        await engine.close()

    asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default="smollm2-135m-instruct")
    ap.add_argument("--engine", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(args.tokenizer)
    vocab = len(tok)
    schema = call_schema(TOOLS)
    text = f"{TOOL_CALL_OPEN}\n{json.dumps(CALL)}\n{TOOL_CALL_CLOSE}"
    candidates = [("llguidance", bench_llguidance)]
    if importlib.util.find_spec("xgrammar"):
        candidates.insert(0, ("xgrammar", bench_xgrammar))
    else:
        print("xgrammar: not installed, left out (pip install xgrammar to compare it)")
    for name, fn in candidates * 2:  # twice: warm
        r = fn(tok, schema, text, vocab)
        ms = [s * 1000 for s in r["steps"]]
        extra = {k: round(v * 1000, 1) for k, v in r.items() if k.endswith("_s")}
        print(f"{name}: vocab {vocab}, compile ms {extra}, {len(ms)} tokens, mask+apply per token: "
              f"median {statistics.median(ms):.3f} ms, p90 {sorted(ms)[int(len(ms) * 0.9)]:.3f} ms, "
              f"max {max(ms):.3f} ms, first {ms[0]:.3f} ms")
    if args.engine:
        bench_engine(args.tokenizer)


if __name__ == "__main__":
    main()
