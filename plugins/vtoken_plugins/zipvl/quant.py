"""Low-bit KV storage: asymmetric min-max quantization, really packed into ``uint8``.

ZipCache (He et al., 2024) quantizes keys **per channel** (a scale and zero point per channel,
shared by the tokens of a block: keys have outlier channels) and values **channel-separably
token-wise**: each channel is divided by ``c = sqrt(max_t |v|)`` (per channel), then each token is
quantized over its channels, and ``c`` is multiplied back on dequantization.

With ``b`` bits, ``scale = (max - min) / (2^b - 1)`` and ``x_hat = code * scale + min``, so every
element is within ``scale / 2`` of the original (``c * scale / 2`` for values). The metadata are
stored in float16, rounded outward (the zero point down, the scale up) so that the stored range
still covers every element and the bound holds for the stored values.

Codes are packed along the channel axis (``8 / b`` codes per byte, the lowest bits first), so a
token's codes stay contiguous and dropping tokens is a gather on the token axis.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

PACKABLE_BITS = (2, 4, 8)
META = torch.float16


def pack(codes: Tensor, bits: int) -> Tensor:
    """``(..., d)`` integer codes below ``2^bits`` -> ``(..., d * bits / 8)`` uint8."""
    grouped = codes.to(torch.uint8).unflatten(-1, (-1, 8 // bits))  # (..., d / per_byte, per_byte)
    return (grouped * _places(bits, codes.device)).sum(-1, dtype=torch.uint8)  # disjoint bit fields


def unpack(packed: Tensor, bits: int) -> Tensor:
    """``(..., d * bits / 8)`` uint8 -> ``(..., d)`` uint8 codes (inverse of :func:`pack`)."""
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], -1).flatten(-2)


def _places(bits: int, device: torch.device) -> Tensor:
    """``2^(bits * i)`` for each code slot ``i`` of a byte (uint8): the value of its lowest bit."""
    return (2 ** (torch.arange(8 // bits, device=device) * bits)).to(torch.uint8)


def _down(x: Tensor) -> Tensor:
    """float16 value <= ``x`` (float32), as close as possible."""
    half = x.to(META)
    below = torch.nextafter(half, torch.full_like(half, float("-inf")))
    return torch.where(half.float() > x, below, half)


def _up(x: Tensor) -> Tensor:
    """float16 value >= ``x`` (float32), as close as possible."""
    half = x.to(META)
    above = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() < x, above, half)


def _minmax_codes(x: Tensor, dim: int, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes of ``x`` (float32) with a min-max range over ``dim``; returns codes, scale, zero."""
    levels = (1 << bits) - 1
    zero = _down(x.amin(dim, keepdim=True))
    scale = _up((x.amax(dim, keepdim=True) - zero.float()) / levels)
    safe = scale.float().clamp(min=torch.finfo(META).tiny)
    codes = ((x - zero.float()) / safe).round().clamp(0, levels)
    return codes, scale, zero


@dataclass
class Quantized:
    """One block of keys or values at ``bits`` bits.

    Attributes:
        codes: ``(B, H, n, d * bits / 8)`` packed uint8 codes.
        scale, zero: float16, ``(B, H, 1, d)`` for keys (per channel), ``(B, H, n, 1)`` for values
            (per token).
        channel: ``(B, H, 1, d)`` float16 channel divisors ``c`` of values; ``None`` for keys.
        bits: bit width.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    channel: Tensor | None
    bits: int

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """``(B, H, n, d)`` in ``dtype``."""
        x = unpack(self.codes, self.bits).float() * self.scale.float() + self.zero.float()
        if self.channel is not None:
            x = x * self.channel.float()
        return x.to(dtype)

    def nbytes(self) -> int:
        tensors = (self.codes, self.scale, self.zero, self.channel)
        return sum(t.nbytes for t in tensors if t is not None)

    def map_tokens(self, fn) -> Quantized:
        """Apply ``fn`` to the tensors with a token axis (codes; per-token scale and zero)."""
        per_token = self.channel is not None
        return replace(
            self,
            codes=fn(self.codes),
            scale=fn(self.scale) if per_token else self.scale,
            zero=fn(self.zero) if per_token else self.zero,
        )

    def map_batch(self, fn) -> Quantized:
        """Apply ``fn`` to every tensor (batch-axis operations: beam reordering, repeats)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "bits"}
        return replace(self, **{k: fn(v) for k, v in tensors.items() if v is not None})


def quantize_keys(keys: Tensor, bits: int) -> Quantized:
    """Per-channel quantization of ``(B, H, n, d)`` keys (the range of each channel over the n tokens)."""
    codes, scale, zero = _minmax_codes(keys.float(), -2, bits)
    return Quantized(pack(codes, bits), scale, zero, None, bits)


def quantize_values(values: Tensor, bits: int) -> Quantized:
    """Channel-separable token-wise quantization of ``(B, H, n, d)`` values."""
    x = values.float()
    channel = _up(x.abs().amax(-2, keepdim=True).sqrt()).clamp(min=torch.finfo(META).tiny)
    codes, scale, zero = _minmax_codes(x / channel.float(), -1, bits)
    return Quantized(pack(codes, bits), scale, zero, channel, bits)
