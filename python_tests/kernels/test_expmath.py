"""Accuracy (ulps) and IEEE special cases of the kernels' own exp / log / sincos(2πu)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gemext import _C

FNS = {"exp": 0, "log": 1, "sincos": 2}
DTYPES = [torch.float32, torch.float64]


def run(fn: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    y, y2 = torch.empty_like(x), torch.empty_like(x)
    _C.math(FNS[fn], int(x.dtype == torch.float64), x.data_ptr(), y.data_ptr(), y2.data_ptr(),
            x.numel())
    return y, y2


def ulps(got: torch.Tensor, exact: np.ndarray) -> float:
    """Max error in units of the last place of the exact value (float64 or longdouble)."""
    dtype = np.float32 if got.dtype == torch.float32 else np.float64
    spacing = np.spacing(np.abs(exact.astype(dtype))).astype(np.longdouble)
    err = np.abs(got.numpy().astype(np.longdouble) - exact) / spacing
    return float(err.max())


def exact(fn, x: torch.Tensor) -> np.ndarray:
    return fn(x.numpy().astype(np.longdouble))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_ulps(dtype):
    hi = 88.0 if dtype == torch.float32 else 709.0
    x = torch.cat([torch.linspace(-20, 10, 200_001, dtype=dtype),
                   torch.empty(100_000, dtype=dtype).uniform_(-hi, hi),
                   torch.empty(10_000, dtype=dtype).uniform_(-1e-3, 1e-3)])
    assert ulps(run("exp", x)[0], exact(np.exp, x)) <= 1.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_ulps(dtype):
    tiny = torch.finfo(dtype).tiny
    x = torch.cat([torch.exp(torch.empty(100_000, dtype=torch.float64).uniform_(-80, 80)).to(dtype),
                   torch.empty(50_000, dtype=dtype).uniform_(0.5, 2.0),
                   torch.tensor([tiny, tiny / 3, tiny / 2**20, 1.0, 2.0], dtype=dtype)])
    assert ulps(run("log", x)[0], exact(np.log, x)) <= 2.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_sincos_turns_abs_error(dtype):
    u = torch.rand(200_000, dtype=dtype)
    s, c = run("sincos", u)
    angle = 2 * np.pi * u.numpy().astype(np.longdouble)  # longdouble: exact enough for a reference
    eps = torch.finfo(dtype).eps
    assert np.abs(s.numpy() - np.sin(angle)).max() <= 1.5 * eps
    assert np.abs(c.numpy() - np.cos(angle)).max() <= 1.5 * eps
    quarter = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=dtype)
    s, c = run("sincos", quarter)
    assert s.tolist() == [0.0, 1.0, 0.0, -1.0] and c.tolist() == [1.0, 0.0, -1.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_special_values(dtype):
    big = 1000.0
    x = torch.tensor([math.nan, math.inf, -math.inf, big, -big, 0.0, -0.0], dtype=dtype)
    y = run("exp", x)[0]
    assert math.isnan(y[0]) and y[1] == math.inf and y[2] == 0.0 and y[3] == math.inf
    assert y[4] == 0.0 and y[5] == 1.0 and y[6] == 1.0
    # overflow threshold and the subnormal range agree with torch exactly
    finfo = torch.finfo(dtype)
    x_max = math.log(finfo.max)
    edge = torch.tensor([x_max - 1e-3, x_max + 1e-3, math.log(finfo.tiny) - 5.0,
                         math.log(finfo.tiny) - 10.0], dtype=dtype)
    torch.testing.assert_close(run("exp", edge)[0], torch.exp(edge), rtol=4 * finfo.eps, atol=0)
    assert torch.isinf(run("exp", edge)[0][1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_special_values(dtype):
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1.0], dtype=dtype)
    y = run("log", x)[0]
    assert math.isnan(y[0]) and y[1] == math.inf and math.isnan(y[2])
    assert y[3] == -math.inf and y[4] == -math.inf and math.isnan(y[5]) and y[6] == 0.0
