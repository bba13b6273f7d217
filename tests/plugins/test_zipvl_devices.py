"""zipvl's scoring, sparse attention, quantization and cache layer stay on the device they meet:
they run under ``FakeTensorMode`` on fake CUDA tensors on this CPU-only machine (see
tests/test_devices.py for how), in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, on_cuda
from vtoken_plugins.zipvl.cache import ZipLayer
from vtoken_plugins.zipvl.quant import quantize_keys, quantize_values
from vtoken_plugins.zipvl.ratio import (
    important_count,
    important_mask,
    probe_rows,
    probe_scores,
    top_sets,
    widen_to_widest,
)
from vtoken_plugins.zipvl.sparse import sparse_attention

B, H, G, T, D = 2, 4, 2, 10, 8


pytestmark = pytest.mark.usefixtures("fake_mode")  # every test on fake CUDA tensors (conftest)


def randn(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=CUDA)


def valid() -> torch.Tensor:
    return torch.ones(B, T, dtype=torch.bool, device=CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scoring_and_selection(dtype):
    query, key = randn(B, H, T, D, dtype=dtype), randn(B, G, T, D, dtype=dtype)
    rows, pad = probe_rows(valid(), 0.2, 0.2, torch.Generator().manual_seed(0))
    groups = probe_scores(query, key, None, rows, pad, 0.3)
    count = important_count(groups.sum(1), valid(), 0.9)
    forced = torch.zeros(B, T, dtype=torch.bool, device=CUDA)
    high = widen_to_widest(
        groups.sum(1), important_mask(groups.sum(1), count, valid(), forced), valid(), forced
    )
    sets = top_sets(groups, count, valid(), forced)
    assert on_cuda(rows, groups, count, high, sets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention(dtype):
    def base(module, q, k, v, mask, **kwargs):  # transformers' (B, q, H, d) output layout
        return torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        ).transpose(1, 2), None

    query, key, value = (
        randn(B, H, T, D, dtype=dtype),
        randn(B, G, T, D, dtype=dtype),
        randn(B, G, T, D, dtype=dtype),
    )
    sets = torch.arange(4, device=CUDA).expand(B, G, 4)
    out, _ = sparse_attention(base, None, query, key, value, None, sets, valid())
    assert on_cuda(out) and out.shape == (B, T, H, D) and out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantization_and_the_cache_layer(dtype):
    x = randn(B, G, T, D, dtype=dtype)
    keys, values = quantize_keys(x, 4), quantize_values(x, 2)
    assert on_cuda(keys.codes, keys.dequantize(dtype), values.dequantize(dtype))
    layer = ZipLayer(4, 2)
    layer.update(x, x)
    high = torch.arange(T, device=CUDA).expand(B, T) % 2 == 0
    layer.flush(high, ~high)
    got, _ = layer.update(randn(B, G, 1, D, dtype=dtype), randn(B, G, 1, D, dtype=dtype))
    layer.add_queries(randn(B, H, 1, D, dtype=dtype))
    layer.crop(-1)
    layer.reorder_cache(torch.tensor([1, 0], device=CUDA))
    assert on_cuda(got, layer.positions, *(t.positions for t in layer.tiers)) and got.dtype == dtype
