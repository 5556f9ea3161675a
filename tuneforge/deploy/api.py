"""Request bodies of the OpenAI-compatible endpoints and the admin endpoints (pydantic).

They give the OpenAPI schema (which the fuzz test generates requests from) and the 400s:
a body that does not fit is answered with OpenAI's error shape naming each bad field.

**Nothing is silently ignored.** Every field of OpenAI's chat-completions and completions
requests is either honoured or refused with a 400 that names it:

honoured   model, messages (tool_calls and tool results included; image_url content parts as
           data: URIs when the base is a vision-language model: chat.check_content_parts), prompt, max_tokens,
           max_completion_tokens, temperature, top_p, stream, stream_options.include_usage
           (a final chunk with usage), stop, seed, n (1-8; streamed chunks carry their
           choice's index), logprobs /
           top_logprobs (chat: bool + 0-20; completions: int 0-20), tools, tool_choice,
           parallel_tool_calls, response_format (text, json_object, json_schema: enforced
           while decoding, deploy/grammar.py);
harmless   user (kept in the request log, sticks the A/B arm), metadata (string pairs, not
           used), store (false/null only: the request log follows serve.yaml's ``logging``,
           not a per-request flag), modalities ["text"], service_tier "auto"/"default",
           logit_bias {}, presence_penalty / frequency_penalty 0, best_of 1 or n, echo false;
refused    any other value of those, image parts for a text-only base and other non-text parts
           (input_audio, file, ...) by their position, and audio, prediction, reasoning_effort, verbosity,
           web_search_options, suffix, functions / function_call (legacy: use tools) ...
           presence/frequency penalties are not transformers' repetition penalty (additive
           per count vs. multiplicative), so they are refused, not approximated;
unknown    any other field: 400 "NAME: Extra inputs are not permitted" (extra="forbid"), so
           a typo or a newer OpenAI field is never dropped without notice. Messages keep
           extra="allow" (clients echo back fields such as ``refusal`` in the history).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8  # choices per request (each is one more row in the engine's batch)
NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's function and schema names


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Open):
    type: str
    text: str | None = None


class FunctionCall(_Open):
    name: str = Field(min_length=1)
    arguments: str | dict = Field(description="a JSON object, as a string (OpenAI) or an object")


class ToolCall(_Open):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool results
    name: str | None = None


class FunctionDef(_Closed):
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema of type object")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict | None) -> dict | None:
        if v is not None and v and v.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON schema of type 'object'")
        return v


class Tool(_Closed):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Closed):
    name: str = Field(pattern=NAME)


class NamedToolChoice(_Closed):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Closed):
    name: str = Field(pattern=NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(_Closed):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Closed):
    include_usage: bool | None = None


class _Sampling(_Closed):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N, description=f"choices to generate (at most {MAX_N})")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the answer ends before the first")
    # int64, as OpenAI documents it; torch's generator takes no more (2**64 was a 503).
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1,
                             description="sampling seed: the same seed gives the same sampled answer")
    # accepted only as no-ops (refused otherwise, by refusals()):
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    # never honoured (refused by name when present and not null):
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None


class CompletionRequest(_Sampling):
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)
    echo: bool | None = None
    suffix: Any = None


_NEVER = {  # field -> why tuneforge does not honour it
    "audio": "audio output is not generated", "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the served models have no reasoning-effort control",
    "verbosity": "the served models have no verbosity control", "web_search_options": "no web search",
    "functions": "legacy functions: send them as tools", "function_call": "legacy function_call: use tool_choice",
    "prompt_cache_key": "the prefix cache needs no key", "safety_identifier": "no safety service to pass it to",
    "suffix": "fill-in-the-middle is not supported",
}


_PENALTY = ("OpenAI's additive penalty is not transformers' multiplicative repetition penalty; "
            "tuneforge does not approximate it (send 0 or leave it out)")
_STORE = "stored completions are not kept per request; the request log follows serve.yaml's logging section"


def refusals(body: ChatRequest | CompletionRequest) -> list[tuple[str, str]]:
    """(field, why) for each field of ``body`` that the server cannot honour (see module doc)."""
    out = [(f, why) for f, why in _NEVER.items() if getattr(body, f, None) is not None]
    for f in ("presence_penalty", "frequency_penalty"):
        if getattr(body, f):
            out.append((f, _PENALTY))
    if body.logit_bias:
        out.append(("logit_bias", "token biases are not applied (send {} or leave it out)"))
    if body.store:
        out.append(("store", _STORE))
    if body.service_tier not in (None, "auto", "default"):
        out.append(("service_tier", "one service tier only ('auto'/'default')"))
    if isinstance(body, ChatRequest):
        if body.modalities not in (None, ["text"]):
            out.append(("modalities", "text output only (['text'])"))
    else:
        if body.echo:
            out.append(("echo", "the prompt is not echoed back"))
        if body.best_of not in (None, 1, body.n or 1):
            out.append(("best_of", "best_of other than n is not supported"))
    return out


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="a registry reference: name, name:vN or name@alias")


class AliasChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, description="name:vN")
    alias: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    force: bool = Field(False, description="point the alias even if the version's eval is worse")
