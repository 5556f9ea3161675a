"""The serving code users write by hand around a tuned adapter, the serving benchmark's baseline:
transformers + peft, every adapter loaded on one base, ``set_adapter`` per request and
``generate`` (greedy), one request at a time, behind FastAPI.

    python benchmarks/naive_server.py RUN_DIR --port 8765 [--endpoint def|async]

``--endpoint def`` is the endpoint FastAPI's documentation asks for around blocking code: a
plain function, which FastAPI runs on its thread pool, with a lock so that one request runs at
a time. Under concurrent clients the requests then run on different pool threads, and torch's
CPU build (GNU OpenMP, a thread pool per calling thread) slows every parallel op once the pools
hold more threads than cores (docs/deploy.md, "one thread for all of the engine's torch work").
``--endpoint async`` blocks the event loop instead: every request on the one main thread, the
fastest a hand-written server gets. serve_throughput.py also calls ``load`` and ``answer``
in-process, without HTTP. The adapter of RUN_DIR is loaded under 16 names, a0 .. a15.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations as types.
import argparse
import threading

from fastapi import FastAPI
from pydantic import BaseModel

from tuneforge.runs import read_run


def load(run_dir: str, device: str = "auto", dtype: str = "auto") -> dict:
    """The base model with RUN_DIR's adapter loaded under 16 names, and its tokenizer."""
    from peft import PeftModel

    from tuneforge.models.load import load_causal_lm, load_tokenizer
    from tuneforge.models.tokenizer import fix_chat_tokenizer
    from tuneforge.hardware import pick_device, pick_dtype

    run = read_run(run_dir)
    device = pick_device(device)
    tok = load_tokenizer(run.base_model)
    base = load_causal_lm(run.base_model, pick_dtype(dtype, device), device).eval()
    fix_chat_tokenizer(tok, base)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir), adapter_name="a0")
    for i in range(1, 16):
        model.load_adapter(str(run.adapter_dir), adapter_name=f"a{i}")
    return {"run": run, "tok": tok, "model": model, "device": device}


def answer(naive: dict, adapter: str, messages: list[dict], max_tokens: int) -> tuple[str, int]:
    """One request: the adapter set, the chat rendered with the run's system prompt, greedy
    ``generate``. Returns the text and the number of generated tokens (EOS not counted)."""
    import torch

    from tuneforge.data.render import with_system

    tok, model = naive["tok"], naive["model"]
    model.set_adapter(adapter)
    ids = tok.apply_chat_template(with_system(messages, naive["run"].system_prompt), add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids.to(naive["device"]), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    n = len(new) - (bool(new) and new[-1] == tok.eos_token_id)
    return tok.decode(new[:n], skip_special_tokens=True), n


class Chat(BaseModel):
    model: str  # the adapter's name
    messages: list[dict]
    max_tokens: int = 32


def app(naive: dict, endpoint: str) -> FastAPI:
    """FastAPI app with an OpenAI-shaped ``/v1/chat/completions`` (model = adapter name)."""
    lock = threading.Lock()  # peft's set_adapter + generate are not safe to interleave

    def reply(req: Chat) -> dict:
        with lock:
            text, n = answer(naive, req.model, req.messages, req.max_tokens)
        return {"object": "chat.completion", "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"completion_tokens": n}}

    api = FastAPI()
    if endpoint == "def":
        @api.post("/v1/chat/completions")
        def chat(req: Chat) -> dict:
            return reply(req)
    else:
        @api.post("/v1/chat/completions")
        async def chat_on_loop(req: Chat) -> dict:
            return reply(req)
    return api


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--endpoint", choices=["def", "async"], default="def")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    import uvicorn

    uvicorn.run(app(load(args.run_dir, args.device, args.dtype), args.endpoint), host="127.0.0.1", port=args.port,
                log_level="warning")
