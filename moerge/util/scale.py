"""Scale-out: independent jobs run here one after another, or as Ray tasks on a local Ray or a cluster.

Fusion simulation (each contributor's fine-tune) and merge search (each candidate's merge and score)
are lists of jobs that share nothing but files; a job is a plain function whose arguments say all it
needs, so the same function runs in this process or in a Ray worker. A Ray worker gets ``threads``
torch threads (default 1: one job per core is faster than two jobs fighting over threads).
"""

from __future__ import annotations

import os
from typing import Callable

from moerge.errors import MoergeError


class Runner:
    """Runs ``fn(**job)`` for a list of jobs: here, or as Ray tasks (``ray``: True or "local" starts a
    local Ray on this machine's cores; an address joins a cluster)."""

    def __init__(self, fn: Callable[..., dict], ray: bool | str | None = None, threads: int | None = None):
        self.fn = fn
        self.ray = None
        self.threads = threads
        self.started = False  # whether this runner started Ray (and so shuts it down)
        if ray:
            try:
                import ray as ray_mod
            except ImportError:
                raise MoergeError("--ray: Ray is not installed; pip install 'moerge[ray]' (or pip install ray)") from None
            if not ray_mod.is_initialized():
                address = None if ray in (True, "local", "") else str(ray)
                try:
                    ray_mod.init(address=address, include_dashboard=False, log_to_driver=False,
                                 **({"num_cpus": os.cpu_count() or 1} if address is None else {}))
                    self.started = True
                except ConnectionError as e:
                    raise MoergeError(f"--ray {ray}: cannot join the Ray cluster ({e}); check the address "
                                      "(ray://HOST:10001 or HOST:6379) or omit it for a local Ray") from None
            self.ray = ray_mod
            self._remote = ray_mod.remote(num_cpus=1)(fn)

    def close(self) -> None:
        if self.ray is not None and self.started:
            self.ray.shutdown()

    def map(self, jobs: list[dict]) -> list:
        if self.ray is None:
            return [self.fn(**j, threads=None) for j in jobs]
        refs = [self._remote.remote(**j, threads=self.threads or 1) for j in jobs]
        return self.ray.get(refs)
