"""Karcher (Riemannian) mean of several tensors' directions on the unit sphere, found by fixed-point
iteration; the result is rescaled by the mean norm."""

from __future__ import annotations

import torch

from moerge.methods.registry import Method, Param, register


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [t / n if float(n) != 0.0 else torch.zeros_like(t) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = sum(ai * ui for ai, ui in zip(a, u))
    mn = torch.linalg.vector_norm(mean)
    mean = u[0].clone() if float(mn) < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.dot(mean.reshape(-1), ui.reshape(-1)).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        tn = torch.linalg.vector_norm(tangent)
        if float(tn) < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    return sum(al * n for al, n in zip(alphas, norms)) * mean


def karcher(base, tensors: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), int(max_iter), tol)


register(Method(
    "karcher", karcher,
    params=(Param("max_iter", int, 10, low=1), Param("tol", float, 1e-5, low=0, open_low=True)),
    pretty="Karcher mean", reference="https://en.wikipedia.org/wiki/Karcher_mean",
))
