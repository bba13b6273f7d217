"""temporal_smoother's building blocks (attention-to-map mapping, the history, the selection) stay
on the device they meet: they run under ``FakeTensorMode`` on fake CUDA tensors on this CPU-only
machine (see tests/test_devices.py), in float32 and bfloat16. The plugin's wiring around them
(``select``, the frame commit) runs on real CPU models only (tests/plugins/test_temporal_smoother.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, on_cuda
from vtoken_plugins.temporal_smoother.importance import on_view, to_visual
from vtoken_plugins.temporal_smoother.selection import dual_select
from vtoken_plugins.temporal_smoother.smoother import History

from vtoken import VisualLayout

B, N, T, D = 2, 6, 10, 8


pytestmark = pytest.mark.usefixtures("fake_mode")  # every test on fake CUDA tensors (conftest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maps_from_attention(dtype):
    positions = torch.arange(2, 2 + N, device=CUDA).expand(B, N)
    layout = VisualLayout(positions, torch.zeros(B, N, dtype=torch.long, device=CUDA))
    weights = torch.rand(B, T, dtype=dtype, device=CUDA)
    keys = torch.arange(T, device=CUDA).expand(B, T)
    scores, seen = to_visual(weights, keys, layout, T)
    assert on_cuda(scores, seen, on_view(scores, layout, T, positions[:, :3]))


@pytest.mark.parametrize("fill", ["zero", "carry"])
@pytest.mark.parametrize("normalize", ["sum", "frame"])
def test_history(fill, normalize):
    history = History(3, 0.8, "newest_first", normalize, fill)
    observed = torch.ones(B, N, dtype=torch.bool, device=CUDA)
    for _ in range(4):
        estimate = history.estimate()
        stored = history.push(torch.rand(B, N, device=CUDA), observed, estimate)
        assert on_cuda(stored)
    assert on_cuda(history.estimate(), history.shown())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("share", [1.0, 0.5])
def test_selection(dtype, share):
    levels = [torch.rand(B, N, dtype=dtype, device=CUDA) for _ in range(2)]
    features = torch.randn(B, N, D, dtype=dtype, device=CUDA)
    pad = torch.zeros(B, N, dtype=torch.bool, device=CUDA)
    keep = dual_select(levels, features, pad, torch.full((B,), 2, device=CUDA), share, steps=N)
    assert on_cuda(keep) and keep.dtype == torch.bool and keep.shape == (B, N)
