"""The OpenAI request bodies moerge serves (pydantic), and OpenAI-style errors.

Fields the OpenAI API has and moerge does not implement (logprobs, echo, penalties, tools) are
refused with a 400 naming them rather than silently ignored; unknown fields are ignored, as OpenAI's
servers do. ``ignore_eos`` is vLLM's; ``mixture`` is moerge's own: expert name -> weight (the OpenAI clients send it through
``extra_body``).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    mixture: Optional[dict[str, float]] = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks, tests)
    # accepted only at their neutral values
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return stops

    def unsupported(self) -> str | None:
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported; leave them at 0"
        if self.logit_bias:
            return "logit_bias is not supported"
        return None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int]]
    logprobs: Optional[int] = None
    echo: bool = False

    def unsupported(self) -> str | None:
        if self.logprobs is not None:
            return "logprobs is not supported"
        if self.echo:
            return "echo is not supported"
        return super().unsupported()


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError(f"message content part of type {p.get('type')!r}: only text parts are supported")
            parts.append(p["text"])
        return "".join(parts)


class ChatRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    tools: Optional[list] = None

    def unsupported(self) -> str | None:
        if self.logprobs:
            return "logprobs is not supported"
        if self.tools:
            return "tools are not supported"
        return super().unsupported()


class LoadAdapter(BaseModel):
    lora_name: str
    lora_path: str


class UnloadAdapter(BaseModel):
    lora_name: str


STATUS_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error"}


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": STATUS_TYPE.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
