"""``moerge serve --ray``: the same FastAPI app as Ray Serve replicas behind Ray's HTTP proxy.

Each replica builds its own bank and engine from the same spec (library, experts, base, routers), so
each batches the requests Ray hands it; Ray spreads requests over replicas and restarts failed ones.
Run-time adapter loading is off here (a load would reach one replica): replicas serve a library, and
an expert added to it appears on every replica at the next request that names it.
"""

from __future__ import annotations

import os

from moerge.errors import MoergeError
from moerge.library import library_for
from moerge.lm.device import resolve as resolve_device
from moerge.serve import build
from moerge.serve.bank import servable_router, sources

NO_RUNTIME = ("adapters are not loaded at run time on Ray Serve replicas (a load would reach one replica); add it to "
              "the library the server runs on (moerge library add) and every replica serves it")


def _replica_app(spec: dict):
    """Runs on each replica: the app over its own engine."""
    import torch

    torch.set_num_threads(spec.pop("threads", 1))
    app, _engine = build(**spec, no_runtime=NO_RUNTIME)
    return app


def deploy(*, address: str | None = None, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
           cpus_per_replica: float = 1.0, threads: int = 1, blocking: bool = False, **spec) -> str:
    """Start (or join) Ray, start Serve's proxy on host:port and run ``replicas`` copies of the app;
    returns the base URL (``.../v1``). ``address``: None or "local" for a local Ray, else a cluster."""
    if replicas < 1:
        raise MoergeError(f"--replicas {replicas}: at least 1")
    spec["library"] = library_for(spec.get("library"), spec.get("experts"))  # resolved here, not in each replica
    check(**spec)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MoergeError("--ray needs Ray Serve: pip install 'ray[serve]'") from None
    # a loaded machine starts the proxy slower than Serve's 5 s readiness check allows
    for var in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(var, "60")
    if not ray.is_initialized():
        local = address in (None, "", "local")
        try:
            ray.init(address=None if local else address, include_dashboard=False, log_to_driver=False,
                     **({"num_cpus": max(2, int(replicas * cpus_per_replica + 0.999))} if local else {}))
        except ConnectionError as e:
            raise MoergeError(f"--ray {address}: cannot join the Ray cluster ({e}); check the address or use 'local'") from None
    serve.start(http_options={"host": host, "port": port})
    # the device, decided here (--device, $MOERGE_DEVICE; auto: CUDA when this machine has it): a CUDA replica
    # asks Ray for a GPU of its own and sees it as cuda (Ray sets CUDA_VISIBLE_DEVICES per replica)
    where = resolve_device(spec.pop("device", None))
    replica_spec = dict(spec, threads=threads, device="cuda" if where.type == "cuda" else where.type)
    gpus = {"num_gpus": 1} if where.type == "cuda" else {}

    def builder():  # a function of no arguments: Ray Serve calls it on each replica to get the ASGI app
        return _replica_app(dict(replica_spec))

    deployment = serve.deployment(serve.ingress(builder)(), name="moerge", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": cpus_per_replica, **gpus})
    try:
        serve.run(deployment.bind(), name="moerge", route_prefix="/", blocking=blocking)
    except Exception as exc:  # a replica failed to start: Ray's own error, first line
        shutdown()
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
        raise MoergeError(f"--ray: the replicas did not start: {first}") from None
    return f"http://{host}:{port}/v1"


def check(*, library=None, experts=None, base=None, routers=None, adapter_roots=None, **_) -> None:
    """What can be checked before Ray starts, in one line each: the experts or library, the routers."""
    if adapter_roots:
        raise MoergeError("--adapter-root: replicas do not load adapters at run time (a load would reach one replica); "
                          "serve a library and add adapters to it")
    sources(library=library, experts=experts, base=base)
    for name in routers or []:
        servable_router(name)


def shutdown() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
