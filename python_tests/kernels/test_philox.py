"""Philox-4x32-10 and the ε stream against a scalar pure-Python reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gemext import _C, ops, reference

# Random123 known-answer vectors: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
MASK = 0xFFFFFFFF


def philox_scalar(ctr: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
        k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
    return c0, c1, c2, c3


def eps_scalar(seed: int, offset: int, i: int, dtype: torch.dtype) -> float:
    """ε of global element i, one element at a time (the documented formula)."""
    g = i // 4
    w = philox_scalar((g & MASK, g >> 32, offset & MASK, offset >> 32), (seed & MASK, seed >> 32))
    if dtype == torch.float32:
        u = [((x >> 8) + 0.5) * 2.0**-24 for x in w]
    else:
        u = [(x + 0.5) * 2.0**-32 for x in w]
    p = (i % 4) // 2
    r = math.sqrt(-2.0 * math.log(u[2 * p]))
    angle = 2.0 * math.pi * u[2 * p + 1]
    return r * (math.cos(angle) if i % 2 == 0 else math.sin(angle))


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers(ctr, key, expected):
    assert philox_scalar(ctr, key) == expected
    assert tuple(_C.philox4x32_10(ctr, key)) == expected
    words = reference.philox4x32_10([np.array([c], dtype=np.uint64) for c in ctr], key)
    assert tuple(int(w[0]) for w in words) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 5, 2**33 + 1), (2**63 - 1, 12345)])
def test_eps_stream_matches_scalar_reference(dtype, seed, offset):
    n = 301
    expected = torch.tensor([eps_scalar(seed, offset, i, dtype) for i in range(n)],
                            dtype=torch.float64)
    torch.testing.assert_close(reference.normal(seed, offset, n, dtype), expected,
                               rtol=1e-13, atol=1e-13)
    zeros = torch.zeros(n, dtype=dtype)
    got = ops.sample(zeros, zeros, seed, offset).double()  # μ=0, σ=exp(0)=1 exactly: θ = ε
    tol = 3e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_reference_normal_start_offset_is_a_slice():
    full = reference.normal(7, 3, 50)
    torch.testing.assert_close(reference.normal(7, 3, 37, start=13), full[13:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eps_moments(dtype):
    x = torch.zeros(10**6, dtype=dtype)
    eps = ops.sample(x, x, ops.new_seed(), 0).double()
    assert abs(eps.mean().item()) < 5e-3  # 5 standard errors
    assert abs(eps.var().item() - 1) < 1e-2
    assert abs(((eps**4).mean() - 3).item()) < 0.05  # Gaussian kurtosis
    assert abs((eps[:-1] * eps[1:]).mean().item()) < 5e-3  # neighbours uncorrelated
