"""Request bodies of the OpenAI-compatible endpoints and the admin endpoints (pydantic).

They give the OpenAPI schema (which the fuzz test generates requests from) and the 400s:
a body that does not fit is answered with OpenAI's error shape naming each bad field.
Fields OpenAI defines and tuneforge does not use (n, logprobs, tools, ...) are accepted and
ignored, so clients that always send them keep working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str
    text: str | None = None


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]


class _Sampling(_Open):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    user: str | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the answer ends before the first")
    seed: int | None = Field(None, description="sampling seed: the same seed gives the same sampled answer")


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str


class AdapterRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="a registry reference: name, name:vN or name@alias")


class AliasChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str = Field(min_length=1, description="name:vN")
    alias: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    force: bool = Field(False, description="point the alias even if the version's eval is worse")
