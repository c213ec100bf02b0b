"""``moerge serve``: a base and its experts behind one OpenAI-compatible endpoint, routed per request
or per token, with continuous batching over the mixture runtime.

- ``bank.py``: what is served (base, experts, routers) and how a request's ``model`` maps to a route;
- ``engine.py``: the continuous-batching loop (one worker thread owns the model);
- ``app.py``: the HTTP API (FastAPI), OpenAI's shapes and errors;
- ``ray_serve.py``: the same app as Ray Serve replicas (``--ray``);
- ``Server`` here: the app on uvicorn, in the foreground (the CLI) or a background thread (tests,
  notebooks).

The server's parts (FastAPI, torch) load in the functions that build it, so the package imports
light: ``serve.protocol`` and the Ray driver need none of them.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from moerge.errors import MoergeError

__all__ = ["Server", "build", "serve"]


def build(*, library=None, experts=None, base=None, routers=None, router_options=None, api_key: str | None = None,
          max_batch: int = 32, max_concurrent: int = 64, adapter_roots: list | None = None, admin_key: str | None = None,
          request_timeout: float = 600.0, draft=None, draft_tokens: int = 4, prefix_cache: int = 4096,
          no_runtime: str | None = None, device: str | None = None):
    """(FastAPI app, engine) for a library or adapter folders (see ``open_bank``). Routers named in
    ``routers`` must fit the experts (else an error); by default ``centroid`` is served when it can be.
    ``adapter_roots``: folders run-time ``load_lora_adapter`` may read from (None: loading and
    unloading at run time are off); ``admin_key``: the key they need instead of ``api_key``;
    ``request_timeout``: seconds before a request is answered 504; ``prefix_cache``: prompt tokens whose
    keys and values are kept to be reused by prompts that start alike (0: off); ``device``: where the
    base, the experts and the batches compute (None: the ``--device`` setting; auto: a CUDA GPU when
    there is one)."""
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
    if prefix_cache < 0:
        raise MoergeError(f"--prefix-cache {prefix_cache}: give a number of tokens, 0 (off) or more")
    if not request_timeout > 0:
        raise MoergeError(f"--request-timeout {request_timeout}: give a number of seconds above 0")
    for root in adapter_roots or []:
        if not Path(root).expanduser().is_dir():
            raise MoergeError(f"--adapter-root {root}: no such folder; give the folder run-time adapters are loaded from")
    if admin_key is not None and adapter_roots is None:
        raise MoergeError("--admin-key guards run-time adapter loading, which is off: give --adapter-root DIR too")
    bank = open_bank(library=library, experts=experts, base=base, routers=["centroid"] if routers is None else routers,
                     router_options=router_options, strict=routers is not None, device=device)
    draft = "ngram" if draft == "ngram" else load_draft(draft, bank) if draft else None
    engine = Engine(bank, max_batch=max_batch, max_concurrent=max_concurrent, draft=draft,
                    draft_tokens=draft_tokens, prefix_cache=prefix_cache)
    from moerge.serve.app import NO_RUNTIME

    app = create_app(engine, api_key=api_key, adapter_roots=adapter_roots, admin_key=admin_key,
                     request_timeout=request_timeout, no_runtime=no_runtime or NO_RUNTIME)
    return app, engine


def load_draft(draft, bank):
    """The draft model for speculative decoding: any causal LM folder (or a base by name) with the
    served base's vocabulary, token for token. (``draft="ngram"`` needs no model: prompt lookup.)"""
    from moerge.lm import base as base_model
    from moerge.lm.device import model_device

    model, tok = base_model.load(draft, device=model_device(bank.model))  # beside the served model
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


def serve(*, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", on_ready=None, grace_period: float = 30.0,
          **kw) -> None:
    """Serve in the foreground until interrupted (``moerge serve``); ``on_ready(bank)`` once it is loaded.
    SIGTERM or Ctrl-C: stop admitting (new connections are refused, requests on open ones get 503),
    let what is in flight finish for up to ``grace_period`` seconds, answer what is left 503, exit."""
    import uvicorn

    if not 0 <= grace_period < 1e6:
        raise MoergeError(f"--grace-period {grace_period}: give a number of seconds, 0 or more (and finite)")
    if not 0 <= port <= 65535:
        raise MoergeError(f"--port {port}: give a port from 1 to 65535")
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
    server = draining_server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                            timeout_graceful_shutdown=grace_period), engine)
    try:
        server.run()
    finally:
        engine.close()


def draining_server(config, engine):
    """uvicorn's server, which on its exit signal (SIGTERM, Ctrl-C) also tells the engine to admit
    nothing more; uvicorn itself stops accepting connections and waits for the open ones. Just
    before uvicorn's grace period ends, the engine stops and answers what is left 503, so that
    every client gets an answer rather than a cut connection."""
    import uvicorn

    grace = config.timeout_graceful_shutdown or 0

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not engine.draining:
                engine.drain()
                timer = threading.Timer(max(0.0, grace - min(1.0, grace / 4)), engine.close)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    return Server(config)
