"""The OpenAI-compatible HTTP API (FastAPI) over the engine.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
as server-sent events ending in ``data: [DONE]``), ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (vLLM's names), ``GET /health``. Every error is OpenAI's JSON shape with
a 4xx status; a client that goes away mid-stream frees its row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

from moerge.errors import MoergeError
from moerge.serve.bank import Conflict, NotFound
from moerge.serve.engine import Busy, Engine, Sampling, Sequence
from moerge.serve.protocol import ChatRequest, CompletionRequest, LoadAdapter, UnloadAdapter, error_body


def create_app(engine: Engine, *, api_key: str | None = None, runtime_adapters: bool = True):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="moerge", docs_url=None, redoc_url=None, openapi_url=None)
    bank = engine.bank
    started = int(time.time())

    def fail(status: int, message: str, **kw) -> JSONResponse:
        return JSONResponse(error_body(status, message, **kw), status_code=status)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
                return fail(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the server's "
                            "--api-key", code="invalid_api_key")
        try:
            return await call_next(request)
        except Exception as exc:  # the last line of defence: a JSON 500, never a traceback to the client
            return fail(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return fail(400, "the request body is not valid JSON")
        if tuple(first.get("loc", ())) == ("body",):
            return fail(400, "the request body must be a JSON object (and sent with Content-Type: application/json)")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return fail(400, f"{where}: {first.get('msg', 'invalid')}", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return fail(exc.status_code, str(exc.detail))

    async def run(fn):
        """``fn`` on the engine's worker between two steps."""
        return await asyncio.wrap_future(engine.control(fn))

    def user_error(exc: Exception) -> JSONResponse:
        if isinstance(exc, NotFound):
            return fail(404, str(exc), code="model_not_found", param="model")
        if isinstance(exc, Conflict):
            return fail(409, str(exc))
        return fail(400, str(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.health()}

    @app.get("/v1/models")
    async def models():
        try:
            await run(bank.refresh)
        except MoergeError as exc:
            return fail(503, f"the library could not be read: {exc}")
        return {"object": "list", "data": bank.models(started)}

    no_runtime = ("adapters are not loaded at run time on Ray Serve replicas (a load would reach one replica); add it to "
                  "the library the server runs on (moerge library add) and every replica serves it")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapter):
        if not runtime_adapters:
            return fail(400, no_runtime)
        try:
            await run(lambda: bank.load_folder(body.lora_name, body.lora_path))
        except MoergeError as exc:
            return user_error(exc)
        return {"status": "ok", "loaded": body.lora_name, "experts": bank.names}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapter):
        if not runtime_adapters:
            return fail(400, no_runtime)
        try:
            await run(lambda: bank.remove(body.lora_name, list(engine.running)))
        except MoergeError as exc:
            return user_error(exc)
        return {"status": "ok", "unloaded": body.lora_name, "experts": bank.names}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        from moerge.tasks.chat import completion_ids

        if isinstance(body.prompt, list) and body.prompt and all(isinstance(t, int) for t in body.prompt):
            prompts = [(list(body.prompt), bank.tokenizer.decode(body.prompt, skip_special_tokens=True))]
        else:
            texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            if not texts:
                return fail(400, "prompt: give a string, a list of strings or a list of token ids", param="prompt")
            prompts = [(completion_ids(bank.tokenizer, t), t) for t in texts]
        return await serve(body, prompts, chat=False, default_max=16)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        from moerge.tasks.chat import chat_ids

        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
            ids, text = chat_ids(bank.tokenizer, messages)
        except (ValueError, TypeError) as exc:
            return fail(400, f"messages: {exc}", param="messages")
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        return await serve(body, [(ids, text)], chat=True, default_max=None)

    async def serve(body, prompts: list[tuple[list[int], str]], *, chat: bool, default_max: int | None):
        why = body.unsupported()
        if why:
            return fail(400, why)
        try:
            route = bank.resolve(body.model, body.mixture)
        except NotFound:
            try:  # an expert added to the library since the last look
                if not await run(bank.refresh):
                    raise
                route = bank.resolve(body.model, body.mixture)
            except MoergeError as exc:
                return user_error(exc)
        except MoergeError as exc:
            return user_error(exc)
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
        try:
            for s in seqs:
                engine.submit(s)
        except Busy as exc:
            for s in seqs:
                s.cancel()
            return fail(429, f"the server is busy: {exc}; retry later")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "created": created, "model": body.model}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(seqs, events, head, chat, include_usage, body.n), media_type="text/event-stream")
        texts = [""] * len(seqs)
        infos: list[dict | None] = [None] * len(seqs)
        remaining = len(seqs)
        try:
            while remaining:
                i, ev = await events.get()
                if ev[0] == "delta":
                    texts[i] += ev[1]
                elif ev[0] == "error":
                    return fail(ev[2], ev[1])
                else:
                    infos[i] = ev[1]
                    remaining -= 1
        finally:
            for s in seqs:
                if s.finish is None:
                    s.cancel()
        choices = []
        for i, (t, info) in enumerate(zip(texts, infos)):
            c = {"index": i, "finish_reason": info["finish_reason"], "logprobs": None, "experts": info["experts"]}
            c |= {"message": {"role": "assistant", "content": t}} if chat else {"text": t}
            choices.append(c)
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage(infos, body.n), "experts": mean_experts(infos)}

    async def stream(seqs, events, head, chat: bool, include_usage: bool, n: int):
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
                i, ev = await events.get()
                if ev[0] == "delta":
                    yield chunk([piece(i, ev[1])])
                elif ev[0] == "error":
                    yield "data: " + json.dumps(error_body(ev[2], ev[1])) + "\n\n"
                    return
                else:
                    infos[i] = ev[1]
                    remaining -= 1
                    yield chunk([piece(i, "", ev[1]["finish_reason"], ev[1]["experts"])])
            if include_usage:
                yield chunk([], usage=usage(infos, n), experts=mean_experts(infos))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): rows still in flight stop at the next step
            for s in seqs:
                if s.finish is None:
                    s.cancel()

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
