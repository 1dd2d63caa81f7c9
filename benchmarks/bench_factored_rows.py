"""The Woodbury products of `von`'s GGN rows for an MLP, dense against factored.

For an `nn.Sequential` MLP a weight block of a GGN row is the outer product of the point's cotangent
at the layer's output and its input, so the products a `von` step needs — the Gram matrix RΛ⁻¹Rᵀ,
R v (twice: the right-hand side and the control variate) and Rᵀz — can be formed from the per-layer
factors without writing R [T, M, D]. This times both on the sinusoid joint fit's shapes (one thread,
calls alternated; median and fastest call) and checks they agree.

    python benchmarks/bench_factored_rows.py [--tasks 25 --points 20 --repeats 200]
"""
from __future__ import annotations

import argparse
import statistics

import torch
from common import interleaved

LAYERS = [(40, 1), (40, 40), (1, 40)]  # (out, in) of the sinusoid MLP's Linear layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=25)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    T, N = args.tasks, args.points
    delta = [torch.randn(T, N, o, generator=g) for o, _ in LAYERS]
    h = [torch.randn(T, N, i, generator=g) for _, i in LAYERS]
    lam_w = [torch.rand(T, o, i, generator=g) + 0.5 for o, i in LAYERS]
    lam_b = [torch.rand(T, o, generator=g) + 0.5 for o, _ in LAYERS]
    R = torch.cat([torch.cat([(d.unsqueeze(-1) * x.unsqueeze(-2)).reshape(T, N, -1), d], -1)
                   for d, x in zip(delta, h)], -1)
    lam_inv = torch.cat([torch.cat([w.reshape(T, -1), b], -1) for w, b in zip(lam_w, lam_b)], -1)
    v, z = torch.randn(T, R.shape[-1], generator=g), torch.randn(T, N, generator=g)
    buf = torch.empty_like(R)

    def dense():
        K = torch.bmm(torch.mul(R, lam_inv.unsqueeze(1), out=buf), R.transpose(1, 2))
        rv = torch.mul(R, v.unsqueeze(1), out=buf).sum(-1)
        torch.mul(R, v.unsqueeze(1), out=buf).sum(-1)  # the control variate's R(θ − μ)
        return K, rv, torch.mul(R, z.unsqueeze(-1), out=buf).sum(1)

    def factored():
        K, rv, rtz, pos = 0, 0, [], 0
        for (o, i), d, x, w, b in zip(LAYERS, delta, h, lam_w, lam_b):
            q = torch.einsum("tmi,toi,tni->tomn", x, w, x)  # per output unit: the inputs' Gram under Λ⁻¹
            K = K + torch.einsum("tmo,tno,tomn->tmn", d, d, q) + torch.einsum("tmo,to,tno->tmn", d, b, d)
            V, vb = v[:, pos:pos + o * i].reshape(T, o, i), v[:, pos + o * i:pos + o * i + o]
            pos += o * i + o
            rv = rv + ((d @ V) * x).sum(-1) + (d * vb.unsqueeze(1)).sum(-1)
            ((d @ V) * x).sum(-1)  # the control variate's
            dz = d * z.unsqueeze(-1)
            rtz += [(dz.transpose(1, 2) @ x).reshape(T, -1), dz.sum(1)]
        return K, rv, torch.cat(rtz, -1)

    for a, b in zip(dense(), factored()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    times = interleaved({"dense": dense, "factored": factored}, args.repeats)
    for name, ts in times.items():
        print(f"{name:9s} {statistics.median(ts) * 1e3:.2f} ms (fastest {min(ts) * 1e3:.2f})  "
              f"(T {T}, M {N}, D {R.shape[-1]}, one thread, calls alternated)")


if __name__ == "__main__":
    main()
