"""`moerge serve`: base and experts behind one OpenAI-compatible endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moerge.cli.common import (
    DEVICE_OPT,
    DTYPE_OPT,
    THREADS_OPT,
    _user_errors,
    _warn,
    err,
)


def serve_cmd(
    library: Optional[Path] = typer.Option(None, "--library", help="Serve the library's latest adapters on its latest base "
                                           "(experts added to it later appear without a restart)."),
    experts: Optional[str] = typer.Option(None, "--experts", help="Adapter folders (comma-separated) instead of a library."),
    base: Optional[str] = typer.Option(None, "--base", help="Base for --experts (default: the one their cards name, else the built-in base), or to serve alone."),
    router: Optional[list[str]] = typer.Option(None, "--router", help="A router to serve as model 'router:NAME' (repeat "
                                               "for several; default: centroid when the experts allow it)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every one; set --api-key then)."),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOERGE_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/* (or $MOERGE_API_KEY)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Requests decoded together in one forward pass."),
    max_concurrent: int = typer.Option(64, "--max-concurrent", help="Requests in flight (running + waiting); more get 429."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Deploy as Ray Serve replicas: 'local' starts a local Ray, or "
                                      "give a cluster address."),
    replicas: int = typer.Option(2, "--replicas", help="With --ray: copies of the server Ray spreads requests over."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Speculative decoding: a small model with the base's "
                                        "vocabulary (folder or name) proposes tokens the served model checks."),
    draft_tokens: int = typer.Option(4, "--draft-tokens", help="With --draft: tokens proposed per step."),
    prefix_cache: int = typer.Option(4096, "--prefix-cache", help="Prompt tokens whose KV cache is kept and reused by "
                                     "prompts that start alike, per expert or router (0: off; off with --draft)."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds a request may take, queueing "
                                          "included; then it is answered 504 and its slot freed."),
    grace_period: float = typer.Option(30.0, "--grace-period", help="On SIGTERM or Ctrl-C: seconds the requests in "
                                       "flight get to finish (nothing new is admitted meanwhile)."),
    adapter_root: Optional[list[Path]] = typer.Option(None, "--adapter-root", help="Allow POST /v1/load_lora_adapter and "
                                                      "unload_lora_adapter, loading only from under this folder "
                                                      "(repeat for several). Off by default."),
    admin_key: Optional[str] = typer.Option(None, "--admin-key", envvar="MOERGE_ADMIN_KEY",
                                            help="With --adapter-root: the key load/unload need ('Authorization: Bearer "
                                            "KEY'), instead of --api-key (or $MOERGE_ADMIN_KEY)."),
    threads: Optional[int] = THREADS_OPT,
    dtype: Optional[str] = DTYPE_OPT,
    device: Optional[str] = DEVICE_OPT,
) -> None:
    """An OpenAI-compatible server: the base, each expert and each router as a model, continuous batching."""
    from moerge.serve import serve

    refs = [e for e in (experts or "").split(",") if e]
    if ray is not None:
        _serve_on_ray(ray, replicas, library=library, experts=refs or None, base=base, routers=router or None, host=host,
                      port=port, api_key=api_key, max_batch=max_batch, max_concurrent=max_concurrent, threads=threads or 1,
                      draft=draft, draft_tokens=draft_tokens, request_timeout=request_timeout, adapter_roots=adapter_root,
                      prefix_cache=prefix_cache)
        return
    with _user_errors() as notes:
        def ready(bank) -> None:  # the server runs until stopped: say now what loading it had to say
            _warn(notes)
            notes.clear()
            err.print(_serving_line(bank, host, port, api_key), highlight=False, markup=False)
            if adapter_root:
                err.print(f"run-time adapters: loaded from under {', '.join(str(r) for r in adapter_root)}"
                          + (" (admin key required)" if admin_key else " (any caller with the API key)"),
                          highlight=False, markup=False)

        serve(library=library, experts=refs or None, base=base, routers=router or None, host=host, port=port,
              api_key=api_key, max_batch=max_batch, max_concurrent=max_concurrent, draft=draft, draft_tokens=draft_tokens,
              request_timeout=request_timeout, grace_period=grace_period, adapter_roots=adapter_root or None,
              prefix_cache=prefix_cache,
              admin_key=admin_key, on_ready=ready)


def _serve_on_ray(address: str, replicas: int, *, host: str, port: int, threads: int, **spec) -> None:
    import time

    from moerge.serve import ray_serve

    with _user_errors():
        url = ray_serve.deploy(address=address, replicas=replicas, host=host, port=port, threads=threads, **spec)
    err.print(f"serving {replicas} Ray Serve replica(s) on {url}" + (" (API key required)" if spec.get("api_key") else "")
              + "; Ctrl-C stops them", highlight=False, markup=False)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()


def _serving_line(bank, host: str, port: int, api_key: Optional[str]) -> str:
    routers = ", ".join(f"router:{n}" + ("" if n in bank.routers else f" (off: {bank.router_errors[n]})") for n in bank.router_names)
    return (f"serving {bank.base_id} with {len(bank.names)} expert(s)" + (f" and {routers}" if routers else "")
            + f" on http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
