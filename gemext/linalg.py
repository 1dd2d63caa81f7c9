"""The one conjugate-gradient solver of the package (iMAML's implicit gradient, TRPO's natural
gradient)."""
from __future__ import annotations

from collections.abc import Callable

import torch

Params = list[torch.Tensor]


def conjugate_gradient(matvec: Callable[[Params], Params], b: Params, steps: int, tiny: float = 1e-30,
                       residual_tol: float | None = None) -> Params:
    """`steps` iterations of conjugate gradient for A x = b from x = 0, for a batch of independent
    symmetric positive-definite systems: every tensor carries a leading system dimension and the
    inner products are per system (a fixed number of steps, so it runs under vmap and on any
    device). `residual_tol`: stop early once every system's squared residual is below it (a host
    sync per step; not under vmap)."""
    def dot(u: Params, w: Params) -> torch.Tensor:
        return sum((ui * wi).flatten(1).sum(1) for ui, wi in zip(u, w))

    def bc(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return s.view(-1, *([1] * (like.dim() - 1)))

    x = [torch.zeros_like(bi) for bi in b]
    r = [bi.clone() for bi in b]
    p = [bi.clone() for bi in b]
    rs = dot(r, r)
    for _ in range(steps):
        if residual_tol is not None and bool((rs < residual_tol).all()):
            break
        ap = matvec(p)
        alpha = rs / (dot(p, ap) + tiny)
        x = [xi + bc(alpha, xi) * pi for xi, pi in zip(x, p)]
        r = [ri - bc(alpha, ri) * api for ri, api in zip(r, ap)]
        rs_new = dot(r, r)
        beta = rs_new / (rs + tiny)
        p = [ri + bc(beta, ri) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x
