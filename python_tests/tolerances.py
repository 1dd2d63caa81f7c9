"""The element-wise tolerance the op tests share: errors relative to the magnitude of each formula's
terms, so cancellation in a result does not make a correct kernel fail."""
from __future__ import annotations

import torch

RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def assert_close(got, expected, scale, dtype):
    """|got − expected| <= rtol·(scale + |expected|) element-wise (scale: magnitude of the terms)."""
    for i, (a, e, s) in enumerate(zip(got, expected, scale)):
        assert a.dtype == dtype and a.shape == e.shape, i
        assert torch.isfinite(a).all(), i
        err = (a.double() - e).abs()
        assert (err <= RTOL[dtype] * (s + e.abs()) + 1e-300).all(), (i, (err / (s + 1e-30)).max())
