"""The OpenAI-compatible HTTP API (FastAPI) over the engine.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
as server-sent events ending in ``data: [DONE]``), ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (vLLM's names; off unless the server is given folders to load from),
``GET /health``. Every error is OpenAI's JSON shape: a 4xx for what the client sent, 500 for a fault
inside the server (a short message; the traceback goes to the server's log only), 503 while shutting
down, 504 past the request's deadline. Every request the engine admits gets an answer, and a client
that goes away mid-stream frees its row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from pathlib import Path

from moerge.errors import MoergeError
from moerge.lm.chat import chat_ids, completion_ids
from moerge.serve.bank import Conflict, NotFound
from moerge.serve.engine import Busy, Engine, Sampling, Sequence, Unavailable
from moerge.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    LoadAdapter,
    UnloadAdapter,
    error_body,
    error_place,
    unknown_field,
)

ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
          "/v1/load_lora_adapter": LoadAdapter, "/v1/unload_lora_adapter": UnloadAdapter}
log = logging.getLogger("moerge.serve")
NO_RUNTIME = ("loading and unloading adapters at run time is off on this server: start it with --adapter-root DIR to "
              "allow adapters from DIR (or add the adapter to the library the server runs on: moerge library add)")


def create_app(engine: Engine, *, api_key: str | None = None, adapter_roots: list | None = None,
               admin_key: str | None = None, request_timeout: float = 600.0, no_runtime: str = NO_RUNTIME):
    """The app over ``engine``. ``adapter_roots``: folders ``load_lora_adapter`` may read from (None:
    run-time loading and unloading are off, ``no_runtime`` says why); ``admin_key``: the key those two
    need instead of ``api_key``; ``request_timeout``: seconds a request may take, queueing included,
    before it is answered 504 and its slot freed."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="moerge", docs_url=None, redoc_url=None, openapi_url=None)
    bank = engine.bank
    started = int(time.time())

    def fail(status: int, message: str, **kw) -> JSONResponse:
        return JSONResponse(error_body(status, message, **kw), status_code=status)

    roots = [Path(r).expanduser().resolve() for r in adapter_roots] if adapter_roots is not None else None

    def key_ok(request: Request, key: str) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())

    @app.middleware("http")
    async def auth(request: Request, call_next):
        path = request.url.path
        if admin_key and path in ADMIN_PATHS:
            if not key_ok(request, admin_key):
                return fail(401, f"{path} needs the server's --admin-key: send 'Authorization: Bearer ADMIN_KEY'",
                            code="invalid_api_key")
        elif api_key and path.startswith("/v1/") and not key_ok(request, api_key):
            return fail(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the server's "
                        "--api-key", code="invalid_api_key")
        try:
            return await call_next(request)
        except Exception as exc:  # the last line of defence: a JSON 500, never a traceback to the client
            log.error("moerge serve: %s %s failed", request.method, path, exc_info=exc)
            return fail(500, f"internal error: {type(exc).__name__} (see the server's log)")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = sorted(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")  # a misspelt field first
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return fail(400, "the request body is not valid JSON")
        if tuple(first.get("loc", ())) == ("body",):
            return fail(400, "the request body must be a JSON object (and sent with Content-Type: application/json)")
        loc, shapes = error_place(tuple(first.get("loc", ())))
        where = ".".join(loc) or "body"
        if first.get("type") == "extra_forbidden" and len(loc) == 1 and request.url.path in BODIES:
            return fail(400, unknown_field(BODIES[request.url.path], loc[0]), param=where, code="unknown_parameter")
        msg = first.get("msg", "invalid")
        if first.get("type") == "finite_number":
            msg = "must be a finite number"
        return fail(400, f"{where}: {shapes or msg}", param=loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return fail(exc.status_code, str(exc.detail))

    async def run(fn):
        """``fn`` on the engine's worker between two steps (TimeoutError past the request deadline)."""
        return await asyncio.wait_for(asyncio.wrap_future(engine.control(fn)), request_timeout)

    def late_body(what: str = "the request") -> dict:
        return error_body(504, f"{what} did not finish within {request_timeout:g} s (the server's --request-timeout); "
                          "retry, or ask for fewer tokens", code="timeout")

    def late(what: str = "the request") -> JSONResponse:
        return JSONResponse(late_body(what), status_code=504)

    async def next_event(events: asyncio.Queue, seqs: list[Sequence], deadline: float):
        """The next (index, event) of a request's sequences, or None once its deadline has passed (its
        sequences are then ended and stop counting in flight)."""
        try:
            return await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            for s in seqs:
                engine.expire(s, timeout=True)
            return None

    def release(seqs: list[Sequence]) -> None:
        """Answered, failed, timed out or abandoned: sequences still running stop and stop counting."""
        for s in seqs:
            engine.expire(s)

    def user_error(exc: Exception, param: str | None = None) -> JSONResponse:
        """A MoergeError as its status: 404 (``param`` or model), 409, else 400 (naming ``param`` if given)."""
        if isinstance(exc, NotFound):
            return fail(404, str(exc), code="model_not_found", param=param or "model")
        if isinstance(exc, Conflict):
            return fail(409, str(exc))
        return fail(400, str(exc), param=param)

    @app.get("/health")
    async def health():
        h = engine.health()
        return JSONResponse(h, status_code=503 if h["status"] in ("draining", "down") else 200)

    @app.get("/v1/models")
    async def models():
        try:
            await run(bank.refresh)
        except MoergeError as exc:
            return fail(503, f"the library could not be read: {exc}")
        except (Unavailable, TimeoutError) as exc:
            return fail(503, f"the server cannot answer now: {exc or 'busy past the deadline'}")
        return {"object": "list", "data": bank.models(started)}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        try:
            await run(bank.refresh)
        except (MoergeError, Unavailable, TimeoutError):
            pass  # what is loaded still answers
        listed = {m["id"]: m for m in bank.models(started)}
        if model not in listed:
            try:
                model = bank.expert_name(model)  # a bare name: its newest version
            except NotFound as exc:
                return fail(404, str(exc), code="model_not_found", param="model")
        return listed[model]

    def allowed(path: str) -> str | None:
        """Why ``path`` may not be loaded (None: it may)."""
        if roots is None:
            return no_runtime
        where = Path(path).expanduser().resolve()
        if not any(where == r or r in where.parents for r in roots):
            return (f"lora_path {path}: outside the folders this server loads adapters from (--adapter-root "
                    f"{', '.join(str(r) for r in roots)})")
        return None

    async def admin(fn) -> JSONResponse | None:
        try:
            await run(fn)
        except MoergeError as exc:
            return user_error(exc)
        except Unavailable as exc:
            return fail(503, str(exc))
        except TimeoutError:
            return late("the adapter change")
        return None

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapter):
        why = allowed(body.lora_path)
        if why:
            return fail(403, why, param="lora_path" if roots is not None else None)
        if body.load_inplace:
            return fail(400, "load_inplace is not supported: unload the adapter first, then load the new one",
                        param="load_inplace")
        return await admin(lambda: bank.load_folder(body.lora_name, body.lora_path)) or \
            {"status": "ok", "loaded": body.lora_name, "experts": bank.names}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapter):
        if roots is None:
            return fail(403, no_runtime)
        return await admin(lambda: bank.remove(body.lora_name, list(engine.running))) or \
            {"status": "ok", "unloaded": body.lora_name, "experts": bank.names}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        given = body.prompt
        if isinstance(given, list) and given and all(isinstance(t, int) for t in given):
            given = [given]  # one prompt of token ids
        if isinstance(given, list) and given and all(isinstance(t, list) for t in given):  # prompts of token ids
            vocab = vocab_size()
            bad = next((t for ids in given for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                return fail(400, f"prompt: token id {bad} is outside this model's vocabulary (0 to {vocab - 1})",
                            param="prompt")
            prompts = [(list(ids), bank.tokenizer.decode(ids, skip_special_tokens=True)) for ids in given]
        else:
            texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            if not texts:
                return fail(400, "prompt: give a string, a list of strings or a list of token ids", param="prompt")
            prompts = [(completion_ids(bank.tokenizer, t), t) for t in texts]
        return await serve(body, prompts, chat=False, default_max=16)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
            ids, text = chat_ids(bank.tokenizer, messages)
        except (ValueError, TypeError) as exc:
            return fail(400, f"messages: {exc}", param="messages")
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await serve(body, [(ids, text)], chat=True, default_max=None)

    def vocab_size() -> int:
        return min(len(bank.tokenizer), bank.model.get_input_embeddings().num_embeddings)

    async def serve(body, prompts: list[tuple[list[int], str]], *, chat: bool, default_max: int | None):
        why = body.unsupported()
        if why:
            field = why.split()[0].rstrip(":")
            return fail(400, why, param=field if field in type(body).model_fields else None)
        t0 = time.monotonic()
        try:
            route = bank.resolve(body.model, body.mixture)
        except NotFound:
            try:  # an expert added to the library since the last look
                if not await run(bank.refresh):
                    raise
                route = bank.resolve(body.model, body.mixture)
            except MoergeError as exc:
                return user_error(exc, "model" if body.mixture is None else "mixture")
            except Unavailable as exc:
                return fail(503, str(exc))
            except TimeoutError:
                return late()
        except MoergeError as exc:
            return user_error(exc, "model" if body.mixture is None else "mixture")
        ctx = engine.context
        for ids, _ in prompts:
            if not ids:
                return fail(400, "the prompt is empty", param="prompt")
            if len(ids) >= ctx:
                return fail(400, f"the prompt is {len(ids)} tokens; this model's context is {ctx} tokens",
                            code="context_length_exceeded", param="messages" if chat else "prompt")
            if body.max_tokens is not None and len(ids) + body.max_tokens > ctx:
                return fail(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({body.max_tokens}) exceeds this model's "
                            f"context of {ctx} tokens; lower max_tokens", code="context_length_exceeded", param="max_tokens")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs: list[Sequence] = []
        for p, (ids, text) in enumerate(prompts):
            for j in range(body.n):
                index = p * body.n + j

                def emit(ev, index=index):
                    loop.call_soon_threadsafe(events.put_nowait, (index, ev))

                mx = body.max_tokens if body.max_tokens is not None else (default_max or ctx - len(ids))
                sampling = Sampling(max_tokens=min(mx, ctx - len(ids)), temperature=body.temperature, top_p=body.top_p,
                                    seed=None if body.seed is None else body.seed + index, stop=body.stop or [],
                                    ignore_eos=body.ignore_eos)
                seqs.append(Sequence(prompt_ids=ids, prompt_text=text, route=route, sampling=sampling, emit=emit))
        admitted: list[Sequence] = []
        try:
            for s in seqs:
                engine.submit(s)
                admitted.append(s)
        except (Busy, Unavailable) as exc:
            for s in seqs:
                s.cancel()
            for s in admitted:
                engine.expire(s)
            if isinstance(exc, Unavailable):
                return fail(503, str(exc))
            return fail(429, f"the server is busy: {exc}; retry later")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "created": created, "model": body.model}
        deadline = t0 + request_timeout
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(seqs, events, head, chat, include_usage, body.n, deadline),
                                     media_type="text/event-stream")
        texts = [""] * len(seqs)
        infos: list[dict | None] = [None] * len(seqs)
        remaining = len(seqs)
        try:
            while remaining:
                got = await next_event(events, seqs, deadline)
                if got is None:
                    return late()
                i, ev = got
                if ev[0] == "delta":
                    texts[i] += ev[1]
                elif ev[0] == "error":
                    return fail(ev[2], ev[1])
                else:
                    infos[i] = ev[1]
                    remaining -= 1
        finally:
            release(seqs)
        choices = []
        for i, (t, info) in enumerate(zip(texts, infos)):
            c = {"index": i, "finish_reason": info["finish_reason"], "logprobs": None, "experts": info["experts"]}
            c |= {"message": {"role": "assistant", "content": t}} if chat else {"text": t}
            choices.append(c)
        out = {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
               "usage": usage(infos, body.n), "experts": mean_experts(infos)}
        note = None if chat else ended_at_once(infos)
        return out | ({"warning": note} if note else {})

    def ended_at_once(infos: list[dict]) -> str | None:
        """Why a completion is empty, when the model ended at once on a raw prompt and is a chat model."""
        if getattr(bank.tokenizer, "chat_template", None) and all(
                i["completion_tokens"] == 0 and i["finish_reason"] == "stop" for i in infos):
            return ("the model ended its answer at once: it is a chat model, and a raw prompt on /v1/completions gets no "
                    "chat template; send messages to /v1/chat/completions")
        return None

    async def stream(seqs, events, head, chat: bool, include_usage: bool, n: int, deadline: float):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra) -> str:
            return "data: " + json.dumps({**head, "object": obj, "choices": choices, **extra}) + "\n\n"

        def piece(i, text, finish=None, experts=None) -> dict:
            c = {"index": i, "finish_reason": finish, "logprobs": None}
            c |= {"delta": {"content": text} if text or finish else {"role": "assistant", "content": ""}} if chat else {"text": text}
            if experts is not None:
                c["experts"] = experts
            return c

        infos: list[dict | None] = [None] * len(seqs)
        remaining = len(seqs)
        try:
            if chat:
                yield chunk([piece(i, "") for i in range(len(seqs))])
            while remaining:
                got = await next_event(events, seqs, deadline)
                if got is None:
                    yield "data: " + json.dumps(late_body()) + "\n\n"
                    return
                i, ev = got
                if ev[0] == "delta":
                    yield chunk([piece(i, ev[1])])
                elif ev[0] == "error":
                    yield "data: " + json.dumps(error_body(ev[2], ev[1])) + "\n\n"
                    return
                else:
                    infos[i] = ev[1]
                    remaining -= 1
                    note = None if chat else ended_at_once([ev[1]])
                    yield chunk([piece(i, "", ev[1]["finish_reason"], ev[1]["experts"])], **({"warning": note} if note else {}))
            if include_usage:
                yield chunk([], usage=usage(infos, n), experts=mean_experts(infos))
            yield "data: [DONE]\n\n"
        finally:  # the stream ended, or the client went away
            release(seqs)

    return app


def usage(infos: list[dict], n: int) -> dict:
    prompt = sum(i["prompt_tokens"] for i in infos) // max(1, n)
    completion = sum(i["completion_tokens"] for i in infos)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def mean_experts(infos: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for i in infos:
        for k, v in i["experts"].items():
            total[k] = total.get(k, 0.0) + v / len(infos)
    return {k: round(v, 4) for k, v in total.items()}
