"""``moerge serve``: a base and its experts behind one OpenAI-compatible endpoint, routed per request
or per token, with continuous batching over the mixture runtime.

- ``bank.py``: what is served (base, experts, routers) and how a request's ``model`` maps to a route;
- ``engine.py``: the continuous-batching loop (one worker thread owns the model);
- ``app.py``: the HTTP API (FastAPI), OpenAI's shapes and errors;
- ``ray_serve.py``: the same app as Ray Serve replicas (``--ray``);
- ``Server`` here: the app on uvicorn, in the foreground (the CLI) or a background thread (tests,
  notebooks).
"""

from __future__ import annotations

import socket
import threading
import time

from moerge.errors import MoergeError

__all__ = ["Server", "build", "serve"]


def build(*, library=None, experts=None, base=None, routers=None, router_options=None, api_key: str | None = None,
          max_batch: int = 32, max_concurrent: int = 64, runtime_adapters: bool = True, draft=None, draft_tokens: int = 4):
    """(FastAPI app, engine) for a library or adapter folders (see ``open_bank``). Routers named in
    ``routers`` must fit the experts (else an error); by default ``centroid`` is served when it can be."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MoergeError("moerge serve needs FastAPI and uvicorn: pip install 'moerge[serve]'") from None
    from moerge.serve.app import create_app
    from moerge.serve.bank import open_bank
    from moerge.serve.engine import Engine

    if max_batch < 1 or max_concurrent < 1 or draft_tokens < 1:
        raise MoergeError("--max-batch, --max-concurrent and --draft-tokens must be at least 1")
    bank = open_bank(library=library, experts=experts, base=base, routers=["centroid"] if routers is None else routers,
                     router_options=router_options, strict=routers is not None)
    engine = Engine(bank, max_batch=max_batch, max_concurrent=max_concurrent, draft=load_draft(draft, bank) if draft else None,
                    draft_tokens=draft_tokens)
    return create_app(engine, api_key=api_key, runtime_adapters=runtime_adapters), engine


def load_draft(draft, bank):
    """The draft model for speculative decoding: any causal LM folder (or a base by name) with the
    served base's vocabulary, token for token."""
    from moerge import base as base_model

    model, tok = base_model.load(draft)
    if tok.get_vocab() != bank.tokenizer.get_vocab():
        raise MoergeError(f"--draft {draft}: its tokenizer differs from the base's ({len(tok)} vs {len(bank.tokenizer)} tokens); "
                          "a draft must share the served model's vocabulary")
    return model


class Server:
    """The app on uvicorn in a background thread: ``with Server(...) as s: OpenAI(base_url=s.url)``."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **kw):
        import uvicorn

        self.app, self.engine = build(**kw)
        self.host, self.port = host, port or free_port(host)
        self._server = uvicorn.Server(uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                                     lifespan="off"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._server.run, name="moerge-http", daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise MoergeError(f"the server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread:
            self._thread.join(timeout=10)
        self.engine.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(*, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", on_ready=None, **kw) -> None:
    """Serve in the foreground until interrupted (``moerge serve``); ``on_ready(bank)`` once it is loaded."""
    import uvicorn

    app, engine = build(**kw)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.close()
    except OSError as exc:
        engine.close()
        raise MoergeError(f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another port") from None
    if on_ready:
        on_ready(engine.bank)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5)
    finally:
        engine.close()
