"""The OpenAI request bodies moerge serves (pydantic), and OpenAI-style errors.

Every field is checked at the door, so that nothing a client sends can fail inside a decoding step.
Fields the OpenAI API has and moerge does not implement (logprobs, echo, penalties, tools, ...) are
accepted at their neutral values and refused with a 400 naming them otherwise, rather than silently
ignored; fields that do not change what is generated (``user``, ``metadata``, ``store``, ...) are
accepted and ignored. An unknown field is a 400 naming it and the closest known one, as OpenAI's API
does, so that ``max_token`` or ``temprature`` is not served with default settings. The extensions:
``ignore_eos`` (vLLM's) and ``mixture`` (moerge's own: expert name -> weight; the OpenAI clients send
both through ``extra_body``).
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64 = 2**63  # OpenAI's seed is a 64-bit integer

EXTENSIONS = ("mixture", "ignore_eos")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(..., min_length=1, max_length=512)
    max_tokens: Optional[int] = Field(None, ge=1, lt=INT64)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)
    mixture: Optional[dict[str, float]] = Field(None, max_length=1024)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks, tests)
    # accepted only at their neutral values
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict] = None
    # accepted and ignored: they change nothing that is generated
    user: Optional[str] = None
    metadata: Optional[dict] = None
    store: Optional[bool] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("give at most 4 non-empty stop strings of at most 256 characters")
        return stops

    def unsupported(self) -> str | None:
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported; leave them at 0"
        if self.logit_bias:
            return "logit_bias is not supported"
        return None


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> str | None:
        if self.logprobs is not None:
            return "logprobs is not supported"
        if self.echo:
            return "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of is not supported; use n for several completions"
        if self.suffix:
            return "suffix (insertion) is not supported"
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
    max_completion_tokens: Optional[int] = Field(None, ge=1, lt=INT64)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list] = None
    function_call: Optional[Any] = None
    response_format: Optional[dict] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict] = None
    prediction: Optional[dict] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[dict] = None

    def unsupported(self) -> str | None:
        if self.logprobs or self.top_logprobs:
            return "logprobs is not supported"
        if self.tools or self.functions or self.tool_choice not in (None, "none", "auto") or self.function_call not in (None, "none", "auto"):
            return "tools (and functions) are not supported"
        if self.response_format not in (None, {"type": "text"}):
            return "response_format is not supported: only plain text ({\"type\": \"text\"})"
        if self.modalities not in (None, ["text"]) or self.audio:
            return "modalities: only text output is supported ([\"text\"])"
        for name in ("prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name):
                return f"{name} is not supported"
        return super().unsupported()


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's: replace an adapter of that name; moerge refuses (unload it first)


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: Optional[int] = None  # vLLM's clients may send it; moerge names adapters only


def unknown_field(model: type[BaseModel], name: str) -> str:
    """The 400 message for a field ``model`` does not know: the closest known one, if any."""
    known = list(model.model_fields)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        hint = f"; did you mean {close[0]!r}?"
    elif issubclass(model, _Common):
        hint = f" (moerge's extensions: {', '.join(EXTENSIONS)})"
    else:
        hint = f" (known: {', '.join(known)})"
    return f"unrecognized request field {name!r}{hint}"


# what a field of several accepted shapes takes, for its 400 (pydantic names each shape it tried)
SHAPES = {"prompt": "give a string, a list of strings, a list of token ids or a list of token-id lists",
          "stop": "give a string or a list of at most 4 strings",
          "content": "give a string or a list of text parts ({\"type\": \"text\", \"text\": ...})"}


def error_place(loc: tuple) -> tuple[list[str], str | None]:
    """(the path of a pydantic error location without the body and the shapes a union tried, the
    message for a field of several shapes, if it is one)."""
    path, hint = [], None
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict")):
            hint = SHAPES.get(path[-1] if path else "", hint)  # a union's shape: not part of the field's name
            continue
        path.append(str(part))
    return path, hint


STATUS_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 502: "server_error", 503: "server_error", 504: "timeout"}


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": STATUS_TYPE.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
