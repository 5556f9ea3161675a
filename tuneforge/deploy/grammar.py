"""Constrained decoding and log-probabilities, per row of a generation batch.

The grammar library is **llguidance** (pinned in pyproject.toml). Measured on this project's
CPU host with SmolLM2's 49,152-token vocabulary (benchmarks/grammar_overhead.py, numbers in
benchmarks/RESULTS.md), for a required tool call over three functions:

- llguidance: grammar compile ~2.5 ms, allowed-token mask + apply ~0.13 ms a token
  (one-time ~0.5 s to index the tokenizer, cached per tokenizer); a 3 MB wheel with no
  dependencies;
- xgrammar 0.2.9: compile ~16-19 ms (per distinct schema, before its cache), mask + apply
  ~0.25 ms a token; its wheel depends on triton and apache-tvm-ffi (hundreds of MB, and a
  triton pinned against torch's own).

Both are maintained and used by vLLM/SGLang; llguidance is faster on both counts here and
installs alone, so it is the one. Grammars are written in llguidance's Lark dialect, where
``%json {schema}`` embeds a JSON schema inside a larger grammar (a tool call's tags around it).

``RowProcessor`` is a transformers LogitsProcessor for one batch: row i gets its request's
grammar (or none: that row's logits are untouched) and, when the request asked for
logprobs, the log-softmax of its raw logits is kept until the streamer learns which token
was chosen. It runs before temperature/top-p (transformers puts custom processors first), so
logprobs are the model's own distribution, and masking happens before sampling.
"""

from __future__ import annotations

import json
import threading

import torch

from tuneforge.data.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_tokenizers: dict[tuple[int, int], object] = {}  # (id(hf tokenizer), vocab) -> llguidance tokenizer
_lock = threading.Lock()


class GrammarError(ValueError):
    """A grammar llguidance cannot build (a bad JSON schema): the client's to fix."""


def _lark_string(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lark string literal


def _compact(schema: dict) -> str:
    """The schema for ``%json``, with json.dumps' separators and no other whitespace: by default
    llguidance lets whitespace run freely between tokens, and a weak model then writes
    newlines until max_tokens (seen with the random test model)."""
    fixed = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    own = schema.get("x-guidance")
    return json.dumps(schema | {"x-guidance": fixed | (own if isinstance(own, dict) else {})})


def json_grammar(schema: dict | None) -> str:
    """Lark text for one JSON value matching ``schema`` (None: any JSON object)."""
    return f"start: %json {_compact(schema if schema is not None else {'type': 'object'})}\n"


def tool_call_grammar(schema: dict) -> str:
    """Lark text for exactly one call block ``<tool_call>\\n{json matching schema}\\n</tool_call>``."""
    return (f"start: {_lark_string(TOOL_CALL_OPEN + chr(10))} call {_lark_string(chr(10) + TOOL_CALL_CLOSE)}\n"
            f"call: %json {_compact(schema)}\n")


def check_grammar(lark: str) -> None:
    """Raise GrammarError naming why ``lark`` (e.g. an unsupported JSON schema) cannot be built."""
    # deferred: llguidance is only needed by requests that constrain their output
    import llguidance

    try:
        error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(lark))
    except Exception as e:  # noqa: BLE001 - whatever the schema, a 400 and never a 500
        error = f"{type(e).__name__}: {e}"
    if error:
        raise GrammarError(error)


def _lltokenizer(tok, vocab: int):
    # deferred: llguidance is only needed by requests that constrain their output
    import llguidance.hf

    key = (id(tok), vocab)
    with _lock:
        if key not in _tokenizers:  # ~0.5 s for a 49k vocabulary: once per tokenizer
            _tokenizers[key] = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=tok.eos_token_id)
        return _tokenizers[key]


def warm(tok, vocab: int) -> None:
    """Index the tokenizer and compute one mask now (at model load, before /readyz), so the
    first constrained request does not pay llguidance's one-time start (~0.5-1.8 s measured)."""
    # deferred: llguidance is only needed by requests that constrain their output
    import llguidance
    import llguidance.torch

    m = llguidance.LLMatcher(_lltokenizer(tok, vocab), llguidance.LLMatcher.grammar_from_lark(json_grammar(None)))
    llguidance.torch.fill_next_token_bitmask(m, llguidance.torch.allocate_token_bitmask(1, vocab), 0)


class RowProcessor:
    """Per-row grammar masks and logprob capture for one ``generate`` call (see module doc).

    ``grammars[i]``: Lark text or None; ``top[i]``: None (no logprobs) or how many alternatives
    (0-20) to report. ``done(i)`` says a row has ended (its matcher then stops consuming)."""

    def __init__(self, tok, grammars: list[str | None], top: list[int | None], done):
        self.tok, self.grammars, self.top, self.done = tok, grammars, top, done
        self.matchers: list = [None] * len(grammars)
        self.errors: list[str | None] = [None] * len(grammars)
        self.lp: list[torch.Tensor | None] = [None] * len(grammars)  # last step's log-softmax per row
        self.mask = None
        self.steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            self._start(scores.shape[-1])
        elif any(self.matchers):
            self._consume(input_ids[:, -1].tolist())
        self.steps += 1
        want = [i for i, k in enumerate(self.top) if k is not None]
        if want:
            lp = torch.log_softmax(scores[want].float(), dim=-1)
            for row, i in enumerate(want):
                self.lp[i] = lp[row]
        if any(self.matchers):
            self._apply(scores)
        return scores

    def _start(self, vocab: int) -> None:
        # deferred: llguidance is only needed by requests that constrain their output
        import llguidance
        import llguidance.torch

        self.mask = llguidance.torch.allocate_token_bitmask(len(self.grammars), vocab)
        for i, g in enumerate(self.grammars):
            if g is None:
                continue
            m = llguidance.LLMatcher(_lltokenizer(self.tok, vocab), llguidance.LLMatcher.grammar_from_lark(g))
            if m.is_error():
                self.errors[i] = m.get_error()
            else:
                self.matchers[i] = m

    def _consume(self, tokens: list[int]) -> None:
        for i, m in enumerate(self.matchers):
            if m is None or m.is_stopped() or self.done(i):
                continue
            if not m.consume_token(tokens[i]):
                self.errors[i] = m.get_error()
                self.matchers[i] = None

    def _apply(self, scores: torch.Tensor) -> None:
        # deferred: llguidance is only needed by requests that constrain their output
        import llguidance.torch

        self.mask.fill_(-1)  # every token allowed, for rows without a grammar
        for i, m in enumerate(self.matchers):
            if m is None:
                continue
            if m.is_stopped():  # the grammar is complete: only eos may follow
                eos, bit = divmod(self.tok.eos_token_id, 32)
                self.mask[i].zero_()
                self.mask[i, eos] = (1 << bit) if bit < 31 else -(1 << 31)  # int32 bit 31 is the sign
            else:
                llguidance.torch.fill_next_token_bitmask(m, self.mask, i)
        apply_bitmask(scores, self.mask.to(scores.device))

    def logprob(self, i: int, token: int) -> dict | None:
        """OpenAI's entry for the token row ``i`` just produced: token, logprob, bytes, top_logprobs."""
        lp = self.lp[i]
        if lp is None:
            return None
        entry = self._entry(token, float(lp[token]))
        k = self.top[i] or 0
        if k:
            values, ids = torch.topk(lp, k)
            entry["top_logprobs"] = [self._entry(t, float(v)) for v, t in zip(values.tolist(), ids.tolist(),
                                                                                strict=True)]
        else:
            entry["top_logprobs"] = []
        return entry

    def _entry(self, token: int, logprob: float) -> dict:
        text = self.tok.decode([token])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}


def apply_bitmask(scores: torch.Tensor, mask: torch.Tensor) -> None:
    """Set to -inf, in place, the scores of the tokens a row's mask leaves out (llguidance's
    layout: token t is bit t % 32 of int32 word t // 32; tokens past the mask's words are out).

    By hand in eager torch rather than llguidance.torch.apply_token_bitmask_inplace: that is a
    torch.compile'd kernel, and where inductor emits AVX2 code (torch 2.13; a CPU without
    AVX-512, or ATEN_CPU_CAPABILITY=avx2) it unpacked about half the bits of a random mask
    wrong, so constrained decoding broke off on tokens the grammar allowed; it also compiled for
    seconds on the first constrained request."""
    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=mask.dtype, device=mask.device)) & 1
    allowed = bits.flatten(1)[:, : scores.shape[-1]] == 1
    n = allowed.shape[1]
    scores[:, n:] = float("-inf")
    scores[:, :n].masked_fill_(~allowed, float("-inf"))
