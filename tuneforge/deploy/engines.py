"""Engines: the server's one plug point. An engine turns a resolved request (which adapter
on which base, the prompt, sampling) into a stream of text chunks.

local  one base model per base name in this process, every registry version a named
       adapter on it; concurrent requests are micro-batched and requests for different
       plain LoRA adapters run in one forward pass (multilora.py; other adapter types
       through peft).
vllm   (vllm_engine.py) forwards to a vLLM OpenAI-compatible server (started with --enable-lora and one
       --lora-modules NAME:vN=RUN_DIR/adapter per version).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneforge.data.render import with_system
from tuneforge.data.tools import chat_ids
from tuneforge.deploy.admission import Admission, RowStop
from tuneforge.deploy.grammar import RowProcessor
from tuneforge.deploy.grammar import warm as warm_grammar
from tuneforge.deploy.multilora import LoraBank
from tuneforge.deploy.prefix_cache import PrefixCache
from tuneforge.deploy.prepack import prepack
from tuneforge.hardware import pick_device, pick_dtype
from tuneforge.models.load import load_causal_lm, load_tokenizer
from tuneforge.data.images import open_image
from tuneforge.evaluate.vision import render as render_vision
from tuneforge.evaluate.vision import split_images
from tuneforge.models.vision import fix_vision_generation, is_vision_model, load_processor, load_vision_model
from tuneforge.models.tokenizer import fix_chat_tokenizer

log = logging.getLogger("tuneforge.serve")


@dataclass(frozen=True)
class GenRequest:
    adapter: str  # the version reference, e.g. "support-bot:v2": the adapter's name in the engine
    adapter_dir: str | None  # None: the base model alone (served under its own name; ``adapter`` is that name)
    base_model: str
    messages: list[dict] | None = None  # chat; or a raw prompt for /v1/completions
    prompt: str | None = None
    system_prompt: str | None = None  # the run's data.system_prompt, used when the chat has none
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tools: list[dict] | None = None  # rendered into the prompt with data.tools.chat_ids (as in training)
    grammar: str | None = None  # llguidance Lark text the output must match (grammar.py), then eos
    logprobs: int | None = None  # None: none; k: each token's logprob and its k most likely alternatives
    response_format: dict | None = None  # as the client sent it (vLLM enforces it itself; local: ``grammar``)
    passthrough: dict | None = None  # tool_choice, parallel_tool_calls as sent, for engines that do tools (vLLM)


@dataclass
class Chunk:
    text: str
    finish_reason: str | None = None  # set on the last chunk, with the token counts
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict] | None = None  # OpenAI's per-token entries for this chunk's tokens, when asked


class EngineError(RuntimeError):
    pass


class PromptTooLong(EngineError):
    """The prompt has more tokens than the server allows (max_prompt_tokens): the client's to fix."""


async def cut_at_stop(chunks: AsyncIterator[Chunk], stops: list[str]) -> AsyncIterator[Chunk]:
    """OpenAI's ``stop``: the answer ends before the first stop string, finish_reason "stop".

    The last len(longest stop) - 1 characters are held back, so a stop string split across
    chunks is still caught. After a hit the rest of the engine's stream is read (not sent) for
    its token counts: the engines generate up to max_tokens either way.
    """
    hold = max(len(s) for s in stops) - 1
    buf, lps = "", None  # held text; logprob entries not yet sent (their tokens may be cut)
    async for c in chunks:
        buf += c.text
        if c.logprobs is not None:
            lps = (lps or []) + c.logprobs
        hits = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if hits:
            last = c
            async for last in chunks:  # noqa: B007 - only the final counts are wanted
                pass
            yield Chunk(buf[: min(hits)], "stop", last.prompt_tokens, last.completion_tokens,
                        _within(lps, min(hits)))
            return
        if c.finish_reason is not None:
            yield Chunk(buf, c.finish_reason, c.prompt_tokens, c.completion_tokens, lps)
            return
        if len(buf) > hold:
            out, buf = buf[: len(buf) - hold], buf[len(buf) - hold :]
            sent = _within(lps, len(out))
            yield Chunk(out, logprobs=sent)
            lps = lps[len(sent):] if lps is not None else None
    if buf:  # a stream that ended without a finish reason
        yield Chunk(buf, logprobs=lps)


def _within(entries: list[dict] | None, chars: int) -> list[dict] | None:
    """The leading logprob entries whose tokens fit in the first ``chars`` characters."""
    if entries is None:
        return None
    out, used = [], 0
    for e in entries:
        used += len(e["token"])
        if used > chars:
            break
        out.append(e)
    return out


async def collect(stream: AsyncIterator[Chunk]) -> Chunk:
    parts, last, lps = [], Chunk(""), None
    async for c in stream:
        parts.append(c.text)
        if c.logprobs is not None:
            lps = (lps or []) + c.logprobs
        last = c
    return Chunk("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens, lps)


# --- local: transformers + peft in this process -----------------------------------------------
@dataclass
class _Call:
    """Work for the engine's worker thread other than a request (a load or an unload)."""
    fn: Any
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future

    def run(self) -> None:
        try:
            result = self.fn()
        except Exception as e:  # noqa: BLE001 - raised in the caller's task
            self.loop.call_soon_threadsafe(_settle, self.done, None, e)
        else:
            self.loop.call_soon_threadsafe(_settle, self.done, result, None)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():  # the caller gave up waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


@dataclass
class _Job:
    req: GenRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: bool = False
    ids: list[int] = field(default_factory=list)


class _RowStreamer:
    """Receives each generation step's tokens for the whole batch ([batch] ids) and sends every
    row's new text to its request as it is produced; a row ends at eos or its own max_tokens."""

    def __init__(self, jobs: list[_Job], prompt_lens: list[int], tok):
        self.jobs, self.prompt_lens, self.tok = jobs, prompt_lens, tok
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.done = [False] * len(jobs)
        self.started = False
        self.steps = 0  # generation steps seen (the first put carries the prompts, not a step)
        self.first_at = self.last_at = 0.0  # perf_counter of the first and the last step's tokens
        self.rows = None  # grammar.RowProcessor of this batch, when a row asked for a grammar or logprobs
        self.pending: list[list[dict] | None] = [None if j.req.logprobs is None else [] for j in jobs]

    def put(self, value: torch.Tensor) -> None:
        if not self.started:  # the first call carries the prompts
            self.started = True
            return
        self.steps += 1
        self.last_at = time.perf_counter()
        if self.steps == 1:
            self.first_at = self.last_at
        for i, t in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if self.done[i]:
                continue
            if t == self.tok.eos_token_id:
                self._finish(i, "stop")
                continue
            self.tokens[i].append(t)
            if self.pending[i] is not None and self.rows is not None:
                self.pending[i].append(self.rows.logprob(i, t))
            text = self.tok.decode(self.tokens[i], skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self._send(i, Chunk(text[len(self.sent[i]):], logprobs=self._take(i)))
                self.sent[i] = text
            if len(self.tokens[i]) >= self.jobs[i].req.max_tokens:
                self._finish(i, "length")

    def end(self) -> None:
        for i in range(len(self.jobs)):
            if not self.done[i]:
                self._finish(i, "length")

    def _take(self, i: int) -> list[dict] | None:
        out = self.pending[i]
        if out is not None:
            self.pending[i] = []
        return out

    def _finish(self, i: int, reason: str) -> None:
        self.done[i] = True
        text = self.tok.decode(self.tokens[i], skip_special_tokens=True)
        error = self.rows.errors[i] if self.rows is not None else None
        if error and self.jobs[i].req.grammar is not None:
            reason = "grammar_error"  # the grammar could not be followed (rare: a tokenizer gap); chat.py says so
        self._send(i, Chunk(text[len(self.sent[i]):], reason, self.prompt_lens[i], len(self.tokens[i]),
                            self._take(i)))

    def _send(self, i: int, chunk: Chunk) -> None:
        job = self.jobs[i]
        job.loop.call_soon_threadsafe(job.out.put_nowait, chunk)


@dataclass
class _Base:
    """One base model and its adapters. Plain LoRA adapters live in ``bank`` and run together in
    one batch (multilora.py); any other adapter is loaded into ``peft``, a PeftModel made on the
    first such adapter, which wraps the same model's modules in place."""

    model: Any  # the transformers model
    tok: Any
    bank: LoraBank
    peft: Any = None
    paths: dict[str, str] = field(default_factory=dict)  # resident adapter -> "gathered" | "peft"
    prefix_ok: bool = False  # its KV cache is one plain layer per decoder layer (no sliding window)
    packed: bool = False  # its Linear layers run on prepacked weights (prepack.py)
    proc: Any = None  # a vision-language base's processor (images in the chat): served by _generate_vision


class LocalEngine:
    """One worker thread runs the batches; requests wait at most ``batch_wait_ms`` to be batched.

    Adapters change (load, unload, LRU eviction) only under ``models_lock``, which a batch
    holds from its first forward pass to its last token, so a running request never loses
    its adapter; an unloaded adapter is loaded again by the next request that needs it.

    ``lora="gathered"`` serves plain LoRA adapters through multilora.LoraBank (every adapter of
    a batch in the same two or three ops per layer); ``lora="peft"`` serves every adapter
    through peft (mixed batches with ``adapter_names=``), the path the benchmark compares against.

    ``SUPPORTS``: tools, tool_choice and response_format (grammars: grammar.py) and logprobs, per row.

    ``prefix_cache_mb``: memory for the KV of served sequences, per adapter, that later prompts
    starting with the same tokens reuse instead of computing again (prefix_cache.py; 0: off).
    ``prepack``: "auto", "on" or "off", bf16 Linear weights packed once for oneDNN on a CPU;
    ``fp32_prefill``: "auto", "on" or "off", many-row products of packed models in float32
    (prepack.py).
    """

    SUPPORTS = frozenset({"logprobs", "tools", "tool_choice", "response_format", "images"})

    def __init__(self, device: str = "auto", dtype: str = "auto", max_batch: int = 16, batch_wait_ms: float = 10,
                 max_adapters: int | None = None, max_prompt_tokens: int | None = None, lora: str = "gathered",
                 prefix_cache_mb: float = 256, prepack: str = "auto", fp32_prefill: str = "auto",
                 max_queue: int = 256):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.max_batch, self.wait = max_batch, batch_wait_ms / 1000
        self.max_adapters, self.max_prompt_tokens, self.lora = max_adapters, max_prompt_tokens, lora
        self.prepack, self.fp32_prefill = prepack, fp32_prefill
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.bases: dict[str, _Base] = {}  # base model name -> its model and adapters
        self.lru: OrderedDict[str, str] = OrderedDict()  # resident adapter -> its base, least recent first
        self.jobs: queue.Queue[_Job | _Call | None] = queue.Queue()
        self.batches: list[list[str]] = []  # adapters of each generate call (for tests and stats)
        self.evicted: list[str] = []  # adapters unloaded by the LRU bound, in order (for tests and stats)
        self.worker: threading.Thread | None = None
        self.lock = threading.Lock()
        self.models_lock = threading.RLock()
        self.admission = Admission(max_batch, max_queue)  # admission.py: queue estimate, cancelled rows

    def admit(self, req: GenRequest, budget_s: float) -> None:
        """Raise admission.Overloaded when ``req`` would not finish within ``budget_s`` seconds
        behind the work already queued, or the queue is full."""
        self.admission.check(req.max_tokens, budget_s)

    async def stream(self, req: GenRequest) -> AsyncIterator[Chunk]:
        self._start()
        job = _Job(req, asyncio.get_running_loop(), asyncio.Queue())
        self.admission.add(job)
        self.jobs.put(job)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, EngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineError(f"{type(item).__name__}: {item}") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Timed out or client gone: the worker skips it if not yet run, and a running batch
            # stops generating its row (admission.RowStop).
            job.cancelled = True
            self.admission.forget(job)

    async def load(self, req: GenRequest) -> None:
        """Load ``req``'s base and adapter now (loading twice is a no-op); waits for a running batch."""
        await self._on_worker(self._locked_model, req)

    async def unload(self, adapter: str) -> bool:
        """Unload an adapter after the running batch (if any) ends; False if it was not loaded."""
        return await self._on_worker(self._unload, adapter)

    async def _on_worker(self, fn, *args):
        """Run ``fn(*args)`` on the worker thread, between batches. Every torch op of the engine
        runs on that one thread: with GNU OpenMP (torch's CPU builds) each thread that runs a
        parallel op keeps its own pool of worker threads, and once the pools of a process hold
        more threads than there are cores, OpenMP stops spinning between parallel regions. A
        decode step is ~1,000 small parallel ops, and it then ran 1.7x slower (SmolLM2-135M, 2
        cores: 85-92 instead of 49-56 ms a token, after a model load on another thread)."""
        self._start()
        loop = asyncio.get_running_loop()
        call = _Call(functools.partial(fn, *args), loop, loop.create_future())
        self.jobs.put(call)
        return await call.done

    def resident(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        with self.models_lock:
            return list(self.lru)

    def paths(self) -> dict[str, str]:
        """How each loaded adapter is served: "gathered" (plain LoRA, multilora.py) or "peft"."""
        with self.models_lock:
            return {a: self.bases[b].paths[a] for a, b in self.lru.items()}

    async def close(self, wait_s: float = 10.0) -> None:
        """Stop the worker after its running batch (cancelled requests stop at their next token).
        A batch still busy after ``wait_s`` (a long prefill) is left to end with the process:
        the worker is a daemon thread, and shutdown must not wait on it."""
        if self.worker is not None:
            self.jobs.put(None)
            await asyncio.to_thread(self.worker.join, wait_s)
            if self.worker.is_alive():
                log.warning("engine worker still busy at shutdown; exiting without it", extra={"waited_s": wait_s})
            self.worker = None

    def _start(self) -> None:
        with self.lock:
            if self.worker is None:
                self.worker = threading.Thread(target=self._loop, name="tuneforge-engine", daemon=True)
                self.worker.start()

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            if isinstance(first, _Call):
                first.run()
                continue
            batch, calls, deadline = [first], [], time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                if isinstance(nxt, _Call):
                    calls.append(nxt)  # after this batch, as a load or unload waits for a running batch
                    continue
                if not nxt.cancelled:  # its caller is gone: it takes no row
                    batch.append(nxt)
            batch = [j for j in batch if not j.cancelled]
            self.admission.started(batch)
            for group in _groups(batch):
                try:
                    self._run(group)
                except Exception as e:  # noqa: BLE001 - handed to each request; the worker lives on
                    for j in group:
                        j.loop.call_soon_threadsafe(j.out.put_nowait, e)
            self.admission.finished()
            for call in calls:
                call.run()

    def _locked_model(self, req: GenRequest) -> _Base:
        with self.models_lock:
            base = self._model(req)
            self._evict(keep={req.adapter})
            return base

    def _unload(self, adapter: str) -> bool:
        with self.models_lock:
            if adapter not in self.lru:
                return False
            self._delete(adapter)
            return True

    def _delete(self, adapter: str) -> None:
        base = self.bases[self.lru.pop(adapter)]
        if self.prefix is not None:
            self.prefix.drop(adapter)
        if base.paths.pop(adapter) == "gathered" and base.bank is not None:
            base.bank.unload(adapter)
            return
        with warnings.catch_warnings():
            # peft warns when the deleted adapter was the active one; each batch sets the
            # adapters it needs, so the active one does not matter here.
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            base.peft.delete_adapter(adapter)

    def _evict(self, keep: set[str]) -> None:
        """Unload least recently used adapters beyond ``max_adapters``, never one in ``keep``
        (the batch about to run); a batch with more distinct adapters than the bound keeps them
        all until it ends."""
        if self.max_adapters is None:
            return
        for adapter in [a for a in self.lru if a not in keep][:max(0, len(self.lru) - self.max_adapters)]:
            self._delete(adapter)
            self.evicted.append(adapter)

    def _model(self, req: GenRequest) -> _Base:
        """The base model (loaded once) with ``req``'s adapter loaded under its version name
        (call with ``models_lock`` held)."""
        # deferred: peft (and the transformers it pulls) load with the first model, not at server start
        from peft import PeftModel

        if req.base_model not in self.bases and is_vision_model(req.base_model):
            proc = load_processor(req.base_model)
            model = load_vision_model(req.base_model, self.dtype, self.device).eval()
            fix_vision_generation(proc, model)
            self.bases[req.base_model] = _Base(model, proc.tokenizer, None, proc=proc)
        if req.base_model not in self.bases:
            tok = load_tokenizer(req.base_model)
            model = load_causal_lm(req.base_model, self.dtype, self.device).eval()
            fix_chat_tokenizer(tok, model)
            bank = LoraBank(model)
            self.bases[req.base_model] = _Base(model, tok, bank, prefix_ok=_plain_kv(model),
                                               packed=prepack(list(bank.linears.values()), self.prepack,
                                                              self.fp32_prefill))
            warm_grammar(tok, model.get_output_embeddings().weight.shape[0])
        base = self.bases[req.base_model]
        if req.adapter_dir is None:  # the base model alone: nothing to load, nothing in the LRU
            return base
        if req.adapter not in base.paths:
            why = ("vision-language base: adapters through peft" if base.bank is None else
                   base.bank.load(req.adapter, req.adapter_dir) if self.lora == "gathered" else "engine lora=peft")
            if why is None:
                base.paths[req.adapter] = "gathered"
            else:
                if base.peft is None:
                    base.peft = PeftModel.from_pretrained(base.model, req.adapter_dir, adapter_name=req.adapter)
                else:
                    base.peft.load_adapter(req.adapter_dir, adapter_name=req.adapter)
                base.peft.eval()
                base.paths[req.adapter] = "peft"
            log.info("adapter loaded", extra={"adapter": req.adapter, "path": base.paths[req.adapter],
                                              "why_peft": why})
        self.lru[req.adapter] = req.base_model
        self.lru.move_to_end(req.adapter)
        return base

    def _run(self, jobs: list[_Job]) -> None:
        with self.models_lock:  # no adapter changes while this batch generates
            for j in jobs:
                base = self._model(j.req)
            self._evict(keep={j.req.adapter for j in jobs if j.req.adapter_dir is not None})
            if base.proc is not None:  # a vision-language base: chats with images
                try:
                    for adapter in dict.fromkeys(j.req.adapter for j in jobs):
                        self._generate_vision(base, [j for j in jobs if j.req.adapter == adapter])
                finally:
                    self._evict(keep=set())
                return
            jobs, prompts = self._prompts(jobs, base.tok)
            try:
                for how, part in _by_path(base, jobs).items():
                    self._generate(base, how, [jobs[i] for i in part], [prompts[i] for i in part])
            finally:
                self._evict(keep=set())  # back within the bound if this batch needed more adapters
    def _prompts(self, jobs: list[_Job], tok) -> tuple[list[_Job], list[list[int]]]:
        """Token ids of each job's prompt; a job over ``max_prompt_tokens`` is answered with
        PromptTooLong and left out of the batch."""
        kept, prompts = [], []
        for j in jobs:
            if j.req.messages is not None:  # rendered as in training, tools included (data/tools.py)
                ids = chat_ids(tok, with_system(j.req.messages, j.req.system_prompt), j.req.tools,
                               add_generation_prompt=True)
            else:
                ids = tok(j.req.prompt, add_special_tokens=False).input_ids
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                err = PromptTooLong(f"the prompt has {len(ids)} tokens; this server takes at most "
                                    f"{self.max_prompt_tokens} (max_prompt_tokens)")
                j.loop.call_soon_threadsafe(j.out.put_nowait, err)
                continue
            kept.append(j)
            prompts.append(ids)
        return kept, prompts

    @torch.no_grad()
    def _generate(self, base: _Base, how: str, jobs: list[_Job], prompts: list[list[int]]) -> None:
        """``how``: "gathered" (multilora.py), "peft-mixed" (peft ``adapter_names=``) or
        "peft-one:ADAPTER" (one peft adapter, made active); see _by_path."""
        # deferred: transformers loads with the first model, not at server start
        from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList

        tok = base.tok
        r = jobs[0].req
        sampling = dict(do_sample=True, temperature=r.temperature, top_p=r.top_p) if r.temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if r.temperature > 0 and r.seed is not None:
            torch.manual_seed(r.seed)  # jobs with a seed batch only with the same seed (_groups)
        adapters = [j.req.adapter for j in jobs]
        self.batches.append(adapters)
        model, extra, adapters_on = base.model, {}, contextlib.nullcontext()
        if how == "gathered":  # base-only rows (no adapter_dir) get None: the base alone
            adapters_on = base.bank.rows([j.req.adapter if j.req.adapter_dir is not None else None for j in jobs])
            if base.peft is not None and base.peft.peft_config:
                adapters_on = _both(base.peft.disable_adapter(), adapters_on)  # peft's adapters stay out of it
        elif how == "peft-mixed":  # peft runs each layer once per adapter sub-batch
            model, extra = base.peft, {"adapter_names": adapters}
        else:
            model = base.peft
            model.set_adapter(adapters[0])
        # Prefix cache: only where each row's KV comes from its own adapter in the plain model
        # (peft's prompt-learning adapters put their own entries in the cache).
        cache = self.prefix if how == "gathered" and base.prefix_ok else None
        reuse, past = 0, None
        if cache is not None:
            found = [cache.match(a, p) for a, p in zip(adapters, prompts, strict=True)]
            reuse = min(n for n, _ in found)
            if reuse:
                past = DynamicCache(ddp_cache_data=[
                    (torch.stack([e.kv[layer][0][:, :reuse] for _, e in found]),
                     torch.stack([e.kv[layer][1][:, :reuse] for _, e in found]))
                    for layer in range(len(found[0][1].kv))], config=base.model.config)
                cache.reused_tokens += reuse * len(jobs)
        ids, mask = _layout(prompts, reuse, tok.pad_token_id)
        streamer = _RowStreamer(jobs, [len(p) for p in prompts], tok)
        if any(j.req.grammar is not None or j.req.logprobs is not None for j in jobs):
            streamer.rows = RowProcessor(tok, [j.req.grammar for j in jobs], [j.req.logprobs for j in jobs],
                                         lambda i: streamer.done[i])
            extra = extra | {"logits_processor": LogitsProcessorList([streamer.rows])}
        autocast = torch.autocast(self.device, dtype=self.dtype) if self.dtype != torch.float32 else \
            contextlib.nullcontext()
        stop, t0, longest = RowStop(streamer, jobs), time.perf_counter(), max(j.req.max_tokens for j in jobs)
        with autocast, adapters_on:
            out = model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                 past_key_values=past, max_new_tokens=longest, stopping_criteria=StoppingCriteriaList(
                                     [stop]), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 streamer=streamer, return_dict_in_generate=cache is not None, **extra, **sampling)
        self.admission.observe(len(jobs), streamer.steps, streamer.first_at - t0, streamer.last_at - streamer.first_at,
                               longest, len(stop.cut))
        self.admission.rows.extend((j.req.adapter, len(streamer.tokens[i]), "cancelled" if i in stop.cut else "done")
                                   for i, j in enumerate(jobs))
        if cache is not None:
            _remember(cache, adapters, prompts, reuse, streamer.tokens, out.past_key_values)


    @torch.no_grad()
    def _generate_vision(self, base: _Base, jobs: list[_Job]) -> None:
        """One adapter's jobs on a vision-language base: the processor renders each chat (its
        images as placeholder tokens, expanded with the image features), left padded, streamed
        row by row as text models are. Tools are refused (the VLM templates do not render them)."""
        # deferred: transformers loads with the first model, not at server start
        from transformers import LogitsProcessorList, StoppingCriteriaList

        tok, proc, r = base.tok, base.proc, jobs[0].req
        kept, texts, images = [], [], []
        for j in jobs:
            if j.req.tools:
                j.loop.call_soon_threadsafe(j.out.put_nowait, EngineError(
                    "tools are not supported with a vision-language base (its chat template does not render them)"))
                continue
            if j.req.messages is None:
                texts.append(j.req.prompt)
                images.append([])
            else:
                conv = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], list) else
                         [{"type": "text", "text": m["content"] or ""}]}
                        for m in with_system(j.req.messages, j.req.system_prompt)]
                texts.append(render_vision(proc, conv, generation_prompt=True))
                images.append([open_image(ref) for ref in split_images(conv)])
            kept.append(j)
        if not kept:
            return
        jobs = kept
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = proc(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt",
                       add_special_tokens=False)
        finally:
            tok.padding_side = side
        lens = enc["attention_mask"].sum(dim=1).tolist()
        if self.max_prompt_tokens is not None and max(lens) > self.max_prompt_tokens:
            for j, n in zip(jobs, lens):
                j.loop.call_soon_threadsafe(j.out.put_nowait, PromptTooLong(
                    f"the prompt has {n} tokens (image tokens included); this server takes at most "
                    f"{self.max_prompt_tokens} (max_prompt_tokens)"))
            return
        sampling = dict(do_sample=True, temperature=r.temperature, top_p=r.top_p) if r.temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if r.temperature > 0 and r.seed is not None:
            torch.manual_seed(r.seed)
        self.batches.append([j.req.adapter for j in jobs])
        model, adapters_on = base.model, contextlib.nullcontext()
        if base.peft is not None:
            model = base.peft
            if r.adapter_dir is None:
                adapters_on = base.peft.disable_adapter()
            else:
                model.set_adapter(r.adapter)
        streamer = _RowStreamer(jobs, lens, tok)
        extra = {}
        if any(j.req.grammar is not None or j.req.logprobs is not None for j in jobs):
            streamer.rows = RowProcessor(tok, [j.req.grammar for j in jobs], [j.req.logprobs for j in jobs],
                                         lambda i: streamer.done[i])
            extra = {"logits_processor": LogitsProcessorList([streamer.rows])}
        autocast = torch.autocast(self.device, dtype=self.dtype) if self.dtype != torch.float32 else \
            contextlib.nullcontext()
        stop, t0, longest = RowStop(streamer, jobs), time.perf_counter(), max(j.req.max_tokens for j in jobs)
        enc = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in enc.items()}
        with autocast, adapters_on:
            model.generate(**enc, max_new_tokens=longest, stopping_criteria=StoppingCriteriaList([stop]),
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, streamer=streamer,
                           **extra, **sampling)
        self.admission.observe(len(jobs), streamer.steps, streamer.first_at - t0, streamer.last_at - streamer.first_at,
                               longest, len(stop.cut))
        self.admission.rows.extend((j.req.adapter, len(streamer.tokens[i]), "cancelled" if i in stop.cut else "done")
                                   for i, j in enumerate(jobs))


def _layout(prompts: list[list[int]], reuse: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask [batch, width] for generate: each row's first ``reuse`` tokens
    (their KV comes from the prefix cache), then padding, then the rest of its prompt, so every
    row's next token sits in the last column. Without reuse this is plain left padding. Position
    ids follow the mask (generate counts only unmasked tokens), so padding in the middle leaves
    each token at its own position."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, :reuse], mask[row, :reuse] = torch.tensor(p[:reuse], dtype=torch.long), 1
        ids[row, width - len(p) + reuse:] = torch.tensor(p[reuse:], dtype=torch.long)
        mask[row, width - len(p) + reuse:] = 1
    return ids, mask


def _remember(cache: PrefixCache, adapters: list[str], prompts: list[list[int]], reuse: int,
              answers: list[list[int]], past) -> None:
    """Put each row's sequence (prompt and answer) with its KV from the batch's final cache into
    ``cache``; ``_layout`` placed row r's tokens at columns [0, reuse) and [width - len + reuse,
    width), and its answer follows from ``width`` (KV exists for every token fed back, so not
    for the last one generated)."""
    width, held = max(len(p) for p in prompts), past.get_seq_length()
    for row, (adapter, p) in enumerate(zip(adapters, prompts, strict=True)):
        answer = answers[row][:max(0, held - width)]
        tokens = tuple(p) + tuple(answer)
        if len(tokens) < cache.min_tokens or cache.covers(adapter, tokens):
            continue
        cols = torch.cat([torch.arange(reuse), torch.arange(width - len(p) + reuse, width + len(answer))])
        cols = cols.to(past.layers[0].keys.device)
        cache.put(adapter, tokens, [(layer.keys[row][:, cols], layer.values[row][:, cols]) for layer in past.layers])


def _plain_kv(model) -> bool:
    """The model's KV cache is a plain growing tensor per layer, which cached prefixes can seed
    (sliding-window and hybrid models keep other state)."""
    # deferred: transformers loads with the first model, not at server start
    from transformers import DynamicCache

    # deferred: transformers takes seconds to import; only code that builds a model pays
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)


def _groups(jobs: list[_Job]) -> list[list[_Job]]:
    """Jobs that can share one batch: same base model and sampling settings."""
    out: dict[tuple, list[_Job]] = {}
    for j in jobs:
        sampled = j.req.temperature > 0
        key = (j.req.base_model, j.req.temperature if sampled else 0.0, j.req.top_p, j.req.seed if sampled else None)
        out.setdefault(key, []).append(j)
    return list(out.values())


def _by_path(base: _Base, jobs: list[_Job]) -> dict[str, list[int]]:
    """How each set of jobs that shares one generate call runs -> the jobs' indices: all
    gathered adapters together; peft's LoRA adapters (not DoRA) together, as peft's
    ``adapter_names=`` batches; any other peft adapter alone: peft cannot mix DoRA rows and
    applies its active adapter to every row for other types (IA3, prompt tuning, ...)."""
    out: dict[str, list[int]] = {}
    for i, j in enumerate(jobs):
        a = j.req.adapter
        if j.req.adapter_dir is None or base.paths[a] == "gathered":
            key = "gathered"
        else:
            cfg = base.peft.peft_config[a]
            # LoRA on fused MoE expert weights (target_parameters: peft's ParamWrapper) refuses
            # mixed-adapter batches too, so such an adapter runs alone.
            mixable = cfg.peft_type == "LORA" and not cfg.use_dora and not getattr(cfg, "target_parameters", None)
            key = "peft-mixed" if mixable else f"peft-one:{a}"
        out.setdefault(key, []).append(i)
    return out


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield
